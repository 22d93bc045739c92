"""The items inside PDUs: the variable items of an A-ASSOCIATE-RQ/AC (PS3.8 9.3.2-9.3.3, Annex D),
read, checked and encoded for the proxy's own probes, and the PDV items of a P-DATA-TF (9.3.5).

Why this module exists: the application context, presentation contexts and user information are
what an association negotiates, the larger half of the RQ and AC and of their rules. `pdu` owns
the PDU around them -- header, fixed fields, AE titles -- and `PduError`; it calls `parse_items`
for the variable part (and `pdv_items` for a P-DATA-TF) and turns an `ItemError` into a PduError
(A-ABORT reason 6, as for every malformed item). That is why this module raises its own error:
it sits below `pdu` and imports nothing of the package.

What it must never do: touch sockets, TLS, trio, clocks or logging; keep references to the buffers
it is given; or let hostile bytes raise anything but ItemError. Everything is a pure function or a
small frozen dataclass.

Where the standard and real peers disagree, the choices are (and tests pin them down):

* Variable items may come in any order. PS3.8 lists one Application Context item, one or more
  Presentation Context items and one User Information item, but does not require an order, and
  pynetdicom and dcm4che both accept any. Counts are enforced: exactly one 0x10, at least one
  0x20 in an RQ, at most one 0x50.
* A missing User Information item (0x50) is accepted: it only carries optional negotiation that the
  upstream can judge for itself, and the proxy does not need it. ``max_pdu_length`` is then None.
* An A-ASSOCIATE-AC may carry no presentation context: that is the requestor's problem, not ours.
* Unknown variable items are kept in ``unknown_items``; unknown sub-items of a presentation context
  are skipped (they stay in the PDU's ``raw``, which is what gets forwarded).
* Item lengths are judged strictly (every one must fit exactly). The UIDs that negotiation uses
  (application context, abstract and transfer syntaxes) must be printable ASCII: they end up in
  logs, and a newline in one would forge a log line. Trailing NULs and spaces are padding. Context
  IDs and results are reported as given.
* The implementation class UID and version name are shown but not judged: they are decoded
  leniently, anything unprintable becomes ``?``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

B = TypeVar("B", bytes, memoryview)

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

# Variable items and sub-items share this layout: type, reserved byte, 2-byte length.
ITEM_HEADER: Final = struct.Struct(">BxH")
# Byte -> itself if printable ASCII, else "?": for fields we must show but may not judge.
_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else 0x3F for b in range(256))


class ItemError(ValueError):
    """The variable items are malformed; the message says how. `pdu` re-raises it as PduError."""


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


class Negotiated:
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
        value = first_user_item(self.user_items, ITEM_MAX_LENGTH)
        return None if value is None or len(value) != 4 else int.from_bytes(value, "big")

    @property
    def implementation_class_uid(self) -> str | None:
        """Implementation Class UID (0x52), or None if absent."""
        value = first_user_item(self.user_items, ITEM_IMPLEMENTATION_CLASS_UID)
        return None if value is None else lenient_text(value)

    @property
    def implementation_version_name(self) -> str | None:
        """Implementation Version Name (0x55), or None if absent."""
        value = first_user_item(self.user_items, ITEM_IMPLEMENTATION_VERSION_NAME)
        return None if value is None else lenient_text(value)


@dataclass(frozen=True, slots=True)
class VariableItems:
    """The variable part of an RQ (its contexts are ``proposed``) or an AC (``answered``)."""

    application_context: str
    proposed: tuple[PresentationContextItem, ...]
    answered: tuple[PresentationContextResult, ...]
    user_items: tuple[UserItem, ...]
    unknown_items: tuple[tuple[int, bytes], ...]


def parse_items(raw: bytes, start: int, *, request: bool, name: str) -> VariableItems:
    """The variable items filling ``raw[start:]``, those of an A-ASSOCIATE-RQ if ``request``,
    else of an -AC; ``name`` is the PDU's, for the messages. ItemError when malformed."""
    app_context: str | None = None
    user_items: tuple[UserItem, ...] | None = None
    context_spans: list[tuple[int, int]] = []
    unknown: list[tuple[int, bytes]] = []
    context_type = ITEM_PRESENTATION_CONTEXT_RQ if request else ITEM_PRESENTATION_CONTEXT_AC
    for item_type, begin, end in _items(raw, start, len(raw), f"the {name}"):
        if item_type == ITEM_APPLICATION_CONTEXT:
            if app_context is not None:
                raise ItemError(f"{name} has more than one application context item")
            app_context = _uid(raw[begin:end], "application context name")
        elif item_type == context_type:
            context_spans.append((begin, end))
        elif item_type == ITEM_USER_INFORMATION:
            if user_items is not None:
                raise ItemError(f"{name} has more than one user information item")
            user_items = _parse_user_info(raw, begin, end)
        else:
            unknown.append((item_type, raw[begin:end]))
    if app_context is None:
        raise ItemError(f"{name} has no application context item")
    proposed: tuple[PresentationContextItem, ...] = ()
    answered: tuple[PresentationContextResult, ...] = ()
    if request:
        if not context_spans:
            raise ItemError(f"{name} proposes no presentation context")
        proposed = tuple(_parse_context_rq(raw, s, e) for s, e in context_spans)
    else:
        answered = tuple(_parse_context_ac(raw, s, e) for s, e in context_spans)
    return VariableItems(app_context, proposed, answered, user_items or (), tuple(unknown))


def _items(raw: bytes, pos: int, end: int, where: str) -> Iterator[tuple[int, int, int]]:
    """Yield (item_type, value_start, value_end) of the items filling raw[pos:end] exactly.

    Variable items and sub-items share this layout: type, reserved byte, 2-byte length.
    """
    while pos < end:
        if end - pos < ITEM_HEADER.size:
            raise ItemError(f"{end - pos} stray bytes at the end of {where}")
        item_type, length = ITEM_HEADER.unpack_from(raw, pos)
        pos += ITEM_HEADER.size
        if pos + length > end:
            raise ItemError(f"item 0x{item_type:02x} length {length} runs past the end of {where}")
        yield item_type, pos, pos + length
        pos += length


def _parse_context_rq(raw: bytes, start: int, end: int) -> PresentationContextItem:
    if end - start < 4:
        raise ItemError(f"presentation context item length {end - start} is less than 4")
    context_id = raw[start]
    where = f"presentation context {context_id}"
    abstract: str | None = None
    transfers: list[str] = []
    for sub_type, s, e in _items(raw, start + 4, end, where):
        if sub_type == ITEM_ABSTRACT_SYNTAX:
            if abstract is not None:
                raise ItemError(f"{where} has more than one abstract syntax")
            abstract = _uid(raw[s:e], f"abstract syntax of {where}")
        elif sub_type == ITEM_TRANSFER_SYNTAX:
            transfers.append(_uid(raw[s:e], f"transfer syntax of {where}"))
    if abstract is None:
        raise ItemError(f"{where} has no abstract syntax")
    if not transfers:
        raise ItemError(f"{where} has no transfer syntax")
    return PresentationContextItem(context_id, abstract, tuple(transfers))


def _parse_context_ac(raw: bytes, start: int, end: int) -> PresentationContextResult:
    if end - start < 4:
        raise ItemError(f"presentation context item length {end - start} is less than 4")
    context_id, result = raw[start], raw[start + 2]
    where = f"presentation context {context_id}"
    transfers = [
        (s, e) for t, s, e in _items(raw, start + 4, end, where) if t == ITEM_TRANSFER_SYNTAX
    ]
    if result != 0:  # the transfer syntax "shall not be tested" (PS3.8 Table 9-18)
        return PresentationContextResult(context_id, result, None)
    if len(transfers) != 1:
        raise ItemError(f"accepted {where} has {len(transfers)} transfer syntaxes, must be 1")
    s, e = transfers[0]
    return PresentationContextResult(context_id, 0, _uid(raw[s:e], f"transfer syntax of {where}"))


def _parse_user_info(raw: bytes, start: int, end: int) -> tuple[UserItem, ...]:
    items = []
    for sub_type, s, e in _items(raw, start, end, "the user information item"):
        value = raw[s:e]
        if sub_type == ITEM_MAX_LENGTH and len(value) != 4:
            raise ItemError(f"maximum length sub-item has length {len(value)}, must be 4")
        items.append(UserItem(sub_type, value))
    return tuple(items)


def _uid(value: bytes, what: str) -> str:
    """Decode a UID: printable ASCII, trailing NULs and spaces are padding."""
    value = value.rstrip(b"\x00 ")
    if not value:
        raise ItemError(f"{what} is empty")
    if not (value.isascii() and value.decode("ascii").isprintable()):
        raise ItemError(f"{what} {value[:64]!r} is not printable ASCII")
    return value.decode("ascii")


def first_user_item(items: tuple[UserItem, ...], item_type: int) -> bytes | None:
    """The value of the first sub-item of ``item_type``, or None."""
    return next((item.value for item in items if item.item_type == item_type), None)


def lenient_text(value: bytes) -> str:
    """Printable ASCII for fields that must be shown but not judged; unprintables become '?'."""
    return value.rstrip(b"\x00 ").translate(_PRINTABLE).decode("ascii").strip()


def encode_item(item_type: int, value: bytes) -> bytes:
    """One item or sub-item: its header, then ``value``."""
    return ITEM_HEADER.pack(item_type, len(value)) + value


def encode_request_items(
    contexts: Sequence[PresentationContextItem],
    *,
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str = "",
    application_context: str = DICOM_APPLICATION_CONTEXT,
) -> bytes:
    """The variable items of an A-ASSOCIATE-RQ: application context, the presentation contexts
    and the user information (maximum length, implementation class UID and version name)."""
    items = bytearray(encode_item(ITEM_APPLICATION_CONTEXT, application_context.encode("ascii")))
    for pc in contexts:
        sub = encode_item(ITEM_ABSTRACT_SYNTAX, pc.abstract_syntax.encode("ascii"))
        for ts in pc.transfer_syntaxes:
            sub += encode_item(ITEM_TRANSFER_SYNTAX, ts.encode("ascii"))
        items += encode_item(ITEM_PRESENTATION_CONTEXT_RQ, bytes([pc.context_id, 0, 0, 0]) + sub)
    user = encode_item(ITEM_MAX_LENGTH, struct.pack(">I", max_pdu_length))
    user += encode_item(ITEM_IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode("ascii"))
    if implementation_version_name:
        version = implementation_version_name.encode("ascii")
        user += encode_item(ITEM_IMPLEMENTATION_VERSION_NAME, version)
    items += encode_item(ITEM_USER_INFORMATION, user)
    return bytes(items)


def pdv_items(raw: B, start: int) -> list[tuple[int, int, B]]:
    """The presentation-data-value items of a whole P-DATA-TF ``raw`` whose header ends at
    ``start``, as (context id, message control header, data); each PDV item is a 4-byte length,
    then at least the context ID and the message control header. ItemError when malformed.
    Given a memoryview, the data are views into it (a data set's pieces are not copied)."""
    pos, end = start, len(raw)
    if pos == end:
        raise ItemError("P-DATA-TF carries no PDV item")
    out: list[tuple[int, int, B]] = []
    while pos < end:
        if end - pos < 4:
            raise ItemError(f"PDV item header truncated at offset {pos}")
        (length,) = struct.unpack_from(">I", raw, pos)
        if length < 2:
            raise ItemError(f"PDV item at offset {pos} has length {length}, less than 2")
        if pos + 4 + length > end:
            raise ItemError(f"PDV item length {length} runs past the end of the PDU")
        out.append((raw[pos + 4], raw[pos + 5], raw[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return out
