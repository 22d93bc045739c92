"""The development PKI (``certs init``) and the certificate helpers the other tests build on."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.security import certload

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

UTC = datetime.UTC
CA = tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def ca() -> CA:
    return devpki.make_ca("test CA")


def ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def key_id(cert: x509.Certificate) -> bytes:
    """RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey bits (for RSA, the PKCS#1
    RSAPublicKey), computed here rather than by cryptography's helper the product uses."""
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.PKCS1)
    return hashlib.sha1(der, usedforsecurity=False).digest()


def common_name(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


# --- init_pki ----------------------------------------------------------------------------------


@needs_openssl
def test_init_pki_verifies_with_openssl(tmp_path: Path) -> None:
    written = devpki.init_pki(tmp_path)
    assert [path.name for path in written] == list(devpki.PKI_FILES)
    result = openssl(
        "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "proxy.pem", tmp_path / "client.pem"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": OK") == 2
    # The purposes the certificates are for, as OpenSSL checks them in a handshake.
    for purpose, name in (("sslserver", "proxy"), ("sslclient", "proxy"), ("sslclient", "client")):
        result = openssl(
            "verify", "-purpose", purpose, "-CAfile", tmp_path / "ca.pem", tmp_path / f"{name}.pem"
        )
        assert result.returncode == 0, (purpose, name, result.stderr)
    result = openssl(
        "verify", "-purpose", "sslserver", "-CAfile", tmp_path / "ca.pem", tmp_path / "client.pem"
    )
    assert result.returncode != 0


def test_init_pki_certificate_contents(tmp_path: Path) -> None:
    devpki.init_pki(tmp_path, days=30)
    ca_cert = certload.load_certificates(tmp_path / "ca.pem")[0]
    proxy = certload.load_certificates(tmp_path / "proxy.pem")[0]
    client = certload.load_certificates(tmp_path / "client.pem")[0]

    constraints = ext(ca_cert, x509.BasicConstraints)
    assert constraints.critical and isinstance(constraints.value, x509.BasicConstraints)
    assert constraints.value.ca
    ca_usage = ext(ca_cert, x509.KeyUsage).value
    assert isinstance(ca_usage, x509.KeyUsage)
    assert ca_usage.key_cert_sign and ca_usage.crl_sign and not ca_usage.digital_signature
    ca_ski = ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert ca_ski.digest == key_id(ca_cert)

    assert common_name(proxy) == "dicom-tls-proxy"
    assert eku(proxy) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = proxy.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = ext(proxy, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign

    assert common_name(client) == "dicom-client"
    assert eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    client_san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert client_san.get_values_for_type(x509.DNSName) == ["dicom-client"]

    for leaf in (proxy, client):
        assert leaf.issuer == ca_cert.subject
        leaf_constraints = ext(leaf, x509.BasicConstraints).value
        assert isinstance(leaf_constraints, x509.BasicConstraints) and not leaf_constraints.ca
        aki = ext(leaf, x509.AuthorityKeyIdentifier).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        assert aki.key_identifier == ca_ski.digest
        ski = ext(leaf, x509.SubjectKeyIdentifier).value
        assert isinstance(ski, x509.SubjectKeyIdentifier) and ski.digest == key_id(leaf)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=10)

    for cert in (ca_cert, proxy, client):
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        public_key = cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 2048

    for stem in ("proxy", "client"):
        identity = certload.load_identity(tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key", None)
        assert identity.chain == ()


def test_init_pki_modes_from_creation(tmp_path: Path) -> None:
    previous = os.umask(0)  # the most permissive umask: keys must still be 0600
    try:
        devpki.init_pki(tmp_path / "pki")
    finally:
        os.umask(previous)
    for name in devpki.PKI_FILES:
        mode = stat.S_IMODE((tmp_path / "pki" / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name


def test_init_pki_creates_nested_directory(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "a" / "b" / "pki"
    assert len(devpki.init_pki(target)) == 6
    assert sorted(path.name for path in target.iterdir()) == sorted(devpki.PKI_FILES)


@pytest.mark.parametrize("existing", devpki.PKI_FILES)
def test_init_pki_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(FileExistsError) as caught:
        devpki.init_pki(tmp_path)
    assert caught.value.filename == str(tmp_path / existing)
    assert existing in str(caught.value)
    assert [path.name for path in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_init_pki_names_every_existing_file(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"")
    (tmp_path / "proxy.key").symlink_to(tmp_path / "missing")  # a dangling symlink counts
    with pytest.raises(FileExistsError) as caught:
        devpki.init_pki(tmp_path)
    assert caught.value.filename == str(tmp_path / "ca.key")
    assert "proxy.key" in str(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ca.key", "proxy.key"]


# --- helpers -----------------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize(
    ("when", "error"),
    [
        ("expired", "certificate has expired"),
        ("not-yet-valid", "certificate is not yet valid"),
    ],
)
def test_make_leaf_validity(
    tmp_path: Path,
    ca: CA,
    when: str,
    error: str,
) -> None:
    now = datetime.datetime.now(UTC)
    day = datetime.timedelta(days=1)
    start, end = (now - 10 * day, now - day) if when == "expired" else (now + day, now + 10 * day)
    _, leaf = devpki.make_leaf(*ca, "leaf", not_before=start, not_after=end)
    assert leaf.not_valid_before_utc == start.replace(microsecond=0)
    devpki.write_pem_cert(tmp_path / "ca.pem", ca[1])
    devpki.write_pem_cert(tmp_path / "leaf.pem", leaf)
    result = openssl("verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem")
    assert result.returncode != 0
    assert error in result.stdout + result.stderr


@needs_openssl
def test_make_leaf_wrong_eku(tmp_path: Path, ca: CA) -> None:
    _, leaf = devpki.make_leaf(*ca, "client only", server=False)
    assert eku(leaf) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    devpki.write_pem_cert(tmp_path / "ca.pem", ca[1])
    devpki.write_pem_cert(tmp_path / "leaf.pem", leaf)
    args = ("-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem")
    assert openssl("verify", "-purpose", "sslclient", *args).returncode == 0
    result = openssl("verify", "-purpose", "sslserver", *args)
    assert result.returncode != 0
    assert "error 26 at 0 depth" in result.stdout + result.stderr  # unsuitable purpose

    _, email = devpki.make_leaf(
        *ca, "mail", extended_key_usage=[ExtendedKeyUsageOID.EMAIL_PROTECTION]
    )
    assert eku(email) == {ExtendedKeyUsageOID.EMAIL_PROTECTION}
    _, anything = devpki.make_leaf(*ca, "no eku", server=False, client=False, key_usage=False)
    assert not any(
        isinstance(e.value, x509.ExtendedKeyUsage | x509.KeyUsage) for e in anything.extensions
    )


@needs_openssl
def test_make_leaf_1024_bit_key(tmp_path: Path, ca: CA) -> None:
    key, leaf = devpki.make_leaf(*ca, "small", key_size=1024)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 1024
    devpki.write_pem_cert(tmp_path / "ca.pem", ca[1])
    devpki.write_pem_cert(tmp_path / "leaf.pem", leaf)
    args = ("-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem")
    assert openssl("verify", "-auth_level", "1", *args).returncode == 0
    result = openssl("verify", "-auth_level", "2", *args)
    assert "key too weak" in result.stdout + result.stderr


@needs_openssl
def test_make_leaf_sha1_signature(tmp_path: Path, ca: CA) -> None:
    # cryptography refuses SHA-1 for certificate signatures; the helper works around it.
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca[1].subject)
        .issuer_name(ca[1].subject)
        .public_key(ca[1].public_key())
        .serial_number(1)
        .not_valid_before(ca[1].not_valid_before_utc)
        .not_valid_after(ca[1].not_valid_after_utc)
    )
    with pytest.raises(UnsupportedAlgorithm, match="sha1"):
        builder.sign(ca[0], hashes.SHA1())  # type: ignore[arg-type]

    _, leaf = devpki.make_leaf(*ca, "legacy", hash_alg=hashes.SHA1(), dns=["legacy"])
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA1)
    assert leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA1
    # cryptography will not check a SHA-1 signature either (verify_directly_issued_by raises
    # "Unsupported signature algorithm"); the raw primitive still does.
    with pytest.raises(ValueError, match="Unsupported signature algorithm"):
        leaf.verify_directly_issued_by(ca[1])
    ca_public_key = ca[1].public_key()
    assert isinstance(ca_public_key, rsa.RSAPublicKey)
    ca_public_key.verify(
        leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1()
    )
    devpki.write_pem_cert(tmp_path / "ca.pem", ca[1])
    devpki.write_pem_cert(tmp_path / "leaf.pem", leaf)
    args = ("-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem")
    assert openssl("verify", "-auth_level", "0", *args).returncode == 0, "signature must verify"
    result = openssl("verify", "-auth_level", "2", *args)
    assert result.returncode != 0
    assert "too weak" in result.stdout + result.stderr

    ec_key, ec_ca = devpki.make_ca("ec CA", private_key=ec.generate_private_key(ec.SECP256R1()))
    _, ec_leaf = devpki.make_leaf(ec_key, ec_ca, "legacy ec", hash_alg=hashes.SHA1())
    assert ec_leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA1
    ec_public_key = ec_ca.public_key()
    assert isinstance(ec_public_key, ec.EllipticCurvePublicKey)
    ec_public_key.verify(ec_leaf.signature, ec_leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA1()))


def test_make_leaf_ec_key(ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    returned, leaf = devpki.make_leaf(*ca, "ecdsa", private_key=key)
    assert returned is key
    usage = ext(leaf, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_encipherment
    leaf.verify_directly_issued_by(ca[1])


@needs_openssl
def test_make_self_signed(tmp_path: Path) -> None:
    _, cert = devpki.make_self_signed("device", dns=["device.local"], ips=["10.0.0.7"])
    assert cert.issuer == cert.subject
    constraints = ext(cert, x509.BasicConstraints).value
    assert isinstance(constraints, x509.BasicConstraints) and not constraints.ca
    cert.verify_directly_issued_by(cert)
    devpki.write_pem_cert(tmp_path / "self.pem", cert)
    # Trusted as its own anchor, the way a pinned device certificate is.
    assert (
        openssl("verify", "-CAfile", tmp_path / "self.pem", tmp_path / "self.pem").returncode == 0
    )


@needs_openssl
def test_make_crl(tmp_path: Path, ca: CA) -> None:
    _, leaf = devpki.make_leaf(*ca, "revoked")
    next_update = datetime.datetime.now(UTC) + datetime.timedelta(days=3)
    crl = devpki.make_crl(*ca, [leaf.serial_number, 12345], next_update=next_update)
    assert crl.is_signature_valid(ca[0].public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert crl.next_update_utc == next_update.replace(microsecond=0)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
    ca_pem = tmp_path / "ca.pem"
    devpki.write_pem_cert(ca_pem, ca[1])
    devpki.write_pem_cert(tmp_path / "leaf.pem", leaf)
    result = openssl("crl", "-in", tmp_path / "crl.pem", "-CAfile", tmp_path / "ca.pem", "-noout")
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout + result.stderr

    undated = devpki.make_crl(*ca, [7], next_update=None)
    assert undated.next_update_utc is None
    assert undated.is_signature_valid(ca[0].public_key())
    assert undated.get_revoked_certificate_by_serial_number(7) is not None
    (tmp_path / "undated.pem").write_bytes(undated.public_bytes(Encoding.PEM))
    result = openssl("crl", "-in", tmp_path / "undated.pem", "-CAfile", ca_pem, "-noout")
    assert "verify OK" in result.stdout + result.stderr

    past = datetime.datetime.now(UTC) - datetime.timedelta(days=2)
    stale = devpki.make_crl(*ca, [], next_update=past)  # lastUpdate moves back to stay before it
    assert stale.next_update_utc == past.replace(microsecond=0)
    assert stale.last_update_utc < past
    result = openssl(
        "verify",
        "-crl_check",
        "-CAfile",
        tmp_path / "ca.pem",
        "-CRLfile",
        tmp_path / "crl.pem",
        tmp_path / "leaf.pem",
    )
    assert "certificate revoked" in result.stdout + result.stderr


def test_write_pem_key_mode_password_and_refusal(tmp_path: Path) -> None:
    key, _ = devpki.make_self_signed("k")
    path = tmp_path / "k.key"
    devpki.write_pem_key(path, key, b"pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    loaded = load_pem_private_key(path.read_bytes(), b"pw")
    assert loaded.public_key() == key.public_key()
    with pytest.raises(FileExistsError):
        devpki.write_pem_key(path, key)
    other, _ = devpki.make_self_signed("other")
    devpki.write_pem_key(path, other, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_pem_private_key(path.read_bytes(), None).public_key() == other.public_key()
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary file left


def test_write_pem_key_does_not_follow_symlink(tmp_path: Path) -> None:
    key, _ = devpki.make_self_signed("k")
    (tmp_path / "link.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        devpki.write_pem_key(tmp_path / "link.key", key)
    assert not (tmp_path / "elsewhere").exists()


def test_write_pem_cert_chain_order(tmp_path: Path, ca: CA) -> None:
    _, leaf = devpki.make_leaf(*ca, "leaf")
    devpki.write_pem_cert(tmp_path / "chain.pem", leaf, ca[1])
    assert certload.load_certificates(tmp_path / "chain.pem") == [leaf, ca[1]]
    with pytest.raises(FileExistsError):
        devpki.write_pem_cert(tmp_path / "chain.pem", leaf)
    devpki.write_pem_cert(tmp_path / "chain.pem", ca[1], overwrite=True)
    assert certload.load_certificates(tmp_path / "chain.pem") == [ca[1]]
    with pytest.raises(ValueError, match="no certificate"):
        devpki.write_pem_cert(tmp_path / "empty.pem")
