"""The supervisor's /metrics, /healthz and /readyz with `workers = N`: the workers' sums.

Why this exists: with `workers = N` each worker counts (`metrics.Metrics` with a `folder`) and the
supervisor, which owns the listening sockets, serves the pages: prometheus_client's multiprocess
mode. The supervisor makes a private folder (0700, removed at exit) and hands it to the workers as
PROMETHEUS_MULTIPROC_DIR; each worker writes its counters and histograms to its own mmap files
there, and `MultiProcessCollector` sums them at scrape time. A dead worker's counter files stay, so
totals never go backwards on a restart; its live gauge (active associations) is dropped by
`worker_died` (`mark_process_dead`). What is not a sum comes from the small JSON status file each
worker rewrites: whether it serves (for /readyz), the absolute expiry times of its generation's
certificates and CRLs (worker 0's are shown, so they follow a reload), and the route health
checks, which only worker 0 runs.

What it must never do: import the engine or talk to a worker (it reads the folder only); trust a
status file (a missing, half-written or foreign one reads as "not reported"); make the gateway
unready because one worker is being restarted once all have served.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops.metrics import CertificateTimes, SpoolGauges, UpstreamHealth, spool_usage
from dicom_tls_proxy.ops.metricsweb import Pages, page_of


class WorkersMetrics(Pages):
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
        self.registry.register(CertificateTimes(lambda: self.status(0).get("tls", {})))
        self.registry.register(UpstreamHealth(lambda: self.status(0).get("routes", {})))
        self.registry.register(SpoolGauges(lambda: self.config))

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
        return page_of(path, self.registry, self._readyz)

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
            "spools": spool_usage(self.config),  # the folders, shared by the workers
            "workers": workers,
        }
