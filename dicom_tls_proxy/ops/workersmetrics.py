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

The status page (/status, /status.json) merges what each worker writes beside: its board
(`board-N.json`, `status.StatusBoard.snapshot` without the inventory: its associations open now,
its last refusals and its counts per route) and its peer inventory's state file
(`inventory.state_path`). Worker 0's facts about the config (listeners, routes, certificates) are
shown; the associations are those of the workers alive; the refusals are the newest of all; the
counts are summed (a restarted worker's count starts again from 0); the inventories are merged by
SHA-256.

What it must never do: import the engine or talk to a worker (it reads the folder only); trust a
status file (a missing, half-written or foreign one reads as "not reported"); make the gateway
unready because one worker is being restarted once all have served.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops import inventory
from dicom_tls_proxy.ops.metrics import (
    PREFIX,
    CertificateTimes,
    SpoolGauges,
    UpstreamHealth,
)
from dicom_tls_proxy.ops.metricsweb import Pages, page_of
from dicom_tls_proxy.ops.status import OTHER_ROUTE, RECENT_REFUSALS, finish, iso
from dicom_tls_proxy.store.spool import route_usage


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
        super().__init__(lambda: self.config.metrics.allow_source)
        self.config = config  # the supervisor's: follows a reload that loaded (allow_source)
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
        self.registry.register(inventory.PeerExpiry(PREFIX, self.peer_certificates))
        self.started = time.time()
        self._inventories: dict[Path, tuple[float, list[dict[str, Any]]]] = {}

    def status(self, index: int, name: str = "worker") -> dict[str, Any]:
        """What worker `index` last reported ({} before it did); possibly from a dead process,
        which the certificate times and route health may still show. `name` "board": what it
        reported for the status page."""
        try:
            status = json.loads((self.folder / f"{name}-{index}.json").read_text())
        except (OSError, ValueError, RecursionError):
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
        return page_of(path, self.registry, self._readyz, self.document)

    def peer_certificates(self) -> list[dict[str, Any]]:
        """The workers' inventories merged, each read again only when its file changed."""
        lists = []
        for index in range(len(self.pids())):
            path = inventory.state_path(self.config, index, self.folder)
            if path is None:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            cached = self._inventories.get(path)
            if cached is None or cached[0] != mtime:
                try:
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                cached = (mtime, inventory.parse_state(text))
                self._inventories[path] = cached
            lists.append(cached[1])
        return inventory.merge(lists)

    def document(self) -> dict[str, Any]:
        """The workers' boards as one status document."""
        workers = self.workers()
        ready, _ = self._readyz()
        boards = [self.status(w["worker"], "board") for w in workers]
        first = next((b for b in boards if b), {})
        doc = merge_boards(boards, [w["ready"] for w in workers])
        proxy = first.get("proxy")
        doc["proxy"] = {
            **(proxy if isinstance(proxy, dict) else {}),
            "pid": os.getpid(),
            "started": iso(self.started),
            "workers": len(workers),
            "ready": ready,
            "stopping": self.stopping,
            "worker_processes": workers,
        }
        doc["proxy"].pop("worker", None)
        doc["peer_certificates"] = self.peer_certificates()
        return finish(doc)

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
            "spools": route_usage(self.config),  # the folders, shared by the workers
            "workers": workers,
        }


def merge_boards(boards: list[dict[str, Any]], alive: list[bool]) -> dict[str, Any]:
    """Several workers' boards as one document (without `proxy` and the inventory): the first
    board's listeners, routes and certificates, the routes' counts summed, the associations of
    the workers `alive`, the RECENT_REFUSALS newest refusals of all. A board that is not what a
    worker writes counts as empty."""
    boards = [b if isinstance(b, dict) else {} for b in boards]
    first = next((b for b in boards if b), {})

    def items(board: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = board.get(key)
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    routes = [dict(r) for r in items(first, "routes")]
    by_name = {r.get("name"): r for r in routes}
    counts = ("associations_now", "associations_total", "refusals_total")
    for route in routes:
        for key in counts:
            route[key] = 0
    for index, board in enumerate(boards):
        for route in items(board, "routes"):
            name = route.get("name")
            if name not in by_name:  # a worker's own `_other`, or a route of another config
                if name != OTHER_ROUTE:
                    continue
                by_name[name] = {"name": name, **dict.fromkeys(counts, 0)}
                routes.append(by_name[name])
            for key in counts:
                value = route.get(key)
                if isinstance(value, int) and not (key == "associations_now" and not alive[index]):
                    by_name[name][key] += value
    associations = [a for i, b in enumerate(boards) if alive[i] for a in items(b, "associations")]
    refusals = [r for b in boards for r in items(b, "recent_refusals")]
    refusals.sort(key=lambda r: str(r.get("ts", "")), reverse=True)
    doc = {
        "listeners": items(first, "listeners"),
        "routes": routes,
        "associations": sorted(associations, key=lambda a: str(a.get("started", ""))),
        "recent_refusals": refusals[:RECENT_REFUSALS],
        "peer_certificates": [],
        "certificates": items(first, "certificates"),
    }
    spools = [b["spools"] for b in boards if isinstance(b.get("spools"), dict)]
    if spools:
        doc["spools"] = spools[0]  # worker 0's, as its routes (the store-and-forward hook)
    return doc
