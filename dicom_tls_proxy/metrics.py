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

With `workers = 1` one process counts and serves, from one `CollectorRegistry`. With `workers = N`
the supervisor serves the pages (`WorkersMetrics`) and the workers count (`Metrics` with a
`folder`): prometheus_client's multiprocess mode. The supervisor makes a private folder (0700,
removed at exit) and hands it to the workers as PROMETHEUS_MULTIPROC_DIR; each worker writes its
counters and histograms to its own mmap files there, and `MultiProcessCollector` sums them at
scrape time. A dead worker's counter files stay, so totals never go backwards on a restart; its
live gauge (active associations) is dropped by `mark_process_dead`. What is not a sum comes from a
small JSON status file each worker rewrites (atomically) when it changes, checked every second:
whether it serves (for /readyz), the absolute expiry times of its generation's certificates and
CRLs (the same files in every worker; worker 0's are shown, so they follow a reload), and the
route health checks, which only worker 0 runs. The audit counters, read from the writers in a single
process, are added to multiprocess counters by the same one-second task.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from dicom_tls_proxy.audit import AssociationRecord, RateLimiter, event
from dicom_tls_proxy.config_schema import Config, Endpoint
from dicom_tls_proxy.streams import STREAM_ERRORS, aclose_quietly, answer_and_close
from dicom_tls_proxy.vocabulary import Outcome

if TYPE_CHECKING:
    from dicom_tls_proxy.auditfile import AuditFile
    from dicom_tls_proxy.proxy import Proxy
    from dicom_tls_proxy.syslogsink import SyslogSink

PREFIX = "dicom_tls_proxy"
OTHER_ROUTE = "_other"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head; a slow client is closed
MAX_CLIENTS = 16
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it once, at import
STATUS_INTERVAL = 1.0  # seconds between a worker's looks at what it reports to the supervisor

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


class _Pages:
    """The HTTP server; a subclass says what each path answers (`page`)."""

    def __init__(self) -> None:
        self._errors = RateLimiter(burst=1, interval=60.0)

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


def _pages(
    path: str, registry: CollectorRegistry, readyz: Callable[[], tuple[bool, dict[str, Any]]]
) -> tuple[int, str, bytes]:
    """The three pages; `readyz` gives the readiness and the rest of its JSON body."""
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
    return 404, "text/plain; charset=utf-8", b"not found\n"


class Metrics(_Pages):
    """The proxy's metrics (a sink of `audit.emit`) and the HTTP server that shows them; with
    `folder` (a worker of `workers = N`), the metrics only: written to the supervisor's folder,
    with this worker's status beside them, for the supervisor to serve."""

    def __init__(
        self,
        proxy: Proxy,
        trail: AuditFile | None = None,
        syslog: SyslogSink | None = None,
        *,
        folder: Path | None = None,
    ) -> None:
        super().__init__()
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series: noise
        self.proxy = proxy
        self.trail = trail
        self.syslog = syslog
        self.folder = folder
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
            f"{PREFIX}_active_associations",
            "Associations being relayed now",
            registry=r,
            multiprocess_mode="livesum",  # the sum over the workers alive
        )
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
        if folder is None:
            self.active.set_function(lambda: float(proxy.active))
            r.register(_CertificateTimes(lambda: tls_times(proxy.gen.config)))
            r.register(_AuditCounters(trail, syslog))
            r.register(_UpstreamHealth(lambda: route_health(proxy)))
        else:
            # A multiprocess gauge is a file: it must be written when the number changes.
            proxy.on_active = self.active.set
            self._audit = [
                (Counter(f"{PREFIX}_{name}", doc, registry=r), what, attribute)
                for name, doc, what, attribute in AUDIT_COUNTERS
            ]
            self._audit_seen = [0] * len(AUDIT_COUNTERS)
            self._status_path = folder / f"worker-{proxy.worker or 0}.json"
            self._status_written = ""
            self._changed = trio.Event()

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
        if self.folder is not None:  # the audit counters' last increments, the last status
            self.publish_now()

    # -- pages ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every listener bound and serving with a loaded config; false again while draining,
        so a load balancer stops sending new peers."""
        return self.listening is not None and not self.proxy.stopping

    def page(self, path: str) -> tuple[int, str, bytes]:
        return _pages(path, self.registry, self._readyz)

    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {
            "listeners": list(self.listening or []),
            "config": str(self.proxy.gen.config.path),
            # Route health checks inform; they never make the proxy unready.
            "routes": route_health(self.proxy),
        }

    # -- a worker's report to the supervisor ------------------------------------------------

    async def publish(self) -> None:
        """With `folder`: every second, and at once after `changed()`, add the audit writers'
        new counts to the shared counters and rewrite the status file if it changed."""
        while True:
            self.publish_now()
            with trio.move_on_after(STATUS_INTERVAL):
                await self._changed.wait()
            self._changed = trio.Event()

    def changed(self) -> None:
        """Something the status shows changed (the listeners serve): publish it now."""
        if self.folder is not None:
            self._changed.set()

    def publish_now(self) -> None:
        try:
            self._publish()
        except Exception as exc:  # the status is for the supervisor: never a reason to crash
            self._error("status", exc)

    def _publish(self) -> None:
        values = _audit_values(self.trail, self.syslog)
        for i, (counter, _, _) in enumerate(self._audit):
            if values[i] > self._audit_seen[i]:
                counter.inc(values[i] - self._audit_seen[i])
                self._audit_seen[i] = values[i]
        status = json.dumps(
            {
                "pid": os.getpid(),
                "ready": self.ready,
                "listeners": list(self.listening or []),
                "config": str(self.proxy.gen.config.path),
                "tls": tls_times(self.proxy.gen.config),
                "routes": route_health(self.proxy),
            },
            sort_keys=True,
        )
        if status == self._status_written:
            return
        temporary = self._status_path.with_suffix(".tmp")
        temporary.write_text(status)
        os.replace(temporary, self._status_path)  # the supervisor never reads half a file
        self._status_written = status


class WorkersMetrics(_Pages):
    """The supervisor's pages with `workers = N`: the workers' metrics summed from `folder`,
    and ready when every worker is."""

    def __init__(
        self,
        config: Config,
        folder: Path,
        listeners: list[str],
        pids: Callable[[], list[int | None]],
    ) -> None:
        super().__init__()
        self.config = config
        self.folder = folder
        self.listeners = listeners  # the sockets the supervisor bound
        self.pids = pids  # each worker slot's running process, None while it is restarted
        self.stopping = False
        self.all_served = False  # every worker was ready once: from then on, one is enough
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(folder))  # type: ignore[no-untyped-call]
        self.registry.register(_CertificateTimes(lambda: self.status(0).get("tls", {})))
        self.registry.register(_UpstreamHealth(lambda: self.status(0).get("routes", {})))

    def status(self, index: int) -> dict[str, Any]:
        """What worker `index` last reported ({} before it did); possibly from a dead process,
        which the certificate times and route health may still show."""
        try:
            status = json.loads((self.folder / f"worker-{index}.json").read_text())
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def worker_died(self, pid: int) -> None:
        """Forget a dead worker's live gauges; its counters stay in the totals."""
        mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for index, pid in enumerate(self.pids()):
            status = self.status(index)
            ready = pid is not None and status.get("pid") == pid and status.get("ready") is True
            out.append({"worker": index, "pid": pid, "ready": ready})
        return out

    def page(self, path: str) -> tuple[int, str, bytes]:
        return _pages(path, self.registry, self._readyz)

    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        """Ready once every worker served; then while one does. The listening sockets belong to
        the parent, so connections queue for the others while a dead worker is restarted: a load
        balancer should not drop the whole gateway for that second."""
        workers = self.workers()
        if not self.all_served:
            self.all_served = all(w["ready"] for w in workers)
        serving = self.all_served and any(w["ready"] for w in workers)
        return not self.stopping and serving, {
            "listeners": self.listeners,
            "config": str(self.config.path),
            "routes": self.status(0).get("routes", {}),  # worker 0 runs the checks
            "workers": workers,
        }


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


def tls_times(config: Config) -> dict[str, dict[str, Any]]:
    """Per TLS table, as POSIX times: the soonest notAfter of its served chain ("certificate")
    and of its CAs ("ca"), and the nextUpdate of each of its CRLs ("crls", None for none).
    Absolute, so a worker can hand them to the supervisor and they stay true."""
    out: dict[str, dict[str, Any]] = {}
    for name, table in sorted(config.tls.items()):
        times: dict[str, Any] = {}
        own = [table.identity.certificate, *table.identity.chain] if table.identity else []
        for kind, certs in (("certificate", own), ("ca", list(table.ca_certificates))):
            if certs:
                times[kind] = min(c.not_valid_after_utc.timestamp() for c in certs)
        if table.crls:
            times["crls"] = [
                c.next_update_utc.timestamp() if c.next_update_utc else None for c in table.crls
            ]
        out[name] = times
    return out


def route_health(proxy: Proxy) -> dict[str, dict[str, Any]]:
    """The last health check of each checked route, as /readyz shows it."""
    return {name: health.as_json() for name, health in sorted(proxy.health.results.items())}


class _CertificateTimes(Collector):
    """Seconds until the configured certificates and CAs expire, and until CRLs need replacing,
    per TLS table; the soonest of each kind, the one an alert must catch. Negative: past.
    `times` gives what `tls_times` returns, for the generation in force."""

    def __init__(self, times: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.times = times

    def collect(self) -> Iterable[Metric]:
        now = time.time()
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
        for name, times in sorted(self.times().items()):
            for kind in ("certificate", "ca"):
                if kind in times:
                    expiry.add_metric([name, kind], times[kind] - now)
            if times.get("crls"):
                crl_next.add_metric(
                    [name], min(t - now if t is not None else 0.0 for t in times["crls"])
                )
        yield expiry
        yield crl_next


# The audit writers' own counts (name, help, sink, attribute): 0 without the sink.
AUDIT_COUNTERS = (
    (
        "audit_dropped",
        "Audit lines lost: the writer could not keep up, or their write failed",
        "trail",
        "dropped",
    ),
    ("audit_failures", "Failed audit file writes (open, write or fsync)", "trail", "failures"),
    ("audit_syslog_sent", "Audit messages written to the syslog collector", "syslog", "sent"),
    (
        "audit_syslog_dropped",
        "Audit messages for the syslog collector lost: queue full, or still queued at stop",
        "syslog",
        "dropped",
    ),
    (
        "audit_syslog_failures",
        "Failed connections to the syslog collector (refused, TLS failed, broken)",
        "syslog",
        "failures",
    ),
)


def _audit_values(trail: AuditFile | None, syslog: SyslogSink | None) -> list[int]:
    sinks = {"trail": trail, "syslog": syslog}
    return [
        int(getattr(sinks[what], attribute)) if sinks[what] is not None else 0
        for _, _, what, attribute in AUDIT_COUNTERS
    ]


class _AuditCounters(Collector):
    """The audit file's counters, read from the writer at scrape time (0 without a file), and
    the syslog sink's (0 without `[audit] syslog`)."""

    def __init__(self, trail: AuditFile | None, syslog: SyslogSink | None = None) -> None:
        self.trail = trail
        self.syslog = syslog

    def collect(self) -> Iterator[Metric]:
        values = _audit_values(self.trail, self.syslog)
        for (name, doc, _, _), count in zip(AUDIT_COUNTERS, values, strict=True):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=count)


class _UpstreamHealth(Collector):
    """The last health check C-ECHO of each route with `health_check = true`, at scrape time;
    `results` gives what `route_health` returns."""

    def __init__(self, results: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.results = results

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
        for name, health in sorted(self.results().items()):
            if health.get("ok") is None or health.get("rtt_ms") is None:
                continue  # not checked yet
            up.add_metric([name], 1.0 if health["ok"] else 0.0)
            took.add_metric([name], health["rtt_ms"] / 1000)
        yield up
        yield took
