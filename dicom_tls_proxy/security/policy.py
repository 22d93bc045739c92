"""Certificate policy: what the proxy asks of a peer certificate beyond "OpenSSL verified it".

Why this exists: OpenSSL answers "is this chain signed by a CA I trust?", but a DICOM proxy must
also refuse what a trusted chain can still carry (an expired or 1024-bit device certificate, a
SHA-1 signature, a client certificate used as a server's), check the configured CRLs, match the
upstream's name the way RFC 6125 says, and say *why* in words an operator can act on ("RSA key of
1024 bits, below the 2048 required"), not ``X509_V_ERR_EE_KEY_TOO_SMALL``. It also accepts what a
thumbprint pin protects: a pinned self-signed certificate's own SHA-1 self-signature proves nothing
and is not held against it. The TLS layer calls these functions from inside OpenSSL's verify
callback (depth 0) with ``cryptography`` objects, and turns the answers into alerts and log lines.
Two parts live beside it: `certnames` (whether a certificate is for a name, RFC 6125) and
`certfields` (the readers that never raise, and the formats of times and errors in messages).

What it must never do: any I/O, logging, socket or pyOpenSSL use (it is pure, and fast enough for a
verify callback); raise on a certificate, however odd (unknown key or signature types, missing,
duplicate or malformed extensions, strange names): every public function answers with a problem,
``False`` or an empty value instead, and what it cannot read counts against the certificate (fail
closed), never for it; the one thing let pass is a signature algorithm it cannot name that is not a
known weak one. It does not verify certificate signatures or build chains: OpenSSL does that.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, mlkem, rsa, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.security.auth import PeerIdentity
from dicom_tls_proxy.security.certfields import (
    CACHED_CERTIFICATES,
    attribute_values,
    common_names,
    error_text,
    extensions_of,
    issuer_text,
    subject_alt_names,
    subject_text,
    time_text,
    utc,
    when,
)
from dicom_tls_proxy.security.thumbprint import der_thumbprints

Purpose = Literal["client", "server"]

MIN_RSA_BITS: Final = 2048
MIN_EC_BITS: Final = 256

# Signature algorithms whose hash is broken, by OID: cryptography cannot name the hash of some of
# them (MD2, MD4, the old OIW forms), so the OID is looked at first.
_WEAK_SIGNATURE_OIDS: Final[dict[str, str]] = {
    "1.2.840.113549.1.1.2": "MD2",  # md2WithRSAEncryption
    "1.2.840.113549.1.1.3": "MD4",  # md4WithRSAEncryption
    "1.2.840.113549.1.1.4": "MD5",  # md5WithRSAEncryption
    "1.3.14.3.2.3": "MD5",  # md5WithRSA (OIW)
    "1.3.14.3.2.25": "MD5",  # md5WithRSASignature (OIW)
    "1.2.840.113549.1.1.5": "SHA-1",  # sha1WithRSAEncryption
    "1.3.14.3.2.29": "SHA-1",  # sha1WithRSASignature (OIW)
    "1.2.840.10040.4.3": "SHA-1",  # dsa-with-sha1
    "1.3.14.3.2.27": "SHA-1",  # dsaWithSHA1 (OIW)
    "1.2.840.10045.4.1": "SHA-1",  # ecdsa-with-SHA1
}
# Hash names as cryptography spells them (RSASSA-PSS carries its hash in parameters).
_WEAK_HASHES: Final[dict[str, str]] = {"md5": "MD5", "sha1": "SHA-1"}

_PURPOSE_OID: Final[dict[Purpose, x509.ObjectIdentifier]] = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}
_EKU_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
_KEY_USAGE_NAMES: Final = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)

# Certificate keys that cannot sign anything, let alone a CRL.
_NON_SIGNING_KEYS: Final = (
    x25519.X25519PublicKey,
    x448.X448PublicKey,
    mlkem.MLKEM768PublicKey,
    mlkem.MLKEM1024PublicKey,
)

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h, unchanged from 1.1.1 to 4.0) that have a
# more precise word than "untrusted". Any other code, known or not, means the chain did not verify.
_OPENSSL_ERRORS: Final[dict[int, Reason]] = {
    9: Reason.TLS_NOT_YET_VALID,  # X509_V_ERR_CERT_NOT_YET_VALID
    10: Reason.TLS_EXPIRED,  # X509_V_ERR_CERT_HAS_EXPIRED
    12: Reason.TLS_CRL_STALE,  # X509_V_ERR_CRL_HAS_EXPIRED
    23: Reason.TLS_REVOKED,  # X509_V_ERR_CERT_REVOKED
    26: Reason.TLS_WRONG_USAGE,  # X509_V_ERR_INVALID_PURPOSE
    62: Reason.TLS_NAME_MISMATCH,  # X509_V_ERR_HOSTNAME_MISMATCH
    64: Reason.TLS_NAME_MISMATCH,  # X509_V_ERR_IP_ADDRESS_MISMATCH
    66: Reason.TLS_WEAK_CERTIFICATE,  # X509_V_ERR_EE_KEY_TOO_SMALL
    67: Reason.TLS_WEAK_CERTIFICATE,  # X509_V_ERR_CA_KEY_TOO_SMALL
    68: Reason.TLS_WEAK_CERTIFICATE,  # X509_V_ERR_CA_MD_TOO_WEAK
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason to refuse a certificate, with a message that names the values involved."""

    reason: Reason
    message: str


# --- certificate checks -------------------------------------------------------------------------


def _check_validity(cert: x509.Certificate, now: datetime) -> list[Problem]:
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    problems: list[Problem] = []
    if now < not_before:
        problems.append(Problem(Reason.TLS_NOT_YET_VALID, f"not valid until {when(not_before)}"))
    if now > not_after:
        problems.append(Problem(Reason.TLS_EXPIRED, f"expired on {when(not_after)}"))
    return problems


def _check_key(cert: x509.Certificate) -> Problem | None:
    try:
        key = cert.public_key()
    except Exception as exc:
        try:
            oid = cert.public_key_algorithm_oid.dotted_string
        except Exception:
            oid = "unreadable"
        return Problem(
            Reason.TLS_WEAK_CERTIFICATE,
            f"public key of a type the proxy cannot assess (algorithm {oid}; {error_text(exc)})",
        )
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return Problem(
            Reason.TLS_WEAK_CERTIFICATE,
            f"RSA key of {key.key_size} bits, below the {MIN_RSA_BITS} required",
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        return Problem(
            Reason.TLS_WEAK_CERTIFICATE,
            f"EC key on {key.curve.name} ({key.curve.key_size} bits), "
            f"below the {MIN_EC_BITS} required",
        )
    if isinstance(key, dsa.DSAPublicKey):
        return Problem(
            Reason.TLS_WEAK_CERTIFICATE,
            f"DSA key of {key.key_size} bits: DSA keys are not accepted",
        )
    return None  # large enough RSA/EC, Ed25519, Ed448, X25519, X448, ML-DSA, ML-KEM


def _weak_signature_hash(cert: x509.Certificate) -> str | None:
    """The name of the broken hash the certificate is signed with, or None."""
    weak = _WEAK_SIGNATURE_OIDS.get(cert.signature_algorithm_oid.dotted_string)
    if weak is not None:
        return weak
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:
        return None  # an algorithm cryptography does not know and that is not a known weak one
    return None if algorithm is None else _WEAK_HASHES.get(algorithm.name)


def _is_self_issued(cert: x509.Certificate) -> bool:
    """Subject equals issuer, and the key identifiers, when both present, agree."""
    if cert.subject != cert.issuer:
        return False
    extensions = extensions_of(cert)
    if extensions is None:
        return False  # unreadable: no exemption
    try:
        ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return True
    return aki is None or aki == ski


def _check_usage(extensions: x509.Extensions, purpose: Purpose) -> list[Problem]:
    problems: list[Problem] = []
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass  # no EKU: any use
    else:
        wanted = _PURPOSE_OID[purpose]
        usages = list(eku)
        if wanted not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
            has = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages) or "none"
            problems.append(
                Problem(
                    Reason.TLS_WRONG_USAGE,
                    f"extended key usage lacks {_EKU_NAMES[wanted]} (has {has})",
                )
            )
    try:
        key_usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass  # no keyUsage: any use
    else:
        if not (
            key_usage.digital_signature or key_usage.key_encipherment or key_usage.key_agreement
        ):
            has = ", ".join(label for attr, label in _KEY_USAGE_NAMES if getattr(key_usage, attr))
            problems.append(
                Problem(
                    Reason.TLS_WRONG_USAGE,
                    "key usage lacks digitalSignature, keyEncipherment and keyAgreement "
                    f"(has {has or 'none'})",
                )
            )
    return problems


def _check_all(
    cert: x509.Certificate, now: datetime, purpose: Purpose, pinned: bool
) -> list[Problem]:
    return _check_validity(cert, now) + list(_static_problems(cert, purpose, pinned))


@functools.lru_cache(maxsize=CACHED_CERTIFICATES)
def _static_problems(cert: x509.Certificate, purpose: Purpose, pinned: bool) -> tuple[Problem, ...]:
    """What does not change with time (key, signature hash, usage), checked once per certificate
    (cryptography's certificates hash and compare by their DER); validity is checked every time."""
    problems: list[Problem] = []
    key_problem = _check_key(cert)
    if key_problem is not None:
        problems.append(key_problem)
    weak_hash = _weak_signature_hash(cert)
    if weak_hash is not None and not (pinned and _is_self_issued(cert)):
        problems.append(Problem(Reason.TLS_WEAK_CERTIFICATE, f"signed with {weak_hash}"))
    try:
        extensions = cert.extensions
    except Exception as exc:
        problems.append(
            Problem(
                Reason.TLS_WRONG_USAGE,
                f"its extensions cannot be read ({error_text(exc)}), "
                "so its permitted use is unknown",
            )
        )
    else:
        problems += _check_usage(extensions, purpose)
    return tuple(problems)


def check_certificate(
    cert: x509.Certificate, *, now: datetime, purpose: Purpose, pinned: bool = False
) -> list[Problem]:
    """Every reason to refuse the peer's end-entity certificate; an empty list means acceptable.

    ``purpose`` is what the peer uses it for: "client" (it connected to the proxy) or "server" (the
    proxy connected to it). ``pinned`` says the certificate is trusted by its thumbprint; a pinned
    self-signed certificate's signature hash is then not held against it. ``now`` without a time
    zone is taken as UTC. A leaf with basicConstraints CA:true is accepted (some devices' are).
    Raises ValueError only for a purpose other than "client" or "server" (a programming error).
    """
    if purpose not in _PURPOSE_OID:
        raise ValueError(f"purpose must be 'client' or 'server', not {purpose!r}")
    try:
        return _check_all(cert, utc(now), purpose, pinned)
    except Exception as exc:  # a certificate odd enough to defeat the checks above: fail closed
        return [
            Problem(Reason.TLS_UNTRUSTED, f"the certificate cannot be checked ({error_text(exc)})")
        ]


# --- revocation ---------------------------------------------------------------------------------


def _revocation_reason(entry: x509.RevokedCertificate) -> str:
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except Exception:
        return ""
    return f" ({flag.value})"


def _check_revocation(
    cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList], now: datetime
) -> Problem | None:
    if not crls:
        return None
    issuer = cert.issuer
    relevant = [crl for crl in crls if crl.issuer == issuer]
    if not relevant:
        return None
    serial = cert.serial_number
    for crl in relevant:
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        if entry is not None:
            return Problem(
                Reason.TLS_REVOKED,
                f"serial {serial:#x} revoked on {when(entry.revocation_date_utc)}"
                f"{_revocation_reason(entry)} by the CRL of {issuer_text(crl)}",
            )
    for crl in relevant:
        next_update = crl.next_update_utc
        if next_update is None:
            return Problem(
                Reason.TLS_CRL_STALE,
                f"the CRL of {issuer_text(crl)} has no nextUpdate, so it may be stale",
            )
        if now > next_update:
            return Problem(
                Reason.TLS_CRL_STALE,
                f"the CRL of {issuer_text(crl)} was due for renewal on {when(next_update)}",
            )
    return None


def check_revocation(
    cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList], now: datetime
) -> Problem | None:
    """Check the certificate against the CRLs of its issuer (matched by name).

    A serial listed in any of them is TLS_REVOKED (this wins over staleness: a revocation stays
    true); otherwise a CRL of that issuer past its nextUpdate, or without one, is TLS_CRL_STALE.
    None when no CRL names the certificate's issuer (not checked) or when it is not revoked. A
    certificate or CRL that cannot be read gives TLS_CRL_STALE: its revocation status is unknown.
    Signatures are not checked here: `crl_signed_by` vets the CRLs when the configuration loads.
    """
    try:
        return _check_revocation(cert, crls, utc(now))
    except Exception as exc:
        return Problem(
            Reason.TLS_CRL_STALE, f"the revocation status cannot be read ({error_text(exc)})"
        )


def crl_signed_by(crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> bool:
    """Whether one of the CAs issued the CRL: same name, valid signature, and (if the CA has a
    keyUsage extension) cRLSign, which OpenSSL also requires before it trusts a CRL."""
    for ca in cas:
        try:
            if ca.subject != crl.issuer:
                continue
            extensions = extensions_of(ca)
            if extensions is None:
                continue
            try:
                if not extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign:
                    continue
            except x509.ExtensionNotFound:
                pass
            public_key = ca.public_key()
            if isinstance(public_key, _NON_SIGNING_KEYS):
                continue
            if crl.is_signature_valid(public_key):
                return True
        except Exception:
            continue
    return False


def openssl_error_reason(errnum: int) -> Reason:
    """The word for an OpenSSL verification error (X509_V_ERR_*); TLS_UNTRUSTED by default."""
    return _OPENSSL_ERRORS.get(errnum, Reason.TLS_UNTRUSTED)


# --- identity and description -------------------------------------------------------------------


@functools.lru_cache(maxsize=CACHED_CERTIFICATES)
def certificate_from_der(der: bytes) -> x509.Certificate:
    """The parsed certificate (cryptography also keeps its parsed extensions with it)."""
    return x509.load_der_x509_certificate(der)


def peer_identity(cert: x509.Certificate, *, chain_verified: bool) -> PeerIdentity:
    """What access control needs to know about the peer; unreadable parts are left empty."""
    return _peer_identity(cert.public_bytes(Encoding.DER), chain_verified)


@functools.lru_cache(maxsize=CACHED_CERTIFICATES)
def _peer_identity(der: bytes, chain_verified: bool) -> PeerIdentity:
    cert = certificate_from_der(der)
    subject: str | None
    try:
        subject = cert.subject.rfc4514_string()
        cns = attribute_values(cert.subject, NameOID.COMMON_NAME)
        units = attribute_values(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    except Exception:
        subject, cns, units = None, (), ()
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    san = subject_alt_names(cert)
    if isinstance(san, x509.SubjectAlternativeName):
        try:
            dns_names = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except Exception:
            dns_names, uris = (), ()
    sha256, sha1 = der_thumbprints(der)
    return PeerIdentity(
        subject=subject,
        common_names=cns,
        organizational_units=units,
        dns_names=dns_names,
        uris=uris,
        sha256=sha256.digest,
        sha1=sha1.digest,
        chain_verified=chain_verified,
    )


def describe(cert: x509.Certificate) -> dict[str, str]:
    """Subject, issuer, validity (ISO 8601 UTC) and thumbprints, for logs and the echo command."""
    return dict(_description(cert.public_bytes(Encoding.DER)))


@functools.lru_cache(maxsize=CACHED_CERTIFICATES)
def _description(der: bytes) -> tuple[tuple[str, str], ...]:
    cert = certificate_from_der(der)
    sha256, sha1 = der_thumbprints(der)
    return tuple(
        {
            "subject": subject_text(cert),
            "cn": common_names(cert),
            "issuer": issuer_text(cert),
            "not_before": time_text(lambda: cert.not_valid_before_utc),
            "not_after": time_text(lambda: cert.not_valid_after_utc),
            "sha256": str(sha256),
            "sha1": str(sha1),
        }.items()
    )
