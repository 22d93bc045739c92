"""W2R's client: sequential C-ECHO associations over TLS, each resuming the session of the last.

DCMTK's echoscu is a new process per association, so its TLS client never resumes; Java, .NET and
most PACS stacks do. This client plays one of those: every association is a fresh TCP connection
and TLS handshake (stdlib `ssl`, whatever version the middlebox negotiates) offering the session
of the one before it, with the client certificate the middlebox verifies; then A-ASSOCIATE-RQ
(Verification), one C-ECHO-RQ, A-RELEASE-RQ. With TLS 1.3 the server's ticket comes after the
handshake: the session is taken once the A-RELEASE-RP was read, when every ticket has arrived.

    python benchmarks/resuming_echo.py --port P --called-ae AE --ca CA --cert C --key K -n N
                                       [--wait]

With --wait, one association first (the full handshake that gives the first session), then
"primed" on stdout, then a line on stdin before the N counted ones: the benchmark reads the
middlebox's CPU in between. At the end one JSON line on stdout: associations, how many resumed
(`SSLSocket.session_reused`), the TLS versions seen. It runs as a process of its own, so its CPU
is never counted as the middlebox's (like echoscu's). It must never send anything but these
four PDUs, nor keep a session beyond its own run.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import procs
from idle_associations import associate_rq
from setups import Endpoint, Pki

from dicom_tls_proxy.protocol import dimse, pdu

TIMEOUT = 30.0


class EchoFailed(Exception):
    """The association did not go RQ/AC, C-ECHO-RQ/RSP (success), RELEASE-RQ/RP."""


@dataclass
class Tally:
    associations: int = 0
    resumed: int = 0
    versions: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> str:
        return json.dumps(
            {
                "associations": self.associations,
                "resumed": self.resumed,
                "versions": dict(self.versions),
            }
        )


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def _read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EchoFailed(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_pdu(sock: ssl.SSLSocket) -> bytes:
    header = _read_exactly(sock, 6)
    return header + _read_exactly(sock, int.from_bytes(header[2:6], "big"))


def _expect(raw: bytes, pdu_type: int, what: str) -> None:
    if raw[0] != pdu_type:
        raise EchoFailed(f"expected {what}, got {pdu.describe(pdu.parse_pdu(raw))}")


def echo_status(p_data: bytes) -> int:
    """The status of a C-ECHO-RSP in one P-DATA-TF holding one command PDV (as every peer here
    sends it)."""
    _expect(p_data, pdu.P_DATA_TF, "a P-DATA-TF (C-ECHO-RSP)")
    pdv_length = int.from_bytes(p_data[6:10], "big")
    return dimse.echo_status(p_data[12 : 10 + pdv_length])


def associate(
    ctx: ssl.SSLContext, port: int, called_ae: str, session: ssl.SSLSession | None
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise


def one_association(
    ctx: ssl.SSLContext, port: int, called_ae: str, session: ssl.SSLSession | None, tally: Tally
) -> ssl.SSLSession | None:
    """One association offering `session`; returns the session to offer next."""
    with associate(ctx, port, called_ae, session) as sock:
        sock.sendall(associate_rq(called_ae))
        _expect(read_pdu(sock), pdu.A_ASSOCIATE_AC, "an A-ASSOCIATE-AC")
        sock.sendall(dimse.encode_p_data(1, dimse.c_echo_rq(1), command=True))
        status = echo_status(read_pdu(sock))
        if status != 0:
            raise EchoFailed(f"C-ECHO-RSP status {status:#06x}")
        sock.sendall(pdu.encode_release_rq())
        _expect(read_pdu(sock), pdu.A_RELEASE_RP, "an A-RELEASE-RP")
        tally.associations += 1
        tally.resumed += bool(sock.session_reused)
        tally.versions[sock.version() or "?"] += 1
        newest = sock.session
        try:  # close_notify both ways: a session closed uncleanly may not be resumed
            sock.unwrap()
        except (OSError, ValueError):
            pass
        return newest


# -- the benchmark's side: this script as a process of its own -----------------------------


@dataclass
class Primed:
    """A running client that made its first association (full handshake) and waits."""

    proc: subprocess.Popen[str]

    def go(self, timeout: float) -> dict[str, int]:
        """Run the counted associations; returns what the client counted: `associations`,
        `resumed`, and one `TLSvX.Y` key per version seen."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = _read_line(self.proc, timeout)
        tally = json.loads(line)
        return {
            "associations": int(tally["associations"]),
            "resumed": int(tally["resumed"]),
            **{str(v): int(n) for v, n in tally["versions"].items()},
        }


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        _stop(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise procs.BenchmarkError(f"resuming_echo.py: no answer ({err.strip()[-2000:]})")
    return line


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@contextmanager
def primed(endpoint: Endpoint, pki: Pki, count: int, timeout: float) -> Iterator[Primed]:
    """This script against `endpoint` with --wait, once it made its first association."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--port", str(endpoint.port), "--called-ae", endpoint.called_ae),
        *("--ca", str(pki.ca), "--cert", str(pki.cert("client")), "--key", str(pki.key("client"))),
        *("-n", str(count), "--wait"),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        started = time.monotonic()
        if _read_line(proc, timeout).strip() != "primed":
            raise procs.BenchmarkError("resuming_echo.py did not say it was primed")
        yield Primed(proc)
        try:
            proc.wait(max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired as exc:
            raise procs.BenchmarkError("resuming_echo.py did not exit") from exc
        if proc.returncode != 0:
            raise procs.BenchmarkError(f"resuming_echo.py exited {proc.returncode}")
    finally:
        _stop(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- the client -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--called-ae", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("-n", "--count", type=int, required=True)
    parser.add_argument("--wait", action="store_true", help="prime, then wait for a stdin line")
    args = parser.parse_args(argv)
    ctx = client_context(args.ca, args.cert, args.key)
    session = None
    try:
        if args.wait:
            session = one_association(ctx, args.port, args.called_ae, None, Tally())
            print("primed", flush=True)
            if not sys.stdin.readline():
                return 1
        tally = Tally()
        for _ in range(args.count):
            session = one_association(ctx, args.port, args.called_ae, session, tally)
    except (OSError, EchoFailed, pdu.PduError, dimse.NotEchoResponse) as exc:
        print(f"resuming_echo: {exc!r}", file=sys.stderr)
        return 1
    print(tally.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
