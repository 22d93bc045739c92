"""The C-ECHO probe behind `dicom-tls-proxy echo`: test a DICOM link and say plainly what is wrong.

It goes through the proxy's own TLS layer (the same verify callback and certificate policy as the
proxy's origination), so a failure is explained with the same reasons the proxy logs, and the
proxy's PDU codec. Its job is diagnosis: every failure becomes a cause and an advice in words an
integration engineer can act on, never an exception. It prints nothing itself; the CLI formats
`EchoResult`, and the route health checks record its cause.

A server that accepts the association and then does anything but answer the C-ECHO (closes,
aborts, asks to release, sends another message or bytes that are no PDU, stays silent) is worded
in one place, `_after_accept`, which also says how the probe leaves it (an A-ABORT, an
A-RELEASE-RP): a PACS is not left holding an association the probe gave up on.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import trio
from cryptography import x509

from dicom_tls_proxy import certload, pdu, policy
from dicom_tls_proxy.config import Endpoint, Profile, TlsTable, VerifyMode
from dicom_tls_proxy.streams import (
    STREAM_ERRORS,
    PeerClosed,
    aclose_quietly,
    os_error_text,
    read_pdu,
)
from dicom_tls_proxy.thumbprint import parse_thumbprint
from dicom_tls_proxy.tls import ByteStream, TlsFailure, TlsInfo, TlsStream, client_context
from dicom_tls_proxy.vocabulary import Reason

VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR LE
IMPLEMENTATION_CLASS_UID = "2.25.80567781562008035110521856474551951270"
IMPLEMENTATION_VERSION = "DICOMTLSPROXY"
TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})
SOURCES = {
    1: "the called application (service user)",
    2: "the ACSE service provider",
    3: "the presentation service provider",
}
ABORT_SOURCES = {  # PS3.8 Table 9-26, seen from the probe: the server is the other side
    0: "the server application (service user)",
    2: "the server's DICOM protocol layer (service provider)",
}
# PS3.7 Table E.1-1: the command field of a request; its response has bit 15 set.
DIMSE_COMMANDS = {
    0x0001: "C-STORE",
    0x0010: "C-GET",
    0x0020: "C-FIND",
    0x0021: "C-MOVE",
    0x0030: "C-ECHO",
    0x0100: "N-EVENT-REPORT",
    0x0110: "N-GET",
    0x0120: "N-SET",
    0x0130: "N-ACTION",
    0x0140: "N-CREATE",
    0x0150: "N-DELETE",
}
C_ECHO_RSP = 0x8030
ECHO_STATUSES = {  # PS3.7 9.1.5.1.4 and Annex C
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
}
COMMAND_LIMIT = 64 * 1024  # a C-ECHO-RSP is about 100 bytes; fragments beyond this are not one
ACCEPTED = "the server accepted the association"


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
    verify: VerifyMode = "none"
    if ca:
        verify = "chain+thumbprint" if pinned else "chain"
    elif pinned:
        verify = "thumbprint"
    return TlsTable(
        name="probe",
        certificate=cert,
        private_key=key,
        ca=ca,
        crl=(),
        verify=verify,
        peer_certificate="required",
        accepted_thumbprints=pinned,
        allow_weak_peer_certificates=False,
        profile=profile,
        ciphers="",
        tls13_ciphersuites="",
        server_name=server_name or "",
        identity=identity,
        ca_certificates=cas,
    )


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """The C-ECHO-RQ command set, implicit VR little endian (PS3.7 9.3.5)."""
    body = (
        _element(0x00000002, VERIFICATION.encode())
        + _element(0x00000100, struct.pack("<H", 0x0030))
        + _element(0x00000110, struct.pack("<H", message_id))
        + _element(0x00000800, struct.pack("<H", 0x0101))
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def command_fields(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (implicit VR LE); raises PduError when it does not parse."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if pos + 8 + length > len(data):
            raise pdu.PduError(f"command element ({group:04x},{element:04x}) is truncated")
        out[(group << 16) | element] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class NotEchoResponse(Exception):
    """A P-DATA-TF that is no C-ECHO-RSP; the message says what it is instead, in words."""


def describe_abort(abort: pdu.Abort) -> str:
    """Who aborted and why, in words, with the numbers a server's log shows."""
    who = ABORT_SOURCES.get(abort.source, f"source {abort.source}")
    if abort.source == 0:  # a service user gives no reason (PS3.8 Table 9-26)
        why = "no reason given"
    else:
        why = pdu.ABORT_REASONS.get(abort.source, {}).get(abort.reason, f"reason {abort.reason}")
    return f"A-ABORT by {who}: {why} (source {abort.source}, reason {abort.reason})"


def describe_status(status: int) -> str:
    """A DIMSE status, with the words for the ones a C-ECHO can get."""
    if status in ECHO_STATUSES:
        words = ECHO_STATUSES[status]
    elif status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        words = "a warning"
    elif status in (0xFF00, 0xFF01):
        words = "pending"
    elif status == 0xFE00:
        words = "cancel"
    else:
        words = "a failure"
    return f"status 0x{status:04x} ({words})"


def describe_command(field: int) -> str:
    """A DIMSE command field as the message's name ("a C-STORE-RSP (command field 0x8001)")."""
    if field == 0x0FFF:
        name = "C-CANCEL-RQ"
    elif (request := DIMSE_COMMANDS.get(field & 0x7FFF)) is not None:
        name = f"{request}-RSP" if field & 0x8000 else f"{request}-RQ"
    else:
        return f"an unknown command (command field 0x{field:04x})"
    return f"a {name} (command field 0x{field:04x})"


def describe_reject(rj: pdu.AssociateReject) -> str:
    kind = {1: "permanently", 2: "transiently"}.get(rj.result, f"(result {rj.result})")
    why = pdu.REJECT_REASONS.get(rj.source, {}).get(rj.reason, f"reason {rj.reason}")
    source = SOURCES.get(rj.source, f"source {rj.source}")
    return (
        f"association rejected {kind} by {source}: {why} "
        f"(result {rj.result}, source {rj.source}, reason {rj.reason})"
    )


def _closed_during_handshake(where: str, exc: BaseException) -> tuple[str, str]:
    return (
        f"{where} closed the connection during the TLS handshake ({exc})",
        "the port may not speak TLS (try without the TLS options), or the server refused this "
        "client",
    )


def _tls_advice(failure: TlsFailure, table: TlsTable, server_name: str) -> tuple[str, str]:
    cert = failure.certificate
    d = policy.describe(cert) if cert is not None else {}
    seen = f"{d.get('sha256', '?')}" if d else "no certificate"
    reason = failure.reason
    if reason == Reason.TLS_UNTRUSTED:
        return (
            f"the server's certificate is not signed by a CA you trust ({failure})",
            f"add the CA that issued it (issuer: {d.get('issuer', '?')}) with --tls-ca, "
            f"or pin the certificate itself with --thumbprint {seen}",
        )
    if reason == Reason.TLS_THUMBPRINT_MISMATCH:
        expected = ", ".join(str(t) for t in table.accepted_thumbprints)
        return (
            f"thumbprint mismatch: expected {expected}, the server presented {seen}",
            "check that you are talking to the right server; if its certificate was replaced, "
            "pin the new thumbprint",
        )
    if reason == Reason.TLS_NAME_MISMATCH:
        names = ", ".join(policy.certificate_names(cert)) if cert is not None else "none"
        return (
            f"hostname mismatch: the certificate is not for {server_name} (it is for: {names})",
            "connect by one of those names, or give the expected one with --server-name",
        )
    if reason in (Reason.TLS_EXPIRED, Reason.TLS_NOT_YET_VALID):
        return (
            f"the server's certificate is not valid now: {failure} "
            f"(valid {d.get('not_before', '?')} to {d.get('not_after', '?')})",
            "renew the server's certificate (or check this machine's clock)",
        )
    if reason == Reason.TLS_NO_CERTIFICATE or "alert" in str(failure):
        return (
            f"the server refused the TLS handshake: {failure}",
            "the server may require a client certificate (--tls-cert/--tls-key) signed by a CA it "
            "trusts, or a TLS version or cipher this client does not offer",
        )
    return (f"TLS failed: {reason}: {failure}", "check the TLS settings of both sides")


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
    stream: ByteStream | None = None
    where = str(target)
    try:
        with trio.move_on_after(timeout) as scope:
            try:
                sock = await trio.open_tcp_stream(target.host, target.port)
            except OSError as exc:
                text = os_error_text(exc)
                if "refused" in text.lower():
                    return result.fail(
                        f"connection refused: nothing listens on {where}",
                        "check the host and port, and that the service is running",
                    )
                return result.fail(
                    f"cannot connect to {where}: {text}", "check the address and network"
                )
            result.timings["connect"] = time.perf_counter() - start
            recorder = _Recorder(sock)
            stream = cast(ByteStream, recorder)
            if table is not None:
                name = server_name or table.server_name or target.host
                mark = time.perf_counter()
                try:
                    tstream = await TlsStream.connect(recorder, client_context(table), table, name)
                except TlsFailure as failure:
                    result.certificate = failure.certificate
                    if recorder.first and recorder.first[0] not in TLS_RECORD_TYPES:
                        return result.fail(
                            f"{where} does not speak TLS: it answered with plaintext "
                            f"(first bytes {recorder.first.hex(' ')})",
                            "this looks like a plaintext DICOM port: drop the --tls/--thumbprint "
                            "options, or use the TLS port (2762 by convention)",
                        )
                    if not recorder.first:  # closed (not reset) before sending a byte
                        return result.fail(*_closed_during_handshake(where, failure))
                    return result.fail(*_tls_advice(failure, table, name))
                except STREAM_ERRORS as exc:
                    return result.fail(*_closed_during_handshake(where, exc))
                stream = tstream
                result.tls = tstream.info()
                result.certificate = result.tls.certificate
                result.timings["tls"] = time.perf_counter() - mark
            await _associate_and_echo(stream, recorder, called_ae, calling_ae, result, where)
        if scope.cancelled_caught:
            if result.cause:  # decided before the time ran out, while releasing
                return result
            if "associate" in result.timings and "echo" not in result.timings:
                verdict = _after_accept(float(timeout))
                result.fail(verdict.cause, verdict.advice)
                assert stream is not None  # associated, so connected
                await _send_quietly(stream, verdict.answer)
                return result
            if "connect" not in result.timings:  # the TCP connect itself never completed
                return result.fail(
                    f"timeout: no connection to {where} within {timeout:g}s",
                    "a firewall may drop the packets, or the host may be down or overloaded",
                )
            step = (
                "TLS handshake" if table is not None and "tls" not in result.timings else "answer"
            )
            return result.fail(
                f"timeout: no {step} from {where} within {timeout:g}s",
                "a firewall may drop the packets, the host may be down, or the port may expect "
                "the other protocol (TLS or plaintext)",
            )
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await aclose_quietly(stream)
    result.timings["total"] = time.perf_counter() - start
    return result


async def _associate_and_echo(
    stream: ByteStream,
    recorder: _Recorder,
    called_ae: str,
    calling_ae: str,
    result: EchoResult,
    where: str,
) -> None:
    mark = time.perf_counter()
    context = pdu.PresentationContextItem(1, VERIFICATION, TRANSFER_SYNTAXES)
    rq = pdu.encode_associate_rq(
        called_ae,
        calling_ae,
        [context],
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION,
    )
    try:
        await stream.send_all(rq)
        raw, rest = await read_pdu(stream, 1 << 20, first=False)
        answer = pdu.parse_pdu(raw)
    except (pdu.PduError, *STREAM_ERRORS) as exc:
        if recorder.first and recorder.first[0] in (0x15, 0x16) and result.tls is None:
            result.fail(
                f"{where} speaks TLS, and this probe spoke plaintext",
                "add --tls-ca FILE (or --thumbprint T) to connect over TLS",
            )
            return
        text = str(exc)
        if result.tls is not None and ("alert" in text or not isinstance(exc, pdu.PduError)):
            # With TLS 1.3 a server checks the client certificate after the client has finished
            # its handshake: its refusal is an alert, or a bare reset that overtook the alert.
            result.fail(
                f"{where} ended the TLS session after the handshake: {text}",
                "the server requires a client certificate it trusts: give --tls-cert and "
                "--tls-key (signed by a CA the server trusts, or pinned there by thumbprint)"
                + ("" if "alert" in text else "; otherwise see the server's log"),
            )
        elif result.tls is None and not recorder.first:
            result.fail(
                f"{where} closed the connection without answering the A-ASSOCIATE-RQ",
                "if this port speaks TLS, add --tls-ca FILE (or --thumbprint T); otherwise see "
                "the server's log (it may refuse this source address)",
            )
        else:
            result.fail(
                f"{where} did not answer the A-ASSOCIATE-RQ properly: {text}",
                "is this a DICOM port?",
            )
        return
    if isinstance(answer, pdu.AssociateReject):
        result.fail(
            describe_reject(answer),
            _reject_advice(answer, called_ae, calling_ae, tls=result.tls is not None),
        )
        return
    if isinstance(answer, pdu.Abort):
        result.fail(
            f"the server aborted the association: {describe_abort(answer)}", "see the server's log"
        )
        return
    if not isinstance(answer, pdu.AssociateAccept):
        result.fail(f"unexpected answer {pdu.describe(answer)}", "is this a DICOM port?")
        return
    accepted = [pc for pc in answer.presentation_contexts if pc.result == 0 and pc.transfer_syntax]
    result.timings["associate"] = time.perf_counter() - mark
    if not accepted:
        result.fail(
            "the server accepted the association but not the Verification service",
            "enable C-ECHO (Verification SOP Class) on the server",
        )
        await _release(stream)
        return
    mark = time.perf_counter()
    context_id = accepted[0].context_id
    ending: _Ending | int
    try:
        await stream.send_all(pdu.encode_p_data(context_id, c_echo_rq(), command=True))
        ending = await _echo_answer(stream, context_id, rest)
    except (pdu.PduError, NotEchoResponse, *STREAM_ERRORS) as exc:
        ending = exc
    if not isinstance(ending, int):
        verdict = _after_accept(ending)
        result.fail(verdict.cause, verdict.advice)
        await _send_quietly(stream, verdict.answer)
        return
    result.status = ending
    result.timings["echo"] = time.perf_counter() - mark
    if ending != 0:  # decided before the release, which only ends the association politely
        result.fail(
            f"the server answered the C-ECHO with {describe_status(ending)}", "see the server's log"
        )
    await _release(stream)
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
        for context, control, data in pdu.pdv_items(raw):
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
                return _echo_status(bytes(command))


def _echo_status(command: bytes) -> int:
    """The status of a whole command set if it is a C-ECHO-RSP; else NotEchoResponse."""
    try:
        fields = command_fields(command)
    except pdu.PduError as exc:
        raise NotEchoResponse(
            f"a command set that does not parse ({exc}), not a C-ECHO-RSP"
        ) from None
    field = fields.get(0x00000100, b"")
    if len(field) < 2:
        raise NotEchoResponse("a command set without a command field, not a C-ECHO-RSP")
    kind = struct.unpack("<H", field[:2])[0]
    if kind != C_ECHO_RSP:
        raise NotEchoResponse(f"{describe_command(kind)}, not a C-ECHO-RSP")
    status = fields.get(0x00000900, b"")
    if len(status) < 2:
        raise NotEchoResponse("a C-ECHO-RSP without a status")
    return int(struct.unpack("<H", status[:2])[0])


@dataclass(frozen=True)
class _Verdict:
    """How an association the server accepted ended without a C-ECHO-RSP: `EchoResult.fail`'s
    words, and what the probe sends the server before it closes."""

    cause: str
    advice: str
    answer: bytes = b""


# What the server can do after its A-ASSOCIATE-AC instead of answering the C-ECHO: send another
# PDU, break the protocol, close or break the connection, or stay silent for so many seconds.
_Ending = (
    pdu.Pdu
    | pdu.PduError
    | NotEchoResponse
    | trio.BrokenResourceError
    | trio.ClosedResourceError
    | OSError
    | float
)
_CLOSED_ADVICE = (
    "see the server's log: it may have failed, or refuse this client (Calling AE, address or "
    "certificate) only after accepting"
)
_PROTOCOL_ADVICE = "the server (or a device between) broke the DICOM protocol: see its log"


def _after_accept(ending: _Ending) -> _Verdict:
    """What the server did after its A-ASSOCIATE-AC instead of answering the C-ECHO, in words, and
    how the probe leaves it. `ending` is the PDU it sent, the error that ended the reading (an
    invalid PDU, a P-DATA-TF that is no C-ECHO-RSP, a closed or broken connection), or the
    seconds it stayed silent. The one place these are worded, for `echo` and the health checks.

    The server is told when the probe gives up on an association it still holds (an A-ABORT, an
    A-RELEASE-RP to its A-RELEASE-RQ), so it is not left waiting with one."""
    unanswered = "without answering the C-ECHO"
    if isinstance(ending, float):
        return _Verdict(
            f"{ACCEPTED} but did not answer the C-ECHO within {ending:g}s",
            "see the server's log: it may be hung or overloaded, or not handle C-ECHO; "
            "a longer --timeout shows whether it answers late",
            pdu.encode_abort(0, 0),
        )
    if isinstance(ending, PeerClosed):
        return _Verdict(f"{ACCEPTED} and then closed the connection {unanswered}", _CLOSED_ADVICE)
    if isinstance(ending, STREAM_ERRORS):  # a reset, a broken pipe, a fatal TLS alert
        return _Verdict(
            f"{ACCEPTED} and then closed the connection {unanswered} ({os_error_text(ending)})",
            _CLOSED_ADVICE,
        )
    if isinstance(ending, pdu.Abort):
        return _Verdict(
            f"{ACCEPTED} and then aborted it {unanswered}: {describe_abort(ending)}",
            "see the server's log for why it aborted (it may refuse C-ECHO from this Calling AE "
            "or this client, or have failed)",
        )
    if isinstance(ending, pdu.ReleaseRequest):
        return _Verdict(
            f"{ACCEPTED} and then asked to release it (A-RELEASE-RQ) {unanswered}",
            "see the server's log: it may not offer C-ECHO to this Calling AE, or end "
            "associations it has no work for",
            pdu.encode_release_rp(),
        )
    if isinstance(ending, NotEchoResponse):
        return _Verdict(
            f"{ACCEPTED} and then answered the C-ECHO with {ending}",
            "the server (or a device between) mixed up its DIMSE messages: see its log",
            pdu.encode_abort(0, 0),
        )
    if isinstance(ending, pdu.PduError):
        return _Verdict(
            f"{ACCEPTED} and then sent an invalid PDU instead of answering the C-ECHO: {ending}",
            _PROTOCOL_ADVICE,
            pdu.encode_abort(2, ending.abort_reason),
        )
    return _Verdict(  # an A-ASSOCIATE-AC again, an -RJ, an RQ, an A-RELEASE-RP
        f"{ACCEPTED} and then sent an unexpected {pdu.describe(ending)} instead of answering the "
        "C-ECHO",
        _PROTOCOL_ADVICE,
        pdu.encode_abort(2, pdu.UNEXPECTED_PDU),
    )


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


async def _release(stream: ByteStream) -> None:
    with trio.move_on_after(5):
        try:
            await stream.send_all(pdu.encode_release_rq())
            await read_pdu(stream, 1 << 16, first=False)
        except (pdu.PduError, *STREAM_ERRORS):
            pass


def _reject_advice(
    rj: pdu.AssociateReject, called_ae: str, calling_ae: str, *, tls: bool = True
) -> str:
    if rj.source == 1 and rj.reason == 7:
        return f"the server has no service called {called_ae!r}: check --called-ae"
    if rj.source == 1 and rj.reason == 3:
        return f"the server does not accept Calling AE {calling_ae!r}: check --calling-ae"
    if rj.source == 1 and not tls:
        # The proxy's TLS listener answers plaintext DICOM so (reason plaintext-on-tls).
        return (
            "if this is a TLS port, connect over TLS: add --tls-ca FILE (or --thumbprint T); "
            "otherwise the server refused this client (source address or rules): see its log"
        )
    if rj.source == 1:
        return "the server refused this client (certificate, source address or rules): see its log"
    if rj.source == 3:
        return "the server or the device behind it is busy or unreachable: try again, see its log"
    return "see the server's log"
