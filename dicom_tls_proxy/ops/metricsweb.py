"""The tiny HTTP/1.1 server on trio behind `[metrics] bind`: /metrics, /healthz, /readyz, and the
status page (/status for a person, /status.json for scripts).

Why no framework: a few read-only pages do not justify a web stack inside a security component, and
the server must share the proxy's event loop and lifetime. It serves GET and HEAD, one request per
connection (`Connection: close`), reads at most 8 KiB of request head within 5 s, serves at most 16
clients at once (more wait in the kernel's backlog), and answers anything else with a 4xx; nothing
a client sends can raise out of it. `[metrics] allow_source` is checked at accept: a client from
another address is closed before a byte is read, with one (rate-limited) log line. What the
pages say is not decided here: `metrics.Metrics` (one process, or a worker) and
`workersmetrics.WorkersMetrics` (the supervisor) give the registry, the readiness and the status
document; `statuspage` draws the page.

What it must never do: let a request, a slow client or an accept error take the proxy down or make
it wait (every error is one rate-limited log line); answer anything but GET and HEAD; read the
proxy's state itself (the subclass's `page` does).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest

from dicom_tls_proxy.config.schema import Endpoint
from dicom_tls_proxy.ops.audit import event
from dicom_tls_proxy.ops.netaddr import format_address
from dicom_tls_proxy.ops.ratelimit import RateLimiter
from dicom_tls_proxy.ops.statuspage import CSP, render_page
from dicom_tls_proxy.security.auth import IPNetwork, source_allowed
from dicom_tls_proxy.transport.streams import STREAM_ERRORS, aclose_quietly, answer_and_close

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
HTML = "text/html; charset=utf-8"
PATHS = ["/metrics", "/healthz", "/readyz", "/status", "/status.json"]
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head; a slow client is closed
MAX_CLIENTS = 16

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class Pages:
    """The HTTP server; a subclass says what each path answers (`page`, usually `page_of`).
    `allow_source` gives the networks clients may come from (empty: any), read at each accept
    so that it follows a reload."""

    def __init__(self, allow_source: Callable[[], tuple[IPNetwork, ...]] = tuple) -> None:
        self._errors = RateLimiter(burst=1, interval=60.0)
        self.allow_source = allow_source
        self._refused = RateLimiter(burst=1, interval=60.0)

    def page(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a path."""
        raise NotImplementedError

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `listeners` are bound beforehand, so a port in use is a start
        error and not a crash inside the nursery."""
        slots = trio.Semaphore(MAX_CLIENTS)
        addresses = [format_address(sl.socket.getsockname()) for sl in listeners]
        for address in addresses:
            event("metrics-listening", address=address, paths=PATHS)
        async with trio.open_nursery() as nursery:
            for sl in listeners:
                nursery.start_soon(self._accept_loop, sl, slots, nursery)
            task_status.started(addresses)

    async def _accept_loop(
        self, sl: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        async with sl:
            while True:
                await slots.acquire()
                try:
                    stream = await sl.accept()
                except OSError as exc:  # out of file descriptors and the like: wait, go on
                    slots.release()
                    self._error("accept", exc)
                    await trio.sleep(0.1)
                    continue
                if not self._admitted(stream):
                    slots.release()
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(self._client, stream, slots)

    def _admitted(self, stream: trio.SocketStream) -> bool:
        """Whether the client's address is in `allow_source`; if not, one line per source and
        minute says so."""
        networks = self.allow_source()
        if not networks:
            return True
        try:
            peer = stream.socket.getpeername()
            source = ipaddress.ip_address(str(peer[0]).split("%")[0])
        except (OSError, ValueError, IndexError):
            return False
        if source_allowed(networks, source):
            return True
        if self._refused.allow(("metrics-refused", str(source))):
            event(
                "metrics-refused",
                logging.WARNING,
                source=str(source),
                msg="not in metrics.allow_source: connection closed",
            )
        return False

    async def _client(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            head: bytes | None = None
            with trio.move_on_after(REQUEST_TIMEOUT):
                head = await _read_head(stream)
            if head is not None:  # None: too slow, or closed early; just close
                await answer_and_close(stream, self._answer(head))
        except STREAM_ERRORS:
            pass
        except Exception as exc:  # never let a request take the proxy down
            self._error("request", exc)
        finally:
            slots.release()
            with trio.CancelScope(shield=True):
                await aclose_quietly(stream)

    def _answer(self, head: bytes) -> bytes:
        request_line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        parts = request_line.split(b" ")
        if len(head) > MAX_REQUEST_HEAD:
            return _response(431, "text/plain", b"request head too large\n")
        if len(parts) != 3 or not parts[1].startswith(b"/"):
            return _response(400, "text/plain", b"bad request\n")
        method, target, version = parts
        if not version.startswith(b"HTTP/1."):
            return _response(505, "text/plain", b"HTTP/1.x only\n")
        if method not in (b"GET", b"HEAD"):
            return _response(405, "text/plain", b"GET only\n", allow="GET, HEAD")
        path = target.split(b"?", 1)[0].decode("ascii", "replace")
        status, content_type, body = self.page(path)
        return _response(status, content_type, body, head_only=method == b"HEAD")

    def _error(self, what: str, exc: BaseException) -> None:
        if self._errors.allow(("metrics", what)):
            event("metrics-error", logging.ERROR, msg=f"{what}: {type(exc).__name__}: {exc}")


def page_of(
    path: str,
    registry: CollectorRegistry,
    readyz: Callable[[], tuple[bool, dict[str, Any]]],
    status: Callable[[], dict[str, Any]] | None = None,
) -> tuple[int, str, bytes]:
    """The pages; `readyz` gives the readiness and the rest of its JSON body, `status` the
    status document (`status.document`)."""
    if path == "/metrics":
        return 200, TEXT_FORMAT, generate_latest(registry)
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        ready, details = readyz()
        body = {"ready": ready, **details}
        return (
            200 if ready else 503,
            "application/json",
            (json.dumps(body) + "\n").encode(),
        )
    if path == "/status.json" and status is not None:
        return 200, "application/json", (json.dumps(status()) + "\n").encode()
    if path == "/status" and status is not None:
        return 200, HTML, render_page(status())
    return 404, "text/plain; charset=utf-8", b"not found\n"


async def open_listeners(bind: Endpoint) -> list[trio.SocketListener]:
    """Bind the metrics address (OSError if it cannot be)."""
    host = None if bind.host in ("", "*") else bind.host
    return await trio.open_tcp_listeners(bind.port, host=host, backlog=64)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head up to the blank line; a longer one is returned cut, to be refused."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            return bytes(buf)
        data = await stream.receive_some(4096)
        if not data:
            return bytes(buf) if buf else None
        buf += data
    return bytes(buf)


def _response(
    status: int, content_type: str, body: bytes, *, head_only: bool = False, allow: str = ""
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
    ]
    if content_type == HTML:  # the only inline script and style are the page's own
        lines += [f"Content-Security-Policy: {CSP}", "Referrer-Policy: no-referrer"]
    if allow:
        lines.append(f"Allow: {allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body
