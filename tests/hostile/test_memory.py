"""Memory stays bounded: 500 idle associations, and a slow reader on one side while the other side
sends gigabytes. The proxy's resident memory is read from /proc/PID/status (VmRSS)."""

from __future__ import annotations

import hashlib
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_tls_proxy.protocol import dimse, pdu
from tests.hostile.cases import client_context, connect, proxy_config
from tests.support import (
    ProxyProcess,
    RssSampler,
    ScriptedUpstream,
    build_ac,
    build_rq,
    pacs_ssl_context,
    proxy_stats,
    raise_fd_limit,
    recv_exact,
    recv_pdu,
    running_proxy,
    tls_out,
    vm_rss_kib,
    wait_until,
)

KIB, MIB = 1024, 1024 * 1024
RELEASE_RQ, RELEASE_RP = pdu.encode_release_rq(), pdu.encode_release_rp()
IDLE = 500


def associate_raw(sock: socket.socket) -> None:
    sock.sendall(build_rq("CT"))
    assert recv_pdu(sock)[0] == pdu.A_ASSOCIATE_AC


def release_raw(sock: socket.socket) -> None:
    sock.sendall(RELEASE_RQ)
    assert recv_pdu(sock) == RELEASE_RP


@pytest.fixture
def memory_proxy(tmp_path: Path, pki: Path) -> Iterator[tuple[ProxyProcess, ScriptedUpstream]]:
    """A proxy in front of an upstream that accepts, echoes every P-DATA-TF, and releases."""

    def accept_echo_release(conn: socket.socket) -> None:
        conn.settimeout(300)  # idle on purpose for as long as the test holds the association
        conn.sendall(build_ac(recv_pdu(conn)))
        while (data := recv_pdu(conn))[0] == pdu.P_DATA_TF:
            conn.sendall(data)
        assert data == RELEASE_RQ
        conn.sendall(RELEASE_RP)

    raise_fd_limit(4 * IDLE + 256)  # before the proxy starts: it inherits the limit
    upstream = ScriptedUpstream(accept_echo_release)
    upstream.listener.listen(1024)
    cfg = proxy_config(pki, upstream.address, max_connections=1024, idle_timeout=600.0)
    try:
        with running_proxy(tmp_path, cfg) as proxy:
            yield proxy, upstream
    finally:
        upstream.close()


@pytest.mark.parametrize(
    "traffic",
    [0, 256 * KIB],
    ids=["fresh", "after-256KiB-each-way"],
)
def test_idle_associations_stay_small(
    memory_proxy: tuple[ProxyProcess, ScriptedUpstream], pki: Path, traffic: int
) -> None:
    """500 associations held idle after their AC (and after moving `traffic` bytes each way, so
    that buffers a busy association grew must shrink back): each costs the proxy < 256 KiB."""
    proxy, upstream = memory_proxy
    address, ctx = proxy.address("tls"), client_context(pki)
    payload = b""
    if traffic:
        payload = dimse.encode_p_data(1, random.Random(2).randbytes(traffic), command=False)

    def open_one() -> ssl.SSLSocket:
        sock = connect(address, ctx)
        associate_raw(sock)
        if payload:
            sock.sendall(payload)
            assert recv_exact(sock, len(payload)) == payload
        return sock  # type: ignore[return-value]

    release_raw(warm := open_one())
    warm.close()
    proxy.association(reason="released")
    baseline = proxy_stats(proxy)
    before = vm_rss_kib(proxy.proc.pid)
    start = time.monotonic()
    held = [open_one() for _ in range(IDLE)]
    try:
        opened = time.monotonic() - start
        stats = proxy_stats(proxy)
        assert stats["associations"] == stats["connections"] == IDLE
        after = vm_rss_kib(proxy.proc.pid)
        per = (after - before) / IDLE
        print(
            f"\n{IDLE} idle associations ({traffic // KIB} KiB each way first), opened in "
            f"{opened:.1f}s: proxy VmRSS {before} -> {after} KiB, {per:.1f} KiB per association"
        )
        assert per < 256
        for sock in held:
            release_raw(sock)
    finally:
        for sock in held:
            sock.close()
    wait_until(
        lambda: len(proxy.find(event="association", reason="released")) == IDLE + 1,
        what=f"{IDLE} released",
    )
    assert proxy_stats(proxy) == baseline
    assert not upstream.errors


# -- one side reads slowly while the other sends a lot ---------------------------------------------

PDU_PAYLOAD = 64 * KIB - 12  # a P-DATA-TF of 64 KiB on the wire
SOURCE = random.Random(3).randbytes(4 * MIB)
REQUEST = dimse.encode_p_data(1, b"\x00" * 64, command=True)  # "send me the data"


def pdus(total: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs with `total` bytes on the wire (a multiple of 64 KiB), varied content."""
    size = PDU_PAYLOAD + 12
    assert total % size == 0
    for i in range(total // size):
        start = (i * 7919) % (len(SOURCE) - PDU_PAYLOAD)
        yield dimse.encode_p_data(1, SOURCE[start : start + PDU_PAYLOAD], command=False)


def send_stream(sock: socket.socket, total: int) -> str:
    digest = hashlib.sha256()
    for data in pdus(total):
        sock.sendall(data)
        digest.update(data)
    return digest.hexdigest()


def slow_read(sock: socket.socket, total: int) -> str:
    """Reads `total` bytes in 64 KiB pieces with a pause after each: at most about 60 MB/s, well
    below what the proxy relays, so the proxy is the one that must hold back."""
    digest, got, paced = hashlib.sha256(), 0, 0
    while got < total:
        chunk = sock.recv(min(64 * KIB, total - got))  # a TLS socket returns one record
        if not chunk:
            raise EOFError(f"closed after {got} of {total} bytes")
        digest.update(chunk)
        got += len(chunk)
        if got - paced >= 64 * KIB:
            paced = got
            time.sleep(0.001)  # the deliberately slow reader (pacing, not waiting for anything)
    return digest.hexdigest()


def slow_reader_transfer(
    tmp_path: Path, pki: Path, total: int, direction: str, side: str = "termination"
) -> None:
    """`total` bytes of P-DATA-TF from one side to the other, read slowly, through the proxy:
    TLS client to plaintext upstream (termination), or plaintext client to TLS upstream
    (origination, where OpenSSL writes to and reads from the upstream socket itself)."""
    hashes: dict[str, str] = {}
    origination = side == "origination"

    def upstream_side(conn: socket.socket) -> None:
        conn.settimeout(600)
        conn.sendall(build_ac(recv_pdu(conn)))
        if direction == "up":
            hashes["received"] = slow_read(conn, total)
        else:
            assert recv_pdu(conn) == REQUEST  # sends only when asked (see test_upstream_faults)
            hashes["sent"] = send_stream(conn, total)
        assert recv_pdu(conn) == RELEASE_RQ
        conn.sendall(RELEASE_RP)

    upstream = ScriptedUpstream(upstream_side, pacs_ssl_context(pki) if origination else None)
    # A small receive window, so that the slow reader pushes back at once.
    upstream.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    cfg = proxy_config(pki, upstream.address)
    if origination:
        cfg["tls"]["pacs"] = tls_out(pki)
        cfg["route"][0]["upstream_tls"] = "pacs"
    try:
        with running_proxy(tmp_path, cfg) as proxy:
            if origination:
                client = connect(proxy.address("plain"), None)
            else:
                client = connect(proxy.address("tls"), client_context(pki))
            client.settimeout(600)
            try:
                associate_raw(client)
                start = time.monotonic()
                with RssSampler(proxy.proc.pid) as rss:
                    if direction == "up":
                        hashes["sent"] = send_stream(client, total)
                    else:
                        client.sendall(REQUEST)
                        hashes["received"] = slow_read(client, total)
                    release_raw(client)
            finally:
                client.close()
            elapsed = time.monotonic() - start
            line = proxy.association(reason="released")
    finally:
        upstream.close()
    print(
        f"\n{total // MIB} MiB {direction}stream ({side}) to a slow reader in {elapsed:.1f}s "
        f"({total / MIB / elapsed:.0f} MiB/s): proxy VmRSS {rss.first} KiB at the start, "
        f"peak {rss.peak} KiB"
    )
    assert not upstream.errors, upstream.errors
    assert hashes["received"] == hashes["sent"]
    moved = line["bytes_up"] if direction == "up" else line["bytes_down"]
    assert moved >= total
    assert rss.peak < 150 * KIB


@pytest.mark.parametrize("side", ["termination", "origination"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_slow_reader_64_mib(tmp_path: Path, pki: Path, direction: str, side: str) -> None:
    slow_reader_transfer(tmp_path, pki, 1024 * (PDU_PAYLOAD + 12), direction, side)


@pytest.mark.soak
@pytest.mark.parametrize("direction", ["up", "down"])
def test_slow_reader_1_gib(tmp_path: Path, pki: Path, direction: str) -> None:
    slow_reader_transfer(tmp_path, pki, 16384 * (PDU_PAYLOAD + 12), direction)
