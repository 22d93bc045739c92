"""Which route an A-ASSOCIATE-RQ takes, or why it is refused: one pure function of the facts.

The connection driver hands over everything it knows (config, listener, peer identity, source
address, the parsed RQ) and gets back a `Forward` or a `Refusal` value; what a refusal answers on
the wire is `association.ENDINGS`'s to say. No
exceptions cross floors, no I/O happens here, so every refusal rule is tested without a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_tls_proxy.config.schema import Config, Listener, Route
from dicom_tls_proxy.protocol.pdu import AssociateRequest
from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.security.auth import (
    IPAddress,
    PeerIdentity,
    calling_ae_allowed,
    peer_allowed,
    source_allowed,
)


@dataclass(frozen=True, slots=True)
class Forward:
    route: Route


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    detail: str
    route: Route | None = None


def find_route(config: Config, listener: str, called_ae: str) -> Route | None:
    """Exact Called AE first, then the `"*"` fallback; only routes that reach this listener."""
    routes = config.routes_for(listener)
    exact = next((r for r in routes if r.called_ae == called_ae), None)
    return exact or next((r for r in routes if r.called_ae == "*"), None)


def decide(
    config: Config,
    listener: Listener,
    peer: PeerIdentity,
    source: IPAddress,
    rq: AssociateRequest,
) -> Forward | Refusal:
    """Identity before AE titles: an AE title is an unauthenticated string."""
    if not rq.protocol_version_supported:
        return Refusal(Reason.PROTOCOL_VERSION, f"protocol version 0x{rq.protocol_version:04x}")
    route = find_route(config, listener.name, rq.called_ae)
    if route is None:
        return Refusal(
            Reason.NO_ROUTE, f"no route for Called AE {rq.called_ae!r} on {listener.name}"
        )
    if not source_allowed(route.allow_source, source):
        return Refusal(
            Reason.SOURCE_NOT_ALLOWED,
            f"{source} is not in route {route.name}'s allow_source",
            route,
        )
    if not peer_allowed(route.allow_peer, peer):
        who = peer.subject if peer.has_certificate else "no certificate"
        return Refusal(
            Reason.PEER_NOT_ALLOWED,
            f"peer ({who}) matches no allow_peer of route {route.name}",
            route,
        )
    if not calling_ae_allowed(route.allow_calling_ae, rq.calling_ae):
        return Refusal(
            Reason.CALLING_AE_NOT_ALLOWED,
            f"Calling AE {rq.calling_ae!r} is not in route {route.name}'s allow_calling_ae",
            route,
        )
    return Forward(route)
