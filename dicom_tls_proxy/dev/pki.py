"""A small development PKI: the backend of ``certs init DIR``, and the tests' certificate factory.

Why this exists: trying the proxy needs a CA, a server certificate for the proxy and a client
certificate for a DICOM peer, and getting ``openssl`` options right for all three (EKUs, SANs, key
usage) is where most first attempts fail. The same helpers let the tests (and the ``demo`` command)
make expired, not-yet-valid, wrong-EKU, 1024-bit or SHA-1-signed certificates on the fly.

Keys are RSA-2048 by default: DCMTK's default TLS profile (BCP 195 non-downgrading) fails TLS 1.2
with an ECDSA server certificate.

What it must never do: leave a private key readable by others, even for an instant (key files are
created with mode 0600 by ``os.open``, never chmod-ed afterwards); overwrite an existing file unless
explicitly asked (``init_pki`` checks every target before writing anything); put key bytes or
passwords in an exception message. It is for development and tests, not a production CA: no
serial-number database, no revocation bookkeeping beyond ``make_crl``. It is not part of the
proxy's production API surface: only ``certs init`` and ``demo`` import it (at call time), never the
code that serves. The SHA-1 signatures and CRLs without nextUpdate cryptography refuses to make are
written by hand in ``devsign``.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_tls_proxy.dev.sign import sign_sha1, without_next_update

SHA256: Final = hashes.SHA256()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Start validity a little in the past so that a peer whose clock lags does not see the certificate
# as not yet valid.
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
_DEFAULT_DAYS: Final = 825  # Apple's (and the CA/Browser Forum's former) maximum for TLS servers

PROXY_COMMON_NAME: Final = "dicom-tls-proxy"
CLIENT_COMMON_NAME: Final = "dicom-client"
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
PKI_FILES: Final = ("ca.pem", "ca.key", "proxy.pem", "proxy.key", "client.pem", "client.key")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_rsa_key(key_size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _validity(
    not_before: datetime.datetime | None, not_after: datetime.datetime | None, days: int
) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    end = not_after if not_after is not None else _now() + datetime.timedelta(days=days)
    return start, end


# Hashes cryptography signs certificates with itself; SHA-1 is made by `devsign.sign_sha1`.
_SIGNING_HASHES: Final = (
    hashes.SHA224,
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
    hashes.SHA3_224,
    hashes.SHA3_256,
    hashes.SHA3_384,
    hashes.SHA3_512,
)


def _sign(
    builder: x509.CertificateBuilder,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    hash_alg: hashes.HashAlgorithm,
) -> x509.Certificate:
    if isinstance(hash_alg, hashes.SHA1):
        return sign_sha1(builder.sign(issuer_key, SHA256), issuer_key)
    if not isinstance(hash_alg, _SIGNING_HASHES):
        raise ValueError(f"unsupported signature hash {hash_alg.name}")
    return builder.sign(issuer_key, hash_alg)


# --- certificates ------------------------------------------------------------------------------


def make_ca(
    common_name: str,
    *,
    key_size: int = 2048,
    days: int = _DEFAULT_DAYS,
    hash_alg: hashes.HashAlgorithm = SHA256,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    private_key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    """Make a self-signed CA: basicConstraints CA:true (critical), keyCertSign+cRLSign, SKI/AKI."""
    key: CertificateIssuerPrivateKeyTypes = (
        private_key if private_key is not None else _new_rsa_key(key_size)
    )
    start, end = _validity(not_before, not_after, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return key, _sign(builder, key, hash_alg)


def _end_entity(
    common_name: str,
    ca: tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate] | None,
    *,
    dns: Iterable[str],
    ips: Iterable[str | IPAddress],
    server: bool,
    client: bool,
    key_size: int,
    hash_alg: hashes.HashAlgorithm,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
    key_usage: bool,
    days: int,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None,
    private_key: CertificateIssuerPrivateKeyTypes | None,
) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    """The end-entity certificate of ``make_leaf`` (signed by ``ca``, with an AKI) and of
    ``make_self_signed`` (``ca`` None: issuer is the subject, signed by its own key, no AKI)."""
    key: CertificateIssuerPrivateKeyTypes = (
        private_key if private_key is not None else _new_rsa_key(key_size)
    )
    start, end = _validity(not_before, not_after, days)
    public_key = key.public_key()
    if not isinstance(
        public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    ):  # pragma: no cover - tests use RSA and EC only
        raise ValueError("only RSA and EC keys are supported")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name) if ca is None else ca[1].subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    usages = list(extended_key_usage) if extended_key_usage is not None else []
    if extended_key_usage is None:
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange (TLS 1.2 RSA suites) needs keyEncipherment; an EC key cannot
                # encipher.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if ca is None:
        return key, _sign(builder, key, hash_alg)
    ca_key, ca_cert = ca
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        issuer_public_key = ca_key.public_key()
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key)
    builder = builder.add_extension(aki, critical=False)
    return key, _sign(builder, ca_key, hash_alg)


def make_leaf(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str | IPAddress] = (),
    server: bool = True,
    client: bool = True,
    key_size: int = 2048,
    hash_alg: hashes.HashAlgorithm = SHA256,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_usage: bool = True,
    days: int = _DEFAULT_DAYS,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None = None,
    private_key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    """Make an end-entity certificate signed by the CA.

    ``server``/``client`` add the serverAuth/clientAuth EKUs (neither: no EKU extension, which
    means any use); ``extended_key_usage`` replaces both with an explicit list. ``key_usage=False``
    leaves out the keyUsage extension. ``private_key`` reuses a key (for example an EC key) instead
    of generating an RSA key of ``key_size`` bits. ``hash_alg=hashes.SHA1()`` works even though
    cryptography refuses it (see ``devsign.sign_sha1``).
    """
    return _end_entity(
        common_name,
        (ca_key, ca_cert),
        dns=dns,
        ips=ips,
        server=server,
        client=client,
        key_size=key_size,
        hash_alg=hash_alg,
        not_before=not_before,
        not_after=not_after,
        key_usage=key_usage,
        days=days,
        extended_key_usage=extended_key_usage,
        private_key=private_key,
    )


def make_self_signed(
    common_name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str | IPAddress] = (),
    server: bool = True,
    client: bool = True,
    key_size: int = 2048,
    hash_alg: hashes.HashAlgorithm = SHA256,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_usage: bool = True,
    days: int = _DEFAULT_DAYS,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None = None,
    private_key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    """Make a self-signed end-entity certificate (CA:false), like the ones DICOM devices carry.

    Same options as ``make_leaf``; such a certificate is trusted by thumbprint, not by a CA.
    """
    return _end_entity(
        common_name,
        None,
        dns=dns,
        ips=ips,
        server=server,
        client=client,
        key_size=key_size,
        hash_alg=hash_alg,
        not_before=not_before,
        not_after=not_after,
        key_usage=key_usage,
        days=days,
        extended_key_usage=extended_key_usage,
        private_key=private_key,
    )


def make_crl(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    revoked_serials: Iterable[int],
    *,
    next_update: datetime.datetime | None,
    last_update: datetime.datetime | None = None,
    crl_number: int = 1,
) -> x509.CertificateRevocationList:
    """Make a CRL, signed by the CA with SHA-256, revoking the serial numbers (with AKI, number).

    ``last_update`` (also the revocation date) defaults to five minutes ago, or to a day before
    ``next_update`` when that is earlier (a stale CRL). ``next_update=None`` makes a CRL without
    nextUpdate (not RFC 5280 conforming, but seen in the field), validly signed.
    """
    now = _now()
    if last_update is not None:
        this_update = last_update
    elif next_update is not None:
        this_update = min(now - _CLOCK_SKEW, next_update - datetime.timedelta(days=1))
    else:
        this_update = now - _CLOCK_SKEW
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update if next_update is not None else this_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    crl = builder.sign(ca_key, SHA256)
    return crl if next_update is not None else without_next_update(crl, ca_key)


# --- files -------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create path (O_EXCL: never an existing file or symlink) and write data.

    The file has its final mode from creation: 0600 for keys (set exactly, whatever the umask), or
    mode less the umask for certificates.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        if mode == _KEY_MODE:
            os.fchmod(fd, _KEY_MODE)  # a umask such as 0277 would have left it read-only
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write a new file, or with overwrite a new file beside path renamed over it (atomic)."""
    if not overwrite:
        _write_new(path, data, mode)
        return
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    _write_new(temporary, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def key_pem(key: PrivateKeyTypes, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of the key, encrypted with the password (AES-256-CBC, PBKDF2) if one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write_pem_key(
    path: Path, key: PrivateKeyTypes, password: bytes | None = None, *, overwrite: bool = False
) -> None:
    """Write the key as PKCS#8 PEM to a file created with mode 0600.

    Refuses an existing path (FileExistsError) unless ``overwrite``, in which case a new 0600 file
    replaces it atomically.
    """
    _write(path, key_pem(key, password), _KEY_MODE, overwrite)


def write_pem_cert(path: Path, *certs: x509.Certificate, overwrite: bool = False) -> None:
    """Write the certificates, in order, as one PEM file (mode 0644 less the umask).

    Refuses an existing path (FileExistsError) unless ``overwrite`` (then replaced atomically).
    """
    if not certs:
        raise ValueError("no certificate to write")
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    _write(path, data, _CERT_MODE, overwrite)


def init_pki(directory: Path, *, days: int = _DEFAULT_DAYS) -> list[Path]:
    """Write a development PKI to directory and return the files written.

    Files: ``ca.pem``/``ca.key`` (the CA), ``proxy.pem``/``proxy.key`` (CN=dicom-tls-proxy, SAN
    localhost, 127.0.0.1, ::1; serverAuth and clientAuth, so it is also the proxy's client
    certificate towards a TLS upstream), ``client.pem``/``client.key`` (CN=dicom-client, clientAuth,
    SAN dicom-client). RSA-2048, SHA-256. Keys are mode 0600 from creation.

    Creates directory if missing. Raises FileExistsError naming the existing file(s) before writing
    anything if any target exists.
    """
    paths = [directory / name for name in PKI_FILES]
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        others = ", ".join(path.name for path in existing[1:])
        raise FileExistsError(
            errno.EEXIST,
            "refusing to overwrite existing file" + (f" ({others} also exist)" if others else ""),
            str(existing[0]),
        )

    # A random suffix keeps two development CAs on one machine apart in trust stores and logs.
    ca_key, ca_cert = make_ca(f"dicom-tls-proxy development CA {secrets.token_hex(3)}", days=days)
    proxy_key, proxy_cert = make_leaf(
        ca_key,
        ca_cert,
        PROXY_COMMON_NAME,
        dns=("localhost",),
        ips=("127.0.0.1", "::1"),
        server=True,
        client=True,
        days=days,
    )
    client_key, client_cert = make_leaf(
        ca_key,
        ca_cert,
        CLIENT_COMMON_NAME,
        dns=(CLIENT_COMMON_NAME,),
        server=False,
        client=True,
        days=days,
    )
    contents: list[tuple[Path, bytes, int]] = []
    for stem, key, cert in (
        ("ca", ca_key, ca_cert),
        ("proxy", proxy_key, proxy_cert),
        ("client", client_key, client_cert),
    ):
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        contents.append((directory / f"{stem}.pem", cert_pem, _CERT_MODE))
        contents.append((directory / f"{stem}.key", key_pem(key), _KEY_MODE))

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for path, data, mode in contents:
            _write_new(path, data, mode)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
