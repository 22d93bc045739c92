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
from typing import Any

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.protocol.dimse import OUT_OF_RESOURCES
from dicom_tls_proxy.store import dicomfile
from dicom_tls_proxy.store.incoming import Incoming
from dicom_tls_proxy.store.records import (
    Meta,
    Refused,
    SpoolError,
    Usage,
    fsync_folder,
    write_json,
)

__all__ = ["Incoming", "Meta", "Refused", "Spool", "SpoolError", "Usage", "route_usage"]

FAILED = "failed"
LOCK = ".forwarder.lock"
USAGE_TTL = 1.0  # seconds a scan of the spool's size is trusted (other workers add to it)
KNOWN_LIMIT = 8192  # queue entries remembered before those no longer there are forgotten
ORPHAN_AGE = 24 * 3600.0  # a temporary file this old is removed even if its pid is alive again


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
    # What this process read of the queue's JSON files: the forwarder looks at the queue once
    # per association and per LINGER, and a JSON does not change but by this process's hand.
    _known: dict[str, Meta] = field(default_factory=dict, repr=False)

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
        self.check_room(0)
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

    def check_room(self, more: int) -> None:
        if self.max_bytes and self.used() + more > self.max_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                f"spool_max_bytes ({self.max_bytes}) would be passed: {self.used()} bytes "
                f"are spooled in {self.folder}",
            )

    def added(self, size: int) -> None:
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
        known = self._known if folder == self.folder else {}
        out: list[Meta] = []
        for name in names[:limit]:
            ident = name[: -len(".dcm")]
            meta = known.get(ident) or self._read_meta(folder, ident)
            if meta is not None:
                known[ident] = meta
                out.append(meta)
        if len(known) > KNOWN_LIMIT:  # instances gone by another process's hand
            present = {name[: -len(".dcm")] for name in names}
            for ident in [i for i in known if i not in present]:
                del known[ident]
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
        fsync_folder(self.folder)
        self._known.pop(meta.id, None)
        self._used -= meta.size

    def attempted(self, meta: Meta, error: str) -> Meta:
        """Count a failed attempt in the instance's JSON (best effort: not fsynced)."""
        updated = replace(meta, attempts=meta.attempts + 1, last_error=error)
        with contextlib.suppress(OSError):
            write_json(self.folder / f"{meta.id}.json", asdict(updated), durable=False)
        self._known[meta.id] = updated
        return updated

    def fail(self, meta: Meta, reason: str) -> Meta:
        """Refused for good: move it to failed/ with `reason` in its JSON."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        updated = replace(meta, attempts=meta.attempts + 1, failed_reason=reason, failed_at=now)
        target = self.failed_folder
        write_json(target / f"{meta.id}.json", asdict(updated), durable=True)
        os.replace(self.folder / f"{meta.id}.dcm", target / f"{meta.id}.dcm")
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"{meta.id}.json").unlink()
        fsync_folder(target)
        fsync_folder(self.folder)
        self._known.pop(meta.id, None)
        return updated

    def retry_failed(self) -> int:
        """Move every failed instance back into the queue, its attempts counted from 0 again."""
        moved = 0
        for meta in self.failed():
            fresh = replace(meta, attempts=0, last_error="", failed_reason="", failed_at="")
            write_json(self.folder / f"{meta.id}.json", asdict(fresh), durable=True)
            os.replace(self.failed_folder / f"{meta.id}.dcm", self.folder / f"{meta.id}.dcm")
            with contextlib.suppress(FileNotFoundError):
                (self.failed_folder / f"{meta.id}.json").unlink()
            moved += 1
        if moved:
            fsync_folder(self.folder)
            fsync_folder(self.failed_folder)
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


def _meta_from_file(path: Path, ident: str) -> Meta | None:
    """An instance's JSON rebuilt from its file meta (the JSON was lost); None if unreadable.
    Only the attempts so far are lost."""
    facts = dicomfile.read_meta(path)
    if facts is None:
        return None
    received = int(ident.split("-", 1)[0]) / 1e9
    return Meta(
        id=ident,
        calling_ae=facts.calling_ae,
        called_ae=facts.called_ae,
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
