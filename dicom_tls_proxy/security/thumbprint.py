"""Certificate thumbprints: parse what operators paste, compute them, compare them safely.

Why this exists: many DICOM devices carry a self-signed certificate that no CA will ever sign, and
the usual way to trust one is to pin its thumbprint (the hash of the certificate's DER bytes).
Operators copy thumbprints from Windows' certificate dialog, ``openssl x509 -fingerprint`` or a
vendor's web page, each with its own formatting (colons, spaces, case, and the invisible
left-to-right mark that Windows copies along). This module turns all of those into one value and
prints it back one way only: ``sha256:<lowercase hex>``.

What it must never do: any I/O, logging, or import from the rest of the package (it is pure);
compare digests with ``==`` (comparison is constant time, and every candidate is checked); accept an
ambiguous thumbprint (a prefix that disagrees with the length is an error, never a guess).
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

Algorithm = Literal["sha256", "sha1"]

_HEX_LENGTH: Final[dict[Algorithm, int]] = {"sha256": 64, "sha1": 40}
_HEX_DIGITS: Final = frozenset("0123456789abcdef")

# Prefixes accepted before the hex digits, after removing whitespace and format characters and
# lowercasing. "sha256fingerprint=" is what ``openssl x509 -noout -fingerprint -sha256`` prints
# ("sha256 Fingerprint=AB:CD:..."), so its whole output line can be pasted.
_PREFIXES: Final[tuple[tuple[str, Algorithm], ...]] = (
    ("sha256fingerprint=", "sha256"),
    ("sha1fingerprint=", "sha1"),
    ("sha-256:", "sha256"),
    ("sha256:", "sha256"),
    ("sha-1:", "sha1"),
    ("sha1:", "sha1"),
)


@dataclass(frozen=True, slots=True)
class Thumbprint:
    """A certificate thumbprint: the hash of the certificate's DER encoding."""

    algorithm: Algorithm
    digest: bytes

    def __post_init__(self) -> None:
        expected = _HEX_LENGTH.get(self.algorithm)
        if expected is None:
            raise ValueError(f"unsupported thumbprint algorithm {self.algorithm!r}")
        if len(self.digest) * 2 != expected:
            raise ValueError(
                f"a {self.algorithm} digest has {expected // 2} bytes, got {len(self.digest)}"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest.hex()}"


def _describe(char: str) -> str:
    """Name a character so that even an invisible one shows in an error message."""
    name = unicodedata.name(char, "")
    code = f"U+{ord(char):04X}"
    if char.isprintable() and not char.isspace():
        return f"{char!r} ({code})"
    return f"{code} {name}".rstrip()


def parse_thumbprint(text: str) -> Thumbprint:
    """Parse a thumbprint in any of the formats operators paste.

    Accepted: an optional ``sha256:`` / ``sha1:`` prefix (any case; also ``sha-256:`` and the
    ``SHA256 Fingerprint=`` of openssl's output), hex digits in any case, separated or not by colons
    and whitespace (including no-break spaces), with Unicode format characters (U+200E left-to-right
    mark, U+FEFF, zero-width spaces...) ignored wherever they are. Without a prefix the algorithm
    follows from the length: 64 hex digits is sha256, 40 is sha1.

    Raises ValueError with a message meant for the operator.
    """
    cleaned = "".join(
        char for char in text if not char.isspace() and unicodedata.category(char) != "Cf"
    ).lower()
    if not cleaned:
        raise ValueError("empty thumbprint")

    algorithm: Algorithm | None = None
    for prefix, prefix_algorithm in _PREFIXES:
        if cleaned.startswith(prefix):
            algorithm = prefix_algorithm
            cleaned = cleaned[len(prefix) :]
            break
    else:
        head, colon, _ = cleaned.partition(":")
        # "md5:..." or "sha384:..." (a hex pair such as "ab:" is not an algorithm name).
        if colon and len(head) > 2 and not set(head) <= _HEX_DIGITS:
            raise ValueError(f"unsupported thumbprint algorithm {head!r}: use sha256 or sha1")

    hex_digits = cleaned.replace(":", "")
    for char in hex_digits:
        if char not in _HEX_DIGITS:
            raise ValueError(f"not a hex digit in the thumbprint: {_describe(char)}")

    if algorithm is None:
        if len(hex_digits) == _HEX_LENGTH["sha256"]:
            algorithm = "sha256"
        elif len(hex_digits) == _HEX_LENGTH["sha1"]:
            algorithm = "sha1"
        else:
            raise ValueError(f"expected 64 hex digits (sha256) or 40 (sha1), got {len(hex_digits)}")
    elif len(hex_digits) != _HEX_LENGTH[algorithm]:
        raise ValueError(
            f"expected {_HEX_LENGTH[algorithm]} hex digits for {algorithm}, got {len(hex_digits)}"
        )
    return Thumbprint(algorithm, bytes.fromhex(hex_digits))


def _digests(cert_der: bytes) -> dict[Algorithm, bytes]:
    """The one place a certificate's thumbprints are computed: `der_thumbprints` (and through it
    `certificate_thumbprints`, `policy.peer_identity`, `policy.describe`) and `matches_any`, which
    takes the bare digests (no `Thumbprint` built per handshake)."""
    return {
        "sha256": hashlib.sha256(cert_der).digest(),
        "sha1": hashlib.sha1(cert_der, usedforsecurity=False).digest(),
    }


def der_thumbprints(cert_der: bytes) -> tuple[Thumbprint, Thumbprint]:
    """The (sha256, sha1) thumbprints of a certificate's DER encoding."""
    digests = _digests(cert_der)
    return Thumbprint("sha256", digests["sha256"]), Thumbprint("sha1", digests["sha1"])


def certificate_thumbprints(cert: x509.Certificate) -> tuple[Thumbprint, Thumbprint]:
    """The certificate's (sha256, sha1) thumbprints, hashes of its DER encoding."""
    return der_thumbprints(cert.public_bytes(Encoding.DER))


def matches_any(cert_der: bytes, accepted: Iterable[Thumbprint]) -> Thumbprint | None:
    """Return the first accepted thumbprint that matches the certificate, or None.

    Every candidate is compared, in constant time, whether or not an earlier one matched, so the
    time taken does not tell which entry (if any) matched.
    """
    digests = _digests(cert_der)
    found: Thumbprint | None = None
    for candidate in accepted:
        if hmac.compare_digest(digests[candidate.algorithm], candidate.digest) and found is None:
            found = candidate
    return found
