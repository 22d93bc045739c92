"""Peer authentication end to end: the real proxy process, real TLS clients on 127.0.0.1.

Covers the four `verify` modes, every certificate-policy refusal (and what
`allow_weak_peer_certificates` lets through), the three `peer_certificate` modes, every `allow_peer`
matcher kind, and the TLS profiles. Each test asserts what the client sees (an association, an
A-ASSOCIATE-RJ, or a TLS alert raised as `ssl.SSLError`) and the reason in the proxy's log line.
Certificates are made once per session by `dicom_tls_proxy.dev.pki`, signed by the session's `pki`
CA.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.protocol import pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ProxyProcess,
    RawClient,
    associate,
    build_rq,
    client_ssl_context,
    dcmtk,
    proxy_config,
    running_proxy,
    tls_in,
)

# TLS 1.0/1.1 clients are the point of some tests here.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
# A key, its certificate and, for some, the rest of the chain the client sends.
KeyAndCert = tuple[
    CertificateIssuerPrivateKeyTypes, x509.Certificate, *tuple[x509.Certificate, ...]
]
CA = tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]

# -- certificates -----------------------------------------------------------------------------

RICH_URI = "urn:example:dicom:ae:CT01"


def _rich_leaf(ca: CA) -> KeyAndCert:
    """A client certificate with an OU, a DNS SAN and a URI SAN, for the allow_peer matchers."""
    ca_key, ca_cert = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "ct-01"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Radiology"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Hospital"),
        ]
    )
    san = [x509.DNSName("ct01.radiology.example.org"), x509.UniformResourceIdentifier(RICH_URI)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _with_own_root(ca: CA) -> KeyAndCert:
    """A leaf of another CA, sent with that CA's root (as many devices send their chain)."""
    root = devpki.make_ca("another CA")
    return (*devpki.make_leaf(*root, "stranger-with-chain", server=False), root[1])


# What each named client certificate is: "self-signed", "pinned-*", "other-ca*" are not signed by
# the session CA, all the others are.
RECIPES: dict[str, Callable[[CA], KeyAndCert]] = {
    "good": lambda ca: devpki.make_leaf(*ca, "good-client", server=False),
    "pinned": lambda ca: devpki.make_leaf(*ca, "pinned-client", server=False),
    "revoked": lambda ca: devpki.make_leaf(*ca, "revoked-client", server=False),
    "expired": lambda ca: devpki.make_leaf(
        *ca, "expired-client", server=False, not_before=NOW - 30 * DAY, not_after=NOW - DAY
    ),
    "not-yet-valid": lambda ca: devpki.make_leaf(
        *ca, "future-client", server=False, not_before=NOW + DAY, not_after=NOW + 30 * DAY
    ),
    "server-only": lambda ca: devpki.make_leaf(*ca, "server-only", server=True, client=False),
    "rsa1024": lambda ca: devpki.make_leaf(*ca, "rsa1024-client", server=False, key_size=1024),
    "sha1": lambda ca: devpki.make_leaf(*ca, "sha1-client", server=False, hash_alg=hashes.SHA1()),
    "self-signed": lambda ca: devpki.make_self_signed("modality-self-signed", server=False),
    "other-ca": lambda ca: devpki.make_leaf(
        *devpki.make_ca("another CA"), "stranger", server=False
    ),
    "other-ca-chain": _with_own_root,
    "rich": _rich_leaf,
    # self-signed, for thumbprint pinning
    "pinned-sha1": lambda ca: devpki.make_self_signed(
        "pinned-sha1", server=False, hash_alg=hashes.SHA1()
    ),
    "pinned-rsa1024": lambda ca: devpki.make_self_signed(
        "pinned-rsa1024", server=False, key_size=1024
    ),
    "pinned-expired": lambda ca: devpki.make_self_signed(
        "pinned-expired", server=False, not_before=NOW - 30 * DAY, not_after=NOW - DAY
    ),
    "pinned-server-only": lambda ca: devpki.make_self_signed(
        "pinned-server-only", server=True, client=False
    ),
}


@dataclass(frozen=True)
class Cred:
    """A client certificate and key on disk."""

    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def sha1(self) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return hashlib.sha1(der, usedforsecurity=False).hexdigest()


class Certs:
    """Named client certificates (see RECIPES), made on first use, and CRLs of the session CA."""

    def __init__(self, directory: Path, pki_dir: Path) -> None:
        self.dir = directory
        key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
        self.ca: CA = (key, x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()))
        self._made: dict[str, Cred] = {}

    def __call__(self, name: str) -> Cred:
        if name not in self._made:
            key, cert, *chain = RECIPES[name](self.ca)
            cred = Cred(self.dir / f"{name}.pem", self.dir / f"{name}.key", cert)
            devpki.write_pem_key(cred.key, key)
            devpki.write_pem_cert(cred.cert, cert, *chain)
            self._made[name] = cred
        return self._made[name]

    def crl(self, kind: str) -> Path:
        """ "revoked": current, lists the "revoked" certificate; "stale": past its nextUpdate."""
        path = self.dir / f"{kind}.crl.pem"
        if not path.exists():
            if kind == "revoked":
                serials = [self("revoked").certificate.serial_number]
                crl = devpki.make_crl(*self.ca, serials, next_update=NOW + 30 * DAY)
            else:
                crl = devpki.make_crl(*self.ca, [], next_update=NOW - DAY)
            path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Certs:
    return Certs(tmp_path_factory.mktemp("peer-certs"), pki)


# -- configs and clients ----------------------------------------------------------------------


def config(pki: Path, upstream: str, routes: list[dict[str, Any]] | None = None, **tls: Any) -> Any:
    """One TLS listener "tls" with table "in"; a `tls` value of None removes that key."""
    return proxy_config(pki, upstream, tls={"in": tls_in(pki, **tls)}, route=routes or None)


def client_ctx(
    pki: Path, cred: Cred | None, version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A stdlib client trusting the proxy's CA. Security level 0, so that it can present a weak
    certificate and speak TLS 1.0/1.1: only the proxy judges here."""
    ctx: ssl.SSLContext = client_ssl_context(pki / "ca.pem")
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cred is not None:
        ctx.load_cert_chain(cred.cert, cred.key)
    return ctx


def accepted(proxy: ProxyProcess, ctx: ssl.SSLContext, called_ae: str = "CT") -> dict[str, Any]:
    """A pynetdicom association through the proxy, released; the proxy's log line."""
    assoc = associate(proxy.address("tls"), called_ae, ssl_context=ctx)
    assert assoc.is_established, proxy.raw
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    line = proxy.association(called_ae=called_ae, reason="released")
    assert line["outcome"] == "completed"
    return line


def tls_refused(proxy: ProxyProcess, ctx: ssl.SSLContext, reason: str) -> dict[str, Any]:
    """The handshake fails with a TLS alert. TLS 1.3 clients finish their side before the proxy
    judges their certificate, so the alert comes with the first read."""
    with pytest.raises(ssl.SSLError) as raised:
        client = RawClient(proxy.address("tls"), ctx)
        try:
            client.sock.recv(1)
        finally:
            client.close()
    assert "alert" in str(raised.value).lower()  # told, not just dropped
    line = proxy.association(reason=reason)
    assert line["outcome"] == "tls-failed"
    return line


def rejected(proxy: ProxyProcess, ctx: ssl.SSLContext, called_ae: str, reason: str) -> Any:
    """TLS succeeds, the A-ASSOCIATE-RQ gets A-ASSOCIATE-RJ (1, 1, 1), then a clean close."""
    client = RawClient(proxy.address("tls"), ctx)
    try:
        client.send(build_rq(called_ae))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 1)
        assert client.read_clean_close() == b""
    finally:
        client.close()
    line = proxy.association(reason=reason, called_ae=called_ae)
    assert line["outcome"] == "rejected"
    return line


def one_digit_off(hex_digest: str) -> str:
    return hex_digest[:-1] + ("0" if hex_digest[-1] != "0" else "1")


def windows_style(hex_digest: str) -> str:
    """As copied from Windows' certificate dialog: a left-to-right mark, uppercase pairs."""
    upper = hex_digest.upper()
    return "\u200e" + " ".join(upper[i : i + 2] for i in range(0, len(upper), 2))


# -- verify = "chain" -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [("good", "released"), ("other-ca", "tls-untrusted"), ("other-ca-chain", "tls-untrusted")],
    ids=str,
)
def test_verify_chain(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str, reason: str
) -> None:
    cred = certs(who)
    with running_proxy(tmp_path, config(pki, legacy.address, verify="chain")) as proxy:
        if reason == "released":
            line = accepted(proxy, client_ctx(pki, cred))
        else:
            line = tls_refused(proxy, client_ctx(pki, cred), reason)
    assert line["peer_subject"] == cred.subject
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"


# -- verify = "thumbprint" --------------------------------------------------------------------

THUMBPRINT_FORMATS: dict[str, Callable[[Cred], str]] = {
    "sha256": lambda c: f"sha256:{c.sha256}",
    "windows-sha256": lambda c: windows_style(c.sha256),
    "windows-sha1": lambda c: windows_style(c.sha1),
    "sha1": lambda c: f"sha1:{c.sha1}",
}


def _thumbprint_config(pki: Path, upstream: str, thumbprint: str) -> Any:
    return config(pki, upstream, verify="thumbprint", ca=None, accepted_thumbprints=[thumbprint])


@pytest.mark.dcmtk
@pytest.mark.parametrize("fmt", list(THUMBPRINT_FORMATS))
def test_thumbprint_accepts_self_signed_dcmtk_client(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, fmt: str
) -> None:
    cred = certs("self-signed")
    cfg = _thumbprint_config(pki, legacy.address, THUMBPRINT_FORMATS[fmt](cred))
    with running_proxy(tmp_path, cfg) as proxy:
        host, port = proxy.address("tls")
        echo = subprocess.run(
            [
                dcmtk("echoscu"),
                *("+tls", str(cred.key), str(cred.cert), "+cf", str(pki / "ca.pem")),
                *("-aet", "MODALITY", "-aec", "CT", host, str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert echo.returncode == 0, echo.stderr
        line = proxy.association(reason="released")
    assert line["calling_ae"] == "MODALITY"
    assert line["peer_subject"] == cred.subject
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"
    assert legacy.calling_aes == ["MODALITY"]


def test_thumbprint_accepts_self_signed_stdlib_client(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice
) -> None:
    cred = certs("self-signed")
    cfg = _thumbprint_config(pki, legacy.address, windows_style(cred.sha256))
    with running_proxy(tmp_path, cfg) as proxy:
        assert accepted(proxy, client_ctx(pki, cred))["peer_sha256"] == f"sha256:{cred.sha256}"


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_thumbprint_one_digit_off_is_refused_and_logged(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, algorithm: str
) -> None:
    cred = certs("self-signed")
    wrong = f"{algorithm}:{one_digit_off(getattr(cred, algorithm))}"
    with running_proxy(tmp_path, _thumbprint_config(pki, legacy.address, wrong)) as proxy:
        line = tls_refused(proxy, client_ctx(pki, cred), "tls-thumbprint-mismatch")
    # The refused certificate is named so that an operator can paste its thumbprint.
    assert line["peer_subject"] == "CN=modality-self-signed"
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"
    assert cred.sha256 in line["detail"]
    assert legacy.associations == 0


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("pinned-sha1", "released"),  # its own SHA-1 self-signature proves nothing either way
        ("pinned-rsa1024", "tls-weak-certificate"),
        ("pinned-expired", "tls-expired"),
        ("pinned-server-only", "tls-wrong-usage"),
    ],
    ids=str,
)
def test_thumbprint_still_applies_the_policy(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str, reason: str
) -> None:
    cred = certs(who)
    cfg = _thumbprint_config(pki, legacy.address, f"sha256:{cred.sha256}")
    with running_proxy(tmp_path, cfg) as proxy:
        if reason == "released":
            line = accepted(proxy, client_ctx(pki, cred))
        else:
            line = tls_refused(proxy, client_ctx(pki, cred), reason)
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"


# -- verify = "chain+thumbprint" --------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("pinned", "released"),  # CA-signed and pinned
        ("good", "tls-thumbprint-mismatch"),  # CA-signed, not pinned
        ("self-signed", "tls-untrusted"),  # pinned, no chain
    ],
    ids=["signed-and-pinned", "signed-not-pinned", "pinned-not-signed"],
)
def test_chain_and_thumbprint_both_needed(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str, reason: str
) -> None:
    pinned = [f"sha256:{certs('pinned').sha256}", f"sha256:{certs('self-signed').sha256}"]
    cfg = config(pki, legacy.address, verify="chain+thumbprint", accepted_thumbprints=pinned)
    cred = certs(who)
    with running_proxy(tmp_path, cfg) as proxy:
        if reason == "released":
            line = accepted(proxy, client_ctx(pki, cred))
        else:
            line = tls_refused(proxy, client_ctx(pki, cred), reason)
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"


# -- verify = "none" --------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["self-signed", "other-ca", "expired"])
def test_verify_none_accepts_any_certificate_with_a_warning(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str
) -> None:
    cred = certs(who)
    with running_proxy(tmp_path, config(pki, legacy.address, verify="none", ca=None)) as proxy:
        assert proxy.wait_for(event="insecure", tls="in")["level"] == "warning"  # at start
        line = accepted(proxy, client_ctx(pki, cred))
        warning = proxy.wait_for(event="insecure", listener="tls")  # on the association
    assert line["peer_subject"] == cred.subject
    assert warning["level"] == "warning" and warning["peer"] == line["peer"]
    assert "verify" in warning["msg"]


# -- certificate policy -----------------------------------------------------------------------


WEAK_OK = {"allow_weak_peer_certificates": True}


@pytest.mark.parametrize(
    ("who", "tls", "reason"),
    [
        ("expired", {}, "tls-expired"),
        ("not-yet-valid", {}, "tls-not-yet-valid"),
        ("server-only", {}, "tls-wrong-usage"),
        ("rsa1024", {}, "tls-weak-certificate"),
        ("sha1", {}, "tls-weak-certificate"),
        ("revoked", {"crl": "revoked"}, "tls-revoked"),
        ("good", {"crl": "stale"}, "tls-crl-stale"),
        # The legacy profile runs OpenSSL at security level 0: the proxy's own policy refuses.
        ("rsa1024", {"profile": "legacy"}, "tls-weak-certificate"),
        ("sha1", {"profile": "legacy"}, "tls-weak-certificate"),
        # allow_weak_peer_certificates never lets revocation problems through.
        ("revoked", {"crl": "revoked", **WEAK_OK}, "tls-revoked"),
        ("good", {"crl": "stale", **WEAK_OK}, "tls-crl-stale"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "server-only-eku",
        "rsa1024",
        "sha1",
        "revoked",
        "stale-crl",
        "rsa1024-legacy-profile",
        "sha1-legacy-profile",
        "revoked-allow-weak",
        "stale-crl-allow-weak",
    ],
)
def test_policy_refusal(
    tmp_path: Path,
    pki: Path,
    certs: Certs,
    legacy: LegacyDevice,
    who: str,
    tls: dict[str, Any],
    reason: str,
) -> None:
    cred = certs(who)
    if "crl" in tls:
        tls = {**tls, "crl": [certs.crl(tls["crl"])]}
    with running_proxy(tmp_path, config(pki, legacy.address, **tls)) as proxy:
        line = tls_refused(proxy, client_ctx(pki, cred), reason)
    assert line["peer_subject"] == cred.subject
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"
    assert legacy.associations == 0


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("expired", "tls-expired"),
        ("not-yet-valid", "tls-not-yet-valid"),
        ("rsa1024", "tls-weak-certificate"),
        ("sha1", "tls-weak-certificate"),
        ("server-only", "tls-wrong-usage"),
    ],
    ids=str,
)
def test_allow_weak_accepts_with_a_warning(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str, reason: str
) -> None:
    cred = certs(who)
    cfg = config(pki, legacy.address, allow_weak_peer_certificates=True)
    with running_proxy(tmp_path, cfg) as proxy:
        line = accepted(proxy, client_ctx(pki, cred))
        warning = proxy.wait_for(event="weak-certificate-accepted")
    assert line["peer_sha256"] == f"sha256:{cred.sha256}"
    assert warning["level"] == "warning" and warning["peer"] == line["peer"]
    assert reason in warning["msg"]


def test_stale_crl_warns_at_check_and_run_but_starts(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address, crl=[certs.crl("stale")])
    with running_proxy(tmp_path, cfg) as proxy:  # it starts: its listener is up
        warning = proxy.wait_for(event="config-warning")
        check = subprocess.run(
            [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(proxy.config_path)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert warning["level"] == "warning" and "tls-crl-stale" in warning["msg"]
    assert check.returncode == 0, check.stderr
    assert "warning:" in check.stderr and "tls.in.crl[0]" in check.stderr
    assert "nextUpdate" in check.stderr


# -- peer_certificate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
def test_required_certificate_missing(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, version: ssl.TLSVersion
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, peer_certificate="required")) as p:
        line = tls_refused(p, client_ctx(pki, None, version), "tls-no-certificate")
    assert line["peer_subject"] == "" and line["peer_sha256"] == ""


@pytest.mark.parametrize(
    ("who", "called_ae", "reason"),
    [
        (None, "OPEN", "released"),
        (None, "CT", "peer-not-allowed"),  # the route wants a certificate
        ("good", "CT", "released"),
        ("other-ca", "OPEN", "tls-untrusted"),  # a presented certificate is verified
    ],
    ids=["no-cert", "no-cert-allow-peer", "cert", "untrusted-cert"],
)
def test_optional_certificate(
    tmp_path: Path,
    pki: Path,
    certs: Certs,
    legacy: LegacyDevice,
    who: str | None,
    called_ae: str,
    reason: str,
) -> None:
    cred = certs(who) if who else None
    routes = [
        {"called_ae": "OPEN", "upstream": legacy.address},
        {"called_ae": "CT", "upstream": legacy.address, "allow_peer": ["cn:good-client"]},
    ]
    cfg = config(pki, legacy.address, routes, peer_certificate="optional")
    with running_proxy(tmp_path, cfg) as proxy:
        ctx = client_ctx(pki, cred)
        if reason == "released":
            line = accepted(proxy, ctx, called_ae)
        elif reason == "peer-not-allowed":
            line = rejected(proxy, ctx, called_ae, reason)
            assert "no certificate" in line["detail"]
        else:
            line = tls_refused(proxy, ctx, reason)
    assert line["peer_subject"] == (cred.subject if cred else "")


@pytest.mark.parametrize("who", [None, "good"], ids=["no-cert", "cert-not-asked-for"])
def test_no_peer_certificate_asked(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, who: str | None
) -> None:
    ctx = client_ctx(pki, certs(who) if who else None)
    with running_proxy(tmp_path, config(pki, legacy.address, peer_certificate="none")) as proxy:
        line = accepted(proxy, ctx)
    assert line["peer_subject"] == "" and line["peer_sha256"] == ""  # never sent


# -- allow_peer matchers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admit", "refuse"),
    [
        ("cn:ct-01", "cn:ct-02"),
        ("ou:Radiology", "ou:Cardiology"),
        ("dns:*.radiology.example.org", "dns:*.cardiology.example.org"),
        (f"uri:{RICH_URI}", f"uri:{RICH_URI}X"),
        ("sha256:{sha256}", "sha256:{sha256_off}"),
        ("sha1:{sha1}", "sha1:{sha1_off}"),
    ],
    ids=["cn", "ou", "dns", "uri", "sha256", "sha1"],
)
def test_allow_peer_matcher(
    tmp_path: Path, pki: Path, certs: Certs, legacy: LegacyDevice, admit: str, refuse: str
) -> None:
    cred = certs("rich")
    values = {
        "sha256": cred.sha256,
        "sha256_off": one_digit_off(cred.sha256),
        "sha1": cred.sha1,
        "sha1_off": one_digit_off(cred.sha1),
    }
    routes = [
        {"called_ae": "CT", "upstream": legacy.address, "allow_peer": [admit.format(**values)]},
        {"called_ae": "MR", "upstream": legacy.address, "allow_peer": [refuse.format(**values)]},
    ]
    with running_proxy(tmp_path, config(pki, legacy.address, routes)) as proxy:
        ok = accepted(proxy, client_ctx(pki, cred), "CT")
        refused = rejected(proxy, client_ctx(pki, cred), "MR", "peer-not-allowed")
    assert ok["peer_subject"] == refused["peer_subject"] == cred.subject
    assert legacy.called_aes == ["CT"]


# -- profiles ---------------------------------------------------------------------------------


def _bundled_openssl_speaks(version: int, name: str) -> bool:
    """Whether pyOpenSSL's OpenSSL (the proxy's) completes a handshake at `version` with itself,
    at the legacy profile's security level."""
    key, cert = devpki.make_self_signed("probe")
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.set_min_proto_version(SSL.TLS1_VERSION)
    server.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    server.use_certificate(cert)
    server.use_privatekey(key)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_min_proto_version(version)
    client.set_max_proto_version(version)
    client.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    ends = [SSL.Connection(client, None), SSL.Connection(server, None)]
    ends[0].set_connect_state()
    ends[1].set_accept_state()
    try:
        for _ in range(6):
            for this, other in (ends, ends[::-1]):
                try:
                    this.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    other.bio_write(this.bio_read(1 << 16))
                except SSL.WantReadError:
                    pass
        return bool(
            ends[0].get_protocol_version_name() == ends[1].get_protocol_version_name() == name
        )
    except SSL.Error:
        return False


@pytest.mark.parametrize(
    ("profile", "version", "ciphers"),
    [
        ("bcp195", ssl.TLSVersion.TLSv1, None),
        ("bcp195", ssl.TLSVersion.TLSv1_1, None),
        ("bcp195", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA:AES128-GCM-SHA256:@SECLEVEL=0"),
        ("tls13", ssl.TLSVersion.TLSv1_2, None),
    ],
    ids=["bcp195-tls1.0", "bcp195-tls1.1", "bcp195-tls1.2-no-ecdhe-aead", "tls13-tls1.2"],
)
def test_profile_refuses(
    tmp_path: Path,
    pki: Path,
    certs: Certs,
    legacy: LegacyDevice,
    profile: str,
    version: ssl.TLSVersion,
    ciphers: str | None,
) -> None:
    ctx = client_ctx(pki, certs("good"), version)
    if ciphers:
        ctx.set_ciphers(ciphers)
    with running_proxy(tmp_path, config(pki, legacy.address, profile=profile)) as proxy:
        line = tls_refused(proxy, ctx, "tls-protocol")
    assert line["tls_version"] == ""
    assert legacy.associations == 0


@pytest.mark.parametrize(
    ("profile", "version", "name", "cipher"),
    [
        (
            "bcp195",
            ssl.TLSVersion.TLSv1_2,
            "TLSv1.2",
            r"ECDHE-(RSA|ECDSA)-AES(128|256)-GCM-SHA(256|384)",
        ),
        (
            "tls13",
            ssl.TLSVersion.TLSv1_3,
            "TLSv1.3",
            r"TLS_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20.*)",
        ),
    ],
    ids=["bcp195-tls1.2", "tls13-tls1.3"],
)
def test_profile_accepts(
    tmp_path: Path,
    pki: Path,
    certs: Certs,
    legacy: LegacyDevice,
    profile: str,
    version: ssl.TLSVersion,
    name: str,
    cipher: str,
) -> None:
    ctx = client_ctx(pki, certs("good"), version)
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # offer CBC and RSA key exchange too: the proxy chooses
    with running_proxy(tmp_path, config(pki, legacy.address, profile=profile)) as proxy:
        line = accepted(proxy, ctx)
    assert line["tls_version"] == name
    assert re.fullmatch(cipher, line["cipher"]), line["cipher"]
    assert line["mac"] == "AEAD"


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1, "TLSv1"), (ssl.TLSVersion.TLSv1_1, "TLSv1.1")],
    ids=["tls1.0", "tls1.1"],
)
def test_legacy_accepts_old_protocol_with_a_warning(
    tmp_path: Path,
    pki: Path,
    certs: Certs,
    legacy: LegacyDevice,
    version: ssl.TLSVersion,
    name: str,
) -> None:
    if not _bundled_openssl_speaks(version.value, name):
        pytest.skip(f"the OpenSSL bundled with cryptography no longer speaks {name}")
    ctx = client_ctx(pki, certs("good"), version)
    with running_proxy(tmp_path, config(pki, legacy.address, profile="legacy")) as proxy:
        assert proxy.wait_for(event="insecure", tls="in")["level"] == "warning"  # at start
        line = accepted(proxy, ctx)
        warning = proxy.wait_for(event="insecure", listener="tls")
    assert line["tls_version"] == name
    assert warning["level"] == "warning" and warning["peer"] == line["peer"]
    assert name in warning["msg"] and line["cipher"] in warning["msg"]
