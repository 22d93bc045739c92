"""`[metrics] bind`: the proxy's Prometheus metrics, and what /readyz says about it.

The counters are fed by `audit.emit` (this is a sink, like the audit file), so they agree with the
log by construction. Label values never come from the network: listeners, routes, outcomes and
reasons are configured names or the vocabulary's words; AE titles are never labels, and an
association that matched no configured route counts under route `_other`. Certificate and CRL
times are computed at scrape time from the generation in force, so they follow a reload. The pages
are served by `metricsweb`'s tiny HTTP server.

With `workers = 1` one process counts and serves, from one `CollectorRegistry`. With `workers = N`
the supervisor serves the pages (`workersmetrics.WorkersMetrics`, which explains the multiprocess
mode) and the workers count (`Metrics` with a `folder`): each writes its counters and histograms to
mmap files in the supervisor's folder, and beside them a small JSON status file it rewrites
(atomically) when it changes, checked every second: whether it serves, the absolute expiry times of
its generation's certificates and CRLs, and the route health checks. The audit counters, read from
the writers in a single process, are added to multiprocess counters by the same one-second task.

What it must never do: import the engine (`server`): it sees the running proxy through `ProxyView`,
the few things it reads, declared here, which the proxy satisfies structurally; take a label value
from the network; let a scrape or a status file write take the proxy down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.ops.inventory import PeerExpiry, PeerInventory, state_path
from dicom_tls_proxy.ops.metricsweb import Pages, page_of
from dicom_tls_proxy.ops.status import (
    OTHER_ROUTE,
    StatusBoard,
    StatusView,
    document,
    route_health,
    route_label,
)
from dicom_tls_proxy.protocol.vocabulary import Outcome
from dicom_tls_proxy.store.spool import route_usage

if TYPE_CHECKING:
    from dicom_tls_proxy.ops.auditfile import AuditFile
    from dicom_tls_proxy.ops.syslogsink import SyslogSink

PREFIX = "dicom_tls_proxy"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it once, at import
STATUS_INTERVAL = 1.0  # seconds between a worker's looks at what it reports to the supervisor

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# -- what the metrics read of the running proxy ---------------------------------------------


class ProxyView(StatusView, Protocol):
    """The running proxy as the metrics see it (`proxy.Proxy` is one, structurally): what the
    status page reads, and `active`; read-only, but for `on_active`, the hook a worker's
    multiprocess gauge is written through."""

    @property
    def active(self) -> int:
        """Associations being relayed now."""
        ...

    on_active: Callable[[int], None] | None  # told each change of `active`


class Metrics(Pages):
    """The proxy's metrics (a sink of `audit.emit`) and the HTTP server that shows them; with
    `folder` (a worker of `workers = N`), the metrics only: written to the supervisor's folder,
    with this worker's status beside them, for the supervisor to serve."""

    def __init__(
        self,
        proxy: ProxyView,
        trail: AuditFile | None = None,
        syslog: SyslogSink | None = None,
        *,
        folder: Path | None = None,
    ) -> None:
        super().__init__(lambda: proxy.gen.config.metrics.allow_source)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series: noise
        self.proxy = proxy
        self.trail = trail
        self.syslog = syslog
        self.folder = folder
        self.listening: list[str] | None = None  # bound addresses once every listener serves
        inventory = PeerInventory(state_path(proxy.gen.config, proxy.worker, folder))
        inventory.load()
        self.board = StatusBoard(proxy, inventory)  # /status: fed here, as a sink of ours
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
        self.spool_events = {
            event: Counter(f"{PREFIX}_spool_{name}", doc, ["route"], registry=r)
            for event, name, doc in SPOOL_EVENTS
        }
        self.spool_forwarded_bytes = Counter(
            f"{PREFIX}_spool_forwarded_bytes",
            "Data set bytes of the instances the upstream took, by store-and-forward route",
            ["route"],
            registry=r,
        )
        if folder is None:
            r.register(SpoolGauges(lambda: proxy.gen.config))
            self.active.set_function(lambda: float(proxy.active))
            r.register(CertificateTimes(lambda: tls_times(proxy.gen.config)))
            r.register(_AuditCounters(trail, syslog))
            r.register(UpstreamHealth(lambda: route_health(proxy)))
            r.register(PeerExpiry(PREFIX, inventory.as_json))
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
            self._board_path = folder / f"board-{proxy.worker or 0}.json"
            self._board_written = ""
            self._changed = trio.Event()

    # -- the sink interface -----------------------------------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        route = route_label(self.proxy.gen.config, record.route)
        self.associations.labels(record.listener, route, record.outcome).inc()
        if not record.completed:
            self.refusals.labels(record.reason).inc()
        if record.outcome == Outcome.TLS_FAILED:
            self.tls_failures.labels(record.reason).inc()
        self.bytes.labels("up").inc(record.bytes_up)
        self.bytes.labels("down").inc(record.bytes_down)
        self.duration.observe(record.duration_s)
        handshake = record.handshake_s
        if handshake is not None:
            self.handshake.observe(handshake)
        self.board.association(record, fields)

    def event(self, fields: dict[str, Any]) -> None:
        self.board.event(fields)
        counter = self.spool_events.get(fields.get("event", ""))
        if counter is not None:
            counter.labels(fields.get("route", OTHER_ROUTE)).inc()
            if fields["event"] == "instance-forwarded":
                self.spool_forwarded_bytes.labels(fields.get("route")).inc(fields.get("bytes", 0))

    def close(self) -> None:
        self.board.close()
        if self.folder is not None:  # the audit counters' last increments, the last status
            self.publish_now()

    # -- pages ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every listener bound and serving with a loaded config; false again while draining,
        so a load balancer stops sending new peers."""
        return self.listening is not None and not self.proxy.stopping

    def page(self, path: str) -> tuple[int, str, bytes]:
        return page_of(path, self.registry, self._readyz, lambda: document(self.board, self.ready))

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The pages, and the inventory's state file kept while they are served."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.board.inventory.keep)
            task_status.started(await nursery.start(super().serve, listeners))

    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {
            "listeners": list(self.listening or []),
            "config": str(self.proxy.gen.config.path),
            # Route health checks inform; they never make the proxy unready.
            "routes": route_health(self.proxy),
            "spools": route_usage(self.proxy.gen.config),
        }

    # -- a worker's report to the supervisor ------------------------------------------------

    async def publish(self) -> None:
        """With `folder`: every second, and at once after `changed()`, add the audit writers'
        new counts to the shared counters and rewrite the status files if they changed; keep
        the inventory's state file, which the supervisor reads too."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.board.inventory.keep)
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
        if status != self._status_written:
            _replace(self._status_path, status)
            self._status_written = status
        # What /status shows of this worker; its inventory is read from its state file.
        board = json.dumps(self.board.snapshot(self.ready, inventory=False))
        if board != self._board_written:
            _replace(self._board_path, board)
            self._board_written = board


def _replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)  # the supervisor never reads half a file


# Audit events counted per store-and-forward route: (event, metric name, help).
SPOOL_EVENTS = (
    ("stored", "stored", "Instances written to the spool and acknowledged with Success"),
    ("instance-forwarded", "forwarded", "Instances the upstream took (Success or Warning)"),
    ("failed", "failed", "Instances the upstream refused for good, moved to failed/"),
)


class SpoolGauges(Collector):
    """The store-and-forward spools at scrape time (`route_usage`, for the config `config`
    gives): what is queued, how old the oldest is, what failed."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "queued": GaugeMetricFamily(
                f"{PREFIX}_spool_queued_instances",
                "Instances in a store-and-forward route's spool, waiting to be forwarded",
                labels=["route"],
            ),
            "queued_bytes": GaugeMetricFamily(
                f"{PREFIX}_spool_queued_bytes",
                "Bytes of the instances waiting in a store-and-forward route's spool",
                labels=["route"],
            ),
            "oldest_age_s": GaugeMetricFamily(
                f"{PREFIX}_spool_oldest_age_seconds",
                "Age of the oldest instance waiting in the spool (0 when none waits)",
                labels=["route"],
            ),
            "failed": GaugeMetricFamily(
                f"{PREFIX}_spool_failed_instances",
                "Instances in the spool's failed/ folder (refused for good; see `spool`)",
                labels=["route"],
            ),
        }
        for name, usage in route_usage(self.config()).items():
            for key, gauge in gauges.items():
                gauge.add_metric([name], float(usage[key] or 0))
        yield from gauges.values()


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


class CertificateTimes(Collector):
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


class UpstreamHealth(Collector):
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
