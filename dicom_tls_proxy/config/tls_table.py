"""One `[tls.NAME]` table: the certificate, key, password, CA and CRL files it names, read and
checked, so that a config that loads is a config whose TLS contexts can be made.

Why this exists apart from the rest of the loader (`config`): this is the part of loading that
reads files other than the config itself (through `certload`, which parses them with
cryptography) and asks OpenSSL about cipher strings, and it is as long as the other tables
together. Every problem names its key (`tls.NAME.private_key`, `tls.NAME.crl[1]`), blamed on
the file, the password or the key as `certload` says.

What it must never do: echo a password or key material in a problem or warning (`certload`'s
messages are fixed phrases), decide trust (it checks that files load and that a CRL is signed by
the table's CA; the TLS layer verifies peers), or open a socket.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from dicom_tls_proxy.config.reader import Reader, one_of
from dicom_tls_proxy.config.schema import (
    PEER_CERTIFICATE_MODES,
    PROFILES,
    TLS_GROUPS,
    VERIFY_MODES,
    TlsTable,
)
from dicom_tls_proxy.security import certload, policy
from dicom_tls_proxy.security.thumbprint import parse_thumbprint

_TLS_KEYS = {
    "certificate",
    "private_key",
    "password_file",
    "password_env",
    "ca",
    "crl",
    "verify",
    "peer_certificate",
    "accepted_thumbprints",
    "allow_weak_peer_certificates",
    "profile",
    "ciphers",
    "tls13_ciphersuites",
    "server_name",
    "session_tickets",
    "groups",
}


def _openssl_list(setter: str) -> Callable[[str], str]:
    """A cipher list OpenSSL accepts (asked of a throwaway context, as the proxy's own will be),
    so that a typo is a config error at `check`, not a traceback when the proxy starts."""

    def check(value: str) -> str:
        if value:
            try:
                getattr(SSL.Context(SSL.TLS_METHOD), setter)(value.encode())
            except (SSL.Error, UnicodeEncodeError):
                raise ValueError(f"OpenSSL matches no cipher in {value!r}") from None
        return value

    return check


_KNOWN_GROUPS = {name.lower() for name in TLS_GROUPS}
MAX_KEY_SHARES = 4  # OpenSSL's most in one ClientHello


def _groups(value: str) -> str:
    """OpenSSL's group list ("X25519MLKEM768:X25519:P-256", preference order; a `*` prefix asks
    for a key share, `/` separates groups of equal preference), every name one of `TLS_GROUPS`:
    a typo or a weak curve is a config error at `check`, not a failure when the proxy starts (a
    test holds `TLS_GROUPS` to what the installed OpenSSL accepts)."""
    if not value:
        return value
    if value.count("*") > MAX_KEY_SHARES:
        raise ValueError(f"{value!r} asks for more than {MAX_KEY_SHARES} key shares (*)")
    for chunk in value.split("/"):
        for part in chunk.split(":"):
            name = part.strip().lstrip("*?")
            if name.lower() not in _KNOWN_GROUPS:
                known = ", ".join(TLS_GROUPS)
                raise ValueError(f"unknown or refused group {name!r} in {value!r}; known: {known}")
    return value


def _password(r: Reader, d: dict[str, Any], key: str) -> tuple[bytes | None, str]:
    """The password and the key to blame when it is wrong."""
    if "password_file" in d and "password_env" in d:
        r.error(f"{key}.password_env", "give password_file or password_env, not both")
        return None, f"{key}.password_env"
    if "password_env" in d:
        var = r.value(d, key, "password_env", str, "")
        if var and var not in os.environ:
            r.error(f"{key}.password_env", f"environment variable {var} is not set")
            return None, f"{key}.password_env"
        return (os.environ[var].encode() if var else None), f"{key}.password_env"
    pw_path = r.path_value(d, key, "password_file")
    if pw_path is None:
        return None, f"{key}.password_file"
    for warning in certload.key_file_warnings(pw_path):
        r.warn(f"{key}.password_file", warning)
    try:
        text = pw_path.read_bytes()
    except OSError as exc:
        r.error(f"{key}.password_file", f"cannot read {pw_path}: {exc.strerror}")
        return None, f"{key}.password_file"
    return text.rstrip(b"\r\n"), f"{key}.password_file"


def tls_table(r: Reader, name: str, d: dict[str, Any], now: datetime) -> TlsTable | None:
    """`[tls.NAME]` read, its files loaded; None when it has problems (all of them in `r`).
    A key left out gets the `TlsTable` default; `now` decides which CRLs are stale."""
    key, base = f"tls.{name}", TlsTable(name)
    r.unknown(d, key, _TLS_KEYS)
    before = len(r.problems)
    certificate = r.path_value(d, key, "certificate")
    private_key = r.path_value(d, key, "private_key")
    password, password_key = _password(r, d, key)
    ca = r.path_value(d, key, "ca", folder=True)
    crl_paths = r.string_list(d, key, "crl", lambda s: s)
    verify = r.value(d, key, "verify", str, base.verify, one_of(*VERIFY_MODES))
    peer_certificate = r.value(
        d, key, "peer_certificate", str, base.peer_certificate, one_of(*PEER_CERTIFICATE_MODES)
    )
    thumbprints = r.string_list(d, key, "accepted_thumbprints", parse_thumbprint)
    allow_weak = r.value(
        d, key, "allow_weak_peer_certificates", bool, base.allow_weak_peer_certificates
    )
    profile = r.value(d, key, "profile", str, base.profile, one_of(*PROFILES))
    ciphers = r.value(d, key, "ciphers", str, base.ciphers, _openssl_list("set_cipher_list"))
    suites = _openssl_list("set_tls13_ciphersuites")
    tls13 = r.value(d, key, "tls13_ciphersuites", str, base.tls13_ciphersuites, suites)
    server_name = r.value(d, key, "server_name", str, base.server_name)
    session_tickets = r.value(d, key, "session_tickets", bool, base.session_tickets)
    groups = r.value(d, key, "groups", str, base.groups, _groups)

    if private_key is not None and certificate is None:
        r.error(f"{key}.certificate", "private_key is given but certificate is missing")
    if verify in ("thumbprint", "chain+thumbprint") and not thumbprints:
        r.error(f"{key}.accepted_thumbprints", f'verify = "{verify}" needs at least one thumbprint')
    if verify in ("chain", "chain+thumbprint") and "ca" not in d:
        r.error(f"{key}.ca", f'verify = "{verify}" needs a ca (file or folder)')
    if verify == "none":
        r.warn(f"{key}.verify", 'verify = "none": peers are not authenticated; use only for tests')
    if profile == "legacy":
        r.warn(
            f"{key}.profile", 'profile = "legacy" allows TLS 1.0/1.1 and CBC suites (not BCP 195)'
        )
    if allow_weak:
        r.warn(f"{key}.allow_weak_peer_certificates", "weak peer certificates are accepted")
    if peer_certificate == "none":
        r.warn(
            f"{key}.peer_certificate",
            'peer_certificate = "none": clients of listeners with this table are not authenticated',
        )

    identity = None
    if certificate is not None:
        for warning in (
            certload.key_file_warnings(private_key or certificate)
            if private_key or _is_p12(certificate)
            else []
        ):
            r.warn(f"{key}.private_key" if private_key else f"{key}.certificate", warning)
        try:
            identity = certload.load_identity(certificate, private_key, password)
        except certload.CertificateError as exc:
            blame = {"password": password_key, "key": f"{key}.private_key"}.get(
                exc.blame, f"{key}.certificate"
            )
            if exc.blame == "key" and private_key is None:
                blame = f"{key}.certificate"
            r.error(blame, str(exc))
    ca_certs: list[x509.Certificate] = []
    if ca is not None:
        try:
            ca_certs = certload.load_ca(ca)
        except certload.CertificateError as exc:
            r.error(f"{key}.ca", str(exc))
    crls: list[x509.CertificateRevocationList] = []
    for i, text in enumerate(crl_paths):
        sub = {"crl": text}
        p = r.path_value(sub, key, "crl")
        if p is None:
            if r.problems and r.problems[-1].startswith(f"{r.path}: {key}.crl:"):
                r.problems[-1] = r.problems[-1].replace(f"{key}.crl:", f"{key}.crl[{i}]:", 1)
            continue
        try:
            loaded = certload.load_crls([p])
        except certload.CertificateError as exc:
            r.error(f"{key}.crl[{i}]", str(exc))
            continue
        for c in loaded:
            if certload.crl_is_stale(c, now):
                r.warn(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} is past its nextUpdate (or has none): "
                    "peers it covers will be refused (tls-crl-stale)",
                )
            elif certload.crl_expires_soon(c, now):
                r.warn(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} reaches its nextUpdate within 7 days",
                )
        for c in loaded:
            if ca_certs and not policy.crl_signed_by(c, ca_certs):
                r.error(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} is not signed by a CA in {key}.ca",
                )
        crls.extend(loaded)

    if len(r.problems) > before:
        return None
    return TlsTable(
        name=name,
        certificate=certificate,
        private_key=private_key,
        ca=ca,
        crl=tuple(Path(p) for p in crl_paths),
        verify=verify,
        peer_certificate=peer_certificate,
        accepted_thumbprints=thumbprints,
        allow_weak_peer_certificates=allow_weak,
        profile=profile,
        ciphers=ciphers,
        tls13_ciphersuites=tls13,
        server_name=server_name,
        session_tickets=session_tickets,
        groups=groups,
        identity=identity,
        ca_certificates=tuple(ca_certs),
        crls=tuple(crls),
    )


def _is_p12(path: Path) -> bool:
    return path.suffix.lower() in (".p12", ".pfx")
