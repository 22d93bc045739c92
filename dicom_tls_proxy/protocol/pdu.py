"""DICOM Upper Layer PDUs (PS3.8 section 9.3): parse, check and build them, without any I/O.

Why this module exists: the proxy has to read exactly two things off the wire before it trusts a
connection enough to relay it -- the A-ASSOCIATE-RQ (to route on the Called AE title and check the
Calling one) and the upstream's answer -- and it must refuse anything malformed *before* it reaches
the old devices it protects, which may not survive a bad length field. This module is the judge:
`PduError`, the one header check every reader of PDUs applies (`check_header`), and the parser.
Around it: `pdu_items` holds the values the association negotiates, `pdu_framing` cuts byte streams
into PDUs (whole ones for the association, boundaries only for the relay), `dimse` reads and writes
the command sets that travel inside P-DATA-TF.

What it must never do: touch sockets, TLS, trio, clocks or logging; keep references to the buffers
it is given; or let a hostile byte string raise anything but :class:`PduError` (a bug here would be
a remote crash). Everything is a pure function or a small frozen dataclass, in the style of h11, so
every rule can be tested with plain bytes.

Where the standard and real peers disagree, the choices are (and tests pin them down; those about
the variable items are in `pdu_items`):

* Framing is judged strictly (every length must fit exactly); values only where the proxy or the
  negotiation depends on them. Results and reasons are reported as given.
* An RQ's AE titles are judged as PS3.5 AE values (trailing NULs are padding, like spaces). The
  A-ASSOCIATE-AC's AE titles, which are reserved and "shall not be tested" (PS3.8 Table 9-17), are
  decoded leniently: anything unprintable becomes ``?``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, assert_never

from dicom_tls_proxy.protocol.pdu_items import (
    DICOM_APPLICATION_CONTEXT,
    ItemError,
    Negotiated,
    PresentationContextItem,
    PresentationContextResult,
    UserItem,
    encode_request_items,
    lenient_text,
    parse_items,
    pdv_items,
)

Buffer = bytes | bytearray | memoryview

A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07
KNOWN_TYPES: Final = frozenset(range(A_ASSOCIATE_RQ, A_ABORT + 1))
PDU_NAMES: Final = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

HEADER_LENGTH: Final = 6
HEADER: Final = struct.Struct(">BxI")  # type, reserved byte, 4-byte body length
ASSOCIATE_MIN_LENGTH: Final = 68  # body bytes before the first variable item of an RQ/AC
_FIXED_BODY_LENGTH: Final = 4  # RJ, release and abort bodies
_FIXED_LENGTH_TYPES: Final = frozenset({A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT})

# A-ABORT reasons (source 2, DICOM UL service-provider) that PduError carries.
UNRECOGNIZED_PDU: Final = 1
UNEXPECTED_PDU: Final = 2
INVALID_PARAMETER: Final = 6

_AE_LENGTH = 16
_CALLED_AE = slice(10, 26)
_CALLING_AE = slice(26, 42)
_FIRST_ITEM = HEADER_LENGTH + ASSOCIATE_MIN_LENGTH


class PduError(Exception):
    """The bytes are not a valid PDU. ``abort_reason`` is the A-ABORT reason to answer with.

    ``str(error)`` says what was wrong, for the log line that goes with the abort.
    """

    def __init__(self, message: str, abort_reason: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class AssociateRequest(Negotiated):
    """An A-ASSOCIATE-RQ. ``raw`` is the whole PDU as received, header included."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    presentation_contexts: tuple[PresentationContextItem, ...]
    user_items: tuple[UserItem, ...]
    unknown_items: tuple[tuple[int, bytes], ...]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AssociateAccept(Negotiated):
    """An A-ASSOCIATE-AC. Its AE titles are the reserved echo of the RQ's, decoded leniently."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    presentation_contexts: tuple[PresentationContextResult, ...]
    user_items: tuple[UserItem, ...]
    unknown_items: tuple[tuple[int, bytes], ...]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AssociateReject:
    """An A-ASSOCIATE-RJ: result 1 permanent / 2 transient, source and reason as in PS3.8 9.3.4."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class Abort:
    """An A-ABORT: source 0 service-user (reason not significant) or 2 service-provider."""

    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """An A-RELEASE-RQ."""


@dataclass(frozen=True, slots=True)
class ReleaseReply:
    """An A-RELEASE-RP."""


@dataclass(frozen=True, slots=True)
class DataTransfer:
    """A P-DATA-TF whose PDV item framing was checked; the PDVs themselves are not decoded."""

    raw: bytes = field(repr=False)


Pdu = (
    AssociateRequest
    | AssociateAccept
    | AssociateReject
    | Abort
    | ReleaseRequest
    | ReleaseReply
    | DataTransfer
)


# --------------------------------------------------------------------------- the header


def parse_header(data: Buffer, offset: int = 0) -> tuple[int, int]:
    """Return (pdu_type, body_length) from the 6 bytes of ``data`` at ``offset``."""
    if len(data) - offset < HEADER_LENGTH:
        raise PduError(f"PDU header needs {HEADER_LENGTH} bytes, got {len(data) - offset}")
    pdu_type, length = HEADER.unpack_from(data, offset)
    return pdu_type, length


def check_header(
    pdu_type: int, length: int, max_pdu_length: int | None = None, *, first: bool = False
) -> None:
    """Judge a PDU header before any of its body is read, since a peer can announce 4 GiB in six
    bytes. The one check of every reader: the parser, `pdu_framing.split_pdu` and the relay's
    `pdu_framing.BoundaryTracker`, so they refuse the same headers in the same words.

    An unknown PDU type raises PduError (reason 1); with ``first`` (the first PDU of a
    connection), any type but an A-ASSOCIATE-RQ raises it with reason 2; an RJ, release or abort
    whose length is not 4, or a body longer than ``max_pdu_length``, with reason 6.
    """
    if pdu_type not in KNOWN_TYPES:
        raise PduError(f"unknown PDU type 0x{pdu_type:02x}", UNRECOGNIZED_PDU)
    if first and pdu_type != A_ASSOCIATE_RQ:
        raise PduError(
            f"first PDU has type 0x{pdu_type:02x}, not an A-ASSOCIATE-RQ", UNEXPECTED_PDU
        )
    if pdu_type in _FIXED_LENGTH_TYPES and length != _FIXED_BODY_LENGTH:
        raise PduError(f"{pdu_name(pdu_type)} has length {length}, must be 4")
    if max_pdu_length is not None and length > max_pdu_length:
        raise PduError(
            f"{pdu_name(pdu_type)} announces {length} bytes, more than the limit {max_pdu_length}"
        )


def pdu_name(pdu_type: int) -> str:
    """The name of a PDU type ("A-ABORT"), or "PDU type 0x.." for one PS3.8 does not define."""
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02x}")


# --------------------------------------------------------------------------- parsing


def parse_pdu(data: Buffer) -> Pdu:
    """Parse exactly one whole PDU, header included. Anything malformed raises PduError."""
    raw = bytes(data)
    pdu_type, length = parse_header(raw)
    check_header(pdu_type, length)
    if length != len(raw) - HEADER_LENGTH:
        raise PduError(
            f"{pdu_name(pdu_type)} length field says {length} bytes"
            f" but {len(raw) - HEADER_LENGTH} follow the header"
        )
    if pdu_type == A_ASSOCIATE_RJ:
        return AssociateReject(raw[7], raw[8], raw[9])
    if pdu_type == A_ABORT:
        return Abort(raw[8], raw[9])
    if pdu_type == A_RELEASE_RQ:
        return ReleaseRequest()
    if pdu_type == A_RELEASE_RP:
        return ReleaseReply()
    try:
        if pdu_type == P_DATA_TF:
            pdv_items(raw, HEADER_LENGTH)
            return DataTransfer(raw)
        return _parse_association(raw, pdu_type)
    except ItemError as error:  # a malformed item is an invalid parameter value (reason 6)
        raise PduError(str(error)) from None


def _parse_association(raw: bytes, pdu_type: int) -> AssociateRequest | AssociateAccept:
    is_rq = pdu_type == A_ASSOCIATE_RQ
    name = pdu_name(pdu_type)
    if len(raw) < _FIRST_ITEM:
        raise PduError(
            f"{name} length {len(raw) - HEADER_LENGTH} is less than {ASSOCIATE_MIN_LENGTH}"
        )
    (protocol_version,) = struct.unpack_from(">H", raw, 6)
    if is_rq:
        called = _parse_ae_field(raw[_CALLED_AE], "called")
        calling = _parse_ae_field(raw[_CALLING_AE], "calling")
    else:
        called = lenient_text(raw[_CALLED_AE])
        calling = lenient_text(raw[_CALLING_AE])
    items = parse_items(raw, _FIRST_ITEM, request=is_rq, name=name)
    if not is_rq:
        return AssociateAccept(
            protocol_version,
            called,
            calling,
            items.application_context,
            items.answered,
            items.user_items,
            items.unknown_items,
            raw,
        )
    return AssociateRequest(
        protocol_version,
        called,
        calling,
        items.application_context,
        items.proposed,
        items.user_items,
        items.unknown_items,
        raw,
    )


# --------------------------------------------------------------------------- AE titles


def _ae_problem(text: str) -> str | None:
    """What is wrong with an AE title (already stripped of padding), or None (PS3.5 AE VR)."""
    if not text:
        return "is empty or all spaces"
    if len(text) > _AE_LENGTH:
        return f"is {len(text)} characters long, more than {_AE_LENGTH}"
    if not text.isascii():
        return "contains a non-ASCII character"
    if "\\" in text:
        return "contains a backslash"
    if not text.isprintable():
        return "contains a control character"
    return None


def parse_ae_title(raw: bytes) -> str:
    """Decode a 16-byte AE title field from the wire.

    Trailing NULs count as padding like trailing spaces (older devices pad with NUL); leading and
    trailing spaces are not significant. PduError (reason 6) if the title is not valid.
    """
    if len(raw) != _AE_LENGTH:
        raise PduError(f"AE title field is {len(raw)} bytes, must be {_AE_LENGTH}")
    text = raw.rstrip(b"\x00 ").decode("latin-1").strip(" ")
    problem = _ae_problem(text)
    if problem is not None:
        raise PduError(f"AE title {raw!r} {problem}")
    return text


def _parse_ae_field(raw: bytes, which: str) -> str:
    try:
        return parse_ae_title(raw)
    except PduError as error:
        raise PduError(f"{which} {error}") from None


def validate_ae_title(text: str) -> str:
    """Check an AE title from configuration and return it without its leading/trailing spaces."""
    stripped = text.strip(" ")
    problem = _ae_problem(stripped)
    if problem is not None:
        raise ValueError(f"AE title {text!r} {problem}")
    return stripped


def encode_ae_title(text: str) -> bytes:
    """The 16-byte wire form of a valid AE title, padded with spaces."""
    return validate_ae_title(text).encode("ascii").ljust(_AE_LENGTH, b" ")


# --------------------------------------------------------------------------- encoding

# PS3.8 Table 9-21: the reasons each source of an A-ASSOCIATE-RJ may give.
REJECT_REASONS: Final = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognized",
        7: "called AE title not recognized",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}
# PS3.8 Table 9-26: source 0 (service-user) sends reason 0; source 2 (provider) gives one.
ABORT_REASONS: Final = {
    0: {0: "not significant"},
    2: {
        0: "reason not specified",
        1: "unrecognized PDU",
        2: "unexpected PDU",
        4: "unrecognized PDU parameter",
        5: "unexpected PDU parameter",
        6: "invalid PDU parameter value",
    },
}


def encode_reject(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ. ValueError for a combination PS3.8 does not define (a bug of ours)."""
    if result not in (1, 2) or reason not in REJECT_REASONS.get(source, {}):
        raise ValueError(f"no A-ASSOCIATE-RJ result {result} source {source} reason {reason}")
    return struct.pack(">BxIxBBB", A_ASSOCIATE_RJ, 4, result, source, reason)


def encode_abort(source: int, reason: int) -> bytes:
    """An A-ABORT. ValueError for a combination PS3.8 does not define (a bug of ours)."""
    if reason not in ABORT_REASONS.get(source, {}):
        raise ValueError(f"no A-ABORT source {source} reason {reason}")
    return struct.pack(">BxIxxBB", A_ABORT, 4, source, reason)


def encode_release_rq() -> bytes:
    """An A-RELEASE-RQ."""
    return struct.pack(">BxIxxxx", A_RELEASE_RQ, 4)


def encode_release_rp() -> bytes:
    """An A-RELEASE-RP."""
    return struct.pack(">BxIxxxx", A_RELEASE_RP, 4)


def encode_associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[PresentationContextItem],
    *,
    max_pdu_length: int = 16384,
    implementation_class_uid: str,
    implementation_version_name: str = "",
    application_context: str = DICOM_APPLICATION_CONTEXT,
) -> bytes:
    """An A-ASSOCIATE-RQ, for the proxy's own probes (`echo`, health checks)."""
    items = encode_request_items(
        contexts,
        max_pdu_length=max_pdu_length,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
        application_context=application_context,
    )
    body = (
        struct.pack(">Hxx", 1)
        + encode_ae_title(called_ae)
        + encode_ae_title(calling_ae)
        + bytes(32)
        + items
    )
    return HEADER.pack(A_ASSOCIATE_RQ, len(body)) + body


def rewrite_called_ae(raw: bytes, called_ae: str) -> bytes:
    """Replace the Called AE title (bytes 10-25) of an RQ or AC; every other byte is kept.

    Used when the route maps the title the client called to the one the upstream expects.
    ValueError if ``called_ae`` is not a valid title; PduError if ``raw`` is no RQ/AC.
    """
    title = encode_ae_title(called_ae)
    if len(raw) < _FIRST_ITEM or raw[0] not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        raise PduError("only a whole A-ASSOCIATE-RQ or -AC has a Called AE title to rewrite")
    return raw[: _CALLED_AE.start] + title + raw[_CALLED_AE.stop :]


def echo_called_ae(ac: bytes, rq: bytes) -> bytes:
    """The upstream's A-ASSOCIATE-AC ``ac`` with the Called AE title field of the client's ``rq``.

    PS3.8 Table 9-17: bytes 10-73 of an A-ASSOCIATE-AC (Called AE, Calling AE, 32 reserved) repeat
    the A-ASSOCIATE-RQ's: they "shall be sent with a value identical to" the RQ's and are not
    tested. When a route rewrote the Called AE for the upstream (`rewrite_called_ae`), the upstream
    repeats the title it was called by, one the client never sent and should never see: to the
    client the association is with the title it called, and a client that compares the AC's
    fields with its RQ's must find its own. So the 16 bytes are copied from the client's RQ as it
    sent them, byte for byte (its padding, spaces or NULs, included), not re-encoded from the
    title. Every other byte is the upstream's.

    PduError if ``ac`` is no whole A-ASSOCIATE-AC or ``rq`` no whole A-ASSOCIATE-RQ.
    """
    if len(ac) < _FIRST_ITEM or ac[0] != A_ASSOCIATE_AC:
        raise PduError("only a whole A-ASSOCIATE-AC can get the client's Called AE title back")
    if len(rq) < _FIRST_ITEM or rq[0] != A_ASSOCIATE_RQ:
        raise PduError("the Called AE title to give back must come from a whole A-ASSOCIATE-RQ")
    return ac[: _CALLED_AE.start] + rq[_CALLED_AE] + ac[_CALLED_AE.stop :]


# --------------------------------------------------------------------------- logs


def describe(pdu: Pdu) -> str:
    """A one-line description for logs."""
    match pdu:
        case AssociateRequest() | AssociateAccept():
            kind = "A-ASSOCIATE-RQ" if isinstance(pdu, AssociateRequest) else "A-ASSOCIATE-AC"
            return (
                f"{kind} {pdu.calling_ae!r} -> {pdu.called_ae!r}, "
                f"{len(pdu.presentation_contexts)} presentation contexts, "
                f"max PDU {pdu.max_pdu_length}, implementation {pdu.implementation_class_uid} "
                f"{pdu.implementation_version_name or ''}".rstrip()
            )
        case AssociateReject(result, source, reason):
            words = REJECT_REASONS.get(source, {}).get(reason, "reserved reason")
            kind = {1: "permanent", 2: "transient"}.get(result, "reserved result")
            return f"A-ASSOCIATE-RJ {kind} source {source} reason {reason} ({words})"
        case Abort(source, reason):
            words = ABORT_REASONS.get(source, {}).get(reason, "reserved reason")
            return f"A-ABORT source {source} reason {reason} ({words})"
        case ReleaseRequest():
            return "A-RELEASE-RQ"
        case ReleaseReply():
            return "A-RELEASE-RP"
        case DataTransfer(raw):
            return f"P-DATA-TF {len(raw) - HEADER_LENGTH} bytes"
    assert_never(pdu)
