"""Thin I/O helpers shared by the server and the probes: whole PDUs, DICOM answers, quiet closes.

Everything here moves bytes on a `ByteStream` (plain or TLS) and bounds itself with a cancel scope;
decisions are made elsewhere.
"""

from __future__ import annotations

import trio

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.pdu_framing import split_pdu
from dicom_tls_proxy.transport.tlsstream import ByteStream, TlsStream

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
DRAIN_LIMIT = 64 * 1024  # bytes read and discarded after a refusal, before closing
DRAIN_SECONDS = 2.0


class PeerClosed(trio.BrokenResourceError):
    """The peer closed the connection where a PDU would begin: an orderly close, which a probe
    reports differently from a reset or a close in the middle of a PDU."""


def os_error_text(exc: BaseException) -> str:
    """The operating system's words ("Connection refused"), also from inside trio's wrapping."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


async def read_pdu(
    stream: ByteStream, limit: int, *, first: bool, initial: bytes = b""
) -> tuple[bytes, bytes]:
    """One whole PDU and whatever came after it; `initial` is what the caller already read.
    `limit` is the longest PDU accepted, header included. The cutting and the judging of the
    header are `pdu_framing.split_pdu`'s: as soon as the header is in, a PDU that is too long, of
    an unknown type or, with `first`, anything but an RQ is refused (no need to wait for a body
    we would not accept). This only reads until it has a PDU."""
    buf = bytearray(initial)
    max_body = limit - pdu.HEADER_LENGTH
    while (whole := split_pdu(buf, max_pdu_length=max_body, first=first)) is None:
        data = await stream.receive_some(65536)
        if not data:
            if not buf:
                raise PeerClosed("closed before sending a PDU")
            raise pdu.PduError(
                f"connection closed after {len(buf)} bytes of a PDU", pdu.INVALID_PARAMETER
            )
        buf += data
    return whole


async def answer_and_close(stream: ByteStream, answer: bytes) -> None:
    """Send the answer, close_notify, shut the write side, drain what the peer sends, close."""
    with trio.move_on_after(DRAIN_SECONDS):
        try:
            if answer:
                await stream.send_all(answer)
            await graceful_close(stream)
        except STREAM_ERRORS:
            pass


async def graceful_close(stream: ByteStream) -> None:
    transport = stream.transport if isinstance(stream, TlsStream) else stream
    with trio.move_on_after(DRAIN_SECONDS):
        try:
            await stream.send_eof()
            drained = 0
            while drained < DRAIN_LIMIT:
                data = await transport.receive_some(65536)
                if not data:
                    break
                drained += len(data)
        except STREAM_ERRORS:
            pass


async def abort_quietly(stream: ByteStream) -> None:
    with trio.move_on_after(2):
        try:
            await stream.send_all(pdu.encode_abort(2, 0))
        except STREAM_ERRORS:
            pass


async def aclose_quietly(stream: ByteStream) -> None:
    try:
        await stream.aclose()
    except STREAM_ERRORS:
        pass
