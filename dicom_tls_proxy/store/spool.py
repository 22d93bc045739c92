"""The spool of a store-and-forward route: DICOM instances on disk, durable before they are
acknowledged, removed only once the upstream has them.

Why this exists: "acknowledged means on disk, nothing lost" (issue 14). An instance arrives through
`Incoming`: a DICOM Part-10 file (preamble and file meta written with pydicom, then the data set
bytes exactly as received) under a temporary name, fsynced, checked to parse, renamed, and the
folder fsynced; only then may the modality get Success. Beside each instance a small JSON file says
what forwarding needs (Calling and Called AE, SOP class and instance, transfer syntax, when
received, the attempts so far). The forwarder takes them oldest first (`queued`), removes what the
upstream took (`delivered`) and moves what it refused for good to `failed/` with the reason
(`fail`); `retry_failed` puts those back.

Layout (folders 0700, files 0600):
    SPOOL/<id>.dcm, SPOOL/<id>.json        queued, <id> sorts oldest first
    SPOOL/<id>.<pid>.tmp                    being written by process <pid>
    SPOOL/failed/<id>.dcm, <id>.json       refused for good, the reason in the JSON
    SPOOL/.forwarder.lock                   held (flock) by the one process that forwards

What it must never do: acknowledge (return from `Incoming.finish`) before the file and the folder
entry are on disk; leave a partial file where the forwarder looks; delete another process's file
being written (a temporary file is removed only once its process is gone); import trio (the
blocking calls are the caller's to run in a thread); log (the caller says what happened).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.protocol.dimse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from dicom_tls_proxy.store import dicomfile

FAILED = "failed"
LOCK = ".forwarder.lock"
FLUSH_AT = 4 << 20  # bytes of a data set held in memory before they are written out
USAGE_TTL = 1.0  # seconds a scan of the spool's size is trusted (other workers add to it)
ORPHAN_AGE = 24 * 3600.0  # a temporary file this old is removed even if its pid is alive again


class Refused(Exception):
    """The instance cannot be stored; `status` is the C-STORE-RSP status to answer (0xA700 out of
    resources, 0xC000 cannot understand), the message says why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class SpoolError(Exception):
    """The spool folder cannot be used (created, written); the message says why."""


@dataclass(frozen=True)
class Meta:
    """What the JSON beside an instance says."""

    id: str
    calling_ae: str
    called_ae: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    received: str  # ISO 8601 UTC
    size: int  # bytes of the data set
    data_offset: int  # where the data set starts in the .dcm file
    attempts: int = 0
    last_error: str = ""
    failed_reason: str = ""
    failed_at: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Meta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Usage:
    """A spool's contents, as `spool` and the metrics show them."""

    queued: int = 0
    queued_bytes: int = 0
    oldest: float | None = None  # POSIX time the oldest queued instance was received
    failed: int = 0
    failed_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.queued_bytes + self.failed_bytes

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        age = None if self.oldest is None else max(0.0, (now or time.time()) - self.oldest)
        return {
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "oldest_age_s": None if age is None else round(age, 1),
            "failed": self.failed,
            "failed_bytes": self.failed_bytes,
        }


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any], *, durable: bool) -> None:
    """Write `path` whole or not at all (temporary name, rename; the temporary file removed if
    that fails)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, json.dumps(data, sort_keys=True).encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Spool:
    """One route's spool folder. `max_bytes` 0: no limit. Shared by every worker; each keeps its
    own short-lived estimate of the size (`used`)."""

    folder: Path
    max_bytes: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    _used: int = field(default=0, repr=False)
    _used_at: float = field(default=float("-inf"), repr=False)
    _sequence: int = field(default=0, repr=False)

    @property
    def failed_folder(self) -> Path:
        return self.folder / FAILED

    def prepare(self) -> None:
        """Create the folders (0700) if needed; SpoolError when that fails."""
        for folder in (self.folder, self.failed_folder):
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise SpoolError(f"cannot create {folder}: {exc.strerror or exc}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise SpoolError(f"{folder} is not writable by this user")

    # -- storing ----------------------------------------------------------------------------

    def begin(
        self,
        *,
        calling_ae: str,
        called_ae: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
    ) -> Incoming:
        """An instance about to arrive; Refused (0xA700) if the spool is full already."""
        self._check_room(0)
        self._sequence += 1
        now = time.time()
        ident = f"{time.time_ns():019d}-{os.getpid()}-{self._sequence:06d}"
        meta = Meta(
            id=ident,
            calling_ae=calling_ae,
            called_ae=called_ae,
            sop_class=sop_class,
            sop_instance=sop_instance,
            transfer_syntax=transfer_syntax,
            received=datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            size=0,
            data_offset=0,
        )
        return Incoming(self, meta)

    def used(self) -> int:
        """Bytes in the spool (queued and failed), rescanned at most every USAGE_TTL seconds."""
        if time.monotonic() - self._used_at > USAGE_TTL:
            self._used, self._used_at = self.usage().bytes, time.monotonic()
        return self._used

    def _check_room(self, more: int) -> None:
        if self.max_bytes and self.used() + more > self.max_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                f"spool_max_bytes ({self.max_bytes}) would be passed: {self.used()} bytes "
                f"are spooled in {self.folder}",
            )

    def _added(self, size: int) -> None:
        self._used += size

    # -- forwarding -------------------------------------------------------------------------

    def queued(self, limit: int | None = None) -> list[Meta]:
        """The queued instances, oldest first (at most `limit`)."""
        return self._metas(self.folder, limit)

    def failed(self) -> list[Meta]:
        return self._metas(self.failed_folder, None)

    def _metas(self, folder: Path, limit: int | None) -> list[Meta]:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".dcm"))
        except FileNotFoundError:
            return []
        out: list[Meta] = []
        for name in names[:limit]:
            meta = self._read_meta(folder, name[: -len(".dcm")])
            if meta is not None:
                out.append(meta)
        return out

    def _read_meta(self, folder: Path, ident: str) -> Meta | None:
        try:
            return Meta.from_json(json.loads((folder / f"{ident}.json").read_text()))
        except FileNotFoundError:
            if not (folder / f"{ident}.dcm").exists():
                return None  # delivered or moved meanwhile (another worker)
            return _meta_from_file(folder / f"{ident}.dcm", ident)
        except (OSError, ValueError, TypeError):
            return _meta_from_file(folder / f"{ident}.dcm", ident)

    def path_of(self, meta: Meta) -> Path:
        return self.folder / f"{meta.id}.dcm"

    def delivered(self, meta: Meta) -> None:
        """The upstream has it: remove it, durably."""
        for suffix in (".dcm", ".json"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{meta.id}{suffix}").unlink()
        _fsync_folder(self.folder)
        self._used -= meta.size

    def attempted(self, meta: Meta, error: str) -> Meta:
        """Count a failed attempt in the instance's JSON (best effort: not fsynced)."""
        updated = replace(meta, attempts=meta.attempts + 1, last_error=error)
        with contextlib.suppress(OSError):
            _write_json(self.folder / f"{meta.id}.json", asdict(updated), durable=False)
        return updated

    def fail(self, meta: Meta, reason: str) -> Meta:
        """Refused for good: move it to failed/ with `reason` in its JSON."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        updated = replace(meta, attempts=meta.attempts + 1, failed_reason=reason, failed_at=now)
        target = self.failed_folder
        _write_json(target / f"{meta.id}.json", asdict(updated), durable=True)
        os.replace(self.folder / f"{meta.id}.dcm", target / f"{meta.id}.dcm")
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"{meta.id}.json").unlink()
        _fsync_folder(target)
        _fsync_folder(self.folder)
        return updated

    def retry_failed(self) -> int:
        """Move every failed instance back into the queue, its attempts counted from 0 again."""
        moved = 0
        for meta in self.failed():
            fresh = replace(meta, attempts=0, last_error="", failed_reason="", failed_at="")
            _write_json(self.folder / f"{meta.id}.json", asdict(fresh), durable=True)
            os.replace(self.failed_folder / f"{meta.id}.dcm", self.folder / f"{meta.id}.dcm")
            with contextlib.suppress(FileNotFoundError):
                (self.failed_folder / f"{meta.id}.json").unlink()
            moved += 1
        if moved:
            _fsync_folder(self.folder)
            _fsync_folder(self.failed_folder)
        return moved

    def remove_orphans(self) -> list[str]:
        """Remove the temporary files of interrupted writes (their process is gone, or they are
        older than ORPHAN_AGE) and JSON files without their instance; their names."""
        removed = []
        now = time.time()
        for folder in (self.folder, self.failed_folder):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            names = {e.name for e in entries}
            for entry in entries:
                name = entry.name
                if name.endswith(".tmp"):
                    pid = name.rsplit(".", 2)[-2]
                    try:
                        old = now - entry.stat().st_mtime > ORPHAN_AGE
                    except FileNotFoundError:
                        continue
                    if pid.isdigit() and _pid_alive(int(pid)) and not old:
                        continue
                elif not (name.endswith(".json") and name[:-5] + ".dcm" not in names):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(name)
        return removed

    def usage(self) -> Usage:
        counts = {}
        oldest = None
        for folder in (self.folder, self.failed_folder):
            count = size = 0
            try:
                for entry in os.scandir(folder):
                    if entry.name.endswith(".dcm"):
                        with contextlib.suppress(FileNotFoundError):
                            size += entry.stat().st_size
                            count += 1
                            if folder == self.folder:
                                received = int(entry.name.split("-", 1)[0]) / 1e9
                                oldest = received if oldest is None else min(oldest, received)
            except FileNotFoundError:
                pass
            counts[folder] = (count, size)
        (queued, queued_bytes), (failed, failed_bytes) = counts.values()
        return Usage(queued, queued_bytes, oldest, failed, failed_bytes)

    @contextlib.contextmanager
    def forwarder_lock(self) -> Iterator[bool]:
        """Hold the spool's forwarder lock while the block runs, if no other process holds it
        (True); released when the block ends or the process dies."""
        try:
            fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                yield False
                return
            yield True
        finally:
            os.close(fd)


class Incoming:
    """One instance being received: its data set is held in memory up to FLUSH_AT bytes, then
    written to the temporary file; `finish` makes it durable. Every method blocks (file I/O):
    the caller runs `flush`, `finish` and `discard` in a thread."""

    def __init__(self, spool: Spool, meta: Meta) -> None:
        self.spool = spool
        self.meta = meta
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.size = 0  # data set bytes received so far
        self.path = spool.folder / f"{meta.id}.{os.getpid()}.tmp"
        self._file: IO[bytes] | None = None

    def add(self, data: bytes | memoryview) -> bool:
        """Take a piece of the data set; True when enough is held to `flush` it. Refused when
        the spool would pass spool_max_bytes."""
        self.size += len(data)
        self.spool._check_room(self.size)
        self.pending.append(bytes(data))
        self.pending_bytes += len(data)
        return self.pending_bytes >= FLUSH_AT

    def flush(self) -> None:
        """Write what is held; Refused (0xA700) when the write fails (disk full...)."""
        try:
            if self._file is None:
                self._file = self._open()
            self._file.writelines(self.pending)
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"writing {self.path} failed: {exc}") from None
        self.pending.clear()
        self.pending_bytes = 0

    def _open(self) -> IO[bytes]:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        handle = os.fdopen(fd, "wb")
        meta, spool = self.meta, self.spool
        header = dicomfile.header(
            sop_class=meta.sop_class,
            sop_instance=meta.sop_instance,
            transfer_syntax=meta.transfer_syntax,
            calling_ae=meta.calling_ae,
            implementation_class_uid=spool.implementation_class_uid,
            implementation_version_name=spool.implementation_version_name,
        )
        handle.write(header)
        self.meta = replace(self.meta, data_offset=len(header))
        return handle

    def finish(self) -> Meta:
        """Write the rest, fsync, check that the data set parses as its transfer syntax, write
        the JSON, rename, fsync the folder: durable. Refused (0xA700 or 0xC000) otherwise, and
        nothing is left behind."""
        try:
            self.flush()
            assert self._file is not None
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        except OSError as exc:
            self.discard()
            raise Refused(OUT_OF_RESOURCES, f"writing {self.path} failed: {exc}") from None
        except Refused:
            self.discard()
            raise
        meta = self.meta
        problem = dicomfile.data_set_problem(self.path, meta.data_offset, meta.transfer_syntax)
        if problem:
            self.discard()
            raise Refused(CANNOT_UNDERSTAND, problem)
        meta = replace(meta, size=self.size)
        final = self.spool.folder / f"{meta.id}"
        try:
            _write_json(final.with_suffix(".json"), asdict(meta), durable=True)
            os.replace(self.path, final.with_suffix(".dcm"))
            _fsync_folder(self.spool.folder)
        except OSError as exc:
            self.discard()
            with contextlib.suppress(OSError):
                final.with_suffix(".json").unlink()
            with contextlib.suppress(OSError):
                final.with_suffix(".dcm").unlink()
            raise Refused(OUT_OF_RESOURCES, f"storing {final}.dcm failed: {exc}") from None
        self.spool._added(self.size + meta.data_offset)
        return meta

    def discard(self) -> None:
        """Drop the instance: nothing of it stays on disk."""
        self.pending.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _meta_from_file(path: Path, ident: str) -> Meta | None:
    """An instance's JSON rebuilt from its file meta (the JSON was lost); None if unreadable.
    The Called AE is not in the file: the forwarder then uses the route's."""
    facts = dicomfile.read_meta(path)
    if facts is None:
        return None
    received = int(ident.split("-", 1)[0]) / 1e9
    return Meta(
        id=ident,
        calling_ae=facts.calling_ae,
        called_ae="",
        sop_class=facts.sop_class,
        sop_instance=facts.sop_instance,
        transfer_syntax=facts.transfer_syntax,
        received=datetime.fromtimestamp(received, UTC).isoformat(timespec="milliseconds"),
        size=facts.size,
        data_offset=facts.data_offset,
    )


def route_usage(config: Config) -> dict[str, dict[str, Any]]:
    """Each store-and-forward route's spool, as /readyz, the metrics and the status page show
    it: queued instances and bytes, the oldest one's age, failed instances; read from the folders,
    so it is the same in every worker and in the supervisor."""
    return {
        route.name: Spool(route.spool).usage().as_json()
        for route in config.routes
        if route.stores and route.spool is not None
    }
