"""TLS origination end to end: a legacy device speaks plaintext (or TLS) to the proxy, which opens
TLS to a remote PACS, here DCMTK `storescp +tls` requiring the proxy's client certificate.

Every refusal of the upstream's certificate must reach the client as A-ASSOCIATE-RJ (2, 3, 1) and
the log as `upstream-tls-failed`, with a detail naming the cause and the upstream certificate's
subject and SHA-256 thumbprint (what an operator pastes into `accepted_thumbprints`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_tls_proxy.protocol import pdu
from tests import support
from tests.support import (
    TIMEOUT,
    ProxyProcess,
    RawClient,
    associate,
    build_rq,
    certificate_of,
    client_ssl_context,
    dcmtk,
    make_dataset,
    pacs_identities,
    running_proxy,
    sha256_of,
    wait_until,
)
from tests.test_termination import storescp

pytestmark = pytest.mark.dcmtk

Identities = dict[str, tuple[Path, Path]]


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Identities:
    return pacs_identities(tmp_path_factory.mktemp("pacs-identities"), pki)


def chain(pki: Path) -> dict[str, Any]:
    return {"verify": "chain", "ca": pki / "ca.pem"}


def pinned(*thumbprints: str) -> dict[str, Any]:
    return {"verify": "thumbprint", "accepted_thumbprints": list(thumbprints)}


def config(
    pki: Path, upstream: str, table: dict[str, Any], *, tls_in: bool = False
) -> dict[str, Any]:
    """A plaintext listener (or a TLS one) and one route, PACS, to `upstream` over TLS [tls.pacs];
    the proxy's client certificate is the dev PKI's proxy.pem (serverAuth and clientAuth) unless
    `table` says otherwise (None leaves a key out)."""
    client = {"certificate": pki / "proxy.pem", "private_key": pki / "proxy.key", **table}
    tls: dict[str, Any] = {"pacs": {k: v for k, v in client.items() if v is not None}}
    listener: dict[str, Any] = {"name": "in", "bind": "127.0.0.1:0"}
    if tls_in:
        tls["in"] = support.tls_in(pki)
        listener["tls"] = "in"
    return {
        "proxy": {"log_format": "json"},
        "tls": tls,
        "listener": [listener],
        "route": [
            {"called_ae": "PACS", "upstream": upstream, "upstream_tls": "pacs", "listeners": ["in"]}
        ],
    }


@contextmanager
def pacs_and_proxy(
    tmp_path: Path,
    pki: Path,
    identity: tuple[Path, Path],
    table: dict[str, Any],
    *,
    tls_in: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[ProxyProcess, Path]]:
    """`storescp +tls` with `identity`, verifying client certificates against the dev CA (its
    default, --require-peer-cert), behind the proxy (its environment plus `env`); yields the proxy
    and the PACS's folder."""
    key, cert = identity
    with ExitStack() as stack:
        pacs, out = stack.enter_context(
            storescp(tmp_path, "+B", "+tls", str(key), str(cert), "+cf", str(pki / "ca.pem"))
        )
        proxy = stack.enter_context(
            running_proxy(tmp_path, config(pki, pacs, table, tls_in=tls_in), env)
        )
        yield proxy, out


def data_set(path: Path) -> bytes:
    """The bytes after the file meta group (which each writer fills with its own implementation
    UID): (0002,0000) is explicit VR LE at offset 132, its value at 140."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


@pytest.mark.parametrize("verify", ["chain", "thumbprint"])
def test_storescu_plaintext_to_tls_pacs(
    tmp_path: Path, pki: Path, identities: Identities, verify: str
) -> None:
    identity = identities["pacs"]
    table = chain(pki) if verify == "chain" else pinned(sha256_of(identity[1]))
    src = tmp_path / "ct.dcm"
    make_dataset(256, 256, seed=11).save_as(src, enforce_file_format=True)
    with pacs_and_proxy(tmp_path, pki, identity, table) as (proxy, out):
        host, port = proxy.address("in")
        store = subprocess.run(
            [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "PACS", host, str(port), str(src)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert store.returncode == 0, store.stderr
        line = proxy.association()
        received = wait_until(lambda: list(out.iterdir()), what="stored file")
    assert data_set(received[0]) == data_set(src)
    assert line["outcome"] == "completed" and line["reason"] == "released"
    assert line["calling_ae"] == "MODALITY" and line["tls_version"] == ""  # plaintext side
    assert line["upstream"].startswith("127.0.0.1:")


PIN = "{sha256}"  # replaced by the upstream certificate's thumbprint


@pytest.mark.parametrize(
    ("identity", "table", "expected"),
    [
        pytest.param("pacs", {}, None, id="ip-san-accepted"),
        pytest.param(
            "dns-only",
            {},
            ["tls-name-mismatch", "not for 127.0.0.1 (it is for: pacs.example.org)"],
            id="dns-san-only-refused",
        ),
        pytest.param(
            "pacs",
            {"server_name": "other.example.org"},
            ["tls-name-mismatch", "not for other.example.org (it is for: 127.0.0.1)"],
            id="server-name-refused",
        ),
        pytest.param(
            "dns-only", {"server_name": "pacs.example.org"}, None, id="server-name-accepted"
        ),
        pytest.param("foreign", {}, ["tls-untrusted", "local issuer"], id="other-ca-refused"),
        pytest.param("expired", {}, ["tls-expired", "expired"], id="expired-refused"),
        pytest.param(
            "pacs",
            pinned("sha256:" + "ab" * 32),
            ["tls-thumbprint-mismatch", f"thumbprint {PIN} is not in accepted_thumbprints"],
            id="thumbprint-mismatch-refused",
        ),
        # A pinned leaf stands for itself: neither its issuer nor its names are checked.
        pytest.param("foreign", pinned(PIN), None, id="pinned-other-ca-accepted"),
        pytest.param("dns-only", pinned(PIN), None, id="pinned-wrong-name-accepted"),
    ],
)
def test_upstream_certificate_judged(
    tmp_path: Path,
    pki: Path,
    identities: Identities,
    identity: str,
    table: dict[str, Any],
    expected: list[str] | None,
) -> None:
    key, cert = identities[identity]
    sha256 = sha256_of(cert)
    subject = certificate_of(cert).subject.rfc4514_string()
    if table.get("verify") != "thumbprint":
        table = {**chain(pki), **table}
    table = {
        k: [x.format(sha256=sha256) for x in v] if isinstance(v, list) else v
        for k, v in table.items()
    }
    with pacs_and_proxy(tmp_path, pki, (key, cert), table) as (proxy, _):
        client = RawClient(proxy.address("in"))
        try:
            client.send(build_rq("PACS"))
            answer = client.read_pdu()
            if expected is None:
                assert answer[0] == pdu.A_ASSOCIATE_AC, answer
                client.send(pdu.encode_release_rq())
                assert client.read_pdu()[0] == pdu.A_RELEASE_RP
            else:
                assert answer == pdu.encode_reject(2, 3, 1)
                assert client.read_clean_close() == b""
        finally:
            client.close()
        line = proxy.association()
    if expected is None:
        assert line["outcome"] == "completed", line
        return
    assert line["outcome"] == "rejected" and line["reason"] == "upstream-tls-failed", line
    for fragment in [*expected, f"(upstream certificate {subject}, {sha256})"]:
        assert fragment.format(sha256=sha256) in line["detail"], line["detail"]


@pytest.mark.parametrize("ours", ["none", "foreign"])
def test_pacs_refuses_the_proxys_client_certificate(
    tmp_path: Path, pki: Path, identities: Identities, ours: str
) -> None:
    """With TLS 1.3 the PACS judges the proxy's certificate after the proxy's side of the
    handshake has finished: the refusal arrives as an alert or a reset, when the RQ is sent."""
    key, cert = identities["foreign"] if ours == "foreign" else (None, None)
    table = {**chain(pki), "certificate": cert, "private_key": key}
    with pacs_and_proxy(tmp_path, pki, identities["pacs"], table) as (proxy, _):
        client = RawClient(proxy.address("in"))
        try:
            client.send(build_rq("PACS"))
            assert client.read_pdu() == pdu.encode_reject(2, 3, 1)
        finally:
            client.close()
        line = proxy.association()
    assert line["outcome"] == "rejected", line
    assert line["reason"] == "upstream-tls-failed", line
    assert "client certificate of [tls.pacs]" in line["detail"], line["detail"]


def echo_and_store_over_tls(
    proxy: ProxyProcess, out: Path, pki: Path, ds: Any
) -> tuple[dict[str, Any], list[Path]]:
    """A pynetdicom TLS client through the proxy's `in` listener to the PACS: a C-ECHO and a
    C-STORE of `ds`, each status 0; the association's log line and what the PACS stored."""
    ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    assoc = associate(
        proxy.address("in"), "PACS", ssl_context=ctx, contexts=[Verification, CTImageStorage]
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    line = proxy.association()
    return line, wait_until(lambda: list(out.iterdir()), what="stored file")


def test_pynetdicom_tls_in_tls_out(tmp_path: Path, pki: Path, identities: Identities) -> None:
    ds = make_dataset(128, 128, seed=12)
    with pacs_and_proxy(tmp_path, pki, identities["pacs"], chain(pki), tls_in=True) as (
        proxy,
        out,
    ):
        line, received = echo_and_store_over_tls(proxy, out, pki, ds)
    stored = dcmread(received[0])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
    assert line["outcome"] == "completed" and line["reason"] == "released"
    assert line["tls_version"] in ("TLSv1.3", "TLSv1.2")
    assert line["peer_subject"] == "CN=dicom-client"
