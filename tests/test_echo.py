"""`dicom-tls-proxy echo`, run as a command against real servers: the proxy's TLS listener (a
pynetdicom device behind it), DCMTK `storescp +tls` directly, plaintext DICOM ports, and sockets
that refuse or never answer, and scripted servers that accept the association and then do not
answer the C-ECHO.

The command is a diagnosis tool, so each failure is checked for the words that tell an integration
engineer what is wrong and what to do, and for its exit code: 0 success, 1 any failure, 2 a usage
error (then nothing is attempted and no report is printed).
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from dicom_tls_proxy.protocol import dimse, pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ProxyProcess,
    ScriptedUpstream,
    build_ac,
    certificate_of,
    free_port,
    pacs_identities,
    pacs_ssl_context,
    running_proxy,
    sha256_of,
    silent_listener,
    wait_until,
)
from tests.test_termination import storescp

Identities = dict[str, tuple[Path, Path]]


@dataclass(frozen=True)
class Server:
    address: str  # host:port
    certificate: Path | None = None  # what it presents, for the expected thumbprints


def run_echo(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "echo", address, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# -- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Identities:
    return pacs_identities(tmp_path_factory.mktemp("echo-identities"), pki)


@pytest.fixture(scope="module")
def proxy_process(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[ProxyProcess]:
    """A TLS listener (client certificates required) and a plaintext one, route CT from both to a
    pynetdicom device."""
    device = LegacyDevice()
    config = {
        "tls": {
            "in": {
                "certificate": pki / "proxy.pem",
                "private_key": pki / "proxy.key",
                "ca": pki / "ca.pem",
            }
        },
        "listener": [
            {"name": "tls", "bind": "127.0.0.1:0", "tls": "in"},
            {"name": "plain", "bind": "127.0.0.1:0"},
        ],
        "route": [{"called_ae": "CT", "upstream": device.address, "listeners": ["tls", "plain"]}],
    }
    try:
        with running_proxy(tmp_path_factory.mktemp("echo-proxy"), config) as running:
            yield running
    finally:
        device.close()


@pytest.fixture
def proxy(proxy_process: ProxyProcess, pki: Path) -> Server:
    host, port = proxy_process.address("tls")
    return Server(f"{host}:{port}", pki / "proxy.pem")


@pytest.fixture
def proxy_plain(proxy_process: ProxyProcess) -> Server:
    host, port = proxy_process.address("plain")
    return Server(f"{host}:{port}")


@contextmanager
def tls_storescp(folder: Path, pki: Path, identity: tuple[Path, Path]) -> Iterator[Server]:
    """`storescp +tls`, requiring a client certificate from the dev CA (its default)."""
    key, cert = identity
    with storescp(folder, "+tls", str(key), str(cert), "+cf", str(pki / "ca.pem")) as (address, _):
        yield Server(address, cert)


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, identities: Identities
) -> Iterator[Server]:
    with tls_storescp(tmp_path_factory.mktemp("echo-pacs"), pki, identities["pacs"]) as server:
        yield server


@pytest.fixture
def expired_pacs(tmp_path: Path, pki: Path, identities: Identities) -> Iterator[Server]:
    with tls_storescp(tmp_path, pki, identities["expired"]) as server:
        yield server


@pytest.fixture
def plain_storescp(tmp_path: Path) -> Iterator[Server]:
    with storescp(tmp_path) as (address, _):
        yield Server(address)


@pytest.fixture
def plain_device(legacy: LegacyDevice) -> Server:
    return Server(legacy.address)


@pytest.fixture
def nothing() -> Server:
    return Server(f"127.0.0.1:{free_port()}")


@pytest.fixture
def full_backlog() -> Iterator[Server]:
    with silent_listener(backlog_full=True) as address:
        yield Server(address)


@pytest.fixture
def mute() -> Iterator[Server]:
    with silent_listener(backlog_full=False) as address:
        yield Server(address)


@pytest.fixture(scope="module")
def files(pki: Path, identities: Identities) -> dict[str, str]:
    return {
        "ca": str(pki / "ca.pem"),
        "other_ca": str(identities["other-ca"][1]),
        "cert": str(pki / "client.pem"),
        "key": str(pki / "client.key"),
    }


def echo_to(
    request: pytest.FixtureRequest, server: str, options: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, str], Server]:
    """Run echo against the fixture named `server`. `options` may name the `files` and the
    server's {address} and {sha256} (of the certificate it presents)."""
    target: Server = request.getfixturevalue(server)
    values = {**request.getfixturevalue("files"), "address": target.address}
    if target.certificate is not None:
        values["sha256"] = sha256_of(target.certificate)
    result = run_echo(target.address, *(part.format(**values) for part in options.split()))
    return result, values, target


CLIENT = "--tls-cert {cert} --tls-key {key}"  # the dev PKI's client certificate
dcmtk = pytest.mark.dcmtk

# -- success ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "called_ae"), [("proxy", "CT"), pytest.param("pacs", "PACS", marks=dcmtk)]
)
@pytest.mark.parametrize(
    "trust",
    ["--tls-ca {ca}", "--thumbprint {sha256}", "--tls-ca {ca} --thumbprint {sha256}"],
    ids=["ca", "thumbprint", "ca-and-thumbprint"],
)
def test_success(request: pytest.FixtureRequest, server: str, called_ae: str, trust: str) -> None:
    result, _, target = echo_to(request, server, f"--called-ae {called_ae} {trust} {CLIENT}")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"C-ECHO ECHOSCU -> {called_ae} at {target.address}: success (status 0x0000)" in out
    assert re.search(r"^TLS: TLSv1\.[23], [A-Z0-9_-]+ \(\d+ bits", out, re.M), out
    assert re.search(r"; key exchange (X25519MLKEM768|x25519|X25519|secp256r1)\)$", out, re.M), out
    assert target.certificate is not None
    cert = certificate_of(target.certificate)
    der = cert.public_bytes(Encoding.DER)
    for expected in (
        f"subject: {cert.subject.rfc4514_string()}",
        f"issuer:  {cert.issuer.rfc4514_string()}",
        f"valid:   {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        f"sha256:{hashlib.sha256(der).hexdigest()}",
        f"sha1:{hashlib.sha1(der).hexdigest()}",
    ):
        assert expected in out, out


def test_success_in_plaintext(request: pytest.FixtureRequest) -> None:
    result, _, target = echo_to(request, "proxy_plain", "--called-ae CT --calling-ae MODALITY")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"C-ECHO MODALITY -> CT at {target.address}: success (status 0x0000)\nround trip: "
    )
    assert "TLS" not in result.stdout and "server certificate" not in result.stdout


def test_insecure_shows_the_certificate_with_a_warning(request: pytest.FixtureRequest) -> None:
    result, values, _ = echo_to(request, "proxy", f"--called-ae CT --insecure {CLIENT}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not verified" in result.stderr and values["sha256"] in result.stdout


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "options", "expected"),
    [
        pytest.param(
            "proxy",
            f"--called-ae CT --tls-ca {{other_ca}} {CLIENT}",
            [
                "cause: the server's certificate is not signed by a CA you trust",
                "add the CA that issued it",
                "or pin the certificate itself with --thumbprint {sha256}",
            ],
            id="unknown-ca",
        ),
        pytest.param(
            "proxy",
            f"--called-ae CT --thumbprint {'AB:' * 31}AB {CLIENT}",
            [
                f"cause: thumbprint mismatch: expected sha256:{'ab' * 32}, "
                "the server presented {sha256}"
            ],
            id="thumbprint-mismatch",
        ),
        pytest.param(
            "proxy",
            f"--called-ae CT --tls-ca {{ca}} --server-name pacs.example.org {CLIENT}",
            [
                "cause: hostname mismatch: the certificate is not for pacs.example.org "
                "(it is for: localhost, 127.0.0.1, ::1)",
                "give the expected one with --server-name",
            ],
            id="hostname-mismatch",
        ),
        pytest.param(
            "expired_pacs",
            f"--called-ae PACS --tls-ca {{ca}} {CLIENT}",
            [
                "cause: the server's certificate is not valid now: certificate has expired",
                "renew the server's certificate",
            ],
            marks=dcmtk,
            id="expired",
        ),
        pytest.param(
            "nothing",
            "--called-ae PACS",
            ["cause: connection refused: nothing listens on {address}"],
            id="connection-refused",
        ),
        pytest.param(
            "full_backlog",
            "--called-ae PACS --tls-ca {ca} --timeout 1",
            ["cause: timeout: no connection to {address} within 1s", "firewall"],
            id="connect-timeout",
        ),
        pytest.param(
            "mute",
            "--called-ae PACS --tls-ca {ca} --timeout 1",
            ["cause: timeout: no TLS handshake from {address} within 1s"],
            id="tls-handshake-timeout",
        ),
        pytest.param(
            "mute",
            "--called-ae PACS --timeout 1",
            ["cause: timeout: no answer from {address} within 1s"],
            id="answer-timeout",
        ),
        pytest.param(
            "plain_device",
            "--called-ae PACS --tls-ca {ca}",
            [
                "cause: {address} does not speak TLS: it answered with plaintext",
                "this looks like a plaintext DICOM port",
            ],
            id="tls-to-plaintext-pynetdicom",
        ),
        pytest.param(
            "proxy_plain",
            "--called-ae CT --tls-ca {ca}",
            [  # the proxy closes at once (reason tls-on-plaintext in its log)
                "cause: {address} closed the connection during the TLS handshake",
                "the port may not speak TLS (try without the TLS options)",
            ],
            id="tls-to-plaintext-proxy",
        ),
        pytest.param(
            "plain_storescp",
            "--called-ae PACS --tls-ca {ca}",
            [
                "cause: {address} closed the connection during the TLS handshake",
                "the port may not speak TLS (try without the TLS options)",
            ],
            marks=dcmtk,
            id="tls-to-plaintext-storescp",
        ),
        pytest.param(
            "proxy",
            "--called-ae CT",
            [  # the proxy answers in plaintext (reason plaintext-on-tls in its log)
                "cause: association rejected permanently by the called application (service "
                "user): no reason given (result 1, source 1, reason 1)",
                "if this is a TLS port, connect over TLS: add --tls-ca FILE",
            ],
            id="plaintext-to-tls-proxy",
        ),
        pytest.param(
            "pacs",
            "--called-ae PACS",
            [
                "cause: {address} closed the connection without answering the A-ASSOCIATE-RQ",
                "if this port speaks TLS, add --tls-ca FILE",
            ],
            marks=dcmtk,
            id="plaintext-to-tls-storescp",
        ),
        pytest.param(
            "proxy",
            f"--called-ae NOWHERE --tls-ca {{ca}} {CLIENT}",
            [
                "cause: association rejected permanently by the called application (service "
                "user): called AE title not recognized (result 1, source 1, reason 7)",
                "the server has no service called 'NOWHERE': check --called-ae",
            ],
            id="rejected-unknown-called-ae",
        ),
        pytest.param(
            "proxy",
            "--called-ae CT --tls-ca {ca}",
            ["ended the TLS session after the handshake", "requires a client certificate"],
            id="client-certificate-required-proxy",
        ),
        pytest.param(
            "pacs",
            "--called-ae PACS --tls-ca {ca}",
            ["ended the TLS session after the handshake", "requires a client certificate"],
            marks=dcmtk,
            id="client-certificate-required-storescp",
        ),
    ],
)
def test_failure(
    request: pytest.FixtureRequest, server: str, options: str, expected: list[str]
) -> None:
    start = time.monotonic()
    result, values, _ = echo_to(request, server, options)
    elapsed = time.monotonic() - start
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert out.startswith("C-ECHO ECHOSCU -> ") and ": FAILED\ncause: " in out, out
    assert "\nwhat to do: " in out
    for fragment in expected:
        assert fragment.format(**values) in out, out
    if "--timeout 1" in options:
        assert elapsed < 9, elapsed  # the 1 s limit, not the default 10 s
    if "{sha256}" in " ".join(expected):
        assert "server certificate:\n  subject: " in out  # shown also when refused


# -- after the association is accepted -------------------------------------------------------
#
# What a broken or unhappy server does after its A-ASSOCIATE-AC instead of answering the C-ECHO
# with status 0. No real server does these on demand, so each is a script on 127.0.0.1 that reads
# the A-ASSOCIATE-RQ, accepts Verification, and then acts; the probe must say in words what the
# server did, exit 1 and never show a traceback.

Script = Callable[[socket.socket, ScriptedUpstream], None]


def dimse_rsp(kind: str, status: int, *, max_pdu: int = 16384) -> bytes:
    """A C-ECHO-RSP or C-STORE-RSP to message 1 on presentation context 1, as P-DATA-TF PDUs
    encoded by pynetdicom (not by the probe's own code); a small `max_pdu` splits the command
    into fragments over several PDUs."""
    from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.sop_class import CTImageStorage, Verification

    primitive = C_ECHO() if kind == "C-ECHO" else C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = status
    if kind == "C-ECHO":
        primitive.AffectedSOPClassUID = Verification
        message = C_ECHO_RSP()
    else:
        primitive.AffectedSOPClassUID = CTImageStorage
        primitive.AffectedSOPInstanceUID = "1.2.3.4"
        message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(part).encode() for part in message.encode_msg(1, max_pdu))


def closes(conn: socket.socket, upstream: ScriptedUpstream) -> None:
    """Close the connection at once (returning closes it)."""


def aborts(source: int, reason: int) -> Script:
    def script(conn: socket.socket, upstream: ScriptedUpstream) -> None:
        upstream.read_pdu(conn)  # the C-ECHO-RQ
        conn.sendall(pdu.encode_abort(source, reason))

    return script


def answers(data: bytes) -> Script:
    """Read the C-ECHO-RQ, send `data`, then read what the probe sends next (kept in
    `upstream.received`) and answer an A-RELEASE-RQ."""

    def script(conn: socket.socket, upstream: ScriptedUpstream) -> None:
        upstream.read_pdu(conn)
        if data:
            conn.sendall(data)
        if upstream.read_pdu(conn)[0] == pdu.A_RELEASE_RQ:
            conn.sendall(pdu.encode_release_rp())

    return script


@contextmanager
def accepting(then: Script, tls: object = None) -> Iterator[ScriptedUpstream]:
    """A server that accepts the association for Verification, then runs `then`."""

    def script(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))
        then(conn, upstream)

    upstream = ScriptedUpstream(script, tls)
    try:
        yield upstream
    finally:
        upstream.close()


ACCEPTED = "cause: the server accepted the association and then "


@pytest.mark.parametrize(
    ("then", "options", "expected", "probe_sends"),
    [
        pytest.param(
            closes,
            "",
            [
                ACCEPTED + "closed the connection without answering the C-ECHO",
                "what to do: see the server's log",
            ],
            None,
            id="close",
        ),
        pytest.param(
            aborts(2, 2),
            "",
            [
                ACCEPTED + "aborted it without answering the C-ECHO: A-ABORT by the server's "
                "DICOM protocol layer (service provider): unexpected PDU (source 2, reason 2)",
            ],
            None,
            id="abort-provider",
        ),
        pytest.param(
            aborts(0, 0),
            "",
            [
                ACCEPTED + "aborted it without answering the C-ECHO: A-ABORT by the server "
                "application (service user): no reason given (source 0, reason 0)",
            ],
            None,
            id="abort-user",
        ),
        pytest.param(
            answers(pdu.encode_release_rq()),
            "",
            [ACCEPTED + "asked to release it (A-RELEASE-RQ) without answering the C-ECHO"],
            pdu.encode_release_rp(),
            id="release-rq",
        ),
        pytest.param(
            answers(dimse_rsp("C-STORE", 0x0000)),
            "",
            [
                ACCEPTED + "answered the C-ECHO with a C-STORE-RSP (command field 0x8001), "
                "not a C-ECHO-RSP"
            ],
            pdu.encode_abort(0, 0),
            id="c-store-rsp",
        ),
        pytest.param(
            answers(dimse.encode_p_data(1, b"\xff" * 16, command=True)),
            "",
            [
                ACCEPTED + "answered the C-ECHO with a command set that does not parse "
                "(command element (ffff,ffff) is truncated), not a C-ECHO-RSP"
            ],
            pdu.encode_abort(0, 0),
            id="garbage-pdv",
        ),
        pytest.param(
            answers(b"\x0a\x00\x00\x00\x00\x04abcd"),
            "",
            [
                ACCEPTED
                + "sent an invalid PDU instead of answering the C-ECHO: unknown PDU type 0x0a"
            ],
            pdu.encode_abort(2, 1),
            id="invalid-pdu",
        ),
        pytest.param(
            answers(b""),
            "--timeout 1",
            [
                "cause: the server accepted the association but did not answer the C-ECHO "
                "within 1s",
            ],
            pdu.encode_abort(0, 0),
            id="silence",
        ),
        pytest.param(
            answers(dimse_rsp("C-ECHO", 0x0110)),
            "",
            ["cause: the server answered the C-ECHO with status 0x0110 (processing failure)"],
            pdu.encode_release_rq(),
            id="failure-status",
        ),
    ],
)
def test_accepted_then_no_echo_answer(
    then: Script, options: str, expected: list[str], probe_sends: bytes | None
) -> None:
    """Exit 1 with the cause in words; the probe then tells the server it is done (`probe_sends`)
    unless the server already ended the association."""
    with accepting(then) as upstream:
        start = time.monotonic()
        result = run_echo(upstream.address, "--called-ae", "PACS", *options.split())
        elapsed = time.monotonic() - start
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert "Traceback" not in out + result.stderr, out + result.stderr
        assert out.startswith(f"C-ECHO ECHOSCU -> PACS at {upstream.address}: FAILED\ncause: "), out
        assert "\nwhat to do: " in out
        for fragment in expected:
            assert fragment in out, out
        if probe_sends is not None:  # the server is told, not left with a dangling association
            wait_until(lambda: len(upstream.received) == 3, what="the probe's last PDU")
            assert upstream.received[-1] == probe_sends
        if options:
            assert elapsed < 9, elapsed  # the 1 s limit, not the default 10 s


def test_accepted_then_fragmented_echo_answer() -> None:
    """A C-ECHO-RSP whose command comes in fragments over several P-DATA-TF is a success."""
    with accepting(answers(dimse_rsp("C-ECHO", 0x0000, max_pdu=40))) as upstream:
        result = run_echo(upstream.address, "--called-ae", "PACS")
        assert result.returncode == 0, result.stdout + result.stderr
        assert ": success (status 0x0000)" in result.stdout
        wait_until(lambda: len(upstream.received) == 3, what="the A-RELEASE-RQ")
        assert upstream.received[-1] == pdu.encode_release_rq()


def test_accepted_then_closed_over_tls(pki: Path, files: dict[str, str]) -> None:
    with accepting(closes, tls=pacs_ssl_context(pki)) as upstream:
        result = run_echo(
            upstream.address,
            *f"--called-ae PACS --tls-ca {files['ca']} {CLIENT.format(**files)}".split(),
        )
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert "Traceback" not in out + result.stderr, out + result.stderr
        assert ACCEPTED + "closed the connection without answering the C-ECHO" in out, out
        assert re.search(r"^TLS: TLSv1\.[23], ", out, re.M), out


def test_invalid_associate_ac() -> None:
    """An A-ASSOCIATE-AC that does not parse is a cause in words too, not a traceback."""

    def script(conn: socket.socket) -> None:
        upstream.read_pdu(conn)
        conn.sendall(b"\x02\x00\x00\x00\x00\x04abcd")

    upstream = ScriptedUpstream(script)
    try:
        result = run_echo(upstream.address, "--called-ae", "PACS")
    finally:
        upstream.close()
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "Traceback" not in out + result.stderr, out + result.stderr
    assert f"cause: {upstream.address} did not answer the A-ASSOCIATE-RQ properly: " in out, out


# -- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--called-ae PACS --tls-ca {ca} --tls-key {key}", "echo: --tls-key needs --tls-cert"),
        ("--called-ae PACS --tls", "echo: no way to verify the server: give --tls-ca FILE"),
        (f"--called-ae PACS {CLIENT}", "echo: no way to verify the server"),
        ("--called-ae PACS --thumbprint sha256:00", "echo: --thumbprint: expected 64 hex digits"),
        ("--called-ae PACS --tls-ca {ca}/missing", "does not exist"),
        ("--called-ae THIS_AE_IS_TOO_LONG", "echo: AE title 'THIS_AE_IS_TOO_LONG' is 19 char"),
        ("", "Missing option '--called-ae'"),
    ],
    ids=[
        "key-without-cert",
        "tls-without-trust",
        "client-cert-without-trust",
        "bad-thumbprint",
        "missing-ca-file",
        "bad-called-ae",
        "no-called-ae",
    ],
)
def test_usage_error(files: dict[str, str], args: str, message: str) -> None:
    result = run_echo("127.0.0.1:104", *(part.format(**files) for part in args.split()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1", "echo: expected host:port (IPv6 as [::1]:2762), got '127.0.0.1'"),
        ("[::1:104", "echo: expected host:port"),
        ("127.0.0.1:0", "echo: port 0 is out of range (1-65535)"),
        ("127.0.0.1:99999", "echo: port 99999 is out of range"),
    ],
)
def test_bad_target(target: str, message: str) -> None:
    result = run_echo(target, "--called-ae", "PACS")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and result.stdout == ""
