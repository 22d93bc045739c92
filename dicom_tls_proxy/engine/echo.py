"""The C-ECHO probe behind `dicom-tls-proxy echo`: test a DICOM link and say plainly what is wrong.

It goes through the proxy's own TLS layer (the same verify callback and certificate policy as the
proxy's origination), so a failure is explained with the same reasons the proxy logs, and the
proxy's PDU codec. Its job is diagnosis: every failure becomes a cause and an advice in words an
integration engineer can act on, never an exception. This module is the probe's protocol and I/O
(connect, TLS, associate, echo, release, and what it sends a server before it leaves); the words
are `echo_advice`'s. It prints nothing itself; the CLI formats `EchoResult`, and the route health
checks record its cause.

A server that accepts the association and then does anything but answer the C-ECHO (closes,
aborts, asks to release, sends another message or bytes that are no PDU, stays silent) ends the
probe through one door, `_farewell` for what the probe sends it (an A-ABORT, an A-RELEASE-RP: a
PACS is not left holding an association the probe gave up on) and `echo_advice.after_accept` for
the words.
"""

from __future__ import annotations

import contextlib
import socket as socket_module
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import trio
from cryptography import x509
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import Endpoint, Profile, TlsTable
from dicom_tls_proxy.engine import echo_advice
from dicom_tls_proxy.engine.echo_advice import Ending
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.dimse import (
    VERIFICATION,
    NotEchoResponse,
    c_echo_rq,
    echo_status,
    encode_p_data,
)
from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem, pdv_items
from dicom_tls_proxy.protocol.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicom_tls_proxy.security import certload
from dicom_tls_proxy.security.thumbprint import parse_thumbprint
from dicom_tls_proxy.transport.streams import (
    STREAM_ERRORS,
    aclose_quietly,
    os_error_text,
    read_pdu,
)
from dicom_tls_proxy.transport.tlscontext import TlsFailure, TlsInfo, client_context
from dicom_tls_proxy.transport.tlsstream import ByteStream, TlsStream

TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR LE
COMMAND_LIMIT = 64 * 1024  # a C-ECHO-RSP is about 100 bytes; fragments beyond this are not one


@dataclass
class EchoResult:
    ok: bool = False
    cause: str = ""
    advice: str = ""
    status: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tls: TlsInfo | None = None
    certificate: x509.Certificate | None = None  # the server's, also when verification failed

    def fail(self, cause: str, advice: str) -> EchoResult:
        self.ok, self.cause, self.advice = False, cause, advice
        return self


class _Recorder(trio.abc.HalfCloseableStream):
    """Keeps the first bytes the server sent, to recognise TLS spoken to plaintext and back."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.first = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if not self.first:
            self.first = bytes(data[:8])
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class SetupError(ValueError):
    """A probe option that cannot work; the message names the option."""


def client_table(
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    thumbprints: Sequence[str] = (),
    password: bytes | None = None,
    profile: Profile = "bcp195",
    insecure: bool = False,
    server_name: str | None = None,
) -> TlsTable:
    """The client-side TLS table a probe verifies the server with (as a route's upstream_tls)."""
    if not (ca or thumbprints or insecure):
        raise SetupError(
            "no way to verify the server: give --tls-ca FILE or --thumbprint T "
            "(or --insecure to only look at its certificate)"
        )
    if key is not None and cert is None:
        raise SetupError("--tls-key needs --tls-cert")
    try:
        pinned = tuple(parse_thumbprint(t) for t in thumbprints)
    except ValueError as exc:
        raise SetupError(f"--thumbprint: {exc}") from None
    try:
        identity = certload.load_identity(cert, key, password) if cert else None
        cas = tuple(certload.load_ca(ca)) if ca else ()
    except certload.CertificateError as exc:
        option = {"password": "--password-file", "key": "--tls-key"}.get(exc.blame, "--tls-cert")
        if exc.path is not None and ca is not None and Path(exc.path) == ca:
            option = "--tls-ca"
        raise SetupError(f"{option}: {exc}") from None
    return TlsTable.for_probe(
        certificate=cert,
        private_key=key,
        ca=ca,
        accepted_thumbprints=pinned,
        profile=profile,
        server_name=server_name or "",
        identity=identity,
        ca_certificates=cas,
    )


@dataclass
class Link:
    """An association opened by `open_link`: the stream, the server's A-ASSOCIATE-AC, and the
    bytes that came after it."""

    stream: ByteStream
    accept: pdu.AssociateAccept
    rest: bytes
    socket: trio.socket.SocketType | None = None  # the TCP socket under it

    def ack_at_once(self) -> None:
        """Answer what arrives next with an immediate TCP ACK (TCP_QUICKACK, Linux; once).

        Why: a server that writes its response in two pieces with Nagle's algorithm on (DCMTK
        storescp sends a C-STORE-RSP's 12-byte PDU and PDV header, then the rest) waits for our
        ACK of the first piece before it sends the second, and Linux delays that ACK by up to
        40 ms: one instance forwarded per 40 ms, measured (strace). A relay never sees it: the
        client's own traffic carries the ACKs."""
        if self.socket is not None and hasattr(socket_module, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_QUICKACK, 1)


async def open_link(
    target: Endpoint,
    called_ae: str,
    calling_ae: str,
    table: TlsTable | None,
    contexts: Sequence[PresentationContextItem],
    result: EchoResult,
    opened: list[ByteStream],
    *,
    ssl_context: SSL.Context | None = None,
    server_name: str | None = None,
) -> Link | None:
    """Connect, TLS (with `table`, through `ssl_context` or one made from the table), associate
    proposing `contexts`: the link, or None with the cause and advice in `result`. The probe and
    the store-and-forward forwarder both open their associations here, so a failure is told in
    the same words. Timings, the TLS facts and the server's certificate go into `result`; every
    stream is appended to `opened` as soon as it exists (the last one is the one to close, also
    when a timeout cancels this half way)."""
    start = time.perf_counter()
    where = str(target)
    try:
        sock = await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        result.fail(*echo_advice.connect_failed(where, os_error_text(exc)))
        return None
    result.timings["connect"] = time.perf_counter() - start
    recorder = _Recorder(sock)
    opened.append(cast(ByteStream, recorder))
    stream: ByteStream = cast(ByteStream, recorder)
    if table is not None:
        name = server_name or table.server_name or target.host
        mark = time.perf_counter()
        context = ssl_context or client_context(table)
        try:
            tstream = await TlsStream.connect(recorder, context, table, name, where)
        except TlsFailure as failure:
            result.certificate = failure.certificate
            pinned = table.accepted_thumbprints
            result.fail(*echo_advice.tls_failed(where, failure, recorder.first, pinned, name))
            return None
        except STREAM_ERRORS as exc:
            result.fail(*echo_advice.closed_during_handshake(where, exc))
            return None
        opened.append(tstream)
        stream = tstream
        result.tls = tstream.info()
        result.certificate = result.tls.certificate
        result.timings["tls"] = time.perf_counter() - mark
    mark = time.perf_counter()
    rq = pdu.encode_associate_rq(
        called_ae,
        calling_ae,
        contexts,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION,
    )
    tls = result.tls is not None
    try:
        await stream.send_all(rq)
        raw, rest = await read_pdu(stream, 1 << 20, first=False)
        answer = pdu.parse_pdu(raw)
    except (pdu.PduError, *STREAM_ERRORS) as exc:
        result.fail(*echo_advice.associate_failed(where, exc, tls=tls, first=recorder.first))
        return None
    if not isinstance(answer, pdu.AssociateAccept):
        result.fail(*echo_advice.not_accepted(answer, called_ae, calling_ae, tls=tls))
        return None
    result.timings["associate"] = time.perf_counter() - mark
    return Link(stream, answer, rest, sock.socket)


def timed_out(result: EchoResult, table: TlsTable | None, where: str, timeout: float) -> None:
    """The cause and advice for a probe or forward that ran out of time before it associated."""
    if "connect" not in result.timings:  # the TCP connect itself never completed
        result.fail(*echo_advice.timed_out(where, timeout, None))
        return
    step = "TLS handshake" if table is not None and "tls" not in result.timings else "answer"
    result.fail(*echo_advice.timed_out(where, timeout, step))


async def echo(
    target: Endpoint,
    called_ae: str,
    calling_ae: str,
    table: TlsTable | None,
    *,
    server_name: str | None = None,
    timeout: float = 10.0,
) -> EchoResult:
    result = EchoResult()
    start = time.perf_counter()
    opened: list[ByteStream] = []
    try:
        with trio.move_on_after(timeout) as scope:
            context = PresentationContextItem(1, VERIFICATION, TRANSFER_SYNTAXES)
            link = await open_link(
                target,
                called_ae,
                calling_ae,
                table,
                [context],
                result,
                opened,
                server_name=server_name,
            )
            if link is not None:
                await _echo(link, result)
        if scope.cancelled_caught:
            if result.cause:  # decided before the time ran out, while releasing
                return result
            if "associate" in result.timings and "echo" not in result.timings:
                silent = float(timeout)
                result.fail(*echo_advice.after_accept(silent))
                await _send_quietly(opened[-1], _farewell(silent))
                return result
            timed_out(result, table, str(target), timeout)
            return result
    finally:
        if opened:
            with trio.CancelScope(shield=True):
                await aclose_quietly(opened[-1])
    result.timings["total"] = time.perf_counter() - start
    return result


async def _echo(link: Link, result: EchoResult) -> None:
    stream = link.stream
    accepted = [
        pc for pc in link.accept.presentation_contexts if pc.result == 0 and pc.transfer_syntax
    ]
    if not accepted:
        result.fail(*echo_advice.NO_VERIFICATION)
        await release(stream)
        return
    mark = time.perf_counter()
    context_id = accepted[0].context_id
    ending: Ending | int
    try:
        await stream.send_all(encode_p_data(context_id, c_echo_rq(), command=True))
        ending = await _echo_answer(stream, context_id, link.rest)
    except (pdu.PduError, NotEchoResponse, *STREAM_ERRORS) as exc:
        ending = exc
    if not isinstance(ending, int):
        result.fail(*echo_advice.after_accept(ending))
        await _send_quietly(stream, _farewell(ending))
        return
    result.status = ending
    result.timings["echo"] = time.perf_counter() - mark
    if ending != 0:  # decided before the release, which only ends the association politely
        result.fail(*echo_advice.echo_failed(ending))
    await release(stream)
    if ending == 0:
        result.ok = True


async def _echo_answer(stream: ByteStream, context_id: int, initial: bytes) -> int | pdu.Pdu:
    """The status of the C-ECHO-RSP, or the PDU the server sent instead of one (an A-ABORT, an
    A-RELEASE-RQ...). A command may come in fragments over several P-DATA-TF (PS3.8 Annex E):
    they are joined up to the last one. `initial` is what came after the A-ASSOCIATE-AC.

    Raises NotEchoResponse for a P-DATA-TF that carries something else, PduError for an invalid
    PDU, a stream error (`PeerClosed` for an orderly close) when the connection ends."""
    command = bytearray()
    while True:
        raw, initial = await read_pdu(stream, 1 << 20, first=False, initial=initial)
        answer = pdu.parse_pdu(raw)
        if not isinstance(answer, pdu.DataTransfer):
            return answer
        for context, control, data in pdv_items(raw, pdu.HEADER_LENGTH):
            if not control & 0x01:
                raise NotEchoResponse("a data set, not a C-ECHO-RSP (which has none)")
            if context != context_id:
                raise NotEchoResponse(
                    f"a command on presentation context {context}, not on {context_id} "
                    "(the one accepted for Verification)"
                )
            command += data
            if len(command) > COMMAND_LIMIT:
                raise NotEchoResponse(
                    f"a command set of over {COMMAND_LIMIT} bytes, not a C-ECHO-RSP"
                )
            if control & 0x02:  # the last fragment
                return echo_status(bytes(command))


def _farewell(ending: Ending) -> bytes:
    """What the probe sends a server that accepted the association and then did not answer the
    C-ECHO (`ending`, as for `echo_advice.after_accept`), before it closes. The server is told
    when the probe gives up on an association it still holds (an A-ABORT, an A-RELEASE-RP to its
    A-RELEASE-RQ), so it is not left waiting with one; nothing when it ended the association."""
    if isinstance(ending, (float, NotEchoResponse)):  # silent, or mixed up its DIMSE messages
        return pdu.encode_abort(0, 0)
    if isinstance(ending, (pdu.Abort, *STREAM_ERRORS)):  # aborted, closed or broke the connection
        return b""
    if isinstance(ending, pdu.ReleaseRequest):
        return pdu.encode_release_rp()
    if isinstance(ending, pdu.PduError):
        return pdu.encode_abort(2, ending.abort_reason)
    return pdu.encode_abort(2, pdu.UNEXPECTED_PDU)  # an AC again, an RJ, an RQ, an A-RELEASE-RP


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    """Send the probe's last PDU, if it takes at most a second; a server gone already does not
    need it."""
    if not data:
        return
    with trio.move_on_after(1):
        try:
            await stream.send_all(data)
        except STREAM_ERRORS:
            pass


async def release(stream: ByteStream) -> None:
    """Release the association politely (A-RELEASE-RQ, the RP awaited at most 5 s)."""
    with trio.move_on_after(5):
        try:
            await stream.send_all(pdu.encode_release_rq())
            await read_pdu(stream, 1 << 16, first=False)
        except (pdu.PduError, *STREAM_ERRORS):
            pass
