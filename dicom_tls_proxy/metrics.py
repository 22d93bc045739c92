"""`[metrics] bind`: Prometheus metrics, /healthz and /readyz on a tiny HTTP/1.1 server on trio.

Why no framework: three read-only pages do not justify a web stack inside a security component, and
the server must share the proxy's event loop and lifetime. It serves GET and HEAD, one request per
connection (`Connection: close`), reads at most 8 KiB of request head within 5 s, serves at most 16
clients at once (more wait in the kernel's backlog), and answers anything else with a 4xx; nothing
a client sends can raise out of it.

The counters are fed by `audit.emit` (this is a sink, like the audit file), so they agree with the
log by construction. Label values never come from the network: listeners, routes, outcomes and
reasons are configured names or the vocabulary's words; AE titles are never labels, and an
association that matched no configured route counts under route `_other`. Certificate and CRL
times are computed at scrape time from the generation in force, so they follow a reload.

Registry: one `CollectorRegistry` per process. With `workers > 1` the numbers would have to be
gathered from every worker; that is not built yet, so the config refuses `[metrics]` there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_tls_proxy.audit import AssociationRecord, RateLimiter, event
from dicom_tls_proxy.config import Endpoint
from dicom_tls_proxy.streams import STREAM_ERRORS, aclose_quietly, answer_and_close
from dicom_tls_proxy.vocabulary import Outcome

if TYPE_CHECKING:
    from dicom_tls_proxy.auditfile import AuditFile
    from dicom_tls_proxy.server import Proxy
    from dicom_tls_proxy.syslogsink import SyslogSink

PREFIX = "dicom_tls_proxy"
OTHER_ROUTE = "_other"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head; a slow client is closed
MAX_CLIENTS = 16

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class Metrics:
    """The proxy's metrics (a sink of `audit.emit`) and the HTTP server that shows them."""

    def __init__(
        self, proxy: Proxy, trail: AuditFile | None = None, syslog: SyslogSink | None = None
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series: noise
        self.proxy = proxy
        self.listening: list[str] | None = None  # bound addresses once every listener serves
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            f"{PREFIX}_associations",
            "Connections ended, by listener, configured route (else _other) and outcome",
            ["listener", "route", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Connections that did not complete (the log's rate-limited lines), by reason",
            ["reason"],
            registry=r,
        )
        self.tls_failures = Counter(
            f"{PREFIX}_tls_handshake_failures",
            "Inbound TLS handshakes failed or peer certificates refused, by reason",
            ["reason"],
            registry=r,
        )
        self.active = Gauge(
            f"{PREFIX}_active_associations", "Associations being relayed now", registry=r
        )
        self.active.set_function(lambda: float(proxy.active))
        self.bytes = Counter(
            f"{PREFIX}_bytes",
            "Bytes relayed, counted when an association ends; up = client to upstream",
            ["direction"],
            registry=r,
        )
        for direction in ("up", "down"):
            self.bytes.labels(direction)
        self.duration = Histogram(
            f"{PREFIX}_association_duration_seconds",
            "Connection lifetime, from accept to the end",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.handshake = Histogram(
            f"{PREFIX}_handshake_seconds",
            "Time from accept to the inbound TLS session established",
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        r.register(_CertificateTimes(proxy))
        r.register(_AuditCounters(trail, syslog))
        r.register(_UpstreamHealth(proxy))
        self._errors = RateLimiter(burst=1, interval=60.0)

    # -- the sink interface -----------------------------------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        routes = {route.name for route in self.proxy.gen.config.routes}
        route = record.route if record.route in routes else OTHER_ROUTE
        self.associations.labels(record.listener, route, record.outcome).inc()
        if record.outcome != Outcome.COMPLETED:
            self.refusals.labels(record.reason).inc()
        if record.outcome == Outcome.TLS_FAILED:
            self.tls_failures.labels(record.reason).inc()
        self.bytes.labels("up").inc(record.bytes_up)
        self.bytes.labels("down").inc(record.bytes_down)
        self.duration.observe(record.duration_s)
        handshake = record.handshake_s
        if handshake is not None:
            self.handshake.observe(handshake)

    def event(self, fields: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    # -- pages ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every listener bound and serving with a loaded config; false again while draining,
        so a load balancer stops sending new peers."""
        return self.listening is not None and not self.proxy.stopping

    def page(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a path."""
        if path == "/metrics":
            return 200, TEXT_FORMAT, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            body = {
                "ready": self.ready,
                "listeners": list(self.listening or []),
                "config": str(self.proxy.gen.config.path),
                # Route health checks inform; they never make the proxy unready.
                "routes": {
                    name: health.as_json()
                    for name, health in sorted(self.proxy.health.results.items())
                },
            }
            return (
                200 if self.ready else 503,
                "application/json",
                (json.dumps(body) + "\n").encode(),
            )
        return 404, "text/plain; charset=utf-8", b"not found\n"

    # -- the HTTP server --------------------------------------------------------------------

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `listeners` are bound beforehand, so a port in use is a start
        error and not a crash inside the nursery."""
        slots = trio.Semaphore(MAX_CLIENTS)
        addresses = [_address(sl.socket.getsockname()) for sl in listeners]
        for address in addresses:
            event("metrics-listening", address=address, paths=["/metrics", "/healthz", "/readyz"])
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
                nursery.start_soon(self._client, stream, slots)

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
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


def _address(addr: Any) -> str:
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _CertificateTimes(Collector):
    """Seconds until the configured certificates and CAs expire, and until CRLs need replacing,
    per TLS table; the soonest of each kind, the one an alert must catch. Negative: past."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterable[Metric]:
        now = datetime.now(UTC)
        expiry = GaugeMetricFamily(
            f"{PREFIX}_certificate_expiry_seconds",
            "Seconds until notAfter of the soonest-expiring certificate (the served chain) "
            "or CA of a TLS table",
            labels=["tls", "kind"],
        )
        crl_next = GaugeMetricFamily(
            f"{PREFIX}_crl_next_update_seconds",
            "Seconds until the soonest nextUpdate of a TLS table's CRLs (0 when one has none)",
            labels=["tls"],
        )
        for name, table in sorted(self.proxy.gen.config.tls.items()):
            own = [table.identity.certificate, *table.identity.chain] if table.identity else []
            for kind, certs in (("certificate", own), ("ca", list(table.ca_certificates))):
                if certs:
                    expiry.add_metric([name, kind], _soonest(certs, now))
            if table.crls:
                crl_next.add_metric(
                    [name],
                    min(
                        (c.next_update_utc - now).total_seconds() if c.next_update_utc else 0.0
                        for c in table.crls
                    ),
                )
        yield expiry
        yield crl_next


def _soonest(certs: list[x509.Certificate], now: datetime) -> float:
    return min((c.not_valid_after_utc - now).total_seconds() for c in certs)


class _AuditCounters(Collector):
    """The audit file's counters, read from the writer at scrape time (0 without a file), and
    the syslog sink's (0 without `[audit] syslog`)."""

    def __init__(self, trail: AuditFile | None, syslog: SyslogSink | None = None) -> None:
        self.trail = trail
        self.syslog = syslog

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            f"{PREFIX}_audit_dropped",
            "Audit lines lost: the writer could not keep up, or their write failed",
            value=self.trail.dropped if self.trail else 0,
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_audit_failures",
            "Failed audit file writes (open, write or fsync)",
            value=self.trail.failures if self.trail else 0,
        )
        yield dropped
        yield failures
        yield CounterMetricFamily(
            f"{PREFIX}_audit_syslog_sent",
            "Audit messages written to the syslog collector",
            value=self.syslog.sent if self.syslog else 0,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_audit_syslog_dropped",
            "Audit messages for the syslog collector lost: queue full, or still queued at stop",
            value=self.syslog.dropped if self.syslog else 0,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_audit_syslog_failures",
            "Failed connections to the syslog collector (refused, TLS failed, broken)",
            value=self.syslog.failures if self.syslog else 0,
        )


class _UpstreamHealth(Collector):
    """The last health check C-ECHO of each route with `health_check = true`, at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_upstream_up",
            "1 if the route's upstream answered the last health check C-ECHO, else 0",
            labels=["route"],
        )
        took = GaugeMetricFamily(
            f"{PREFIX}_upstream_check_seconds",
            "How long the route's last health check took (connect, TLS, associate, C-ECHO)",
            labels=["route"],
        )
        for name, health in sorted(self.proxy.health.results.items()):
            if health.ok is None or health.rtt_ms is None:
                continue  # not checked yet
            up.add_metric([name], 1.0 if health.ok else 0.0)
            took.add_metric([name], health.rtt_ms / 1000)
        yield up
        yield took
