"""Whether a certificate is for a name (RFC 6125), and the names it is for, for messages.

Why this exists: when the proxy connects to a TLS upstream (a route's `upstream_tls`, the syslog
collector), the certificate it is shown must be for the name it connected to, matched the way RFC
6125 says (iPAddress SANs for addresses, dNSName SANs for host names, one wildcard as the entire
leftmost label, the CN only without any SAN), and a refusal must say which names the certificate
is for. Part of the certificate policy (`policy`); the TLS layer calls it from OpenSSL's verify
callback, `echo` and `certs show` for their messages.

What it must never do: any I/O, logging, socket or pyOpenSSL use (it is pure); raise on a
certificate or a name, however odd: what cannot be read or parsed never matches, and lists no name.
"""

from __future__ import annotations

import functools
import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID

from dicom_tls_proxy.security.certfields import (
    CACHED_CERTIFICATES,
    attribute_values,
    subject_alt_names,
)


def _parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        address = ipaddress.IPv6Address(int(address))  # a certificate cannot name a zone
    return address


def _dns_labels(name: str) -> list[str] | None:
    """Lowercased labels without a trailing dot, or None for a name that cannot match anything."""
    if not name.isascii():
        return None  # SANs are IA5String: a U-label reference name must be given as A-labels
    if name.endswith("."):
        name = name[:-1]
    labels = name.lower().split(".")
    if any(not label for label in labels):
        return None
    return labels


def _dns_matches(pattern: str, reference: list[str]) -> bool:
    """RFC 6125 6.4: exact (case-insensitive) or one wildcard that is the entire leftmost label."""
    labels = _dns_labels(pattern)
    if labels is None or len(labels) != len(reference):
        return False
    if labels[0] == "*":
        # At least two labels after the wildcard (no "*.org"), no other wildcard anywhere.
        if len(labels) < 3 or any("*" in label for label in labels[1:]):
            return False
        return labels[1:] == reference[1:]
    if any("*" in label for label in labels):
        return False  # partial wildcards ("f*.example.org") are not honoured
    return labels == reference


def server_name_matches(cert: x509.Certificate, name: str) -> bool:
    """Whether the certificate is for the server name the proxy connected to (RFC 6125).

    An IP address (v4 or v6, in any textual form) must equal an iPAddress SAN, never a DNS name or
    the CN. A host name must match a dNSName SAN, case-insensitively, a trailing dot ignored,
    A-labels compared as they are, a wildcard only as the entire leftmost label matching exactly
    one label. The subject CN is consulted only when the certificate has no SAN extension at all.
    Unreadable extensions, non-ASCII names and names with empty labels never match.
    """
    try:
        return _server_name_matches(cert, name)
    except Exception:
        return False


@functools.lru_cache(maxsize=CACHED_CERTIFICATES)
def _server_name_matches(cert: x509.Certificate, name: str) -> bool:
    san = subject_alt_names(cert)
    if isinstance(san, Exception):
        return False
    address = _parse_ip(name)
    if address is not None:
        if san is None:
            return False
        return any(
            isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
            and value.version == address.version
            and int(value) == int(address)
            for value in san.get_values_for_type(x509.IPAddress)
        )
    reference = _dns_labels(name)
    if reference is None or "*" in name or reference[-1].isdigit():
        return False  # "*" is no host name; a numeric last label is an IP in inet_aton form
    if san is not None:
        patterns = san.get_values_for_type(x509.DNSName)
    else:
        patterns = list(attribute_values(cert.subject, NameOID.COMMON_NAME))
    return any(_dns_matches(pattern, reference) for pattern in patterns)


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names the certificate is for, for messages: DNS then IP SANs; the CNs if it has no SAN.

    Unreadable extensions give an empty list.
    """
    try:
        san = subject_alt_names(cert)
        if isinstance(san, Exception):
            return []
        if san is None:
            return list(attribute_values(cert.subject, NameOID.COMMON_NAME))
        names = list(san.get_values_for_type(x509.DNSName))
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        return names
    except Exception:
        return []
