"""What /status and /status.json show: the proxy, its routes, the associations open right now, the
last refusals and the certificates, as one JSON document.

Why this exists: when a modality cannot send, the person on call should not have to grep log lines
to learn which AE is connected, through which route, with which certificate, and which peer was
just refused and why. `StatusBoard` is a sink of `audit.emit` (the single place every association
ends, so the refusals and counts agree with the log); the associations open now are the proxy's
own live records (`live`), read when a page is asked for, their bytes as the relay counts them.

The document is made in two steps: `StatusBoard.snapshot` (facts that do not change by themselves
with time; what a worker of `workers = N` writes for the supervisor, which merges them, see
`workersmetrics`) and `finish` (what the clock adds: durations, uptime, days left).

Store-and-forward routes: each one's spool (`store.spool.route_usage`: queued instances and
bytes, the oldest one's age, failed instances) is under the route's `queue` key, and all of them
under the top-level `spools`.

What it must never do: import the engine (it sees the proxy through `StatusView`); hold anything
but bounded structures (the live set is the proxy's, bounded by max_connections; RECENT_REFUSALS
refusals; the inventory's own limit); show a secret: certificates appear as subject, issuer,
SHA-256 and dates, never a key, a password or a byte of a PDU.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from dicom_tls_proxy import __version__
from dicom_tls_proxy.config.schema import Config, Route
from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.ops.inventory import PeerInventory, seconds_left
from dicom_tls_proxy.protocol.vocabulary import EXPLANATIONS, Reason
from dicom_tls_proxy.security import policy
from dicom_tls_proxy.store.spool import route_usage

RECENT_REFUSALS = 100
OTHER_ROUTE = "_other"  # an association that matched no configured route
DAY = 86400.0

# -- what the status page (and the metrics) read of the running proxy ---------------------------


class _Generation(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def loaded(self) -> float: ...


class _RouteHealth(Protocol):
    def as_json(self) -> dict[str, Any]: ...


class _HealthChecks(Protocol):
    @property
    def results(self) -> Mapping[str, _RouteHealth]: ...


class StatusView(Protocol):
    """The running proxy as the status page sees it (`proxy.Proxy` is one, structurally)."""

    @property
    def worker(self) -> int | None:
        """This process's worker number with `workers = N`, else None."""
        ...

    @property
    def stopping(self) -> bool: ...

    @property
    def gen(self) -> _Generation:
        """The generation in force (its `config` follows a reload)."""
        ...

    @property
    def health(self) -> _HealthChecks: ...

    @property
    def started(self) -> float:
        """POSIX time the process started."""
        ...

    @property
    def live(self) -> Mapping[int, AssociationRecord]:
        """The associations routed and not ended yet."""
        ...


def route_health(proxy: StatusView) -> dict[str, dict[str, Any]]:
    """The last health check of each checked route, as /readyz and the status page show it."""
    return {name: health.as_json() for name, health in sorted(proxy.health.results.items())}


def route_label(config: Config, route: str) -> str:
    """The configured route an association is counted under, OTHER_ROUTE when it matched none
    (a label value never comes from the network)."""
    return route if any(r.name == route for r in config.routes) else OTHER_ROUTE


def iso(moment: float) -> str:
    """A POSIX time as the audit's timestamps are written (UTC, milliseconds, Z)."""
    text = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


# -- the board: a sink of every association's end ---------------------------------------------


class StatusBoard:
    """The refusals, the per-route counts and the peer inventory, fed by `audit.emit`, and the
    live associations read from `view`; `snapshot` makes the document."""

    def __init__(self, view: StatusView, inventory: PeerInventory | None = None) -> None:
        self.view = view
        self.inventory = inventory or PeerInventory(None)
        self.refusals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self.associations: Counter[str] = Counter()  # ended, by route (else OTHER_ROUTE)
        self.refused: Counter[str] = Counter()
        self.listening: dict[str, list[str]] = {}  # listener -> bound addresses
        self._certificates: tuple[int, list[dict[str, Any]]] = (0, [])
        # A record's start is monotonic; one offset to wall time keeps a worker's board the same
        # from one second to the next while nothing happens (it is rewritten only on a change).
        self._wall = time.time() - time.monotonic()

    # -- the sink interface ---------------------------------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        config = self.view.gen.config
        route = route_label(config, record.route)
        self.associations[route] += 1
        if not record.completed:
            self.refused[route] += 1
            self.refusals.append(refusal(record, fields.get("ts", "")))
        if record.peer_certificate and _verifies(config, record.listener):
            self.inventory.seen(record.peer_certificate, fields.get("ts", "") or iso(time.time()))

    def event(self, fields: dict[str, Any]) -> None:
        if fields.get("event") == "listening":
            addresses = self.listening.setdefault(str(fields.get("listener", "")), [])
            if fields.get("address") not in addresses:
                addresses.append(str(fields.get("address", "")))

    def close(self) -> None:
        try:
            self.inventory.save()
        except OSError:
            pass  # the inventory is a convenience: never a reason for a stop to fail

    # -- the document -----------------------------------------------------------------------

    def snapshot(self, ready: bool, *, inventory: bool = True) -> dict[str, Any]:
        """Everything but what the clock adds (see `finish`); without the peer inventory when
        `inventory` is false (a worker's: the supervisor reads its state file)."""
        view = self.view
        config, gen = view.gen.config, view.gen
        live = sorted(view.live.values(), key=lambda r: r.started)
        associations = [association(r, self._wall + r.started) for r in live]
        if view.worker is not None:
            for item in associations:
                item["worker"] = view.worker
        spools = (
            guarded(lambda: route_usage(config)) if any(r.stores for r in config.routes) else None
        )
        now_by_route = Counter(a["route"] or OTHER_ROUTE for a in associations)
        doc: dict[str, Any] = {
            "proxy": {
                "version": __version__,
                "pid": os.getpid(),
                "started": iso(view.started),
                "config": str(config.path),
                "config_loaded": iso(gen.loaded),
                "workers": config.proxy.workers,
                "ready": ready,
                "stopping": view.stopping,
            },
            "listeners": listeners(config, self.listening),
            "routes": routes(config, route_health(view), now_by_route, self, spools),
            "associations": associations,
            "recent_refusals": list(reversed(self.refusals)),
            "peer_certificates": self.inventory.as_json() if inventory else [],
            "certificates": self.certificates(config),
        }
        if view.worker is not None:
            doc["proxy"]["worker"] = view.worker
        if spools is not None:
            doc["spools"] = spools
        return doc

    def certificates(self, config: Config) -> list[dict[str, Any]]:
        """The proxy's own certificates, its CAs and CRLs: made once per loaded config."""
        if self._certificates[0] != id(config):
            self._certificates = (id(config), own_certificates(config))
        return self._certificates[1]


def _verifies(config: Config, listener: str) -> bool:
    """Whether the listener's TLS table verified the certificate (not `verify = "none"`): only
    those enter the inventory, so a stranger cannot fill it."""
    for li in config.listeners:
        if li.name == listener and li.tls is not None and li.tls in config.tls:
            return config.tls[li.tls].verify != "none"
    return False


def association(record: AssociationRecord, started: float) -> dict[str, Any]:
    return {
        "peer": record.peer,
        "listener": record.listener,
        "calling_ae": record.calling_ae,
        "called_ae": record.called_ae,
        "route": record.route,
        "upstream": record.upstream,
        "peer_subject": record.peer_subject,
        "peer_sha256": record.peer_sha256,
        "tls_version": record.tls_version,
        "cipher": record.cipher,
        "bytes_up": record.bytes_up,
        "bytes_down": record.bytes_down,
        "started": iso(started),
    }


def refusal(record: AssociationRecord, ts: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": ts,
        "peer": record.peer,
        "listener": record.listener,
        "calling_ae": record.calling_ae,
        "called_ae": record.called_ae,
        "route": record.route,
        "outcome": record.outcome,
        "reason": record.reason,
        "explanation": _explanation(record.reason),
        "detail": record.detail,
    }
    if record.peer_sha256:
        out["peer_subject"], out["peer_sha256"] = record.peer_subject, record.peer_sha256
    return out


def _explanation(reason: str) -> str:
    try:
        return EXPLANATIONS.get(Reason(reason), "")
    except ValueError:
        return ""


def listeners(config: Config, bound: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    out = []
    for li in config.listeners:
        table = config.tls.get(li.tls) if li.tls else None
        out.append(
            {
                "name": li.name,
                "bind": str(li.bind),
                "addresses": list(bound.get(li.name, [])),
                "tls": li.tls,
                "verify": table.verify if table else None,
                "peer_certificate": table.peer_certificate if table else None,
                "profile": table.profile if table else None,
                "allow_source": [str(n) for n in li.allow_source],
                "allow_plaintext_from": [str(p) for p in li.allow_plaintext_from],
            }
        )
    return out


def routes(
    config: Config,
    health: Mapping[str, dict[str, Any]],
    now: Mapping[str, int],
    board: StatusBoard,
    spools: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    out = []
    for route in config.routes:
        item = {
            "name": route.name,
            "called_ae": route.called_ae,
            "listeners": list(route.listeners),
            "upstream": str(route.upstream),
            "upstream_tls": route.upstream_tls,
            "upstream_called_ae": route.upstream_called_ae,
            "mode": route.mode,
            "allow": allow_summary(route),
            "health": health.get(route.name),
            "associations_now": now.get(route.name, 0),
            "associations_total": board.associations.get(route.name, 0),
            "refusals_total": board.refused.get(route.name, 0),
        }
        if spools is not None and route.name in spools:
            item["queue"] = spools[route.name]
        out.append(item)
    if board.associations.get(OTHER_ROUTE):  # matched no route: counted, shown apart
        out.append(
            {
                "name": OTHER_ROUTE,
                "associations_now": 0,
                "associations_total": board.associations[OTHER_ROUTE],
                "refusals_total": board.refused.get(OTHER_ROUTE, 0),
            }
        )
    return out


def allow_summary(route: Route) -> dict[str, list[str]]:
    """Who may use the route, per rule; an empty list: anyone."""
    return {
        "calling_ae": list(route.allow_calling_ae),
        "peer": [str(m) for m in route.allow_peer],
        "source": [str(n) for n in route.allow_source],
    }


def own_certificates(config: Config) -> list[dict[str, Any]]:
    """Per TLS table: the certificate it serves and its chain, its CAs, and its CRLs."""
    out: list[dict[str, Any]] = []
    for name, table in sorted(config.tls.items()):
        kinds: list[tuple[str, Iterable[Any]]] = []
        if table.identity is not None:
            kinds += [("certificate", [table.identity.certificate])]
            kinds += [("chain", table.identity.chain)]
        kinds += [("ca", table.ca_certificates)]
        for kind, certificates in kinds:
            for cert in certificates:
                d = policy.describe(cert)
                out.append(
                    {
                        "tls": name,
                        "kind": kind,
                        "subject": d["subject"],
                        "issuer": d["issuer"],
                        "sha256": d["sha256"],
                        "not_after": d["not_after"],
                    }
                )
        for crl in table.crls:
            next_update = crl.next_update_utc
            out.append(
                {
                    "tls": name,
                    "kind": "crl",
                    "issuer": crl.issuer.rfc4514_string(),
                    "next_update": iso(next_update.timestamp()) if next_update else None,
                }
            )
    return out


# -- what the clock adds ------------------------------------------------------------------------


def finish(doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Add to a snapshot (or a merge of them) what depends on the time: the uptime, each
    association's duration, each certificate's and CRL's days left. Changes `doc` in place."""
    now = time.time() if now is None else now
    doc["generated"] = iso(now)
    proxy = doc.get("proxy", {})
    started = seconds_left(proxy.get("started", ""), now)
    if started is not None:
        proxy["uptime_s"] = round(-started, 1)
    for item in doc.get("associations", []):
        started = seconds_left(item.get("started", ""), now)
        item["duration_s"] = round(-started, 1) if started is not None else None
    for item in [*doc.get("certificates", []), *doc.get("peer_certificates", [])]:
        left = seconds_left(item.get("not_after") or item.get("next_update") or "", now)
        item["days_left"] = round(left / DAY, 1) if left is not None else None
    return doc


def document(board: StatusBoard, ready: bool) -> dict[str, Any]:
    """The whole document of a single process, as /status.json answers it."""
    return finish(board.snapshot(ready))


def guarded(value: Callable[[], Any]) -> Any:
    """`value()`, or None if it fails: an optional part of the view (the spool hook) must not
    break the page."""
    try:
        return value()
    except Exception:
        return None
