"""Hostile peers: a catalogue of what a scanner, a fuzzer or a broken device sends to the proxy.

Each `Case` is one connection: what it sends (over TLS with a valid client certificate, or over
bare TCP), whether it then reads the answer or just goes away, and what the refusal table says the
proxy answers and logs. The catalogue is shared by the per-case tests (`test_hostile_input.py`)
and by the soak test, which runs this module as a second process to throw every case at a busy
proxy: `python -m tests.hostile.cases TLS_HOST:PORT PLAIN_HOST:PORT PKI_DIR SECONDS THREADS [STOP]`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_tls_proxy.protocol import pdu
from tests import support
from tests.support import TIMEOUT, build_rq, client_ssl_context

Address = tuple[str, int]


def proxy_config(pki: Path, upstream: str, **proxy: Any) -> dict[str, Any]:
    """One TLS listener and one plaintext listener, route CT to `upstream` on both."""
    return support.proxy_config(
        pki,
        upstream,
        proxy={"log_format": "json", **proxy},
        listener=[
            {"name": "tls", "bind": "127.0.0.1:0", "tls": "in"},
            {"name": "plain", "bind": "127.0.0.1:0"},
        ],
        route=[{"called_ae": "CT", "upstream": upstream, "listeners": ["tls", "plain"]}],
    )


def client_context(pki: Path) -> ssl.SSLContext:
    ctx: ssl.SSLContext = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    return ctx


# -- building hostile bytes ---------------------------------------------------------------------

RQ = build_rq("CT")
FIXED = RQ[6:74]  # protocol version, reserved, Called AE, Calling AE, 32 reserved bytes
ITEMS = RQ[74:]  # application context, presentation context, user information


def rq_with(
    *, called: bytes | None = None, calling: bytes | None = None, items: bytes = ITEMS
) -> bytes:
    """An A-ASSOCIATE-RQ with the given raw AE fields and variable items; lengths kept right."""
    fixed = bytearray(FIXED)
    if called is not None:
        fixed[4:20] = called
    if calling is not None:
        fixed[20:36] = calling
    body = bytes(fixed) + items
    return struct.pack(">BxI", pdu.A_ASSOCIATE_RQ, len(body)) + body


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxI", pdu_type, length)


APP_CONTEXT = item(0x10, b"1.2.840.10008.3.1.1.1")
USER_INFO = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
ABSTRACT = item(0x30, b"1.2.840.10008.1.1")
TRANSFER = item(0x40, b"1.2.840.10008.1.2")


def context(*subs: bytes) -> bytes:
    return item(0x20, b"\x01\x00\x00\x00" + b"".join(subs))


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of Python's own TLS client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# -- the catalogue --------------------------------------------------------------------------------

STALLED = "within handshake_timeout"
ABORT_INVALID = pdu.encode_abort(2, 6)
ABORT_UNEXPECTED = pdu.encode_abort(2, 2)
ABORT_UNRECOGNIZED = pdu.encode_abort(2, 1)


@dataclass(frozen=True)
class Case:
    """One hostile connection and what the refusal table says happens to it.

    `send` goes out after the TLS handshake (`tls`) or on bare TCP to the TLS port or the
    plaintext one (`listener`). Then the client either closes at once (`close`: the answer cannot
    be seen, `answer` is None), or half-closes (`eof`), or just waits; it reads until the proxy
    closes, which must be a clean close (no reset; close_notify once TLS is up). `answer` is
    every byte read before that close (b"" for a bare close). `stall` cases are answered by a
    close after handshake_timeout.
    """

    name: str
    send: bytes | Callable[[], bytes]
    reason: str
    outcome: str
    answer: bytes | None
    detail: str = ""  # a phrase the log line's detail must contain
    tls: bool = True
    listener: str = "tls"
    close: bool = False
    eof: bool = False
    stall: bool = False

    def payload(self) -> bytes:
        return self.send() if callable(self.send) else self.send


def _invalid(name: str, send: bytes, detail: str, **kw: Any) -> Case:
    """A-ABORT (2, 6): a malformed or too long A-ASSOCIATE-RQ (unseen if the client closed)."""
    answer = None if kw.get("close") else ABORT_INVALID
    return Case(name, send, "invalid-pdu", "aborted", answer, detail, **kw)


CASES: list[Case] = [
    # -- handshakes and PDUs that never complete: a close at handshake_timeout (slowloris)
    Case(
        "slowloris-half-client-hello",
        lambda: (hello := client_hello())[: len(hello) // 2],
        "handshake-timeout",
        "timed-out",
        b"",
        STALLED,
        tls=False,
        stall=True,
    ),
    Case("tcp-silent", b"", "handshake-timeout", "timed-out", b"", STALLED, tls=False, stall=True),
    Case("tls-silent", b"", "handshake-timeout", "timed-out", b"", STALLED, stall=True),
    Case("rq-header-only", RQ[:6], "handshake-timeout", "timed-out", b"", STALLED, stall=True),
    Case("rq-half", RQ[: len(RQ) // 2], "handshake-timeout", "timed-out", b"", STALLED, stall=True),
    # -- the wrong protocol on a port: plaintext DICOM to TLS is refused in plaintext DICOM
    Case(
        "plaintext-rq-on-tls-port",
        RQ,
        "plaintext-on-tls",
        "rejected",
        pdu.encode_reject(1, 1, 1),
        "plaintext DICOM received on TLS listener tls",
        tls=False,
    ),
    Case(
        "client-hello-on-plaintext-port",
        client_hello,
        "tls-on-plaintext",
        "refused",
        b"",
        "TLS handshake received on plaintext listener plain",
        tls=False,
        listener="plain",
    ),
    # -- PDU lengths no peer may announce: judged on the 6-byte header, no body is waited for
    _invalid("rq-length-ffffffff", header(1, 0xFFFFFFFF), "more than the limit"),
    _invalid(
        "plaintext-rq-length-ffffffff",
        header(1, 0xFFFFFFFF),
        "more than the limit",
        tls=False,
        listener="plain",
    ),
    _invalid("rq-length-0", header(1, 0), "less than 68"),
    # -- a first PDU that is not an A-ASSOCIATE-RQ
    Case(
        "p-data-first-length-ffffffff",
        header(pdu.P_DATA_TF, 0xFFFFFFFF),
        "unexpected-pdu",
        "aborted",
        ABORT_UNEXPECTED,
        "not an A-ASSOCIATE-RQ",
    ),
    Case(
        "ac-first",
        b"\x02" + RQ[1:],
        "unexpected-pdu",
        "aborted",
        ABORT_UNEXPECTED,
        "not an A-ASSOCIATE-RQ",
    ),
    Case(
        "abort-first",
        pdu.encode_abort(0, 0),
        "unexpected-pdu",
        "aborted",
        ABORT_UNEXPECTED,
        "not an A-ASSOCIATE-RQ",
    ),
    Case(
        "type-00-length-ffffffff",
        header(0x00, 0xFFFFFFFF),
        "unrecognized-pdu",
        "aborted",
        ABORT_UNRECOGNIZED,
        "unknown PDU type 0x00",
    ),
    Case(
        "type-ff",
        header(0xFF, 4) + bytes(4),
        "unrecognized-pdu",
        "aborted",
        ABORT_UNRECOGNIZED,
        "unknown PDU type 0xff",
    ),
    # -- truncated and garbage variable items
    _invalid("items-truncated", rq_with(items=ITEMS[:-5]), "runs past the end"),
    _invalid("items-cut-in-header", rq_with(items=ITEMS[:2]), "stray bytes"),
    _invalid("items-stray-bytes", rq_with(items=ITEMS + b"\x50\x00\x00"), "stray bytes"),
    _invalid(
        "item-length-ffff",
        rq_with(items=b"\x10\x00\xff\xff" + ITEMS[4:]),
        "runs past the end",
    ),
    _invalid(
        "items-garbage",
        rq_with(items=random.Random(1).randbytes(300)),
        "item 0xf5 length 25890 runs past the end",  # the first of the garbage "items"
    ),
    _invalid("no-presentation-context", rq_with(items=APP_CONTEXT + USER_INFO), "no presentation"),
    _invalid(
        "no-application-context", rq_with(items=context(ABSTRACT, TRANSFER)), "no application"
    ),
    _invalid(
        "two-application-contexts",
        rq_with(items=APP_CONTEXT + APP_CONTEXT + context(ABSTRACT, TRANSFER)),
        "more than one application context",
    ),
    _invalid(
        "context-without-transfer-syntax",
        rq_with(items=APP_CONTEXT + context(ABSTRACT) + USER_INFO),
        "no transfer syntax",
    ),
    _invalid(
        "uid-with-newline",
        rq_with(items=APP_CONTEXT + context(item(0x30, b"1.2.840\nforged=1"), TRANSFER)),
        "not printable",
    ),
    _invalid(
        "max-length-item-of-3-bytes",
        rq_with(items=APP_CONTEXT + context(ABSTRACT, TRANSFER) + item(0x50, item(0x51, b"abc"))),
        "maximum length sub-item",
    ),
    # -- AE titles the standard forbids
    _invalid("called-ae-control-character", rq_with(called=b"CT\x07".ljust(16)), "control"),
    _invalid(
        "calling-ae-newline", rq_with(calling=b"SCU\nforged=1".ljust(16)), "control character"
    ),
    _invalid("called-ae-backslash", rq_with(called=b"C\\T".ljust(16)), "backslash"),
    _invalid("called-ae-16-spaces", rq_with(called=b" " * 16), "all spaces"),
    _invalid("calling-ae-16-spaces", rq_with(calling=b" " * 16), "all spaces"),
    _invalid("called-ae-latin-1", rq_with(called=b"CT\xe9".ljust(16)), "non-ASCII"),
    _invalid("calling-ae-utf-8", rq_with(calling="SCÜ".encode().ljust(16)), "non-ASCII"),
    _invalid("calling-ae-nul-inside", rq_with(calling=b"S\x00CU".ljust(16)), "control"),
    # -- connections that end after a byte or none
    Case(
        "tcp-one-byte-0x16-then-close",
        b"\x16",
        "tls-protocol",
        "tls-failed",
        None,
        "closed the connection during the handshake",
        tls=False,
        close=True,
    ),
    _invalid(
        "tcp-one-byte-0x01-then-close",
        b"\x01",
        "closed after 1 bytes",
        tls=False,
        close=True,
    ),
    _invalid("tls-one-byte-then-eof", b"\x01", "closed after 1 bytes", eof=True),
    Case(
        "tcp-connect-close",
        b"",
        "client-closed",
        "aborted",
        None,
        "closed before sending anything",
        tls=False,
        close=True,
    ),
    Case(
        "tls-handshake-then-eof",
        b"",
        "client-closed",
        "aborted",
        b"",
        "closed before sending a PDU",
        eof=True,
    ),
]
BY_NAME = {case.name: case for case in CASES}


# -- throwing one case ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    answer: bytes | None  # what was read until the proxy closed; None when we closed first
    elapsed: float  # seconds from our connect to the proxy's close
    answered_in: float  # seconds from the end of our sending to the proxy's close


def connect(address: Address, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A TLS close without close_notify is an SSLEOFError, not an empty read, so it can be told.
    return ctx.wrap_socket(sock, suppress_ragged_eofs=False) if ctx is not None else sock


def read_until_close(sock: socket.socket, *, clean: bool = False) -> bytes:
    """What the peer sends until it closes. With `clean`, a TCP reset or a TLS close without
    close_notify raises; without, either ends the reading as a close does."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        if clean:
            raise
    return data


def throw(case: Case, addresses: dict[str, Address], ctx: ssl.SSLContext) -> Seen:
    """Play `case` against the proxy; the connection is closed when this returns."""
    data = case.payload()
    connected = time.monotonic()
    sock = connect(addresses[case.listener], ctx if case.tls else None)
    try:
        if data:
            sock.sendall(data)
        sent = time.monotonic()
        if case.close:
            return Seen(None, 0.0, 0.0)
        if case.eof:  # half-close below TLS: the TLS socket keeps reading
            with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                dup.shutdown(socket.SHUT_WR)
        answer = read_until_close(sock, clean=True)
        now = time.monotonic()
        return Seen(answer, now - connected, now - sent)
    finally:
        sock.close()


# -- the second process of the soak test ---------------------------------------------------------


def hostile_loop(
    addresses: dict[str, Address], pki: Path, seconds: float, threads: int, stop: Path | None
) -> dict[str, int]:
    """Throw every case, round-robin from `threads` threads, for `seconds` or until the file
    `stop` exists; count the connections made and those that failed on our side."""
    ctx = client_context(pki)
    deadline = time.monotonic() + seconds
    counts = {"connections": 0, "errors": 0}
    lock = threading.Lock()

    def worker(offset: int) -> None:
        n = offset
        while time.monotonic() < deadline and not (stop and stop.exists()):
            case = CASES[n % len(CASES)]
            n += 1
            try:
                throw(case, addresses, ctx)
                key = "connections"
            except OSError:  # ssl.SSLError too: a refused or reset connection is no surprise
                key = "errors"
            with lock:
                counts[key] += 1

    pool = [threading.Thread(target=worker, args=(i * 7,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return counts


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    # python -m tests.hostile.cases TLS_HOST:PORT PLAIN_HOST:PORT PKI_DIR SECONDS THREADS [STOP]
    # prints {"connections": N, "errors": N} as JSON when done
    tls_address, plain_address, pki_dir, seconds, threads, *stop = sys.argv[1:]
    result = hostile_loop(
        {"tls": _address(tls_address), "plain": _address(plain_address)},
        Path(pki_dir),
        float(seconds),
        int(threads),
        Path(stop[0]) if stop else None,
    )
    print(json.dumps(result), flush=True)
