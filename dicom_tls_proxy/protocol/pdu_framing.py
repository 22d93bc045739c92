"""Cutting a byte stream into DICOM Upper Layer PDUs (PS3.8 9.3.1), by their 6-byte headers.

Why this module exists: the proxy reads PDUs from a stream in two ways. During the association it
needs whole PDUs (the A-ASSOCIATE-RQ, the upstream's answer, the probes' exchanges): `split_pdu`,
which `streams.read_pdu` calls as bytes arrive. After the association is up it only needs to know
where PDU boundaries fall (to notice A-RELEASE and A-ABORT, and to inject an A-ABORT only between
PDUs), and that must cost per PDU, not per byte, because the relay moves hundreds of megabytes:
`BoundaryTracker`. Both judge each header with `pdu.check_header` as soon as its six bytes are in,
so a header is refused the same way, in the same words, wherever it is read -- and before a body a
peer announced at 4 GiB is waited for.

What it must never do: touch sockets, TLS, trio, clocks or logging (the reading is `streams`'s);
look inside a body; keep references to the buffers it is given; or raise anything but PduError on
hostile bytes.
"""

from __future__ import annotations

from typing import Final

from dicom_tls_proxy.protocol.pdu import (
    A_ABORT,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    HEADER,
    HEADER_LENGTH,
    P_DATA_TF,
    Buffer,
    PduError,
    check_header,
    parse_header,
)

_MAX_LENGTH: Final = 0xFFFFFFFF  # what a 4-byte length can announce


def pdu_length_needed(
    buffer: Buffer, *, max_pdu_length: int | None = None, first: bool = False
) -> int | None:
    """Total size (header + body) of the first PDU in ``buffer``, or None until its header is in.

    The header is judged (`pdu.check_header`) before any body is buffered: an unknown PDU type
    raises PduError (reason 1); with ``first``, any type but an A-ASSOCIATE-RQ (reason 2); an RJ,
    release or abort whose length is not 4, or a body longer than ``max_pdu_length`` (reason 6).
    """
    if len(buffer) < HEADER_LENGTH:
        return None
    pdu_type, length = parse_header(buffer)
    check_header(pdu_type, length, max_pdu_length, first=first)
    return HEADER_LENGTH + length


def split_pdu(
    buffer: Buffer, *, max_pdu_length: int | None = None, first: bool = False
) -> tuple[bytes, bytes] | None:
    """The first whole PDU in ``buffer`` and the bytes after it, or None while more are needed.

    Feed it what a stream has delivered so far, and again with more bytes while it answers None:
    its header is judged as soon as it is in (as in `pdu_length_needed`), so a PDU that will be
    refused is refused before its body is waited for.
    """
    needed = pdu_length_needed(buffer, max_pdu_length=max_pdu_length, first=first)
    if needed is None or len(buffer) < needed:
        return None
    return bytes(buffer[:needed]), bytes(buffer[needed:])


class BoundaryTracker:
    """Follows PDU boundaries in a relayed byte stream using only the 6-byte headers.

    The relay forwards large chunks untouched; this only looks at headers (which may straddle
    chunks) and skips bodies arithmetically, so its cost is per PDU, not per byte. It copies at
    most 6 bytes and keeps no reference to what it is fed.

    A header with an unknown PDU type raises PduError (reason 1); a fixed-size PDU (RJ, release,
    abort) announcing a length other than 4, or a body over ``max_pdu_length``, raises PduError
    (reason 6). After an error the stream has lost its framing, so every later ``feed`` raises
    it again.
    """

    __slots__ = (
        "_error",
        "_header",
        "_max",
        "_remaining",
        "_type",
        "last_type",
        "pdus",
        "seen_abort",
        "seen_release_rp",
        "seen_release_rq",
    )

    def __init__(self, max_pdu_length: int | None = None) -> None:
        self._max = max_pdu_length
        self._header = bytearray()  # a header split across chunks, at most 5 bytes
        self._remaining = 0  # body bytes of the current PDU still to come
        self._type: int | None = None  # type of the PDU whose body is being skipped
        self._error: PduError | None = None
        self.last_type: int | None = None
        self.pdus = 0
        self.seen_release_rq = False
        self.seen_release_rp = False
        self.seen_abort = False

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at the end of a PDU (or nothing was fed)."""
        return self._type is None and not self._header

    def feed(self, data: Buffer) -> None:
        """Advance over ``data``, the next bytes of the stream."""
        if self._error is not None:  # a fresh exception, so tracebacks do not pile up
            raise PduError(str(self._error), self._error.abort_reason)
        try:
            self._feed(data)
        except PduError as error:
            self._error = error
            raise

    def _feed(self, data: Buffer) -> None:
        end = len(data)
        pos = 0
        while pos < end:
            if self._type is None and not self._header:
                # The common case, kept tight: whole P-DATA PDUs one after another (a 256 KiB
                # chunk holds 16 of 16 KiB). Their only effect is the count; the first PDU of
                # another type, or one that does not end in this chunk, takes the general path.
                # The same header layout (pdu.HEADER), and only headers check_header passes: a
                # P-DATA-TF within the limit; anything else goes to check_header below.
                unpack = HEADER.unpack_from
                limit = self._max if self._max is not None else _MAX_LENGTH
                pdus = self.pdus
                while end - pos >= HEADER_LENGTH:
                    pdu_type, length = unpack(data, pos)
                    if (
                        pdu_type != P_DATA_TF
                        or length > limit
                        or pos + HEADER_LENGTH + length > end
                    ):
                        break
                    pos += HEADER_LENGTH + length
                    pdus += 1
                if pdus != self.pdus:
                    self.pdus = pdus
                    self.last_type = P_DATA_TF
                if pos >= end:
                    break
            if self._type is not None:  # inside a body: skip as much as we have
                step = min(self._remaining, end - pos)
                pos += step
                self._remaining -= step
                if self._remaining == 0:
                    self._complete()
            elif not self._header and end - pos >= HEADER_LENGTH:  # whole header in this chunk
                self._start(*parse_header(data, pos))
                pos += HEADER_LENGTH
            else:  # a header split across chunks
                step = min(HEADER_LENGTH - len(self._header), end - pos)
                self._header += data[pos : pos + step]
                pos += step
                if len(self._header) == HEADER_LENGTH:
                    header = bytes(self._header)
                    self._header.clear()
                    self._start(*parse_header(header))

    def _start(self, pdu_type: int, length: int) -> None:
        check_header(pdu_type, length, self._max)
        self._type, self._remaining = pdu_type, length
        if length == 0:
            self._complete()

    def _complete(self) -> None:
        pdu_type = self._type
        self._type = None
        self.pdus += 1
        self.last_type = pdu_type
        if pdu_type == A_RELEASE_RQ:
            self.seen_release_rq = True
        elif pdu_type == A_RELEASE_RP:
            self.seen_release_rp = True
        elif pdu_type == A_ABORT:
            self.seen_abort = True
