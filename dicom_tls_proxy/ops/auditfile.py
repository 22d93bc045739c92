"""The audit trail: `[audit] file`, one JSON object per line, per association and per notable event.

Why a file beside the log: the log is for operators and rate-limits refusals; an audit trail must
hold every association, accepted or refused, and survive a crash, so it is appended and fsynced.

How it stays out of the way of traffic:

- `audit.emit` hands each line to `put`, which only does `send_nowait` on a bounded memory channel.
  A full channel (the disk cannot keep up) drops the line and counts it; a connection task never
  waits for the disk.
- One writer task takes whatever has arrived, at most once per `interval` (1 s), and writes and
  fsyncs it in a worker thread (`trio.to_thread`), so a slow disk never stalls the event loop.
- Failures (disk full, folder removed, file replaced by a folder, permissions) are counted, logged
  as one rate-limited `audit-failed` line, and never stop traffic; the lines of a failed batch are
  lost and counted as dropped. The next batch tries again.

Why several workers (`workers = N`) never interleave: each opens the file with O_APPEND and writes
each batch, whole lines only, with one `os.write`. PIPE_BUF is no help here (it is about pipes and
FIFOs); for a regular file on a local filesystem (ext4, XFS, btrfs, tmpfs) Linux holds the inode
lock for the whole of one write() and moves the offset to the end under it, so two processes'
O_APPEND writes land one after the other, never mixed. One write per batch rather than per line:
fewer system calls, and the same guarantee. NFS gives no such guarantee: keep the file local.
A short write (only when the disk fills mid-write) leaves a cut line; the next batch starts with a
newline so the cut stays on its own line.

Rotation: before each batch the writer compares the path's inode with the open file's; when the
file was renamed or removed (logrotate without copytruncate) it opens a new one at the path. A new
file is created with mode 0640 (never wider; the umask may narrow it).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import trio

from dicom_tls_proxy.ops.audit import AssociationRecord, event
from dicom_tls_proxy.ops.ratelimit import Throttle

CAPACITY = 10_000  # lines waiting for the writer: about ten seconds of a very busy gateway
INTERVAL = 1.0  # seconds between two write+fsync batches, at most
REPORT_INTERVAL = 60.0  # seconds between two audit-failed (or audit-dropped) log lines
MODE = 0o640
_UNSYNCABLE = {errno.EINVAL, errno.EOPNOTSUPP}  # fsync on a pipe or character device (/dev/stdout)


class AuditFile:
    """One process's writer of the audit file; a sink of `audit.emit` and `audit.event`."""

    def __init__(
        self,
        path: Path,
        *,
        extra: dict[str, Any] | None = None,
        capacity: int = CAPACITY,
        interval: float = INTERVAL,
    ) -> None:
        self.path = path
        self.extra = extra or {}  # fields on every line, such as the worker number
        self.interval = interval
        self._send, self._receive = trio.open_memory_channel[bytes](capacity)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._cut = False  # the last write stopped inside a line
        self._closed = False
        self._failing = False
        self._failure_lines = Throttle(REPORT_INTERVAL)
        self._drop_lines = Throttle(REPORT_INTERVAL)
        self.written = 0  # lines written and fsynced
        self.dropped = 0  # lines lost: channel full, or their batch failed
        self.failures = 0  # failed batches (open, write or fsync)

    # -- the sink interface (synchronous, never waits) ------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        self.put(fields)

    def event(self, fields: dict[str, Any]) -> None:
        self.put(fields)

    def put(self, fields: dict[str, Any]) -> None:
        """Queue one line. ASCII-only JSON: any AE title or subject stays one valid line."""
        line = {"ts": fields.get("ts"), **self.extra, **fields}
        data = (json.dumps(line, ensure_ascii=True, default=str) + "\n").encode("ascii")
        if self._closed:
            self.dropped += 1
            return
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            self.dropped += 1
            if self._drop_lines.due():
                event(
                    "audit-dropped",
                    logging.ERROR,
                    file=str(self.path),
                    dropped=self.dropped,
                    msg="the audit file cannot keep up; lines are dropped, traffic goes on",
                )

    # -- the writer ---------------------------------------------------------------------

    def open(self) -> None:
        """Open (create) the file at start, so a problem shows in the log at once; a failure
        is reported and retried with the first batch, never fatal."""
        try:
            self._ensure_open()
        except OSError as exc:
            self._report_failure(exc, 0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: waits for a line, lets a second's worth gather, writes them in one
        batch and fsyncs; on cancellation (stop) writes what is left."""
        last = -math.inf
        task_status.started()
        try:
            while True:
                first = await self._receive.receive()
                wait = last + self.interval - trio.current_time()
                if wait > 0:
                    try:
                        await trio.sleep(wait)
                    except trio.Cancelled:
                        self._write_now([first, *self._take()])
                        raise
                batch = [first, *self._take()]
                with trio.CancelScope(shield=True):  # a batch taken is a batch written
                    error = await trio.to_thread.run_sync(self._write, b"".join(batch))
                self._done(error, len(batch))
                last = trio.current_time()
        finally:
            self._write_now(self._take())

    def close(self) -> None:
        """Write and fsync what is queued (the `stopped` line comes after the writer task
        ended), then close. Lines put after this are counted as dropped."""
        self._write_now(self._take())
        self._closed = True
        self._close_fd()

    def _take(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    def _write_now(self, batch: list[bytes]) -> None:
        if batch:
            self._done(self._write(b"".join(batch)), len(batch))

    def _done(self, error: OSError | None, lines: int) -> None:
        if error is None:
            self.written += lines
            if self._failing:
                self._failing = False
                event("audit-recovered", file=str(self.path), msg="the audit file is written again")
        else:
            self._report_failure(error, lines)

    def _report_failure(self, exc: OSError, lines: int) -> None:
        self.failures += 1
        self.dropped += lines
        self._failing = True
        if self._failure_lines.due():
            event(
                "audit-failed",
                logging.ERROR,
                file=str(self.path),
                failures=self.failures,
                dropped=self.dropped,
                msg=f"cannot write the audit file ({exc.strerror or exc}); traffic goes on, "
                "audit lines are lost until it works again",
            )

    # -- file operations (run in a worker thread, or at stop) ------------------------------

    def _write(self, data: bytes) -> OSError | None:
        """Append `data` (whole lines) with one write, then fsync. Returns the error, if any."""
        wrote = 0
        try:
            fd = self._ensure_open()
            if self._cut:
                data = b"\n" + data
            view = memoryview(data)
            while wrote < len(data):  # more than one turn only on a short write (disk full)
                wrote += os.write(fd, view[wrote:])
            self._cut = False
            try:
                os.fsync(fd)
            except OSError as exc:
                if exc.errno not in _UNSYNCABLE:
                    raise
            return None
        except OSError as exc:
            if 0 < wrote < len(data):
                self._cut = True
            self._close_fd()  # the next batch reopens: the file may be back
            return exc

    def _ensure_open(self) -> int:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._identity
            except OSError:
                same = False
            if same:
                return self._fd
            self._close_fd()  # rotated, removed or replaced: write to what is at the path now
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, MODE)
            created = True
        except FileExistsError:
            fd = os.open(self.path, flags)
            created = False
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        if created:  # make the new name itself durable, best effort
            try:
                folder = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
            except OSError:
                pass
        return fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity = self._fd, None, None
            try:
                os.close(fd)
            except OSError:
                pass
