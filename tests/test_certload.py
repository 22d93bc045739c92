"""Loading certificates, keys, CA folders and CRLs, and the errors that point at the right key."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.security.certload import (
    CertificateError,
    Identity,
    crl_expires_soon,
    crl_is_stale,
    insecure_file_reason,
    key_file_warnings,
    load_ca,
    load_certificates,
    load_crls,
    load_identity,
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

CA = tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
PASSWORD = b"Tr0ub4dor&3-sekrit"
UTC = datetime.UTC


def openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


def assert_no_secret(error: BaseException, secret: bytes = PASSWORD) -> None:
    """Neither the message, the repr nor the formatted traceback mention the secret."""
    text = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    assert secret.decode() not in text
    assert secret.hex() not in text


@pytest.fixture(scope="module")
def ca() -> CA:
    return devpki.make_ca("certload CA")


@pytest.fixture(scope="module")
def leaf(ca: CA) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    return devpki.make_leaf(*ca, "leaf", dns=["leaf"])


@pytest.fixture
def files(
    tmp_path: Path, ca: CA, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> Path:
    """cert.pem (leaf + CA), key.pem (plain), enc.pem (encrypted with PASSWORD), ca.pem."""
    key, cert = leaf
    devpki.write_pem_cert(tmp_path / "cert.pem", cert, ca[1])
    devpki.write_pem_key(tmp_path / "key.pem", key)
    devpki.write_pem_key(tmp_path / "enc.pem", key, PASSWORD)
    devpki.write_pem_cert(tmp_path / "ca.pem", ca[1])
    return tmp_path


# --- load_certificates -------------------------------------------------------------------------


def test_load_pem_many_and_der(files: Path, ca: CA, leaf: tuple[object, x509.Certificate]) -> None:
    assert load_certificates(files / "cert.pem") == [leaf[1], ca[1]]
    (files / "leaf.der").write_bytes(leaf[1].public_bytes(Encoding.DER))
    assert load_certificates(files / "leaf.der") == [leaf[1]]
    # Windows line ends and a UTF-8 byte-order mark (Notepad) are fine.
    crlf = b"\xef\xbb\xbf" + (files / "cert.pem").read_bytes().replace(b"\n", b"\r\n")
    (files / "crlf.pem").write_bytes(crlf)
    assert load_certificates(files / "crlf.pem") == [leaf[1], ca[1]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, world\n", "not a PEM, DER or PKCS#12 file"),
        (b"", "not a PEM, DER or PKCS#12 file"),
        (b"\x30\x03\x02\x01\x05", "not a PEM, DER or PKCS#12 file"),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "no certificate found in file",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "the file holds a PEM certificate that cannot be parsed",
        ),
    ],
)
def test_load_certificates_errors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "x.crt").write_bytes(content)
    with pytest.raises(CertificateError) as caught:
        load_certificates(tmp_path / "x.crt")
    assert str(caught.value) == message
    assert caught.value.blame == "file"
    assert caught.value.path == tmp_path / "x.crt"


def test_load_certificates_unreadable(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="file not found") as caught:
        load_certificates(tmp_path / "missing.pem")
    assert caught.value.blame == "file"
    with pytest.raises(CertificateError, match="is a folder"):
        load_certificates(tmp_path)


# --- PKCS#12 -----------------------------------------------------------------------------------


def make_p12(
    path: Path,
    leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate],
    extra: list[x509.Certificate],
    password: bytes | None,
) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key = leaf[0]
    assert isinstance(key, rsa.RSAPrivateKey)
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(b"leaf", key, leaf[1], extra, encryption)
    )


@pytest.mark.parametrize("name", ["bundle.p12", "bundle.PFX", "bundle.bin"])
@pytest.mark.parametrize("password", [None, PASSWORD], ids=["no-password", "password"])
def test_pkcs12_identity(
    tmp_path: Path,
    ca: CA,
    leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate],
    name: str,
    password: bytes | None,
) -> None:
    make_p12(tmp_path / name, leaf, [ca[1]], password)
    identity = load_identity(tmp_path / name, None, password)
    assert identity.certificate == leaf[1]
    assert identity.chain == (ca[1],)
    assert load_certificates(tmp_path / name, password) == [leaf[1], ca[1]]


def test_pkcs12_password_errors(
    tmp_path: Path, ca: CA, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> None:
    make_p12(tmp_path / "b.p12", leaf, [ca[1]], PASSWORD)
    with pytest.raises(CertificateError) as caught:
        load_identity(tmp_path / "b.p12", None, b"wrong " + PASSWORD)
    assert caught.value.blame == "password"
    assert str(caught.value) == "wrong password or corrupt PKCS#12 file"
    assert_no_secret(caught.value)
    assert_no_secret(caught.value, b"wrong " + PASSWORD)
    with pytest.raises(CertificateError) as caught:
        load_identity(tmp_path / "b.p12", None, None)
    assert caught.value.blame == "password"
    assert "no password was given" in str(caught.value)


def test_pkcs12_password_given_but_not_needed(
    tmp_path: Path, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> None:
    make_p12(tmp_path / "b.p12", leaf, [], None)
    assert load_identity(tmp_path / "b.p12", None, PASSWORD).certificate == leaf[1]


@needs_openssl
@pytest.mark.parametrize("legacy", [False, True], ids=["aes", "legacy-rc2"])
def test_pkcs12_from_openssl(
    files: Path, leaf: tuple[object, x509.Certificate], legacy: bool
) -> None:
    openssl(
        "pkcs12",
        "-export",
        *(["-legacy"] if legacy else []),
        "-in",
        files / "cert.pem",
        "-inkey",
        files / "key.pem",
        "-passout",
        f"pass:{PASSWORD.decode()}",
        "-out",
        files / "b.pfx",
    )
    identity = load_identity(files / "b.pfx", None, PASSWORD)
    assert identity.certificate == leaf[1]
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "b.pfx", None, b"nope")
    assert caught.value.blame == "password"


def test_pkcs12_without_key(tmp_path: Path, ca: CA) -> None:
    (tmp_path / "t.p12").write_bytes(
        pkcs12.serialize_java_truststore(
            [pkcs12.PKCS12Certificate(ca[1], b"ca")], serialization.NoEncryption()
        )
    )
    assert load_certificates(tmp_path / "t.p12") == [ca[1]]
    with pytest.raises(CertificateError, match="holds no private key") as caught:
        load_identity(tmp_path / "t.p12", None, None)
    assert caught.value.blame == "key"


# --- PEM identity ------------------------------------------------------------------------------


def test_plain_key(files: Path, ca: CA, leaf: tuple[object, x509.Certificate]) -> None:
    identity = load_identity(files / "cert.pem", files / "key.pem", None)
    assert identity.certificate == leaf[1]
    assert identity.chain == (ca[1],)
    # A password for a key that needs none is not needed, and not an error.
    assert load_identity(files / "cert.pem", files / "key.pem", PASSWORD).certificate == leaf[1]


def test_encrypted_key_right_password(files: Path, leaf: tuple[object, x509.Certificate]) -> None:
    identity = load_identity(files / "cert.pem", files / "enc.pem", PASSWORD)
    assert identity.certificate == leaf[1]


def test_encrypted_key_wrong_password(files: Path) -> None:
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", files / "enc.pem", b"not the " + PASSWORD)
    assert str(caught.value) == "wrong password or corrupt key"
    assert caught.value.blame == "password"
    assert caught.value.path == files / "enc.pem"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert_no_secret(caught.value)
    assert_no_secret(caught.value, b"not the " + PASSWORD)


def test_encrypted_key_no_password(files: Path) -> None:
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", files / "enc.pem", None)
    assert caught.value.blame == "password"
    assert str(caught.value) == "the private key is encrypted and no password was given"


@needs_openssl
@pytest.mark.parametrize("form", ["traditional-pem", "pkcs8-der"])
def test_encrypted_key_openssl_formats(
    files: Path, leaf: tuple[object, x509.Certificate], form: str
) -> None:
    target = files / "other.key"
    passout = f"pass:{PASSWORD.decode()}"
    if form == "traditional-pem":  # "BEGIN RSA PRIVATE KEY" with Proc-Type/DEK-Info (3DES)
        openssl(
            "rsa",
            "-in",
            files / "key.pem",
            "-traditional",
            "-des3",
            "-passout",
            passout,
            "-out",
            target,
        )
        assert b"Proc-Type: 4,ENCRYPTED" in target.read_bytes()
    else:
        openssl(
            "pkcs8",
            "-topk8",
            "-in",
            files / "key.pem",
            "-outform",
            "DER",
            "-passout",
            passout,
            "-out",
            target,
        )
    assert load_identity(files / "cert.pem", target, PASSWORD).certificate == leaf[1]
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", target, b"wrong")
    assert caught.value.blame == "password"
    assert_no_secret(caught.value)


def test_der_plain_key(
    files: Path, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> None:
    (files / "key.der").write_bytes(
        leaf[0].private_bytes(
            Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert load_identity(files / "cert.pem", files / "key.der", None).certificate == leaf[1]


def test_combined_pem_file(
    files: Path, ca: CA, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> None:
    (files / "both.pem").write_bytes(
        (files / "cert.pem").read_bytes() + (files / "enc.pem").read_bytes()
    )
    identity = load_identity(files / "both.pem", None, PASSWORD)
    assert identity.certificate == leaf[1] and identity.chain == (ca[1],)
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "both.pem", None, None)
    assert caught.value.blame == "password"


def test_no_key_anywhere(files: Path) -> None:
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", None, None)
    assert caught.value.blame == "key"
    assert "no private key" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no private key found in file"),  # the certificate file given as the key
        (b"garbage", "not a PEM or DER private key, or a corrupt one"),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "not a PEM or DER private key, or a corrupt one",
        ),
    ],
)
def test_bad_key_file(files: Path, content: bytes | None, message: str) -> None:
    key_path = files / "bad.key"
    key_path.write_bytes(content if content is not None else (files / "cert.pem").read_bytes())
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", key_path, None)
    assert str(caught.value) == message
    assert caught.value.blame == "key"
    assert caught.value.path == key_path


def test_missing_key_file_blames_key(files: Path) -> None:
    with pytest.raises(CertificateError, match="file not found") as caught:
        load_identity(files / "cert.pem", files / "missing.key", None)
    assert caught.value.blame == "key"


def test_certificate_key_mismatch(files: Path, ca: CA) -> None:
    other_key, _ = devpki.make_leaf(*ca, "other")
    devpki.write_pem_key(files / "other.key", other_key)
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "cert.pem", files / "other.key", None)
    assert str(caught.value) == "certificate does not match the private key"
    assert caught.value.blame == "key"


def test_chain_in_wrong_order_hint(
    files: Path, ca: CA, leaf: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]
) -> None:
    devpki.write_pem_cert(files / "reversed.pem", ca[1], leaf[1])
    with pytest.raises(CertificateError) as caught:
        load_identity(files / "reversed.pem", files / "key.pem", None)
    assert str(caught.value).startswith("certificate does not match the private key")
    assert "certificate 2" in str(caught.value)


def test_identity_repr_hides_key(files: Path) -> None:
    identity = load_identity(files / "cert.pem", files / "enc.pem", PASSWORD)
    assert isinstance(identity, Identity)
    assert "private_key" not in repr(identity)
    assert "PrivateKey" not in repr(identity)


# --- CA files and folders ----------------------------------------------------------------------


def test_load_ca_file(files: Path, ca: CA, leaf: tuple[object, x509.Certificate]) -> None:
    assert load_ca(files / "ca.pem") == [ca[1]]
    assert load_ca(files / "cert.pem") == [leaf[1], ca[1]]


def test_load_ca_folder_any_names(tmp_path: Path, files: Path, ca: CA) -> None:
    _, second = devpki.make_ca("second CA")
    _, third = devpki.make_ca("third CA")
    folder = tmp_path / "trust"
    folder.mkdir()
    devpki.write_pem_cert(folder / "hospital-root.crt", ca[1])
    (folder / "Vendor Root CA.cer").write_bytes(second.public_bytes(Encoding.DER))
    devpki.write_pem_cert(folder / "noext", third)
    (folder / "abcd1234.0").symlink_to(folder / "hospital-root.crt")  # an OpenSSL hash link
    (folder / "README.txt").write_text("Put the CA certificates here.\n")
    shutil.copy(files / "key.pem", folder / "leftover.key")
    (folder / "empty").write_bytes(b"")
    (folder / "dangling.pem").symlink_to(folder / "missing.pem")
    (folder / "sub").mkdir()
    _, nested = devpki.make_ca("nested CA")
    devpki.write_pem_cert(folder / "sub" / "nested.pem", nested)
    crl = devpki.make_crl(
        *ca, [], next_update=datetime.datetime.now(UTC) + datetime.timedelta(days=1)
    )
    (folder / "ca.crl").write_bytes(crl.public_bytes(Encoding.DER))

    loaded = load_ca(folder)
    assert sorted(c.subject.rfc4514_string() for c in loaded) == [
        "CN=certload CA",
        "CN=second CA",
        "CN=third CA",
    ]


def test_load_ca_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("nothing here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CertificateError, match="no certificate found in folder") as caught:
        load_ca(tmp_path)
    assert caught.value.blame == "file"
    assert caught.value.path == tmp_path


def test_load_ca_folder_with_broken_certificate(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateError, match="cannot be parsed") as caught:
        load_ca(tmp_path)
    assert caught.value.path == tmp_path / "bad.pem"


# --- CRLs --------------------------------------------------------------------------------------


def test_load_crls_pem_and_der(tmp_path: Path, ca: CA) -> None:
    soon = datetime.datetime.now(UTC) + datetime.timedelta(days=30)
    first = devpki.make_crl(*ca, [1, 2], next_update=soon, crl_number=1)
    second = devpki.make_crl(*ca, [3], next_update=soon, crl_number=2)
    (tmp_path / "one.pem").write_bytes(first.public_bytes(Encoding.PEM))
    (tmp_path / "two.crl").write_bytes(second.public_bytes(Encoding.DER))
    (tmp_path / "both.pem").write_bytes(
        first.public_bytes(Encoding.PEM) + second.public_bytes(Encoding.PEM)
    )
    crls = load_crls([tmp_path / "one.pem", tmp_path / "two.crl"])
    assert [len(crl) for crl in crls] == [2, 1]
    assert crls == [first, second]
    assert load_crls([tmp_path / "both.pem"]) == [first, second]
    assert load_crls([]) == []


def test_load_crls_errors(tmp_path: Path, files: Path) -> None:
    (tmp_path / "junk.crl").write_bytes(b"\x30\x03junk")
    with pytest.raises(CertificateError, match="not a PEM or DER CRL") as caught:
        load_crls([tmp_path / "junk.crl"])
    assert caught.value.blame == "file"
    with pytest.raises(CertificateError, match="no CRL found in file"):
        load_crls([files / "ca.pem"])
    with pytest.raises(CertificateError, match="file not found"):
        load_crls([tmp_path / "missing.crl"])


def test_crl_staleness(ca: CA) -> None:
    now = datetime.datetime.now(UTC)
    day = datetime.timedelta(days=1)
    fresh = devpki.make_crl(*ca, [], next_update=now + 30 * day)
    ending = devpki.make_crl(*ca, [], next_update=now + 3 * day)
    stale = devpki.make_crl(*ca, [], last_update=now - 10 * day, next_update=now - day)

    assert not crl_is_stale(fresh, now) and not crl_expires_soon(fresh, now)
    assert not crl_is_stale(ending, now) and crl_expires_soon(ending, now)
    assert not crl_expires_soon(ending, now, days=2)
    assert crl_is_stale(stale, now) and not crl_expires_soon(stale, now)
    assert crl_is_stale(fresh, now + 31 * day)
    # Without nextUpdate nobody can tell whether a CRL is current: stale, as the TLS policy says.
    undated = devpki.make_crl(*ca, [], next_update=None)
    assert undated.next_update_utc is None
    assert crl_is_stale(undated, now) and not crl_expires_soon(undated, now)
    with pytest.raises(ValueError, match="timezone"):
        crl_is_stale(fresh, now.replace(tzinfo=None))


# --- file permissions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o644, True), (0o604, True), (0o640, False), (0o600, False), (0o440, False)],
)
def test_key_file_warnings(tmp_path: Path, mode: int, warned: bool) -> None:
    path = tmp_path / "tls.key"
    path.write_bytes(b"x")
    path.chmod(mode)
    warnings = key_file_warnings(path)
    assert bool(warnings) == warned
    if warned:
        assert str(path) in warnings[0] and f"{mode:04o}" in warnings[0]


def kubernetes_secret(tmp_path: Path, mode: int) -> Path:
    """A Secret volume the way the kubelet lays it out: tls.key -> ..data/tls.key -> ..2024_x/."""
    volume = tmp_path / "secret"
    timestamped = volume / "..2024_05_01_12_00_00.123456789"
    timestamped.mkdir(parents=True)
    (timestamped / "tls.key").write_bytes(b"x")
    (timestamped / "tls.key").chmod(mode)
    (volume / "..data").symlink_to(timestamped.name)
    (volume / "tls.key").symlink_to("..data/tls.key")
    volume.chmod(0o1777)  # the tmpfs root of a projected volume is world-writable with sticky bit
    return volume / "tls.key"


def test_key_file_warnings_follow_symlinks(tmp_path: Path) -> None:
    assert key_file_warnings(kubernetes_secret(tmp_path / "a", 0o640)) == []
    assert len(key_file_warnings(kubernetes_secret(tmp_path / "b", 0o644))) == 1
    assert key_file_warnings(tmp_path / "missing") == []


def test_insecure_file_reason(tmp_path: Path) -> None:
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    (safe / "k").write_bytes(b"x")
    (safe / "k").chmod(0o600)
    assert insecure_file_reason(safe / "k") is None

    (safe / "k").chmod(0o666)
    reason = insecure_file_reason(safe / "k")
    assert reason is not None and "writable by every user" in reason
    (safe / "k").chmod(0o600)

    open_folder = tmp_path / "open"
    open_folder.mkdir()
    (open_folder / "k").write_bytes(b"x")
    open_folder.chmod(0o777)
    reason = insecure_file_reason(open_folder / "k")
    assert reason is not None and "sticky" in reason and str(open_folder) in reason

    open_folder.chmod(0o1777)  # like /tmp: others cannot replace a file they do not own
    assert insecure_file_reason(open_folder / "k") is None


def test_insecure_file_reason_symlinks(tmp_path: Path) -> None:
    # A symlinked key (mode of the link itself is 0777) in a sane layout is fine.
    secret = kubernetes_secret(tmp_path, 0o640)
    assert secret.is_symlink()
    assert insecure_file_reason(secret) is None

    # The target is what counts: a link to a file in a world-writable folder is not fine...
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    (exposed / "k").write_bytes(b"x")
    exposed.chmod(0o777)
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    (safe / "k").symlink_to(exposed / "k")
    assert insecure_file_reason(safe / "k") is not None

    # ...nor is a link that anyone could swap, in a world-writable folder without sticky bit.
    (safe / "real").write_bytes(b"x")
    (exposed / "link").symlink_to(safe / "real")
    reason = insecure_file_reason(exposed / "link")
    assert reason is not None and str(exposed) in reason
    assert insecure_file_reason(tmp_path / "missing") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_key_file(files: Path) -> None:
    (files / "key.pem").chmod(0)
    with pytest.raises(CertificateError, match="permission denied") as caught:
        load_identity(files / "cert.pem", files / "key.pem", None)
    assert caught.value.blame == "key"
