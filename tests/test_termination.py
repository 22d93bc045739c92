"""TLS termination end to end: real TLS clients -> the proxy (a real process) -> plaintext devices.

Each refusal test asserts what the client sees on the wire (the exact RJ/A-ABORT bytes, or a close)
and the reason in the proxy's log line.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_tls_proxy.protocol import dimse, pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ProxyProcess,
    RawClient,
    ScriptedUpstream,
    associate,
    build_ac,
    build_rq,
    client_ssl_context,
    dcmtk,
    free_port,
    make_dataset,
    proxy_config,
    running_proxy,
    storescp_running,
    wait_until,
)

LOG_FIELDS = {
    "ts",
    "event",
    "listener",
    "peer",
    "tls_version",
    "cipher",
    "encryption",
    "mac",
    "tls_group",
    "resumed",
    "peer_subject",
    "peer_sha256",
    "calling_ae",
    "called_ae",
    "abstract_syntaxes",
    "route",
    "upstream",
    "outcome",
    "reason",
    "bytes_up",
    "bytes_down",
    "duration_s",
}


def config(pki: Path, upstream: str, **proxy: Any) -> dict[str, Any]:
    return proxy_config(pki, upstream, proxy={"log_format": "json", **proxy})


def client_ctx(pki: Path) -> Any:
    return client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")


@contextmanager
def raw(proxy: ProxyProcess, pki: Path) -> Iterator[RawClient]:
    client = RawClient(proxy.address("tls"), client_ctx(pki))
    try:
        yield client
    finally:
        client.close()


# -- real peers -----------------------------------------------------------------------------


def test_pynetdicom_echo_store_find(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assoc = associate(proxy.address("tls"), "CT", ssl_context=client_ctx(pki))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        ds = make_dataset(seed=7)
        assert assoc.send_c_store(ds).Status == 0
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientName = "*"
        answers = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, PatientRootQueryRetrieveInformationModelFind
            )
            if status and status.Status == 0xFF00
        ]
        assoc.release()
        line = proxy.association(called_ae="CT")
    assert answers and answers[0].PatientName == "DOE^JOHN"
    assert legacy.stored[0].PixelData == ds.PixelData
    assert line["outcome"] == "completed" and line["reason"] == "released"
    assert set(line) >= LOG_FIELDS
    assert line["tls_version"] in ("TLSv1.3", "TLSv1.2")
    assert line["tls_group"].lower() in ("x25519mlkem768", "x25519", "secp256r1")  # the client's
    assert line["peer_subject"] == "CN=dicom-client"
    assert line["peer_sha256"].startswith("sha256:") and len(line["peer_sha256"]) == 71
    assert line["calling_ae"] == "TEST_SCU"
    assert (
        "CT Image Storage" in line["abstract_syntaxes"]
        and "Verification SOP Class" in line["abstract_syntaxes"]
    )
    assert line["bytes_up"] > len(ds.PixelData) and line["bytes_down"] > 0


@contextmanager
def storescp(tmp_path: Path, *extra: str) -> Iterator[tuple[str, Path]]:
    """DCMTK storescp as the legacy device, storing into a folder; yields (address, folder)."""
    port = free_port()
    with storescp_running(port, tmp_path / "received", *extra) as out:
        yield f"127.0.0.1:{port}", out


def dcmtk_tls(pki: Path) -> list[str]:
    return ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]


@pytest.mark.dcmtk
def test_twenty_concurrent_associations_store_ten_files_each(tmp_path: Path, pki: Path) -> None:
    """20 DCMTK storescu processes at once, 10 files each, every pixel byte compared.

    (20 pynetdicom SCU threads in one process hit pynetdicom's own DIMSE timeouts under load,
    pydicom/pynetdicom#842, also with no proxy in between; separate processes measure the proxy.)
    """
    sent: dict[str, bytes] = {}
    batches = []
    for n in range(20):
        files = []
        for i in range(10):
            ds = make_dataset(32, 32, seed=n * 100 + i)
            path = tmp_path / f"c{n}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent[ds.SOPInstanceUID] = ds.PixelData
            files.append(str(path))
        batches.append(files)
    with (
        storescp(tmp_path, "--fork") as (device, out),
        running_proxy(tmp_path, config(pki, device)) as proxy,
    ):
        host, port = proxy.address("tls")
        env = {**os.environ, "TCP_NODELAY": "1"}
        clients = [
            subprocess.Popen(
                [
                    dcmtk("storescu"),
                    *dcmtk_tls(pki),
                    "-aet",
                    f"SCU{n}",
                    "-aec",
                    "CT",
                    host,
                    str(port),
                    *files,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for n, files in enumerate(batches)
        ]
        for client in clients:
            _, err = client.communicate(timeout=120)
            assert client.returncode == 0, err
        wait_until(
            lambda: len(proxy.find(event="association", outcome="completed")) == 20,
            what="20 log lines",
        )
        wait_until(lambda: len(list(out.iterdir())) == 200, what="200 stored files")
    received = {ds.SOPInstanceUID: ds.PixelData for ds in map(dcmread, out.iterdir())}
    assert received == sent


@pytest.mark.dcmtk
def test_dcmtk_echoscu_and_storescu_to_plain_storescp(tmp_path: Path, pki: Path) -> None:
    with storescp(tmp_path) as (device, out), running_proxy(tmp_path, config(pki, device)) as proxy:
        host, port = proxy.address("tls")
        env = {**os.environ, "TCP_NODELAY": "1"}
        target = ["-aet", "DCMTK", "-aec", "CT", host, str(port)]
        echo = subprocess.run(
            [dcmtk("echoscu"), *dcmtk_tls(pki), *target],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
        assert echo.returncode == 0, echo.stderr
        ds = make_dataset(256, 256, seed=3)
        src = tmp_path / "ct.dcm"
        ds.save_as(src, enforce_file_format=True)
        store = subprocess.run(
            [dcmtk("storescu"), *dcmtk_tls(pki), *target, str(src)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
        assert store.returncode == 0, store.stderr
        wait_until(
            lambda: len(proxy.find(event="association", outcome="completed")) == 2,
            what="2 associations",
        )
        line = proxy.find(event="association", outcome="completed")[-1]
        received = wait_until(lambda: list(out.iterdir()), what="stored file")
    assert dcmread(received[0]).PixelData == ds.PixelData
    assert line["calling_ae"] == "DCMTK" and line["reason"] == "released"


def test_upstream_called_ae_rewritten_and_restored(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address)
    cfg["route"][0]["upstream_called_ae"] = "CT01"
    with running_proxy(tmp_path, cfg) as proxy, raw(proxy, pki) as client:
        rq = build_rq("CT")
        client.send(rq)
        ac = client.read_pdu()
        assert ac[0] == pdu.A_ASSOCIATE_AC
        assert ac[10:26] == rq[10:26]  # the client's own Called AE, byte for byte
        client.send(pdu.encode_release_rq())
        assert client.read_pdu()[0] == pdu.A_RELEASE_RP
    assert legacy.called_aes == ["CT01"]


# -- the refusal table ----------------------------------------------------------------------


def _refused(proxy: ProxyProcess, pki: Path, rq: bytes) -> bytes:
    with raw(proxy, pki) as client:
        client.send(rq)
        answer = client.read_pdu()
        assert client.read_clean_close() == b""  # then a clean close, not a reset
        return answer


def test_no_route(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assert _refused(proxy, pki, build_rq("NOWHERE")) == pdu.encode_reject(1, 1, 7)
        line = proxy.association(reason="no-route")
    assert line["outcome"] == "rejected" and line["called_ae"] == "NOWHERE"


def test_fallback_route(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address)
    cfg["route"][0]["called_ae"] = "*"
    with running_proxy(tmp_path, cfg) as proxy:
        assoc = associate(proxy.address("tls"), "ANYTHING", ssl_context=client_ctx(pki))
        assert assoc.is_established
        assoc.release()
        assert proxy.association()["route"] == "*"


def test_calling_ae_not_allowed(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address)
    cfg["route"][0]["allow_calling_ae"] = ["PACS*"]
    with running_proxy(tmp_path, cfg) as proxy:
        assert _refused(proxy, pki, build_rq("CT", "WORKSTATION")) == pdu.encode_reject(1, 1, 3)
        assert proxy.association(reason="calling-ae-not-allowed")["calling_ae"] == "WORKSTATION"
        assoc = associate(
            proxy.address("tls"), "CT", calling_ae="PACS_MAIN", ssl_context=client_ctx(pki)
        )
        assert assoc.is_established
        assoc.release()


def test_peer_not_allowed(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address)
    cfg["route"][0]["allow_peer"] = ["cn:someone-else"]
    with running_proxy(tmp_path, cfg) as proxy:
        assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(1, 1, 1)
        assert proxy.association(reason="peer-not-allowed")["peer_subject"] == "CN=dicom-client"


def test_source_not_allowed_by_route(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address)
    cfg["route"][0]["allow_source"] = ["10.0.0.0/8"]
    with running_proxy(tmp_path, cfg) as proxy:
        assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(1, 1, 1)
        proxy.association(reason="source-not-allowed")


def test_source_not_allowed_by_listener_closes_before_tls(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address)
    cfg["listener"][0]["allow_source"] = ["192.0.2.0/24"]
    with running_proxy(tmp_path, cfg) as proxy:
        with socket.create_connection(proxy.address("tls"), timeout=TIMEOUT) as sock:
            assert sock.recv(100) == b""  # closed without a TLS byte
        line = proxy.association(reason="source-not-allowed")
    assert line["outcome"] == "refused" and line["tls_version"] == ""


def test_protocol_version(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assert _refused(proxy, pki, build_rq("CT", version=2)) == pdu.encode_reject(1, 2, 2)
        proxy.association(reason="protocol-version")


def test_upstream_unreachable(tmp_path: Path, pki: Path) -> None:
    upstream = f"127.0.0.1:{free_port()}"
    with running_proxy(tmp_path, config(pki, upstream)) as proxy:
        assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(2, 3, 1)
        line = proxy.association(reason="upstream-unreachable")
    assert line["outcome"] == "rejected" and line["upstream"] == upstream
    # which upstream, and the system's own words for why (ECONNREFUSED)
    assert line["detail"].startswith(f"{upstream}: "), line["detail"]
    assert line["detail"].endswith(os.strerror(errno.ECONNREFUSED)), line["detail"]


def test_upstream_connect_timeout(tmp_path: Path, pki: Path) -> None:
    # A listener that never accepts, with its backlog filled: further SYNs are dropped.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
        fillers.append(s)
    try:
        cfg = config(pki, f"127.0.0.1:{hole.getsockname()[1]}", connect_timeout=1.0)
        with running_proxy(tmp_path, cfg) as proxy:
            assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(2, 3, 1)
            proxy.association(reason="upstream-timeout")
    finally:
        for s in fillers:
            s.close()
        hole.close()


def test_upstream_no_answer(tmp_path: Path, pki: Path) -> None:
    seen_abort = threading.Event()

    def silent(conn: socket.socket) -> None:
        upstream.read_pdu(conn)
        if upstream.read_pdu(conn)[0] == pdu.A_ABORT:
            seen_abort.set()

    upstream = ScriptedUpstream(silent)
    try:
        with running_proxy(tmp_path, config(pki, upstream.address, associate_timeout=1.0)) as proxy:
            assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(2, 3, 1)
            proxy.association(reason="upstream-no-answer")
        assert seen_abort.wait(TIMEOUT)
    finally:
        upstream.close()


def test_upstream_rejects(tmp_path: Path, pki: Path) -> None:
    def reject(conn: socket.socket) -> None:
        upstream.read_pdu(conn)
        conn.sendall(pdu.encode_reject(1, 1, 3))

    upstream = ScriptedUpstream(reject)
    try:
        with running_proxy(tmp_path, config(pki, upstream.address)) as proxy:
            assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(1, 1, 3)
            assert proxy.association(reason="upstream-rejected")["outcome"] == "rejected"
    finally:
        upstream.close()


def test_too_many_associations(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, max_connections=1)) as proxy:
        first = associate(proxy.address("tls"), "CT", ssl_context=client_ctx(pki))
        assert first.is_established
        try:
            assert _refused(proxy, pki, build_rq("CT")) == pdu.encode_reject(2, 3, 2)
            proxy.association(reason="too-many-associations")
        finally:
            first.release()
        proxy.association(reason="released")
        second = associate(proxy.address("tls"), "CT", ssl_context=client_ctx(pki))
        assert second.is_established  # the slot was given back
        second.release()


@pytest.mark.parametrize(
    ("first", "answer", "reason"),
    [
        (b"\x0a\x00\x00\x00\x00\x04abcd", pdu.encode_abort(2, 1), "unrecognized-pdu"),
        (pdu.encode_release_rq(), pdu.encode_abort(2, 2), "unexpected-pdu"),
        (b"\x01\x00\x00\x00\x00\x10" + bytes(16), pdu.encode_abort(2, 6), "invalid-pdu"),
        (
            b"\x01\x00\x00\x01\x00\x00",
            pdu.encode_abort(2, 6),
            "invalid-pdu",
        ),  # longer than the limit
    ],
    ids=["unknown-type", "release-first", "truncated-rq", "too-long"],
)
def test_bad_first_pdu(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, first: bytes, answer: bytes, reason: str
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assert _refused(proxy, pki, first) == answer
        assert proxy.association(reason=reason)["outcome"] == "aborted"
    assert legacy.associations == 0


def test_invalid_calling_ae(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    rq = bytearray(build_rq("CT"))
    rq[26:42] = b"BAD\\AE".ljust(16)
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assert _refused(proxy, pki, bytes(rq)) == pdu.encode_abort(2, 6)
        proxy.association(reason="invalid-pdu")


def test_handshake_timeout(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, handshake_timeout=1.0)) as proxy:
        with raw(proxy, pki) as client:
            client.send(build_rq("CT")[:20])  # part of a PDU, then silence
            assert client.read_clean_close() == b""
        assert proxy.association(reason="handshake-timeout")["outcome"] == "timed-out"
        with socket.create_connection(
            proxy.address("tls"), timeout=TIMEOUT
        ) as sock:  # no TLS at all
            assert sock.recv(100) == b""
        wait_until(
            lambda: len(proxy.find(event="association", reason="handshake-timeout")) == 2,
            what="second timeout",
        )


def test_upstream_drops_mid_association(tmp_path: Path, pki: Path) -> None:
    def drop(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))

    upstream = ScriptedUpstream(drop)
    try:
        with (
            running_proxy(tmp_path, config(pki, upstream.address)) as proxy,
            raw(proxy, pki) as client,
        ):
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            assert client.read_pdu() == pdu.encode_abort(2, 0)
            assert proxy.association(reason="upstream-closed")["outcome"] == "aborted"
    finally:
        upstream.close()


def test_client_drops_mid_association(tmp_path: Path, pki: Path) -> None:
    got: list[bytes] = []
    done = threading.Event()

    def accept_then_listen(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))
        got.append(upstream.read_pdu(conn))
        done.set()

    upstream = ScriptedUpstream(accept_then_listen)
    try:
        with running_proxy(tmp_path, config(pki, upstream.address)) as proxy:
            with raw(proxy, pki) as client:
                client.send(build_rq("CT"))
                assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            assert done.wait(TIMEOUT)
            proxy.association(reason="client-closed")
        assert got == [pdu.encode_abort(2, 0)]  # the legacy device frees its slot
    finally:
        upstream.close()


def test_idle_timeout_aborts_both(tmp_path: Path, pki: Path) -> None:
    got: list[bytes] = []

    def accept_then_listen(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))
        got.append(upstream.read_pdu(conn))

    upstream = ScriptedUpstream(accept_then_listen)
    try:
        with (
            running_proxy(tmp_path, config(pki, upstream.address, idle_timeout=1.0)) as proxy,
            raw(proxy, pki) as client,
        ):
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            assert client.read_pdu() == pdu.encode_abort(2, 0)
            assert proxy.association(reason="idle-timeout")["outcome"] == "timed-out"
            wait_until(lambda: got, what="abort at the upstream")
        assert got == [pdu.encode_abort(2, 0)]
    finally:
        upstream.close()


def test_idle_timeout_counts_from_the_last_byte_either_way(tmp_path: Path, pki: Path) -> None:
    """Past idle_timeout many times over: an association moving a PDU every eighth of it, first
    only up (a long C-STORE), then only down (a long C-FIND answer), then every 20 ms (faster than
    the deadline is moved), lives on; once silent it is aborted to both, no earlier than 15/16 of
    idle_timeout after its last byte."""
    idle = 2.0
    ups, downs, dense = 20, 20, 100  # 5 s up, 5 s down at 250 ms; 2 s at 20 ms
    chunk = dimse.encode_p_data(1, b"\x00" * 64, command=False)
    got: list[bytes] = []

    def device(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))
        for _ in range(ups):
            got.append(upstream.read_pdu(conn))
        for _ in range(downs):
            time.sleep(idle / 8)  # the pace of the traffic: quiet for less than idle_timeout
            conn.sendall(chunk)
        for _ in range(dense + 1):  # and then the A-ABORT
            got.append(upstream.read_pdu(conn))

    upstream = ScriptedUpstream(device)
    try:
        with (
            running_proxy(tmp_path, config(pki, upstream.address, idle_timeout=idle)) as proxy,
            raw(proxy, pki) as client,
        ):
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            started = time.monotonic()
            for _ in range(ups):
                time.sleep(idle / 8)  # the pace of the traffic: quiet for less than idle_timeout
                client.send(chunk)
            for _ in range(downs):
                assert client.read_pdu() == chunk
            for _ in range(dense):
                time.sleep(0.02)
                client.send(chunk)
            last = time.monotonic()
            assert not proxy.find(event="association")  # alive after 6 x idle_timeout
            assert client.read_pdu() == pdu.encode_abort(2, 0)
            silent = time.monotonic() - last
            line = proxy.association(reason="idle-timeout")
            wait_until(lambda: len(got) == ups + dense + 1, what="the abort at the upstream")
        assert last - started > 5 * idle
        assert idle * 15 / 16 <= silent < 2 * idle + 1, silent
        assert got == [chunk] * (ups + dense) + [pdu.encode_abort(2, 0)]
        assert line["outcome"] == "timed-out"
        assert line["bytes_up"] == len(build_rq("CT")) + (ups + dense) * len(chunk)
        assert line["bytes_down"] == len(build_ac(build_rq("CT"))) + downs * len(chunk)
        assert line["duration_s"] > 6 * idle
        assert not upstream.errors, upstream.errors
    finally:
        upstream.close()


def test_text_log_line(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address)
    cfg["proxy"]["log_format"] = "text"
    path = tmp_path / "proxy.toml"
    from tests.support import toml_dumps

    path.write_text(toml_dumps(cfg))
    proxy = ProxyProcess(path)
    try:
        line = wait_until(
            lambda: [x for x in proxy.raw if "event=listening" in x], what="listening"
        )[0]
        port = int(line.split("address=")[1].split()[0].rsplit(":", 1)[1])
        client = RawClient(("127.0.0.1", port), client_ctx(pki))
        client.send(build_rq("NOPE"))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 7)
        client.close()
        text = wait_until(
            lambda: [x for x in proxy.raw if "event=association" in x], what="association"
        )[0]
    finally:
        proxy.stop()
    assert "level=warning" in text and "outcome=rejected" in text and "reason=no-route" in text
    assert "called_ae=NOPE" in text
