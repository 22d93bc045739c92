"""Thin I/O helpers shared by the server and the probes: whole PDUs, DICOM answers, quiet closes.

Everything here moves bytes on a `ByteStream` (plain or TLS) and bounds itself with a cancel scope;
decisions are made elsewhere.
"""

from __future__ import annotations

import trio

from dicom_tls_proxy import pdu
from dicom_tls_proxy.tls import ByteStream, TlsStream

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
    With `first`, anything but an RQ is refused as soon as its header is seen (no need to wait
    for a body we would not accept)."""
    buf = bytearray()
    needed: int | None = None
    pending = initial
    while needed is None or len(buf) < needed:
        data, pending = (pending, b"") if pending else (await stream.receive_some(65536), b"")
        if not data:
            if not buf:
                raise PeerClosed("closed before sending a PDU")
            raise pdu.PduError(
                f"connection closed after {len(buf)} bytes of a PDU", pdu.INVALID_PARAMETER
            )
        buf += data
        if needed is None and len(buf) >= pdu.HEADER_LENGTH:
            kind, length = pdu.parse_header(buf)
            if kind not in pdu.KNOWN_TYPES:
                raise pdu.PduError(f"unknown PDU type 0x{kind:02x}", pdu.UNRECOGNIZED_PDU)
            if first and kind != pdu.A_ASSOCIATE_RQ:
                raise pdu.PduError(
                    f"first PDU has type 0x{kind:02x}, not an A-ASSOCIATE-RQ", pdu.UNEXPECTED_PDU
                )
            if length + pdu.HEADER_LENGTH > limit:
                raise pdu.PduError(
                    f"PDU of {length} bytes exceeds the limit of {limit}", pdu.INVALID_PARAMETER
                )
            needed = length + pdu.HEADER_LENGTH
    return bytes(buf[:needed]), bytes(buf[needed:])


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
