"""Route health checks: a periodic C-ECHO to each upstream whose route sets `health_check = true`.

The probe is `echo.echo`, the same code as `dicom-tls-proxy echo`: plaintext, or TLS with the
route's `upstream_tls` table, with the Called AE the proxy would forward (`upstream_called_ae`, else
the route's `called_ae`). The last result per route is kept for /readyz ("routes") and the
`dicom_tls_proxy_upstream_*` gauges, and a change of state is logged (`upstream-up`,
`upstream-down`). It never changes readiness: one dead modality must not take a whole gateway out
of a load balancer. The checks follow the current generation: a reload starts them again with the
new routes, and a route no longer checked drops out of the results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from dicom_tls_proxy.config.schema import Config, Route
from dicom_tls_proxy.engine import echo
from dicom_tls_proxy.ops.audit import event


@dataclass(frozen=True)
class RouteHealth:
    """One route's last check; `ok` is None until the first check has ended."""

    ok: bool | None
    checked_at: str | None = None  # ISO 8601, UTC
    rtt_ms: float | None = None  # how long the check took (connect, TLS, associate, echo)
    cause: str = ""  # why it failed, in the words of `dicom-tls-proxy echo`

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class HealthChecks:
    """Runs the checks of the current config; `follow` after a successful reload."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.results: dict[str, RouteHealth] = {}
        self._round = trio.CancelScope()

    def follow(self, config: Config) -> None:
        """Check the routes of `config` from now on (a reload)."""
        self.config = config
        self._round.cancel()

    async def run(self) -> None:
        while True:
            config = self.config
            routes = [route for route in config.routes if route.health_check]
            names = {route.name for route in routes}
            for name in list(self.results):
                if name not in names:
                    del self.results[name]
            for route in routes:
                self.results.setdefault(route.name, RouteHealth(ok=None))
            self._round = trio.CancelScope()
            with self._round:  # cancelled by `follow`
                async with trio.open_nursery() as nursery:
                    for route in routes:
                        nursery.start_soon(self._check_loop, config, route)
                    await trio.sleep_forever()

    async def _check_loop(self, config: Config, route: Route) -> None:
        table = config.tls[route.upstream_tls] if route.upstream_tls else None
        called_ae = route.upstream_called_ae or route.called_ae
        while True:
            start = time.perf_counter()
            try:
                result = await echo.echo(
                    route.upstream,
                    called_ae,
                    route.health_check_calling_ae,
                    table,
                    timeout=route.health_check_timeout,
                )
                ok, cause = result.ok, result.cause
            except Exception as exc:  # a probe must never take the proxy down
                ok, cause = False, f"{type(exc).__name__}: {exc}"
            health = RouteHealth(
                ok=ok,
                checked_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                rtt_ms=round((time.perf_counter() - start) * 1000, 3),
                cause=cause,
            )
            before = self.results.get(route.name)
            self.results[route.name] = health
            if before is None or before.ok != ok:
                if ok:
                    event(
                        "upstream-up",
                        route=route.name,
                        upstream=str(route.upstream),
                        rtt_ms=health.rtt_ms,
                    )
                else:
                    event(
                        "upstream-down",
                        logging.WARNING,
                        route=route.name,
                        upstream=str(route.upstream),
                        cause=cause,
                    )
            await trio.sleep(route.health_check_interval)
