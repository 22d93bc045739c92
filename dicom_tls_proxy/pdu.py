"""DICOM Upper Layer PDUs (PS3.8 section 9.3): parse, check and build them, without any I/O.

Why this module exists: the proxy has to read exactly two things off the wire before it trusts a
connection enough to relay it -- the A-ASSOCIATE-RQ (to route on the Called AE title and check the
Calling one) and the upstream's answer -- and it must refuse anything malformed *before* it reaches
the old devices it protects, which may not survive a bad length field. After the association is up
it only needs to know where PDU boundaries fall (to notice A-RELEASE and A-ABORT), and that must
cost per PDU, not per byte, because the relay moves hundreds of megabytes.

What it must never do: touch sockets, TLS, trio, clocks or logging; keep references to the buffers
it is given; or let a hostile byte string raise anything but :class:`PduError` (a bug here would be
a remote crash). Everything is a pure function or a small frozen dataclass, in the style of h11, so
every rule can be tested with plain bytes.

Where the standard and real peers disagree, the choices are (and tests pin them down):

* Variable items may come in any order. PS3.8 lists one Application Context item, one or more
  Presentation Context items and one User Information item, but does not require an order, and
  pynetdicom and dcm4che both accept any. Counts are enforced: exactly one 0x10, at least one
  0x20 in an RQ, at most one 0x50.
* A missing User Information item (0x50) is accepted: it only carries optional negotiation that the
  upstream can judge for itself, and the proxy does not need it. ``max_pdu_length`` is then None.
* An A-ASSOCIATE-AC may carry no presentation context: that is the requestor's problem, not ours.
* Unknown variable items are kept in ``unknown_items``; unknown sub-items of a presentation context
  are skipped (they stay in ``raw``, which is what gets forwarded).
* Framing is judged strictly (every length must fit exactly); values only where the proxy or the
  negotiation depends on them. The UIDs that negotiation uses (application context, abstract and
  transfer syntaxes) must be printable ASCII: they end up in logs, and a newline in one would forge
  a log line. Trailing NULs and spaces are padding. Context IDs, results and reasons are reported
  as given.
* Fields that are shown but not judged -- the A-ASSOCIATE-AC's AE titles, which are reserved and
  "shall not be tested" (PS3.8 Table 9-17), and the implementation class UID and version name --
  are decoded leniently: anything unprintable becomes ``?``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, assert_never

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
ASSOCIATE_MIN_LENGTH: Final = 68  # body bytes before the first variable item of an RQ/AC
_FIXED_BODY_LENGTH: Final = 4  # RJ, release and abort bodies
_FIXED_LENGTH_TYPES: Final = frozenset({A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT})

# A-ABORT reasons (source 2, DICOM UL service-provider) that PduError carries.
UNRECOGNIZED_PDU: Final = 1
UNEXPECTED_PDU: Final = 2
INVALID_PARAMETER: Final = 6

# Item types (PS3.8 9.3.2-9.3.3 and Annex D).
DICOM_APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
ITEM_APPLICATION_CONTEXT: Final = 0x10
ITEM_PRESENTATION_CONTEXT_RQ: Final = 0x20
ITEM_PRESENTATION_CONTEXT_AC: Final = 0x21
ITEM_ABSTRACT_SYNTAX: Final = 0x30
ITEM_TRANSFER_SYNTAX: Final = 0x40
ITEM_USER_INFORMATION: Final = 0x50
ITEM_MAX_LENGTH: Final = 0x51
ITEM_IMPLEMENTATION_CLASS_UID: Final = 0x52
ITEM_IMPLEMENTATION_VERSION_NAME: Final = 0x55

_HEADER = struct.Struct(">BxI")
_MAX_LENGTH = 0xFFFFFFFF  # what a 4-byte length can announce
_ITEM_HEADER = struct.Struct(">BxH")
_AE_LENGTH = 16
_CALLED_AE = slice(10, 26)
_CALLING_AE = slice(26, 42)
_FIRST_ITEM = HEADER_LENGTH + ASSOCIATE_MIN_LENGTH
# Byte -> itself if printable ASCII, else "?": for fields we must show but may not judge.
_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else 0x3F for b in range(256))


class PduError(Exception):
    """The bytes are not a valid PDU. ``abort_reason`` is the A-ABORT reason to answer with.

    ``str(error)`` says what was wrong, for the log line that goes with the abort.
    """

    def __init__(self, message: str, abort_reason: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class PresentationContextItem:
    """One proposed presentation context (item 0x20 of an A-ASSOCIATE-RQ)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PresentationContextResult:
    """One answered presentation context (item 0x21 of an A-ASSOCIATE-AC).

    ``result`` 0 is acceptance; for any other result the transfer syntax is not significant
    (PS3.8 Table 9-18) and is None.
    """

    context_id: int
    result: int
    transfer_syntax: str | None


@dataclass(frozen=True, slots=True)
class UserItem:
    """A sub-item of the User Information item (0x50), kept as bytes: most are relayed untouched."""

    item_type: int
    value: bytes


class _Association:
    """What the RQ and the AC share: properties over the user information sub-items."""

    __slots__ = ()
    protocol_version: int
    user_items: tuple[UserItem, ...]

    @property
    def protocol_version_supported(self) -> bool:
        """Bit 0 of the protocol version is version 1; other bits are to be ignored (PS3.8)."""
        return bool(self.protocol_version & 1)

    @property
    def max_pdu_length(self) -> int | None:
        """Maximum Length Received (0x51): the largest P-DATA-TF body the sender accepts.

        0 means no limit; None means the sub-item is absent.
        """
        value = _first_user_item(self.user_items, ITEM_MAX_LENGTH)
        return None if value is None or len(value) != 4 else int.from_bytes(value, "big")

    @property
    def implementation_class_uid(self) -> str | None:
        """Implementation Class UID (0x52), or None if absent."""
        value = _first_user_item(self.user_items, ITEM_IMPLEMENTATION_CLASS_UID)
        return None if value is None else _lenient_text(value)

    @property
    def implementation_version_name(self) -> str | None:
        """Implementation Version Name (0x55), or None if absent."""
        value = _first_user_item(self.user_items, ITEM_IMPLEMENTATION_VERSION_NAME)
        return None if value is None else _lenient_text(value)


@dataclass(frozen=True, slots=True)
class AssociateRequest(_Association):
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
class AssociateAccept(_Association):
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


# --------------------------------------------------------------------------- framing


def parse_header(data: Buffer) -> tuple[int, int]:
    """Return (pdu_type, body_length) from the first 6 bytes of ``data``."""
    if len(data) < HEADER_LENGTH:
        raise PduError(f"PDU header needs {HEADER_LENGTH} bytes, got {len(data)}")
    pdu_type, length = _HEADER.unpack_from(data)
    return pdu_type, length


def pdu_length_needed(buffer: Buffer, *, max_pdu_length: int | None = None) -> int | None:
    """Total size (header + body) of the first PDU in ``buffer``, or None until its header is in.

    The header is judged before any body is buffered, since a peer can announce 4 GiB in six
    bytes: an unknown PDU type raises PduError (reason 1); an RJ, release or abort whose length is
    not 4, or a body longer than ``max_pdu_length``, raises PduError (reason 6).
    """
    if len(buffer) < HEADER_LENGTH:
        return None
    pdu_type, length = parse_header(buffer)
    _check_header(pdu_type, length, max_pdu_length)
    return HEADER_LENGTH + length


def _check_header(pdu_type: int, length: int, max_pdu_length: int | None) -> None:
    if pdu_type not in KNOWN_TYPES:
        raise PduError(f"unrecognized PDU type 0x{pdu_type:02x}", UNRECOGNIZED_PDU)
    if pdu_type in _FIXED_LENGTH_TYPES and length != _FIXED_BODY_LENGTH:
        raise PduError(f"{_name(pdu_type)} has length {length}, must be 4")
    if max_pdu_length is not None and length > max_pdu_length:
        raise PduError(
            f"{_name(pdu_type)} announces {length} bytes, more than the limit {max_pdu_length}"
        )


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
                unpack = _HEADER.unpack_from
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
                self._start(*_HEADER.unpack_from(data, pos))
                pos += HEADER_LENGTH
            else:  # a header split across chunks
                step = min(HEADER_LENGTH - len(self._header), end - pos)
                self._header += data[pos : pos + step]
                pos += step
                if len(self._header) == HEADER_LENGTH:
                    header = bytes(self._header)
                    self._header.clear()
                    self._start(*_HEADER.unpack(header))

    def _start(self, pdu_type: int, length: int) -> None:
        _check_header(pdu_type, length, self._max)
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


# --------------------------------------------------------------------------- parsing


def parse_pdu(data: Buffer) -> Pdu:
    """Parse exactly one whole PDU, header included. Anything malformed raises PduError."""
    raw = bytes(data)
    pdu_type, length = parse_header(raw)
    _check_header(pdu_type, length, None)
    if length != len(raw) - HEADER_LENGTH:
        raise PduError(
            f"{_name(pdu_type)} length field says {length} bytes"
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
    if pdu_type == P_DATA_TF:
        pdv_items(raw)
        return DataTransfer(raw)
    return _parse_association(raw, pdu_type)


def pdv_items(raw: bytes) -> list[tuple[int, int, bytes]]:
    """The PDVs of a whole P-DATA-TF as (context id, message control header, data); each PDV
    item is a 4-byte length, then at least the context ID and the message control header."""
    pos, end = HEADER_LENGTH, len(raw)
    if pos == end:
        raise PduError("P-DATA-TF carries no PDV item")
    out: list[tuple[int, int, bytes]] = []
    while pos < end:
        if end - pos < 4:
            raise PduError(f"PDV item header truncated at offset {pos}")
        (length,) = struct.unpack_from(">I", raw, pos)
        if length < 2:
            raise PduError(f"PDV item at offset {pos} has length {length}, less than 2")
        if pos + 4 + length > end:
            raise PduError(f"PDV item length {length} runs past the end of the PDU")
        out.append((raw[pos + 4], raw[pos + 5], raw[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return out


def _items(raw: bytes, pos: int, end: int, where: str) -> Iterator[tuple[int, int, int]]:
    """Yield (item_type, value_start, value_end) of the items filling raw[pos:end] exactly.

    Variable items and sub-items share this layout: type, reserved byte, 2-byte length.
    """
    while pos < end:
        if end - pos < _ITEM_HEADER.size:
            raise PduError(f"{end - pos} stray bytes at the end of {where}")
        item_type, length = _ITEM_HEADER.unpack_from(raw, pos)
        pos += _ITEM_HEADER.size
        if pos + length > end:
            raise PduError(f"item 0x{item_type:02x} length {length} runs past the end of {where}")
        yield item_type, pos, pos + length
        pos += length


def _parse_association(raw: bytes, pdu_type: int) -> AssociateRequest | AssociateAccept:
    is_rq = pdu_type == A_ASSOCIATE_RQ
    name = _name(pdu_type)
    if len(raw) < _FIRST_ITEM:
        raise PduError(
            f"{name} length {len(raw) - HEADER_LENGTH} is less than {ASSOCIATE_MIN_LENGTH}"
        )
    (protocol_version,) = struct.unpack_from(">H", raw, 6)
    if is_rq:
        called = _parse_ae_field(raw[_CALLED_AE], "called")
        calling = _parse_ae_field(raw[_CALLING_AE], "calling")
    else:
        called = _lenient_text(raw[_CALLED_AE])
        calling = _lenient_text(raw[_CALLING_AE])

    app_context: str | None = None
    user_items: tuple[UserItem, ...] | None = None
    context_spans: list[tuple[int, int]] = []
    unknown: list[tuple[int, bytes]] = []
    context_type = ITEM_PRESENTATION_CONTEXT_RQ if is_rq else ITEM_PRESENTATION_CONTEXT_AC
    for item_type, start, end in _items(raw, _FIRST_ITEM, len(raw), f"the {name}"):
        if item_type == ITEM_APPLICATION_CONTEXT:
            if app_context is not None:
                raise PduError(f"{name} has more than one application context item")
            app_context = _uid(raw[start:end], "application context name")
        elif item_type == context_type:
            context_spans.append((start, end))
        elif item_type == ITEM_USER_INFORMATION:
            if user_items is not None:
                raise PduError(f"{name} has more than one user information item")
            user_items = _parse_user_info(raw, start, end)
        else:
            unknown.append((item_type, raw[start:end]))
    if app_context is None:
        raise PduError(f"{name} has no application context item")
    if not is_rq:
        return AssociateAccept(
            protocol_version,
            called,
            calling,
            app_context,
            tuple(_parse_context_ac(raw, s, e) for s, e in context_spans),
            user_items or (),
            tuple(unknown),
            raw,
        )
    if not context_spans:
        raise PduError(f"{name} proposes no presentation context")
    return AssociateRequest(
        protocol_version,
        called,
        calling,
        app_context,
        tuple(_parse_context_rq(raw, s, e) for s, e in context_spans),
        user_items or (),
        tuple(unknown),
        raw,
    )


def _parse_context_rq(raw: bytes, start: int, end: int) -> PresentationContextItem:
    if end - start < 4:
        raise PduError(f"presentation context item length {end - start} is less than 4")
    context_id = raw[start]
    where = f"presentation context {context_id}"
    abstract: str | None = None
    transfers: list[str] = []
    for sub_type, s, e in _items(raw, start + 4, end, where):
        if sub_type == ITEM_ABSTRACT_SYNTAX:
            if abstract is not None:
                raise PduError(f"{where} has more than one abstract syntax")
            abstract = _uid(raw[s:e], f"abstract syntax of {where}")
        elif sub_type == ITEM_TRANSFER_SYNTAX:
            transfers.append(_uid(raw[s:e], f"transfer syntax of {where}"))
    if abstract is None:
        raise PduError(f"{where} has no abstract syntax")
    if not transfers:
        raise PduError(f"{where} has no transfer syntax")
    return PresentationContextItem(context_id, abstract, tuple(transfers))


def _parse_context_ac(raw: bytes, start: int, end: int) -> PresentationContextResult:
    if end - start < 4:
        raise PduError(f"presentation context item length {end - start} is less than 4")
    context_id, result = raw[start], raw[start + 2]
    where = f"presentation context {context_id}"
    transfers = [
        (s, e) for t, s, e in _items(raw, start + 4, end, where) if t == ITEM_TRANSFER_SYNTAX
    ]
    if result != 0:  # the transfer syntax "shall not be tested" (PS3.8 Table 9-18)
        return PresentationContextResult(context_id, result, None)
    if len(transfers) != 1:
        raise PduError(f"accepted {where} has {len(transfers)} transfer syntaxes, must be 1")
    s, e = transfers[0]
    return PresentationContextResult(context_id, 0, _uid(raw[s:e], f"transfer syntax of {where}"))


def _parse_user_info(raw: bytes, start: int, end: int) -> tuple[UserItem, ...]:
    items = []
    for sub_type, s, e in _items(raw, start, end, "the user information item"):
        value = raw[s:e]
        if sub_type == ITEM_MAX_LENGTH and len(value) != 4:
            raise PduError(f"maximum length sub-item has length {len(value)}, must be 4")
        items.append(UserItem(sub_type, value))
    return tuple(items)


def _uid(value: bytes, what: str) -> str:
    """Decode a UID: printable ASCII, trailing NULs and spaces are padding."""
    value = value.rstrip(b"\x00 ")
    if not value:
        raise PduError(f"{what} is empty")
    if not (value.isascii() and value.decode("ascii").isprintable()):
        raise PduError(f"{what} {value[:64]!r} is not printable ASCII")
    return value.decode("ascii")


def _lenient_text(value: bytes) -> str:
    """Printable ASCII for fields that must be shown but not judged; unprintables become '?'."""
    return value.rstrip(b"\x00 ").translate(_PRINTABLE).decode("ascii").strip()


def _first_user_item(items: tuple[UserItem, ...], item_type: int) -> bytes | None:
    return next((item.value for item in items if item.item_type == item_type), None)


def _name(pdu_type: int) -> str:
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02x}")


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


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


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
    items = bytearray(_item(ITEM_APPLICATION_CONTEXT, application_context.encode("ascii")))
    for pc in contexts:
        sub = _item(ITEM_ABSTRACT_SYNTAX, pc.abstract_syntax.encode("ascii"))
        for ts in pc.transfer_syntaxes:
            sub += _item(ITEM_TRANSFER_SYNTAX, ts.encode("ascii"))
        items += _item(ITEM_PRESENTATION_CONTEXT_RQ, bytes([pc.context_id, 0, 0, 0]) + sub)
    user = _item(ITEM_MAX_LENGTH, struct.pack(">I", max_pdu_length))
    user += _item(ITEM_IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode("ascii"))
    if implementation_version_name:
        user += _item(ITEM_IMPLEMENTATION_VERSION_NAME, implementation_version_name.encode("ascii"))
    items += _item(ITEM_USER_INFORMATION, user)
    body = (
        struct.pack(">Hxx", 1)
        + encode_ae_title(called_ae)
        + encode_ae_title(calling_ae)
        + bytes(32)
        + bytes(items)
    )
    return _HEADER.pack(A_ASSOCIATE_RQ, len(body)) + body


def encode_p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF carrying one PDV (PS3.8 9.3.5 and Annex E.2)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return _HEADER.pack(P_DATA_TF, len(pdv)) + pdv


def rewrite_called_ae(raw: bytes, called_ae: str) -> bytes:
    """Replace the Called AE title (bytes 10-25) of an RQ or AC; every other byte is kept.

    Used when the route maps the title the client called to the one the upstream expects.
    ValueError if ``called_ae`` is not a valid title; PduError if ``raw`` is no RQ/AC.
    """
    title = encode_ae_title(called_ae)
    if len(raw) < _FIRST_ITEM or raw[0] not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        raise PduError("only a whole A-ASSOCIATE-RQ or -AC has a Called AE title to rewrite")
    return raw[: _CALLED_AE.start] + title + raw[_CALLED_AE.stop :]


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


def echo_called_ae(ac: bytes, rq: bytes) -> bytes:
    """The A-ASSOCIATE-AC with the Called AE title (bytes 10-25) of the client's own RQ, byte for
    byte. PS3.8 has the AC repeat RQ bytes 10-73; some requestors check them, so when a route's
    `upstream_called_ae` rewrote the title on the way up, the client must not see the rewrite."""
    if len(ac) < _FIRST_ITEM or ac[0] != A_ASSOCIATE_AC:
        raise PduError("only a whole A-ASSOCIATE-AC repeats the Called AE title")
    if len(rq) < _FIRST_ITEM or rq[0] != A_ASSOCIATE_RQ:
        raise PduError("only a whole A-ASSOCIATE-RQ has a Called AE title to echo")
    return ac[: _CALLED_AE.start] + rq[_CALLED_AE] + ac[_CALLED_AE.stop :]
