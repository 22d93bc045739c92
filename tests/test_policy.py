"""Tests for dicom_tls_proxy.security.policy and its parts (certnames, certfields): certificates
made on the fly.

Certificates come from dicom_tls_proxy.dev.pki where it can make them (its SHA-1 certificates
are real: TBS re-signed with SHA-1, which OpenSSL verifies; so is its CRL without nextUpdate);
odd ones (DSA keys, custom key usages, duplicate extensions) are built here with cryptography
and, where cryptography refuses, by editing DER. MD5 and RSA-PSS/SHA-1 signatures come from the
openssl CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import crypto

from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.protocol.vocabulary import EXPLANATIONS, TLS_REASONS, Reason
from dicom_tls_proxy.security.certnames import certificate_names, server_name_matches
from dicom_tls_proxy.security.policy import (
    Problem,
    Purpose,
    check_certificate,
    check_revocation,
    crl_signed_by,
    describe,
    openssl_error_reason,
    peer_identity,
)
from dicom_tls_proxy.security.thumbprint import certificate_thumbprints

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
SHA1 = hashes.SHA1()

Key = CertificateIssuerPrivateKeyTypes


# --- fixtures and builders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> tuple[Key, x509.Certificate]:
    return devpki.make_ca("Policy Test CA")


@pytest.fixture(scope="module")
def other_ca() -> tuple[Key, x509.Certificate]:
    return devpki.make_ca("Other CA", private_key=ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """One leaf key reused wherever the key does not matter (EC keys are cheap to sign with)."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def leaf(ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    ca_key, ca_cert = ca
    return devpki.make_leaf(
        ca_key,
        ca_cert,
        "pacs.example.org",
        dns=(
            "pacs.example.org",
            "UPPER.Example.ORG",
            "*.wild.example.org",
            "xn--bcher-kva.example.org",
        ),
        ips=("127.0.0.1", "::1", "192.0.2.10"),
        private_key=ec_key,
    )[1]


def _name(cn: str, *extra: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    attributes += [x509.NameAttribute(oid, value) for oid, value in extra]
    return x509.Name(attributes)


def build(
    *,
    subject: x509.Name,
    key: CertificatePublicKeyTypes,
    issuer: x509.Name | None = None,
    issuer_key: Key,
    extensions: Sequence[x509.ExtensionType] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A certificate exactly as described, signed with SHA-256 (cryptography, no pki defaults)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer if issuer is not None else subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before if not_before is not None else NOW - DAY)
        .not_valid_after(not_after if not_after is not None else NOW + DAY)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def reasons(problems: Sequence[Problem]) -> list[Reason]:
    return [problem.reason for problem in problems]


def cert_with_duplicate_san(issuer_key: Key) -> x509.Certificate:
    """A certificate with two subjectAltName extensions (made as SAN + issuerAltName, then the
    issuerAltName OID 2.5.29.18 renamed 2.5.29.17, same length)."""
    names = x509.SubjectAlternativeName([x509.DNSName("dup.example.org")])
    cert = build(
        subject=_name("dup.example.org"),
        key=issuer_key.public_key(),
        issuer_key=issuer_key,
        extensions=[names, x509.IssuerAlternativeName([x509.DNSName("dup.example.org")])],
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    ian = bytes.fromhex("0603551d12")
    assert der.count(ian) == 1
    return x509.load_der_x509_certificate(der.replace(ian, bytes.fromhex("0603551d11")))


# --- vocabulary ---------------------------------------------------------------------------------


def test_name_mismatch_is_a_tls_reason() -> None:
    assert Reason.TLS_NAME_MISMATCH.value == "tls-name-mismatch"
    assert Reason.TLS_NAME_MISMATCH in TLS_REASONS
    assert "expected server name" in EXPLANATIONS[Reason.TLS_NAME_MISMATCH]
    assert set(EXPLANATIONS) == set(Reason)


def test_problem_is_frozen() -> None:
    problem = Problem(Reason.TLS_EXPIRED, "expired")
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.message = "x"  # type: ignore[misc]


# --- check_certificate: validity ----------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["client", "server"])
def test_good_leaf_has_no_problems(
    ca: tuple[Key, x509.Certificate], leaf: x509.Certificate, purpose: Purpose
) -> None:
    assert check_certificate(leaf, now=datetime.now(UTC), purpose=purpose) == []
    rsa_leaf = devpki.make_leaf(*ca, "rsa-leaf")[1]
    assert check_certificate(rsa_leaf, now=datetime.now(UTC), purpose=purpose) == []


def test_expired(ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey) -> None:
    cert = devpki.make_leaf(
        *ca,
        "old",
        not_before=datetime(2024, 1, 1, tzinfo=UTC),
        not_after=datetime(2025, 1, 1, tzinfo=UTC),
        private_key=ec_key,
    )[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == [
        Problem(Reason.TLS_EXPIRED, "expired on 2025-01-01 00:00 UTC")
    ]


def test_not_yet_valid(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    start = datetime(2031, 2, 3, 4, 5, tzinfo=UTC)
    cert = devpki.make_leaf(
        *ca, "future", not_before=start, not_after=start + DAY, private_key=ec_key
    )[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="server") == [
        Problem(Reason.TLS_NOT_YET_VALID, "not valid until 2031-02-03 04:05 UTC")
    ]


def test_validity_bounds_are_inclusive_and_naive_now_is_utc(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime(2026, 1, 2, tzinfo=UTC)
    cert = devpki.make_leaf(*ca, "edges", not_before=start, not_after=end, private_key=ec_key)[1]
    assert check_certificate(cert, now=start, purpose="client") == []
    assert check_certificate(cert, now=end, purpose="client") == []
    later = end + timedelta(seconds=1)
    assert reasons(check_certificate(cert, now=later, purpose="client")) == [Reason.TLS_EXPIRED]
    naive = later.replace(tzinfo=None)
    assert reasons(check_certificate(cert, now=naive, purpose="client")) == [Reason.TLS_EXPIRED]
    # The same instant in another time zone is the same instant.
    plus_two = end.astimezone(timezone(timedelta(hours=2)))
    assert check_certificate(cert, now=plus_two, purpose="client") == []


def test_unknown_purpose_is_a_programming_error(leaf: x509.Certificate) -> None:
    with pytest.raises(ValueError, match="purpose"):
        check_certificate(leaf, now=datetime.now(UTC), purpose="both")  # type: ignore[arg-type]


# --- check_certificate: keys --------------------------------------------------------------------


def test_rsa_1024_is_weak(ca: tuple[Key, x509.Certificate]) -> None:
    # cryptography 50 still generates RSA-1024 (it refuses below 1024).
    cert = devpki.make_leaf(*ca, "small", key_size=1024)[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == [
        Problem(Reason.TLS_WEAK_CERTIFICATE, "RSA key of 1024 bits, below the 2048 required")
    ]


@pytest.mark.parametrize(
    ("curve", "weak"),
    [
        (ec.SECP192R1(), True),
        (ec.SECP224R1(), True),
        (ec.SECP256R1(), False),
        (ec.SECP256K1(), False),
        (ec.SECP384R1(), False),
        (ec.SECP521R1(), False),
    ],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_ec_key_sizes(
    ca: tuple[Key, x509.Certificate], curve: ec.EllipticCurve, weak: bool
) -> None:
    cert = devpki.make_leaf(*ca, "ec", private_key=ec.generate_private_key(curve))[1]
    problems = check_certificate(cert, now=datetime.now(UTC), purpose="server")
    if weak:
        assert problems == [
            Problem(
                Reason.TLS_WEAK_CERTIFICATE,
                f"EC key on {curve.name} ({curve.key_size} bits), below the 256 required",
            )
        ]
    else:
        assert problems == []


def test_dsa_is_weak_whatever_its_size(other_ca: tuple[Key, x509.Certificate]) -> None:
    ca_key, ca_cert = other_ca
    key = dsa.generate_private_key(2048)
    cert = build(
        subject=_name("dsa"), key=key.public_key(), issuer=ca_cert.subject, issuer_key=ca_key
    )
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == [
        Problem(Reason.TLS_WEAK_CERTIFICATE, "DSA key of 2048 bits: DSA keys are not accepted")
    ]


def test_ed25519_is_fine() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    cert = build(subject=_name("ed"), key=key.public_key(), issuer_key=key)
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == []


# --- check_certificate: signature hash ----------------------------------------------------------


def test_sha1_signed_leaf_is_weak_even_when_pinned(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    ca_key, ca_cert = ca
    cert = devpki.make_leaf(ca_key, ca_cert, "sha1", hash_alg=SHA1, private_key=ec_key)[1]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    expected = [Problem(Reason.TLS_WEAK_CERTIFICATE, "signed with SHA-1")]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == expected
    # Pinning excuses a certificate's *own* signature only; this one is signed by a CA.
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client", pinned=True) == expected


@pytest.mark.parametrize("key_kind", ["rsa", "ec"])
def test_pinned_self_signed_sha1_is_accepted(key_kind: str) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1()) if key_kind == "ec" else None
    cert = devpki.make_self_signed("modality", hash_alg=SHA1, private_key=private_key)[1]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client", pinned=True) == []
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == [
        Problem(Reason.TLS_WEAK_CERTIFICATE, "signed with SHA-1")
    ]


def test_pinning_does_not_excuse_anything_else() -> None:
    cert = devpki.make_self_signed(
        "old-modality",
        hash_alg=SHA1,
        key_size=1024,
        not_before=datetime(2010, 1, 1, tzinfo=UTC),
        not_after=datetime(2020, 1, 1, tzinfo=UTC),
    )[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client", pinned=True) == [
        Problem(Reason.TLS_EXPIRED, "expired on 2020-01-01 00:00 UTC"),
        Problem(Reason.TLS_WEAK_CERTIFICATE, "RSA key of 1024 bits, below the 2048 required"),
    ]


@pytest.fixture(scope="module")
def openssl_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    executable = shutil.which("openssl")
    if executable is None:
        pytest.skip("no openssl command")
    directory = tmp_path_factory.mktemp("openssl")
    key = rsa.generate_private_key(65537, 2048)
    (directory / "key.pem").write_bytes(devpki.key_pem(key))
    yield executable, directory


def _openssl_self_signed(openssl_cli: tuple[str, Path], *options: str) -> x509.Certificate:
    executable, directory = openssl_cli
    out = directory / "cert.pem"
    subprocess.run(
        [
            *(executable, "req", "-x509", "-key", str(directory / "key.pem"), "-subj", "/CN=cli"),
            *("-days", "2", "-out", str(out), *options),
        ],
        check=True,
        capture_output=True,
    )
    return x509.load_pem_x509_certificate(out.read_bytes())


@pytest.mark.parametrize(
    ("options", "weak_hash"),
    [
        (("-md5",), "MD5"),
        (("-sha1",), "SHA-1"),
        (("-sha1", "-sigopt", "rsa_padding_mode:pss"), "SHA-1"),
        (("-sha256", "-sigopt", "rsa_padding_mode:pss"), None),
    ],
    ids=["md5", "sha1", "pss-sha1", "pss-sha256"],
)
def test_weak_hashes_signed_by_the_openssl_cli(
    openssl_cli: tuple[str, Path], options: tuple[str, ...], weak_hash: str | None
) -> None:
    cert = _openssl_self_signed(openssl_cli, *options)
    now = datetime.now(UTC) + timedelta(minutes=1)  # openssl starts validity at the current second
    problems = check_certificate(cert, now=now, purpose="server")
    if weak_hash is None:
        assert problems == []
    else:
        assert problems == [Problem(Reason.TLS_WEAK_CERTIFICATE, f"signed with {weak_hash}")]
        assert check_certificate(cert, now=now, purpose="server", pinned=True) == []


# --- check_certificate: usage -------------------------------------------------------------------


def test_wrong_extended_key_usage(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    server_only = devpki.make_leaf(*ca, "srv", server=True, client=False, private_key=ec_key)[1]
    client_only = devpki.make_leaf(*ca, "cli", server=False, client=True, private_key=ec_key)[1]
    assert check_certificate(server_only, now=datetime.now(UTC), purpose="server") == []
    assert check_certificate(server_only, now=datetime.now(UTC), purpose="client") == [
        Problem(Reason.TLS_WRONG_USAGE, "extended key usage lacks clientAuth (has serverAuth)")
    ]
    assert check_certificate(client_only, now=datetime.now(UTC), purpose="client") == []
    assert check_certificate(client_only, now=datetime.now(UTC), purpose="server") == [
        Problem(Reason.TLS_WRONG_USAGE, "extended key usage lacks serverAuth (has clientAuth)")
    ]


def test_extended_key_usage_names_unknown_oids(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    usages = [ExtendedKeyUsageOID.CODE_SIGNING, x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")]
    cert = devpki.make_leaf(*ca, "odd", extended_key_usage=usages, private_key=ec_key)[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == [
        Problem(
            Reason.TLS_WRONG_USAGE,
            "extended key usage lacks clientAuth (has codeSigning, 1.3.6.1.4.1.99999.1)",
        )
    ]


@pytest.mark.parametrize("purpose", ["client", "server"])
def test_any_extended_key_usage_and_no_eku_are_accepted(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey, purpose: Purpose
) -> None:
    any_usage = devpki.make_leaf(
        *ca,
        "any",
        extended_key_usage=[
            ExtendedKeyUsageOID.EMAIL_PROTECTION,
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
        ],
        private_key=ec_key,
    )[1]
    no_eku = devpki.make_leaf(*ca, "none", server=False, client=False, private_key=ec_key)[1]
    with pytest.raises(x509.ExtensionNotFound):
        no_eku.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert check_certificate(any_usage, now=datetime.now(UTC), purpose=purpose) == []
    assert check_certificate(no_eku, now=datetime.now(UTC), purpose=purpose) == []


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ({"digital_signature": True}, None),
        ({"key_encipherment": True}, None),
        ({"key_agreement": True}, None),
        ({"key_agreement": True, "decipher_only": True}, None),
        (
            {"key_cert_sign": True, "crl_sign": True},
            "key usage lacks digitalSignature, keyEncipherment and keyAgreement "
            "(has keyCertSign, cRLSign)",
        ),
        (
            {"content_commitment": True},
            "key usage lacks digitalSignature, keyEncipherment and keyAgreement "
            "(has nonRepudiation)",
        ),
    ],
)
def test_key_usage(
    other_ca: tuple[Key, x509.Certificate],
    ec_key: ec.EllipticCurvePrivateKey,
    flags: dict[str, bool],
    problem: str | None,
) -> None:
    ca_key, ca_cert = other_ca
    cert = build(
        subject=_name("ku"),
        key=ec_key.public_key(),
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        extensions=[key_usage(**flags)],
    )
    expected = [] if problem is None else [Problem(Reason.TLS_WRONG_USAGE, problem)]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client") == expected


def test_missing_key_usage_is_accepted(
    ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    cert = devpki.make_leaf(*ca, "noku", key_usage=False, private_key=ec_key)[1]
    assert check_certificate(cert, now=datetime.now(UTC), purpose="server") == []


def test_ca_true_leaf_is_accepted(ec_key: ec.EllipticCurvePrivateKey) -> None:
    # Some modalities present a self-signed certificate with CA:true.
    cert = build(
        subject=_name("modality"),
        key=ec_key.public_key(),
        issuer_key=ec_key,
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            key_usage(digital_signature=True, key_cert_sign=True),
        ],
    )
    assert check_certificate(cert, now=datetime.now(UTC), purpose="client", pinned=True) == []


def test_all_problems_are_reported_together(ca: tuple[Key, x509.Certificate]) -> None:
    ca_key, ca_cert = ca
    cert = devpki.make_leaf(
        ca_key,
        ca_cert,
        "everything-wrong",
        key_size=1024,
        hash_alg=SHA1,
        server=True,
        client=False,
        not_before=datetime(2019, 1, 1, tzinfo=UTC),
        not_after=datetime(2020, 1, 1, tzinfo=UTC),
    )[1]
    assert reasons(check_certificate(cert, now=datetime.now(UTC), purpose="client")) == [
        Reason.TLS_EXPIRED,
        Reason.TLS_WEAK_CERTIFICATE,
        Reason.TLS_WEAK_CERTIFICATE,
        Reason.TLS_WRONG_USAGE,
    ]


def test_duplicate_extensions_are_a_problem_not_an_exception(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    cert = cert_with_duplicate_san(ec_key)
    with pytest.raises(x509.DuplicateExtension):
        _ = cert.extensions
    problems = check_certificate(cert, now=datetime.now(UTC), purpose="server", pinned=True)
    assert reasons(problems) == [Reason.TLS_WRONG_USAGE]
    assert "extensions cannot be read" in problems[0].message
    assert "DuplicateExtension" in problems[0].message
    assert server_name_matches(cert, "dup.example.org") is False  # no CN fallback either
    assert certificate_names(cert) == []
    identity = peer_identity(cert, chain_verified=True)
    assert identity.dns_names == ()
    assert identity.common_names == ("dup.example.org",)
    assert identity.sha256 == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    assert describe(cert)["subject"] == "CN=dup.example.org"


# --- revocation ---------------------------------------------------------------------------------


def test_revoked(ca: tuple[Key, x509.Certificate], leaf: x509.Certificate) -> None:
    ca_key, ca_cert = ca
    last_update = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)
    crl = devpki.make_crl(
        ca_key,
        ca_cert,
        [leaf.serial_number, 12345],
        next_update=NOW + DAY,
        last_update=last_update,
    )
    problem = check_revocation(leaf, [crl], NOW)
    assert problem == Problem(
        Reason.TLS_REVOKED,
        f"serial {leaf.serial_number:#x} revoked on 2026-03-04 05:06 UTC "
        "by the CRL of CN=Policy Test CA",
    )


def test_revocation_reason_is_named(
    ca: tuple[Key, x509.Certificate], leaf: x509.Certificate
) -> None:
    ca_key, ca_cert = ca
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(leaf.serial_number)
        .revocation_date(NOW - DAY)
        .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
        .add_revoked_certificate(entry)
        .sign(ca_key, hashes.SHA256())
    )
    problem = check_revocation(leaf, [crl], NOW)
    assert problem is not None and problem.reason is Reason.TLS_REVOKED
    assert "(keyCompromise)" in problem.message


def test_not_revoked(ca: tuple[Key, x509.Certificate], leaf: x509.Certificate) -> None:
    crl = devpki.make_crl(*ca, [leaf.serial_number + 1], next_update=NOW + DAY)
    assert check_revocation(leaf, [crl], NOW) is None
    assert check_revocation(leaf, [], NOW) is None


def test_stale_crl(ca: tuple[Key, x509.Certificate], leaf: x509.Certificate) -> None:
    next_update = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    crl = devpki.make_crl(
        *ca, [], next_update=next_update, last_update=next_update - timedelta(days=7)
    )
    assert check_revocation(leaf, [crl], next_update) is None  # due at that instant, not past it
    assert check_revocation(leaf, [crl], next_update + timedelta(seconds=1)) == Problem(
        Reason.TLS_CRL_STALE,
        "the CRL of CN=Policy Test CA was due for renewal on 2026-01-02 03:04 UTC",
    )
    # One fresh CRL of the issuer does not excuse a stale one.
    fresh = devpki.make_crl(*ca, [], next_update=NOW + DAY)
    stale = check_revocation(leaf, [fresh, crl], NOW)
    assert stale is not None and stale.reason is Reason.TLS_CRL_STALE


def test_revoked_wins_over_stale(ca: tuple[Key, x509.Certificate], leaf: x509.Certificate) -> None:
    crl = devpki.make_crl(
        *ca, [leaf.serial_number], next_update=NOW - DAY, last_update=NOW - 2 * DAY
    )
    problem = check_revocation(leaf, [crl], NOW)
    assert problem is not None and problem.reason is Reason.TLS_REVOKED


def test_crl_without_next_update_is_stale(
    ca: tuple[Key, x509.Certificate], leaf: x509.Certificate
) -> None:
    crl = devpki.make_crl(*ca, [], next_update=None)
    assert crl.next_update_utc is None
    assert check_revocation(leaf, [crl], NOW) == Problem(
        Reason.TLS_CRL_STALE, "the CRL of CN=Policy Test CA has no nextUpdate, so it may be stale"
    )


def test_crl_of_another_issuer_is_ignored(
    other_ca: tuple[Key, x509.Certificate], leaf: x509.Certificate
) -> None:
    revoking_same_serial = devpki.make_crl(
        *other_ca, [leaf.serial_number], next_update=NOW - DAY, last_update=NOW - 2 * DAY
    )
    assert check_revocation(leaf, [revoking_same_serial], NOW) is None


def test_crl_signed_by(
    ca: tuple[Key, x509.Certificate], other_ca: tuple[Key, x509.Certificate]
) -> None:
    crl = devpki.make_crl(*ca, [1], next_update=NOW + DAY)
    assert crl_signed_by(crl, [ca[1]])
    assert crl_signed_by(crl, [other_ca[1], ca[1]])
    assert not crl_signed_by(crl, [other_ca[1]])
    assert not crl_signed_by(crl, [])
    # Same name, another key: an impostor.
    impostor = devpki.make_ca("Policy Test CA", private_key=ec.generate_private_key(ec.SECP256R1()))
    assert not crl_signed_by(crl, [impostor[1]])
    assert not crl_signed_by(devpki.make_crl(*impostor, [], next_update=NOW + DAY), [ca[1]])


def test_crl_signer_needs_crl_sign_when_it_has_key_usage(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    def ca_with(usage: x509.KeyUsage | None) -> x509.Certificate:
        extensions: list[x509.ExtensionType] = [x509.BasicConstraints(ca=True, path_length=None)]
        if usage is not None:
            extensions.append(usage)
        return build(
            subject=_name("KU CA"),
            key=ec_key.public_key(),
            issuer_key=ec_key,
            extensions=extensions,
        )

    crl = devpki.make_crl(ec_key, ca_with(None), [], next_update=NOW + DAY)
    assert crl_signed_by(crl, [ca_with(None)])
    assert crl_signed_by(crl, [ca_with(key_usage(key_cert_sign=True, crl_sign=True))])
    assert not crl_signed_by(crl, [ca_with(key_usage(key_cert_sign=True))])


# --- openssl_error_reason -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (9, Reason.TLS_NOT_YET_VALID),
        (10, Reason.TLS_EXPIRED),
        (12, Reason.TLS_CRL_STALE),
        (23, Reason.TLS_REVOKED),
        (26, Reason.TLS_WRONG_USAGE),
        (62, Reason.TLS_NAME_MISMATCH),
        (64, Reason.TLS_NAME_MISMATCH),
        (66, Reason.TLS_WEAK_CERTIFICATE),
        (67, Reason.TLS_WEAK_CERTIFICATE),
        (68, Reason.TLS_WEAK_CERTIFICATE),
        (0, Reason.TLS_UNTRUSTED),
        (2, Reason.TLS_UNTRUSTED),
        (3, Reason.TLS_UNTRUSTED),
        (7, Reason.TLS_UNTRUSTED),
        (18, Reason.TLS_UNTRUSTED),
        (19, Reason.TLS_UNTRUSTED),
        (20, Reason.TLS_UNTRUSTED),
        (21, Reason.TLS_UNTRUSTED),
        (63, Reason.TLS_UNTRUSTED),
        (9999, Reason.TLS_UNTRUSTED),
        (-1, Reason.TLS_UNTRUSTED),
    ],
)
def test_openssl_error_reason_table(code: int, reason: Reason) -> None:
    assert openssl_error_reason(code) is reason


def _openssl_verify(
    cert: x509.Certificate,
    trusted: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> tuple[int, str] | None:
    """Verify with the OpenSSL that pyOpenSSL links (cryptography's); (code, text) or None."""
    store = crypto.X509Store()
    for anchor in trusted:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    for crl in crls:
        store.add_crl(crl)
    if crls:
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        code, _depth, text = error.errors
        return int(code), str(text)
    return None


def test_openssl_error_codes_empirically(
    ca: tuple[Key, x509.Certificate],
    other_ca: tuple[Key, x509.Certificate],
    leaf: x509.Certificate,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    ca_key, ca_cert = ca
    assert _openssl_verify(leaf, [ca_cert]) is None

    expired = devpki.make_leaf(
        *ca, "expired", not_before=NOW - 3 * DAY, not_after=NOW - DAY, private_key=ec_key
    )[1]
    future = devpki.make_leaf(
        *ca, "future", not_before=NOW + DAY, not_after=NOW + 3 * DAY, private_key=ec_key
    )[1]
    self_signed = devpki.make_self_signed("self", private_key=ec_key)[1]
    unknown_issuer = devpki.make_leaf(*other_ca, "stranger", private_key=ec_key)[1]
    # Claims the trusted CA as issuer but is signed by another RSA key (OpenSSL 3+ does not even
    # try an issuer whose key type cannot have made the signature: that would be 20, not 7).
    forged = build(
        subject=_name("forged"),
        key=ec_key.public_key(),
        issuer=ca_cert.subject,
        issuer_key=rsa.generate_private_key(65537, 2048),
    )
    revoking = devpki.make_crl(ca_key, ca_cert, [leaf.serial_number], next_update=NOW + DAY)
    stale = devpki.make_crl(ca_key, ca_cert, [], next_update=NOW - DAY, last_update=NOW - 2 * DAY)

    cases = [
        (expired, [ca_cert], (), 10, Reason.TLS_EXPIRED),
        (future, [ca_cert], (), 9, Reason.TLS_NOT_YET_VALID),
        (self_signed, [ca_cert], (), 18, Reason.TLS_UNTRUSTED),
        (unknown_issuer, [ca_cert], (), 20, Reason.TLS_UNTRUSTED),
        (forged, [ca_cert], (), 7, Reason.TLS_UNTRUSTED),
        (leaf, [ca_cert], [revoking], 23, Reason.TLS_REVOKED),
        (leaf, [ca_cert], [stale], 12, Reason.TLS_CRL_STALE),
    ]
    for cert, trusted, crls, code, reason in cases:
        result = _openssl_verify(cert, trusted, crls)
        assert result is not None, cert.subject
        assert result[0] == code, result
        assert openssl_error_reason(result[0]) is reason

    # OpenSSL and the policy agree on the words for the same certificates.
    assert reasons(check_certificate(expired, now=datetime.now(UTC), purpose="client")) == [
        Reason.TLS_EXPIRED
    ]
    assert reasons(check_certificate(future, now=datetime.now(UTC), purpose="client")) == [
        Reason.TLS_NOT_YET_VALID
    ]
    revoked = check_revocation(leaf, [revoking], NOW)
    assert revoked is not None and revoked.reason is Reason.TLS_REVOKED


def test_openssl_accepts_the_sha1_certificates_pki_makes() -> None:
    # pki's SHA-1 certificates carry real SHA-1 signatures: OpenSSL verifies the self-signature.
    cert = devpki.make_self_signed("sha1", hash_alg=SHA1)[1]
    assert _openssl_verify(cert, [cert]) is None
    untrusted = _openssl_verify(cert, [])
    assert untrusted is not None and untrusted[0] == 18


# --- server names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pacs.example.org", True),
        ("PACS.Example.Org", True),
        ("pacs.example.org.", True),
        ("pacs.example.org..", False),
        (".pacs.example.org", False),
        ("upper.example.org", True),
        ("example.org", False),
        ("pacs.example.org.evil", False),
        ("a.wild.example.org", True),
        ("A-1.WILD.example.org.", True),
        ("xn--bcher-kva.wild.example.org", True),
        ("wild.example.org", False),
        ("a.b.wild.example.org", False),
        (".wild.example.org", False),
        ("*.wild.example.org", False),
        ("xn--bcher-kva.example.org", True),
        ("XN--BCHER-KVA.example.org", True),
        ("bücher.example.org", False),
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("192.0.2.10", True),
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),
        ("0000:0000:0000:0000:0000:0000:0000:0001", True),
        ("[::1]", True),
        ("::1%lo", True),
        ("::2", False),
        ("::ffff:127.0.0.1", False),
        ("127.1", False),
        ("localhost", False),
        ("", False),
        (".", False),
        ("*", False),
    ],
)
def test_server_name_matches(leaf: x509.Certificate, name: str, expected: bool) -> None:
    assert server_name_matches(leaf, name) is expected


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (["f*.example.org"], "foo.example.org", False),
        (["*oo.example.org"], "foo.example.org", False),
        (["*.org"], "example.org", False),
        (["*.*.example.org"], "a.b.example.org", False),
        (["a.*.example.org"], "a.b.example.org", False),
        (["*.example.org"], "example.org", False),
        (["*.example.org"], "a.example.org", True),
        (["*.example.org."], "a.example.org", True),
        (["*.0.0.1"], "127.0.0.1", False),
        (["127.0.0.1"], "127.0.0.1", False),  # a dNSName never matches an IP address
        (["*.0.0.1"], "a.0.0.1", False),  # numeric last label: never a host name
        (["*"], "localhost", False),
        (["localhost"], "localhost", True),
    ],
)
def test_dns_san_patterns(
    ec_key: ec.EllipticCurvePrivateKey, patterns: list[str], name: str, expected: bool
) -> None:
    cert = build(
        subject=_name("ignored.example.org"),
        key=ec_key.public_key(),
        issuer_key=ec_key,
        extensions=[x509.SubjectAlternativeName([x509.DNSName(p) for p in patterns])],
    )
    assert server_name_matches(cert, name) is expected


def test_common_name_only_without_san(ec_key: ec.EllipticCurvePrivateKey) -> None:
    no_san = build(subject=_name("legacy.example.org"), key=ec_key.public_key(), issuer_key=ec_key)
    assert server_name_matches(no_san, "legacy.example.org")
    assert server_name_matches(no_san, "LEGACY.example.org.")
    assert not server_name_matches(no_san, "other.example.org")
    assert certificate_names(no_san) == ["legacy.example.org"]

    wildcard_cn = build(subject=_name("*.example.org"), key=ec_key.public_key(), issuer_key=ec_key)
    assert server_name_matches(wildcard_cn, "a.example.org")
    assert not server_name_matches(wildcard_cn, "example.org")

    ip_cn = build(subject=_name("127.0.0.1"), key=ec_key.public_key(), issuer_key=ec_key)
    assert not server_name_matches(ip_cn, "127.0.0.1")  # never the CN for an IP

    with_san = build(
        subject=_name("legacy.example.org"),
        key=ec_key.public_key(),
        issuer_key=ec_key,
        extensions=[x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("::1"))])],
    )
    assert not server_name_matches(with_san, "legacy.example.org")  # a SAN: the CN is ignored
    assert server_name_matches(with_san, "0::1")
    assert certificate_names(with_san) == ["::1"]


def test_certificate_names(leaf: x509.Certificate) -> None:
    assert certificate_names(leaf) == [
        "pacs.example.org",
        "UPPER.Example.ORG",
        "*.wild.example.org",
        "xn--bcher-kva.example.org",
        "127.0.0.1",
        "::1",
        "192.0.2.10",
    ]


# --- identity and description -------------------------------------------------------------------


def test_peer_identity(
    other_ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    ca_key, ca_cert = other_ca
    subject = _name(
        "modality-1",
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Radiology"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "CT"),
        (NameOID.ORGANIZATION_NAME, "Hospital, Inc."),
    )
    cert = build(
        subject=subject,
        key=ec_key.public_key(),
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        extensions=[
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("ct1.example.org"),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                    x509.UniformResourceIdentifier("urn:oid:1.2.3.4"),
                    x509.RFC822Name("ct@example.org"),
                    x509.DNSName("ct1"),
                ]
            )
        ],
    )
    identity = peer_identity(cert, chain_verified=True)
    sha256, sha1 = certificate_thumbprints(cert)
    assert identity.subject == subject.rfc4514_string()
    assert identity.subject == r"O=Hospital\, Inc.,OU=CT,OU=Radiology,CN=modality-1"
    assert identity.common_names == ("modality-1",)
    assert identity.organizational_units == ("Radiology", "CT")
    assert identity.dns_names == ("ct1.example.org", "ct1")
    assert identity.uris == ("urn:oid:1.2.3.4",)
    assert identity.sha256 == sha256.digest
    assert identity.sha1 == sha1.digest
    assert identity.chain_verified is True
    assert identity.has_certificate
    assert peer_identity(cert, chain_verified=False).chain_verified is False


def test_describe(leaf: x509.Certificate, ca: tuple[Key, x509.Certificate]) -> None:
    described = describe(leaf)
    assert set(described) == {
        "subject",
        "cn",
        "issuer",
        "not_before",
        "not_after",
        "sha256",
        "sha1",
    }
    assert described["cn"] == "pacs.example.org"
    assert described["subject"] == "CN=pacs.example.org"
    assert described["issuer"] == "CN=Policy Test CA"
    assert described["not_before"] == leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert described["not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert described["sha256"] == "sha256:" + leaf.fingerprint(hashes.SHA256()).hex()
    assert described["sha1"] == "sha1:" + leaf.fingerprint(hashes.SHA1()).hex()
    assert described["sha256"] == str(certificate_thumbprints(leaf)[0])

    fixed = devpki.make_leaf(
        *ca,
        "fixed",
        not_before=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        not_after=datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC),
        private_key=ec.generate_private_key(ec.SECP256R1()),
    )[1]
    assert describe(fixed)["not_before"] == "2026-01-02T03:04:05Z"
    assert describe(fixed)["not_after"] == "2027-01-02T03:04:05Z"


# --- never raise --------------------------------------------------------------------------------


def _exercise(
    cert: x509.Certificate, name: str, crls: Sequence[x509.CertificateRevocationList] = ()
) -> None:
    """Every public function on one certificate: none may raise, whatever it holds."""
    for purpose in ("client", "server"):
        for pinned in (False, True):
            problems = check_certificate(
                cert, now=datetime.now(UTC), purpose=purpose, pinned=pinned
            )
            assert all(isinstance(problem, Problem) for problem in problems)
    assert isinstance(server_name_matches(cert, name), bool)
    assert all(isinstance(n, str) for n in certificate_names(cert))
    assert peer_identity(cert, chain_verified=False).sha256 is not None
    assert set(describe(cert)) >= {"subject", "sha256"}
    assert check_revocation(cert, [], NOW) is None
    result = check_revocation(cert, crls, NOW)
    assert result is None or isinstance(result, Problem)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(max_size=80))
def test_server_name_matches_never_raises(leaf: x509.Certificate, name: str) -> None:
    assert isinstance(server_name_matches(leaf, name), bool)
    assert isinstance(server_name_matches(leaf, name + ".example.org"), bool)
    assert isinstance(server_name_matches(leaf, "*." + name), bool)
    assert check_certificate(leaf, now=datetime.now(UTC), purpose="server") == []


_DNS_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    common_name=st.text(min_size=1, max_size=16),  # the 64 limit counts UTF-8 bytes
    unit=st.text(min_size=1, max_size=16),
    dns=st.lists(_DNS_TEXT, max_size=4),
    uri=_DNS_TEXT,
    name=st.text(max_size=40),
)
def test_odd_names_in_certificates_never_raise(
    ec_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    unit: str,
    dns: list[str],
    uri: str,
    name: str,
) -> None:
    general: list[x509.GeneralName] = [x509.DNSName(value) for value in dns]
    general.append(x509.UniformResourceIdentifier(uri))
    cert = build(
        subject=_name(common_name, (NameOID.ORGANIZATIONAL_UNIT_NAME, unit)),
        key=ec_key.public_key(),
        issuer_key=ec_key,
        extensions=[x509.SubjectAlternativeName(general)],
    )
    _exercise(cert, name)
    _exercise(cert, dns[0] if dns else common_name)


@pytest.fixture(scope="module")
def rich_der(ca: tuple[Key, x509.Certificate], ec_key: ec.EllipticCurvePrivateKey) -> bytes:
    cert = devpki.make_leaf(
        *ca,
        "rich.example.org",
        dns=("rich.example.org", "*.rich.example.org"),
        ips=("127.0.0.1", "::1"),
        private_key=ec_key,
    )[1]
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def revoking_everything(
    ca: tuple[Key, x509.Certificate], rich_der: bytes
) -> list[x509.CertificateRevocationList]:
    serial = x509.load_der_x509_certificate(rich_der).serial_number
    return [devpki.make_crl(*ca, [serial, serial ^ 1, 1, 2], next_update=NOW + DAY)]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mangled_certificates_never_raise(
    rich_der: bytes, revoking_everything: list[x509.CertificateRevocationList], data: st.DataObject
) -> None:
    der = bytearray(rich_der)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(der) - 1), label="position")
        der[position] = data.draw(st.integers(0, 255), label="byte")
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        return  # cryptography refuses it outright: the TLS layer never gets a certificate object
    _exercise(cert, "rich.example.org", revoking_everything)
    _exercise(cert, "127.0.0.1", revoking_everything)
