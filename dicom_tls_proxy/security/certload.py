"""Loading certificates, private keys, CA bundles and CRLs from the files operators actually have.

Why this exists: the config loader (for `check`, `run` and every reload; the TLS layer gets what
it loaded), the `echo` probe and the `thumbprint` command all need to read the same files (PEM
with one or many certificates, DER, PKCS#12 exported from Windows, encrypted or plain keys, a CA
folder that is not an OpenSSL hash directory, Kubernetes Secrets mounted as symlinks) and to say
what is wrong in a way that points at the right configuration key. Every failure is a
``CertificateError`` whose ``blame`` says whether the certificate file, the password or the private
key is at fault.

It is not pure: it reads those files (each up to a size cap), parses them with cryptography, and
looks at files' modes and their folders' (who else could read a key or replace a trust anchor).

What it must never do: put a password, key bytes or any part of a key file in an exception message,
a repr or a log (messages are fixed phrases; errors about passwords are raised ``from None`` so
that no underlying message travels with them); decide trust (that is the TLS layer's job: this
module only reads files and reports what it found); modify any file.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
    pkcs12,
)

Blame = Literal["file", "password", "key"]

# Certificate and key files are small; a cap keeps a misconfigured path (a log file, /dev/zero) from
# filling memory. CRLs of large CAs can reach tens of megabytes.
_MAX_CERT_FILE: Final = 16 * 1024 * 1024
_MAX_CRL_FILE: Final = 512 * 1024 * 1024

_PEM_MARKER: Final = b"-----BEGIN "
_PEM_CERTIFICATE: Final = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----")
_PEM_PRIVATE_KEY: Final = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
_PEM_CRL: Final = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", re.DOTALL)
_PKCS12_SUFFIXES: Final = frozenset({".p12", ".pfx"})


class CertificateError(Exception):
    """A certificate, key or password file could not be used.

    ``blame`` names what is at fault, so that the configuration layer can point at the right key:
    ``"file"`` (``certificate``, or a CA/CRL file), ``"password"`` (``password_file``) or ``"key"``
    (``private_key``). ``path`` is the file concerned, when there is one. The message is a plain
    phrase for the operator and never contains a password or key material.
    """

    def __init__(self, message: str, *, blame: Blame, path: Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.blame: Blame = blame
        self.path = path

    def __repr__(self) -> str:
        return f"CertificateError({self.message!r}, blame={self.blame!r}, path={self.path!r})"


@dataclass(frozen=True)
class Identity:
    """A certificate with its private key and the intermediates to send along with it."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates, leaf excluded, in file order
    private_key: PrivateKeyTypes = field(repr=False)


# --- reading -----------------------------------------------------------------------------------


def _read(path: Path, blame: Blame, limit: int = _MAX_CERT_FILE) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except IsADirectoryError:
        raise CertificateError("is a folder, not a file", blame=blame, path=path) from None
    except FileNotFoundError:
        raise CertificateError("file not found", blame=blame, path=path) from None
    except PermissionError:
        raise CertificateError("permission denied", blame=blame, path=path) from None
    except OSError as exc:
        raise CertificateError(
            f"cannot read file: {exc.strerror or type(exc).__name__}", blame=blame, path=path
        ) from None
    if len(data) > limit:
        raise CertificateError(
            f"file too large (over {limit // (1024 * 1024)} MiB)", blame=blame, path=path
        )
    return data


def _looks_like_der_sequence(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x30


def _looks_like_pkcs12(data: bytes) -> bool:
    """PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo, ... } (RFC 7292)."""
    if not _looks_like_der_sequence(data):
        return False
    first = data[1]
    offset = 2 + (first & 0x7F if first & 0x80 else 0)
    return data[offset : offset + 3] == b"\x02\x01\x03"


def _load_pkcs12(
    data: bytes, password: bytes | None, path: Path
) -> pkcs12.PKCS12KeyAndCertificates:
    try:
        return pkcs12.load_pkcs12(data, password)
    except (ValueError, TypeError):
        pass
    if password is not None:
        # A password was given for a file that has none: the password is simply not needed.
        try:
            return pkcs12.load_pkcs12(data, None)
        except (ValueError, TypeError):
            pass
        message = "wrong password or corrupt PKCS#12 file"
    else:
        message = "the PKCS#12 file is encrypted and no password was given"
    raise CertificateError(message, blame="password", path=path) from None


class _NoCertificate(CertificateError):
    """The file holds no certificate at all (as opposed to a broken one): a CA folder skips it."""


def _from_pkcs12(
    data: bytes, path: Path, password: bytes | None
) -> tuple[list[x509.Certificate], pkcs12.PKCS12KeyAndCertificates]:
    bundle = _load_pkcs12(data, password, path)
    certificates = [] if bundle.cert is None else [bundle.cert.certificate]
    certificates += [cert.certificate for cert in bundle.additional_certs]
    if not certificates:
        raise _NoCertificate("no certificate found in file", blame="file", path=path)
    return certificates, bundle


def _certificates_from_bytes(
    data: bytes, path: Path, password: bytes | None
) -> tuple[list[x509.Certificate], pkcs12.PKCS12KeyAndCertificates | None]:
    """Certificates in data (leaf first for PKCS#12), and the PKCS#12 bundle if it was one."""
    if _PEM_MARKER in data:
        if not _PEM_CERTIFICATE.search(data):
            raise _NoCertificate("no certificate found in file", blame="file", path=path)
        try:
            return x509.load_pem_x509_certificates(data), None
        except ValueError:
            raise CertificateError(
                "the file holds a PEM certificate that cannot be parsed", blame="file", path=path
            ) from None
    if _looks_like_pkcs12(data):
        return _from_pkcs12(data, path, password)
    if _looks_like_der_sequence(data):
        try:
            return [x509.load_der_x509_certificate(data)], None
        except ValueError:
            pass
    if path.suffix.lower() in _PKCS12_SUFFIXES:
        return _from_pkcs12(data, path, password)
    raise _NoCertificate("not a PEM, DER or PKCS#12 file", blame="file", path=path)


def load_certificates(path: Path, password: bytes | None = None) -> list[x509.Certificate]:
    """Read the certificates in a PEM (one or many), DER or PKCS#12 file, in file order.

    For PKCS#12 (``.p12``/``.pfx``, or recognised by its content) the certificate that matches the
    bundle's key comes first. ``password`` is only used for PKCS#12; one given for a bundle that has
    none is ignored.
    """
    return _certificates_from_bytes(_read(path, "file"), path, password)[0]


# --- identity ----------------------------------------------------------------------------------


def _load_private_key(
    data: bytes, password: bytes | None, path: Path, blame: Blame
) -> PrivateKeyTypes:
    """Parse a PEM or DER private key, encrypted or not. blame is for a file that is not a key."""
    load = load_pem_private_key if _PEM_MARKER in data else load_der_private_key
    if load is load_pem_private_key and not _PEM_PRIVATE_KEY.search(data):
        raise CertificateError("no private key found in file", blame=blame, path=path)
    try:
        # Decided without the password first: TypeError means "encrypted", and a password given
        # for a plain key is simply not needed.
        return load(data, None)
    except TypeError:
        pass
    except UnsupportedAlgorithm:
        raise CertificateError("unsupported private key type", blame=blame, path=path) from None
    except ValueError:
        raise CertificateError(
            "not a PEM or DER private key, or a corrupt one", blame=blame, path=path
        ) from None
    if password is None:
        raise CertificateError(
            "the private key is encrypted and no password was given", blame="password", path=path
        )
    try:
        return load(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(
            "wrong password or corrupt key", blame="password", path=path
        ) from None


def _public_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public_key = key.public_key()
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _identity(
    certificates: list[x509.Certificate], key: PrivateKeyTypes, key_path: Path
) -> Identity:
    key_der = _public_der(key)
    leaf, *chain = certificates
    if _public_der(leaf) != key_der:
        message = "certificate does not match the private key"
        for number, other in enumerate(chain, start=2):
            if _public_der(other) == key_der:
                message += (
                    f" (the key belongs to certificate {number} in the file:"
                    " the server's own certificate must come first)"
                )
                break
        raise CertificateError(message, blame="key", path=key_path)
    leaf_der = leaf.public_bytes(Encoding.DER)
    intermediates = tuple(cert for cert in chain if cert.public_bytes(Encoding.DER) != leaf_der)
    return Identity(certificate=leaf, chain=intermediates, private_key=key)


def load_identity(certificate: Path, private_key: Path | None, password: bytes | None) -> Identity:
    """Load a certificate, its chain and its private key, and check that they belong together.

    Either a certificate file (PEM chain, leaf first; or DER) and a key file (PEM or DER, PKCS#1,
    PKCS#8 or SEC1, encrypted or not), or, with ``private_key`` None, a PKCS#12 bundle or a PEM
    file that holds both. ``password`` decrypts the key or the PKCS#12 bundle. The key must match
    the leaf's public key.
    """
    data = _read(certificate, "file")
    certificates, bundle = _certificates_from_bytes(data, certificate, password)
    key: PrivateKeyTypes
    if private_key is not None:
        key = _load_private_key(_read(private_key, "key"), password, private_key, "key")
        return _identity(certificates, key, private_key)
    if bundle is not None:
        if bundle.key is None:
            raise CertificateError(
                "the PKCS#12 file holds no private key", blame="key", path=certificate
            )
        return _identity(certificates, bundle.key, certificate)
    if _PEM_MARKER in data and _PEM_PRIVATE_KEY.search(data):
        key = _load_private_key(data, password, certificate, "file")
        return _identity(certificates, key, certificate)
    raise CertificateError(
        "no private key given, and the certificate file holds none", blame="key", path=certificate
    )


# --- trust anchors and revocation ---------------------------------------------------------------


def _certificates_in_folder(folder: Path) -> list[x509.Certificate]:
    found: list[x509.Certificate] = []
    seen: set[bytes] = set()
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():  # follows symlinks: skips folders, devices and dangling links
            continue
        try:
            certificates, _ = _certificates_from_bytes(_read(entry, "file"), entry, None)
        except _NoCertificate:
            continue  # a key, a CRL, a README...
        except CertificateError as exc:
            if exc.blame == "password":
                continue  # an encrypted PKCS#12 bundle is not a trust anchor
            raise
        for cert in certificates:
            # OpenSSL hash links (abcd1234.0 -> ca.pem) would otherwise list a CA twice.
            der = cert.public_bytes(Encoding.DER)
            if der not in seen:
                seen.add(der)
                found.append(cert)
    return found


def load_ca(path: Path) -> list[x509.Certificate]:
    """Read trusted CA certificates from a file (PEM, many certificates; or DER) or a folder.

    A folder's files are all read whatever their names (not only OpenSSL hash names), PEM or DER;
    subfolders and files that hold no certificate (keys, CRLs, READMEs) are skipped, duplicates
    (hash links) dropped. An empty result is an error.
    """
    if path.is_dir():
        certificates = _certificates_in_folder(path)
        if not certificates:
            raise CertificateError("no certificate found in folder", blame="file", path=path)
        return certificates
    return load_certificates(path)


def load_crls(paths: Sequence[Path]) -> list[x509.CertificateRevocationList]:
    """Read the CRLs in the files, PEM (one or more per file) or DER, in order."""
    crls: list[x509.CertificateRevocationList] = []
    for path in paths:
        data = _read(path, "file", _MAX_CRL_FILE)
        try:
            if _PEM_MARKER in data:
                blocks = _PEM_CRL.findall(data)
                if not blocks:
                    raise CertificateError("no CRL found in file", blame="file", path=path)
                crls += [x509.load_pem_x509_crl(block) for block in blocks]
            else:
                crls.append(x509.load_der_x509_crl(data))
        except ValueError:
            raise CertificateError("not a PEM or DER CRL", blame="file", path=path) from None
    return crls


def _aware(now: datetime.datetime) -> datetime.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def crl_is_stale(crl: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    """True when the CRL's nextUpdate has passed, or when it has none.

    RFC 5280 (5.1.2.5) requires nextUpdate; without it nobody can tell whether the CRL is current,
    and the TLS policy refuses peers it covers as stale, so configuration checks must agree.
    """
    next_update = crl.next_update_utc
    return next_update is None or _aware(now) > next_update


def crl_expires_soon(
    crl: x509.CertificateRevocationList, now: datetime.datetime, days: int = 7
) -> bool:
    """True when the CRL is not stale yet but its nextUpdate comes within ``days`` of now."""
    next_update = crl.next_update_utc
    if next_update is None or crl_is_stale(crl, now):
        return False  # stale already: crl_is_stale says so
    return next_update - now <= datetime.timedelta(days=days)


# --- file permissions --------------------------------------------------------------------------


def key_file_warnings(path: Path) -> list[str]:
    """Warnings about a private key or password file that others can read.

    Readable by every user is warned about; group-readable is not (Kubernetes Secrets with an
    fsGroup are mode 0640 or 0440). Symlinks are followed, since Kubernetes mounts Secrets as
    symlinks. A file that cannot be examined gives no warning: loading it reports the problem.
    """
    if os.name != "posix":  # pragma: no cover - modes mean nothing on Windows
        return []
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    if mode & stat.S_IROTH:
        return [
            f"{path} is readable by every user on this machine (mode {stat.S_IMODE(mode):04o});"
            " make it readable by its owner only, for example with chmod 600"
        ]
    return []


def _writable_by_others(mode: int) -> bool:
    return bool(mode & stat.S_IWOTH)


def insecure_file_reason(path: Path) -> str | None:
    """Why another user could change what this file holds, or None.

    Checked: the file itself (after following symlinks) is writable by others; the folder holding
    it, or the folder holding the symlink that leads to it, is writable by others without the
    sticky bit (then anyone can replace the file). A symlink's own mode (always 0777) does not
    matter. A file that cannot be examined gives None: loading it reports the problem.
    """
    if os.name != "posix":  # pragma: no cover - modes mean nothing on Windows
        return None
    try:
        target = path.resolve(strict=True)
        if _writable_by_others(target.stat().st_mode):
            return f"{target} is writable by every user on this machine"
        folders = [target.parent]
        if path.is_symlink() and path.absolute().parent != target.parent:
            folders.append(path.absolute().parent)
        for folder in folders:
            mode = folder.stat().st_mode
            if _writable_by_others(mode) and not mode & stat.S_ISVTX:
                return (
                    f"{folder} is writable by every user on this machine and has no sticky bit,"
                    f" so anyone can replace {path.name}"
                )
    except OSError:
        return None
    return None
