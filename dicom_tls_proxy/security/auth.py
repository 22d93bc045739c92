"""Access control: who may reach a route. Pure functions that fail closed.

Every matcher answers one question in one line and a missing answer is a "no". Nothing here does
I/O or knows about sockets or TLS objects: the TLS layer hands over a `PeerIdentity` built from the
verified certificate, and the routing layer asks these functions about it.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dicom_tls_proxy.security.thumbprint import Thumbprint, parse_thumbprint

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MatcherKind = Literal["cn", "ou", "dns", "uri", "sha256", "sha1"]
NAME_KINDS: frozenset[str] = frozenset({"cn", "ou", "dns", "uri"})


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the TLS layer learned about a peer; `None` fields mean "not presented"."""

    subject: str | None = None  # RFC 4514
    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    sha256: bytes | None = None
    sha1: bytes | None = None
    chain_verified: bool = False  # the names were vouched for by a configured CA

    @property
    def has_certificate(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True, slots=True)
class PeerMatcher:
    """One `allow_peer` entry, e.g. ``cn:pacs.example.org`` or ``sha256:ab12...``."""

    kind: MatcherKind
    value: str
    thumbprint: Thumbprint | None = None

    @property
    def is_name(self) -> bool:
        return self.kind in NAME_KINDS

    def __str__(self) -> str:
        return f"{self.kind}:{self.thumbprint.digest.hex() if self.thumbprint else self.value}"


def parse_peer_matcher(text: str) -> PeerMatcher:
    """Parse ``kind:value``; raises ValueError with a message fit for a config error."""
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not value.strip():
        raise ValueError(
            f"expected kind:value (cn:, ou:, dns:, uri:, sha256:, sha1:), got {text!r}"
        )
    if kind in ("sha256", "sha1"):
        thumb = parse_thumbprint(text)
        return PeerMatcher(thumb.algorithm, thumb.digest.hex(), thumb)
    if kind not in NAME_KINDS:
        raise ValueError(f"unknown matcher kind {kind!r} (cn, ou, dns, uri, sha256, sha1)")
    return PeerMatcher(kind, value.strip())  # type: ignore[arg-type]


def matcher_matches(matcher: PeerMatcher, peer: PeerIdentity) -> bool:
    """Whether one matcher accepts the peer. Name matchers need a chain-verified certificate."""
    if not peer.has_certificate:
        return False
    if matcher.thumbprint is not None:
        seen = peer.sha256 if matcher.thumbprint.algorithm == "sha256" else peer.sha1
        return seen is not None and hmac.compare_digest(seen, matcher.thumbprint.digest)
    if not peer.chain_verified:
        return False  # a name nobody vouched for proves nothing
    if matcher.kind == "cn":
        return matcher.value in peer.common_names
    if matcher.kind == "ou":
        return matcher.value in peer.organizational_units
    if matcher.kind == "dns":
        return any(fnmatch.fnmatchcase(n.lower(), matcher.value.lower()) for n in peer.dns_names)
    return matcher.value in peer.uris  # uri: exact


def peer_allowed(matchers: Iterable[PeerMatcher], peer: PeerIdentity) -> bool:
    """Empty list: any peer that passed TLS verification; otherwise any matcher must match."""
    matchers = tuple(matchers)
    return not matchers or any(matcher_matches(m, peer) for m in matchers)


def source_allowed(networks: Iterable[IPNetwork], address: IPAddress) -> bool:
    """Empty list: any source. IPv4-mapped IPv6 sources are compared as IPv4."""
    networks = tuple(networks)
    if not networks:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == n.version and address in n for n in networks)


def calling_ae_allowed(patterns: Iterable[str], calling_ae: str) -> bool:
    """Empty list: any Calling AE. Globs (`*`, `?`) are case-sensitive, as AE titles are."""
    patterns = tuple(patterns)
    return not patterns or any(fnmatch.fnmatchcase(calling_ae, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class PlaintextSender:
    """One `allow_plaintext_from` entry: a legacy sender let through a TLS port while migrating."""

    calling_ae: str
    source: IPNetwork


def plaintext_allowed(
    senders: Iterable[PlaintextSender], calling_ae: str, source: IPAddress
) -> bool:
    """Both must match: an AE title alone is an unauthenticated string anyone can type."""
    return any(s.calling_ae == calling_ae and source_allowed((s.source,), source) for s in senders)
