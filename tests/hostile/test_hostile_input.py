"""Hostile input: every case of `cases.CASES`, then a flood of connections opened and dropped.

Each case gets the answer of the refusal table (or a close at handshake_timeout), one log line that
says what happened, reaches no device, and costs no file descriptor and no task afterwards: the
proxy's SIGUSR1 stats are back to the baseline taken after one warm-up association.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from dicom_tls_proxy.protocol import pdu
from tests.hostile.cases import CASES, Case, client_hello, connect, header, proxy_config, throw
from tests.hostile.conftest import HANDSHAKE_TIMEOUT, Target, attack
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ScriptedUpstream,
    build_ac,
    build_rq,
    recv_exact,
    recv_pdu,
    wait_until,
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_connection(target: Target, case: Case) -> None:
    seen = throw(case, target.addresses, target.ctx)
    line = target.proxy.association(reason=case.reason)

    assert line["outcome"] == case.outcome
    assert case.detail and case.detail in line["detail"], line["detail"]
    assert line["detail"].isprintable()  # nothing the peer sent can forge a log line
    if case.answer is not None:
        assert seen.answer == case.answer
    if case.stall:
        assert HANDSHAKE_TIMEOUT <= seen.elapsed <= HANDSHAKE_TIMEOUT + 2.0, seen.elapsed
    elif seen.answer is not None:
        assert seen.answered_in < HANDSHAKE_TIMEOUT, seen  # answered at once, not timed out
    assert not target.proxy.find(event="unparsed")
    assert not target.proxy.find(level="error")
    assert target.legacy.associations == 1  # the warm-up only: nothing hostile got through
    target.assert_nothing_leaked()
    target.echo()  # and it still serves


FLOOD = 2000
BATCH = 250


@pytest.mark.parametrize(
    ("greeting", "reasons"),
    [(b"", {"client-closed"}), (client_hello(), {"client-closed", "tls-protocol"})],
    ids=["silent", "client-hello"],
)
def test_flood_of_dropped_connections(target: Target, greeting: bytes, reasons: set[str]) -> None:
    """2000 TCP connections opened and dropped in batches of 250 (silent, or after a whole
    ClientHello that makes the proxy do its side of a handshake), half with a reset (SO_LINGER 0),
    half with a FIN: every one is logged (lines or `suppressed` counts), none is left behind."""
    lines_before = len(target.proxy.find(event="association"))
    start = time.monotonic()
    linger0 = struct.pack("ii", 1, 0)
    for first in range(0, FLOOD, BATCH):
        batch = [
            socket.create_connection(target.addresses["tls"], timeout=TIMEOUT) for _ in range(BATCH)
        ]
        for n, sock in enumerate(batch, first):
            if greeting:
                sock.sendall(greeting)
            if n % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            sock.close()

    def accounted() -> int:
        lines = len(target.proxy.find(event="association")) - lines_before
        return lines + sum(x["count"] for x in target.proxy.find(event="suppressed"))

    wait_until(lambda: accounted() >= FLOOD, timeout=120, what=f"{FLOOD} connections logged")
    elapsed = time.monotonic() - start
    print(
        f"\n{FLOOD} connections ({len(greeting)}-byte greeting) dropped, logged in {elapsed:.1f}s"
    )
    assert accounted() == FLOOD
    seen = {x["reason"] for x in target.proxy.find(event="association")[lines_before:]}
    assert seen | {x["reason"] for x in target.proxy.find(event="suppressed")} <= reasons
    assert elapsed < 60
    assert not target.proxy.find(level="error")
    target.assert_nothing_leaked()
    target.echo()


# -- hostile PDUs once the association is up ----------------------------------------------------

P_DATA_4_GIB = header(pdu.P_DATA_TF, 0xFFFFFFFF) + bytes(64)
RELEASE_4_GIB = header(pdu.A_RELEASE_RQ, 0xFFFFFFFF)
ABORT = pdu.encode_abort(2, 0)


@pytest.mark.parametrize(
    ("hostile", "with_rq"),
    [
        (P_DATA_4_GIB, False),
        (RELEASE_4_GIB, False),
        (header(0x0A, 4) + bytes(4), False),
        (RELEASE_4_GIB, True),
    ],
    ids=["p-data-4-gib", "release-rq-4-gib", "unknown-type", "release-rq-4-gib-with-the-rq"],
)
def test_hostile_pdu_after_the_rq_never_reaches_the_device(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, hostile: bytes, with_rq: bool
) -> None:
    """Once the association is up the proxy only follows PDU headers, but a header no peer may
    send must not reach the device behind it, whether it comes after the AC or in the same write
    as the RQ: the RQ goes on and the AC comes back, then the client and the device each get an
    A-ABORT (2, 0) instead of the hostile header."""
    after_ac: list[bytes] = []
    connected, done = threading.Event(), threading.Event()

    def device(conn: socket.socket) -> None:
        connected.set()
        try:
            conn.sendall(build_ac(recv_pdu(conn)))
            head = recv_exact(conn, 6)  # the first header the device sees after its AC
            after_ac.append(head + (recv_exact(conn, 4) if head[0] == pdu.A_ABORT else b""))
            while conn.recv(65536):
                pass
        finally:
            done.set()

    upstream = ScriptedUpstream(device)
    cfg = proxy_config(pki, legacy.address, idle_timeout=2.0)  # the bound, should all else fail
    cfg["route"].append({"called_ae": "DEVICE", "upstream": upstream.address})
    try:
        with attack(tmp_path, pki, legacy, cfg) as t:
            sock = connect(t.addresses["tls"], t.ctx)
            try:
                sock.sendall(build_rq("DEVICE") + (hostile if with_rq else b""))
                assert recv_pdu(sock)[0] == pdu.A_ASSOCIATE_AC
                if not with_rq:
                    sock.sendall(hostile)
                assert recv_pdu(sock) == ABORT
            finally:
                sock.close()
            line = t.proxy.association(route="DEVICE")
            assert connected.is_set() and done.wait(TIMEOUT)
            assert after_ac == [ABORT]  # not the hostile header, nor a bare close
            assert line["reason"] == "invalid-pdu"
            t.assert_nothing_leaked()
    finally:
        upstream.close()
