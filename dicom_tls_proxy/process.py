"""Process plumbing shared by a lone proxy, its supervisor and its workers: the pid file, systemd's
notify socket, giving freed heap back, and the lifeline that ties a worker to its supervisor.

Why a lifeline pipe and not `prctl(PR_SET_PDEATHSIG)`: the kernel sends the death signal when the
*thread* that forked the child exits, not the process. trio's `open_process` forks from a thread
of its thread cache, and an idle cached thread exits after 10 s, so every worker was told its
parent had died 10.0 s after it started (and was restarted, and again 10 s later). A pipe has no
such trap: the supervisor holds the write end (close-on-exec, so no worker inherits it) for its
whole life; each worker watches the read end, and reads end-of-file the moment the supervisor is
gone, however it died (SIGKILL and OOM included), whichever thread spawned the worker.

Nothing here decides anything about connections; it must never import the engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import trio

from dicom_tls_proxy.audit import event


@contextlib.contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """`pid_file` for `dicom-tls-proxy reload` and init systems; removed on the way out."""
    if path is not None:
        path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def sd_notify(state: str) -> None:
    """systemd's Type=notify protocol, without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError as exc:
            event("notify-failed", logging.WARNING, msg=str(exc))


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only; musl has no need


_LIBC = _load_libc()


def trim_heap() -> None:
    """Give freed memory back to the system. glibc keeps freed relay buffers (up to 256 KiB
    each) in its heap, so a gateway that moved a burst of studies would otherwise keep it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def lifeline() -> tuple[int, int]:
    """A new lifeline: (read end, for the workers; write end, kept by the supervisor only).
    Both ends are close-on-exec; the supervisor passes the read end with `pass_fds`."""
    return os.pipe()


async def supervisor_gone(fd: int) -> None:
    """Return once the supervisor that holds the lifeline's write end has exited. Nothing is
    ever written: the only thing the read end can show is end-of-file."""
    os.set_blocking(fd, False)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if not os.read(fd, 64):
                return
        except BlockingIOError:
            continue
