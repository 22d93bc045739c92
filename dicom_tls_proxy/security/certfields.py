"""Reading a certificate's fields for the certificate policy, without ever raising.

Why this exists: `policy` (the checks, the peer's identity, the description for logs) and
`certnames` (RFC 6125 name matching) read the same parts of a certificate, the names and the
extensions, and must all survive a certificate odd enough to make cryptography raise on reading
them (duplicate or malformed extensions, strange names). Each reader here answers with a placeholder
or ``None`` instead, in one place, and the caller decides what that means (for the checks: against
the certificate, never for it). The time and error formats of the policy's messages live here too.

What it must never do: any I/O, logging, socket or pyOpenSSL use (it is pure, and runs inside
OpenSSL's verify callback); raise on a certificate or CRL; judge one (that is `policy`'s job).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509

# A modality presents the same certificate for every association: parsing it, reading its names
# and judging its key and usage once, not per association, was 10% of the proxy's CPU for a C-ECHO
# association. The objects are immutable and the caches bounded; what depends on time (validity,
# CRLs) is checked on every handshake.
CACHED_CERTIFICATES = 512


def utc(moment: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def when(moment: datetime) -> str:
    """A time for a message: ``2025-01-31 12:00 UTC``."""
    return utc(moment).strftime("%Y-%m-%d %H:%M UTC")


def _iso(moment: datetime) -> str:
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_text(exc: Exception) -> str:
    """An exception for a message: its type, and its text when it has one."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def subject_text(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:
        return "<unreadable name>"


def issuer_text(cert: x509.Certificate | x509.CertificateRevocationList) -> str:
    try:
        return cert.issuer.rfc4514_string()
    except Exception:
        return "<unreadable name>"


def time_text(read: Callable[[], datetime]) -> str:
    """The time `read` returns in ISO 8601 UTC, or a placeholder when it cannot be read."""
    try:
        return _iso(read())
    except Exception:
        return "<unreadable time>"


def common_names(cert: x509.Certificate) -> str:
    """The subject's CNs, comma-separated ("" when none, or when the subject cannot be read)."""
    try:
        return ", ".join(attribute_values(cert.subject, x509.NameOID.COMMON_NAME))
    except Exception:
        return ""


def attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    values: list[str] = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value if isinstance(value, str) else value.hex())
    return tuple(values)


def extensions_of(cert: x509.Certificate) -> x509.Extensions | None:
    """The parsed extensions, or None when they cannot be parsed (duplicate, malformed)."""
    try:
        return cert.extensions
    except Exception:
        return None


def subject_alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName | Exception | None:
    """The SAN extension, None when absent, or the exception when the extensions are unreadable."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except Exception as exc:
        return exc
