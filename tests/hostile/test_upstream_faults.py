"""Upstream faults: each ends with the right PDU to the client within the configured timeouts
(A-ASSOCIATE-RJ (2, 3, 1) before the AC, A-ABORT (2, 0) after it), and the proxy keeps serving
others: an association held open on another route during the fault still works, a new one made
while the fault is under way succeeds, and nothing is left behind (stats back to the baseline).

Refused, black-holed and silent upstreams are also in tests/test_termination.py, one by one; here
they run with the rest under the "keeps serving others" check. The `tls-` faults come from a TLS
upstream (the proxy originating TLS, where OpenSSL reads and writes the socket itself): a reset,
a close_notify, or a TCP close without one, each in the middle of an association.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_tls_proxy.protocol import dimse, pdu
from tests.hostile.cases import connect, header, proxy_config, read_until_close
from tests.hostile.conftest import Target, attack
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ScriptedUpstream,
    associate,
    build_ac,
    build_rq,
    free_port,
    pacs_ssl_context,
    recv_exact,
    recv_pdu,
    silent_listener,
    tls_out,
)

CONNECT_TIMEOUT = ASSOCIATE_TIMEOUT = 1.0
REJECT = pdu.encode_reject(2, 3, 1)
ABORT = pdu.encode_abort(2, 0)
SENT_AFTER_AC = 1 << 20  # P-DATA the client sends after the AC in the reset case


def read_to_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def no_answer(conn: socket.socket) -> None:
    recv_pdu(conn)
    read_to_eof(conn)  # the proxy's A-ABORT, then its close


def closes_before_answer(conn: socket.socket) -> None:
    recv_pdu(conn)


def http_answer(conn: socket.socket) -> None:
    recv_pdu(conn)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    read_to_eof(conn)


def answer_of_4_gib(conn: socket.socket) -> None:
    recv_pdu(conn)
    conn.sendall(header(pdu.A_ASSOCIATE_AC, 0xFFFFFFFF))
    read_to_eof(conn)


def reset_mid_transfer(conn: socket.socket) -> None:
    conn.sendall(build_ac(recv_pdu(conn)))
    recv_exact(conn, 128 * 1024)  # in the middle of the client's P-DATA stream
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def half_close_after_ac(conn: socket.socket) -> None:
    conn.sendall(build_ac(recv_pdu(conn)))
    conn.shutdown(socket.SHUT_WR)
    read_to_eof(conn)


def close_notify_after_ac(conn: socket.socket) -> None:
    conn.sendall(build_ac(recv_pdu(conn)))
    assert isinstance(conn, ssl.SSLSocket)
    raw = conn.unwrap()  # close_notify, then the proxy's own close_notify
    read_to_eof(raw)


@dataclass(frozen=True)
class Fault:
    name: str
    # A ScriptedUpstream, or "refused", "black-hole" (no connect) or "silent" (connects, never
    # accepts nor answers)
    script: Callable[[socket.socket], None] | str
    reason: str
    answer: bytes  # what the client reads after the AC (or instead of it) until the close
    within: float  # seconds from the RQ (or from the AC) to that answer
    after_ac: bool = False
    tls: bool = False  # the upstream speaks TLS (route with upstream_tls)


FAULTS = [
    Fault("refused", "refused", "upstream-unreachable", REJECT, CONNECT_TIMEOUT),
    Fault("black-holed", "black-hole", "upstream-timeout", REJECT, CONNECT_TIMEOUT + 1.5),
    Fault(
        "accepts-never-answers", no_answer, "upstream-no-answer", REJECT, ASSOCIATE_TIMEOUT + 1.5
    ),
    Fault("closes-before-answer", closes_before_answer, "upstream-no-answer", REJECT, 1.0),
    Fault("answers-http", http_answer, "upstream-no-answer", REJECT, 1.0),
    Fault("answers-4-gib-pdu", answer_of_4_gib, "upstream-no-answer", REJECT, 1.0),
    Fault("reset-mid-transfer", reset_mid_transfer, "upstream-closed", ABORT, 2.0, after_ac=True),
    Fault("half-close-after-ac", half_close_after_ac, "upstream-closed", ABORT, 1.0, after_ac=True),
    Fault("tls-silent", "silent", "upstream-timeout", REJECT, CONNECT_TIMEOUT + 1.5, tls=True),
    *(
        Fault(f"tls-{name}", script, "upstream-closed", ABORT, within, after_ac=True, tls=True)
        for name, script, within in [
            ("reset-mid-transfer", reset_mid_transfer, 2.0),
            ("half-close-after-ac", half_close_after_ac, 1.0),
            ("close-notify-after-ac", close_notify_after_ac, 1.0),
        ]
    ),
]


@contextmanager
def faulty_upstream(fault: Fault, pki: Path) -> Iterator[tuple[str, ScriptedUpstream | None]]:
    if fault.script == "refused":
        yield f"127.0.0.1:{free_port()}", None
    elif fault.script in ("black-hole", "silent"):
        with silent_listener(backlog_full=fault.script == "black-hole") as address:
            yield address, None
    else:
        assert callable(fault.script)
        upstream = ScriptedUpstream(fault.script, pacs_ssl_context(pki) if fault.tls else None)
        upstream.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            yield upstream.address, upstream
        finally:
            upstream.close()


def meet_fault(t: Target, fault: Fault) -> tuple[bytes, float]:
    """The client's side: RQ to BAD (then, after an AC, P-DATA); what it reads and how soon."""
    sock = connect(t.addresses["tls"], t.ctx)
    try:
        sock.sendall(build_rq("BAD"))
        start = time.monotonic()
        if fault.after_ac:
            assert recv_pdu(sock)[0] == pdu.A_ASSOCIATE_AC
            start = time.monotonic()
            if fault.script is reset_mid_transfer:
                data = dimse.encode_p_data(1, bytes(64 * 1024 - 12), command=False)
                # The proxy may close while we still send (a reset): like a robust DICOM
                # client, stop sending then and read what came; the A-ABORT is there.
                with suppress(OSError):
                    for _ in range(SENT_AFTER_AC // len(data)):
                        sock.sendall(data)
        answer = read_until_close(sock)
        return answer, time.monotonic() - start
    finally:
        sock.close()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_upstream_fault(tmp_path: Path, pki: Path, legacy: LegacyDevice, fault: Fault) -> None:
    with ExitStack() as stack:
        address, upstream = stack.enter_context(faulty_upstream(fault, pki))
        cfg = proxy_config(
            pki,
            legacy.address,
            connect_timeout=CONNECT_TIMEOUT,
            associate_timeout=ASSOCIATE_TIMEOUT,
            idle_timeout=60.0,
        )
        cfg["route"].append({"called_ae": "BAD", "upstream": address})
        if fault.tls:
            cfg["tls"]["pacs"] = tls_out(pki)
            cfg["route"][-1]["upstream_tls"] = "pacs"
        t = stack.enter_context(attack(tmp_path, pki, legacy, cfg))
        held = associate(t.addresses["tls"], "CT", ssl_context=t.ctx)  # another route, open
        assert held.is_established

        seen: list[tuple[bytes, float]] = []
        client = threading.Thread(target=lambda: seen.append(meet_fault(t, fault)))
        client.start()
        t.echo()  # a new association while the fault is under way
        client.join(TIMEOUT)
        line = t.proxy.association(route="BAD")

        assert seen, "the client never finished"
        answer, elapsed = seen[0]
        assert answer == fault.answer
        assert elapsed <= fault.within, elapsed
        assert line["reason"] == fault.reason
        assert held.send_c_echo().Status == 0  # the held association did not notice
        held.release()
        t.proxy.wait_for(event="association", reason="released", route="CT")
        t.echo()
        if upstream is not None:
            assert not [e for e in upstream.errors if not isinstance(e, OSError)], upstream.errors
        assert not t.proxy.find(level="error")
        t.assert_nothing_leaked()


def ac_then(extra: bytes) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        conn.sendall(build_ac(recv_pdu(conn)) + extra)  # one segment: the AC and what follows
        read_to_eof(conn)

    return script


@pytest.mark.parametrize(
    "extra",
    [pdu.encode_abort(0, 0), dimse.encode_p_data(1, b"\x00" * 64, command=True)],
    ids=["a-abort", "p-data-tf"],
)
def test_upstream_pdu_right_after_the_ac_is_relayed(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, extra: bytes
) -> None:
    upstream = ScriptedUpstream(ac_then(extra))
    try:
        cfg = proxy_config(pki, legacy.address, idle_timeout=2.0)  # a lost PDU ends in 2 s
        cfg["route"].append({"called_ae": "EAGER", "upstream": upstream.address})
        with attack(tmp_path, pki, legacy, cfg) as t:
            sock = connect(t.addresses["tls"], t.ctx)
            try:
                sock.sendall(build_rq("EAGER"))
                assert recv_pdu(sock)[0] == pdu.A_ASSOCIATE_AC
                assert recv_pdu(sock) == extra
            finally:
                sock.close()
    finally:
        upstream.close()
