"""Certificates that must fail, under attack conditions: each is refused in the TLS handshake with
the reason an operator understands, the client never gets a DICOM byte, and the refusal costs the
proxy no file descriptor and no task. (tests/test_peer_auth.py covers every mode and override.)"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from dicom_tls_proxy.security.thumbprint import certificate_thumbprints
from tests.hostile.cases import proxy_config
from tests.hostile.conftest import HANDSHAKE_TIMEOUT, attack
from tests.support import TIMEOUT, LegacyDevice, build_rq
from tests.test_peer_auth import Certs, Cred, certs  # noqa: F401  (the `certs` fixture)

# name of the client certificate (tests/test_peer_auth.py RECIPES), extra TLS settings, reason
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("expired", {}, "tls-expired"),
    ("not-yet-valid", {}, "tls-not-yet-valid"),
    ("server-only", {}, "tls-wrong-usage"),
    ("rsa1024", {}, "tls-weak-certificate"),
    ("sha1", {}, "tls-weak-certificate"),
    ("other-ca", {}, "tls-untrusted"),
    ("other-ca-chain", {}, "tls-untrusted"),
    ("self-signed", {}, "tls-untrusted"),
    ("revoked", {"crl": True}, "tls-revoked"),
    (
        "self-signed",
        {"verify": "thumbprint", "accepted_thumbprints": ["GOOD"]},
        "tls-thumbprint-mismatch",
    ),
    ("none", {}, "tls-no-certificate"),
]


def client(pki: Path, cred: Cred | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client may offer what the proxy must refuse
    if cred is not None:
        ctx.load_cert_chain(str(cred.cert), str(cred.key))
    return ctx


def no_dicom_answer(address: tuple[str, int], ctx: ssl.SSLContext) -> None:
    """Handshake, send an A-ASSOCIATE-RQ: the proxy must refuse in TLS, never answer in DICOM."""
    with socket.create_connection(address, timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:  # TLS 1.3: the refusal comes after our Finished
                tls.sendall(build_rq("CT"))
                assert tls.recv(100) == b""
        except (ssl.SSLError, ConnectionError):
            pass


@pytest.mark.parametrize(
    ("name", "settings", "reason"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_refused_certificate_costs_nothing(
    tmp_path: Path,
    pki: Path,
    legacy: LegacyDevice,
    certs: Certs,  # noqa: F811
    name: str,
    settings: dict[str, Any],
    reason: str,
) -> None:
    cfg = proxy_config(pki, legacy.address, handshake_timeout=HANDSHAKE_TIMEOUT)
    table = cfg["tls"]["in"]
    if "crl" in settings:
        table["crl"] = [certs.crl("revoked")]
    if settings.get("verify") == "thumbprint":  # the warm-up client is the one pinned
        good = x509.load_pem_x509_certificate((pki / "client.pem").read_bytes())
        table.update(
            verify="thumbprint", accepted_thumbprints=[str(certificate_thumbprints(good)[0])]
        )
        del table["ca"]
    with attack(tmp_path, pki, legacy, cfg) as target:
        cred = None if name == "none" else certs(name)
        no_dicom_answer(target.addresses["tls"], client(pki, cred))
        line = target.proxy.association(reason=reason)
        assert line["outcome"] == "tls-failed"
        if cred is not None:  # the operator can pin or chase the refused certificate
            assert line["peer_sha256"] == f"sha256:{cred.sha256}"
            assert line["peer_subject"] == cred.subject
        assert legacy.associations == 1  # only the warm-up reached the device
        target.assert_nothing_leaked()
        target.echo()  # and the proxy still serves
