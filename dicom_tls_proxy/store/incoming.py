"""One instance arriving in a spool, from its C-STORE-RQ to durable or gone: pieces of its data
set held in memory up to FLUSH_AT, then written to a temporary file; `finish` makes it a complete
DICOM Part-10 file in the spool, checked to parse, or leaves nothing.

Why apart from `spool`: this is the write path the modality waits on (its C-STORE-RSP comes after
`finish`), and the order of its steps is the durability promise; the spool is the folder and what
the forwarder does with it.

What it must never do: return from `finish` before the data file and its folder entry are on disk;
leave a partial file where the forwarder looks; import trio (the caller runs the blocking calls in
a thread).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO, Protocol

from dicom_tls_proxy.protocol.dimse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from dicom_tls_proxy.store import dicomfile
from dicom_tls_proxy.store.records import Meta, Refused, fsync_folder, write_json

FLUSH_AT = 4 << 20  # bytes of a data set held in memory before they are written out


class Room(Protocol):
    """The spool an instance arrives in (`spool.Spool` is one): where, as which implementation,
    and whether there is room."""

    folder: Path
    implementation_class_uid: str
    implementation_version_name: str

    def check_room(self, more: int) -> None:
        """Refused (0xA700) when `more` bytes would pass spool_max_bytes."""

    def added(self, size: int) -> None:
        """`size` bytes more are in the spool."""


class Incoming:
    """One instance being received: its data set is held in memory up to FLUSH_AT bytes, then
    written to the temporary file; `finish` makes it durable. Every method blocks (file I/O):
    the caller runs `flush`, `finish` and `discard` in a thread."""

    def __init__(self, spool: Room, meta: Meta) -> None:
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
        self.spool.check_room(self.size)
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
            called_ae=meta.called_ae,
            implementation_class_uid=spool.implementation_class_uid,
            implementation_version_name=spool.implementation_version_name,
        )
        handle.write(header)
        self.meta = replace(self.meta, data_offset=len(header))
        return handle

    def finish(self) -> Meta:
        """Write the rest, check that the data set parses as its transfer syntax, fsync, write
        the JSON, rename, fsync the folder: durable. Refused (0xA700 or 0xC000) otherwise, and
        nothing is left behind. The JSON is written in place and not fsynced: the file meta says
        all of it but the attempts (`dicomfile.read_meta`), so a JSON a crash left empty or
        half written is rebuilt from the instance; one file created and one fsync less per
        instance (measured: inode allocation and fsyncs were most of the ingest's cost)."""
        try:
            self.flush()
            assert self._file is not None
            self._file.flush()
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
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            write_json(final.with_suffix(".json"), asdict(meta), durable=False, in_place=True)
            os.replace(self.path, final.with_suffix(".dcm"))
            fsync_folder(self.spool.folder)
        except OSError as exc:
            self.discard()
            with contextlib.suppress(OSError):
                final.with_suffix(".json").unlink()
            with contextlib.suppress(OSError):
                final.with_suffix(".dcm").unlink()
            raise Refused(OUT_OF_RESOURCES, f"storing {final}.dcm failed: {exc}") from None
        self.spool.added(self.size + meta.data_offset)
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
