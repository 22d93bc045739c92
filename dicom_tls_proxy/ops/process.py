"""Process plumbing shared by a lone proxy, its supervisor and its workers: binding the listening
sockets (and taking them over from a supervisor), the pid file, systemd's notify socket, giving
freed heap back, and the lifeline that ties a worker to its supervisor.

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
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import trio

from dicom_tls_proxy.config.schema import Config, Listener
from dicom_tls_proxy.ops.audit import event
from dicom_tls_proxy.ops.metricsweb import open_listeners as open_metrics_listeners
from dicom_tls_proxy.transport.streams import os_error_text

Bound = list[tuple[Listener, trio.SocketListener]]


class StartError(Exception):
    """The proxy cannot start (a port in use, a bad address); the message says which key."""


async def bind_listeners(config: Config) -> Bound:
    """Bind every listener once. A port already in use is an error, never shared silently."""
    bound: Bound = []
    try:
        for li in config.listeners:
            host = None if li.bind.host in ("", "*") else li.bind.host
            try:
                listeners = await trio.open_tcp_listeners(li.bind.port, host=host, backlog=1024)
            except OSError as exc:
                raise StartError(
                    f"{config.path}: {li.key_path}.bind: cannot listen on {li.bind}: "
                    f"{os_error_text(exc)}"
                ) from None
            bound.extend((li, sl) for sl in listeners)
    except BaseException:
        for _, sl in bound:
            sl.socket.close()
        raise
    return bound


def listeners_from_fds(config: Config, spec: str) -> Bound:
    """Sockets a supervisor bound and passed down, as `NAME=FD,NAME=FD`."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, fd = item.partition("=")
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=int(fd)))
        out.append((config.listener(name), trio.SocketListener(sock)))
    return out


def listeners_spec(bound: Bound) -> tuple[str, list[int]]:
    """What a worker is told of the sockets it inherits (`listeners_from_fds`), and their fds."""
    spec = ",".join(f"{li.name}={sl.socket.fileno()}" for li, sl in bound)
    return spec, [sl.socket.fileno() for _, sl in bound]


async def bind_metrics(config: Config) -> list[trio.SocketListener]:
    """Bind `[metrics] bind` (StartError if it cannot be)."""
    assert config.metrics.bind is not None
    try:
        return await open_metrics_listeners(config.metrics.bind)
    except OSError as exc:
        raise StartError(
            f"{config.path}: metrics.bind: cannot listen on {config.metrics.bind}: "
            f"{os_error_text(exc)}"
        ) from None


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


# Signals whose default action ends the process but which only ask for a reload or a report: a
# process ignores them from its first instruction until its signal receiver takes them over, so
# that a SIGHUP or SIGUSR1 that comes early (a worker just restarted) ends nothing.
HARMLESS = (signal.SIGHUP, signal.SIGUSR1)


def ignore_until_handled() -> None:
    for signum in HARMLESS:
        signal.signal(signum, signal.SIG_IGN)


def open_fds() -> int:
    """This process's open file descriptors (-1 where /proc is not there)."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1


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
