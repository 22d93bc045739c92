"""DIMSE command sets (PS3.7) as they travel in P-DATA-TF PDUs: build and read the C-ECHO and
C-STORE requests and responses, and the names and meaning of commands and statuses.

Why this module exists: the proxy relays DIMSE messages without reading them, but three parts of it
speak DIMSE themselves: its probe (`echo`: the `dicom-tls-proxy echo` command and the route health
checks) sends a C-ECHO-RQ and must tell a C-ECHO-RSP from anything else a server may answer; a
store-and-forward route answers C-ECHO and C-STORE requests itself; and its forwarder sends
C-STORE-RQs and judges the statuses it gets back (`store_disposition`). That is PS3.7's business,
one layer above `pdu` (PS3.8), and tests build their peers' messages with the same functions.

What it must never do: touch sockets, TLS, trio, clocks or logging; decide what the probe or the
forwarder does about an answer; or raise on a hostile command set anything but PduError or
NotEchoResponse. Only command sets are handled here (implicit VR little endian, PS3.7 6.3.1); a
data set is bytes to this module, and the spool's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Literal

from dicom_tls_proxy.protocol.pdu import HEADER, P_DATA_TF, PduError

VERIFICATION: Final = "1.2.840.10008.1.1"  # the Verification SOP Class, C-ECHO's
# PS3.7 Table E.1-1: the command field of a request; its response has bit 15 set.
DIMSE_COMMANDS: Final = {
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
C_ECHO_RSP: Final = 0x8030
ECHO_STATUSES: Final = {  # PS3.7 9.1.5.1.4 and Annex C
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
}
C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_ECHO_RQ: Final = 0x0030
AFFECTED_SOP_CLASS: Final = 0x00000002
COMMAND_FIELD: Final = 0x00000100
MESSAGE_ID: Final = 0x00000110
RESPONDED_TO: Final = 0x00000120  # Message ID Being Responded To
PRIORITY: Final = 0x00000700
DATA_SET_TYPE: Final = 0x00000800
STATUS: Final = 0x00000900
AFFECTED_SOP_INSTANCE: Final = 0x00001000
NO_DATA_SET: Final = 0x0101  # Command Data Set Type: no data set follows

SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700  # Refused: out of resources (PS3.4 Table B.2-1)
CANNOT_UNDERSTAND: Final = 0xC000  # Error: cannot understand
UNRECOGNIZED_OPERATION: Final = 0x0211
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
# What the forwarder does with an instance after the upstream's C-STORE-RSP (issue 14, PS3.4 B.2.3)
Disposition = Literal["delivered", "retry", "failed"]


class NotEchoResponse(Exception):
    """A P-DATA-TF that is no C-ECHO-RSP; the message says what it is instead, in words."""


def encode_p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF carrying one PDV (PS3.8 9.3.5 and Annex E.2)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return HEADER.pack(P_DATA_TF, len(pdv)) + pdv


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """The C-ECHO-RQ command set, implicit VR little endian (PS3.7 9.3.5)."""
    return _command_set(
        [
            (AFFECTED_SOP_CLASS, VERIFICATION.encode()),
            (COMMAND_FIELD, struct.pack("<H", C_ECHO_RQ)),
            (MESSAGE_ID, struct.pack("<H", message_id)),
            (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        ]
    )


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a command set that the proxy acts on. `message_id` is the Message ID of a
    request, or the Message ID Being Responded To of a response."""

    field: int
    message_id: int
    sop_class: str = ""
    sop_instance: str = ""
    has_data_set: bool = False
    status: int | None = None

    @property
    def is_response(self) -> bool:
        return bool(self.field & 0x8000)


def _us(fields: dict[int, bytes], tag: int) -> int | None:
    value = fields.get(tag, b"")
    return int(struct.unpack("<H", value[:2])[0]) if len(value) >= 2 else None


def _text(fields: dict[int, bytes], tag: int) -> str:
    return fields.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")


def parse_command(data: bytes) -> Command:
    """A command set's fields; PduError when it does not parse or has no command field."""
    fields = command_fields(data)
    field = _us(fields, COMMAND_FIELD)
    if field is None:
        raise PduError("a command set without a command field (0000,0100)")
    responded = _us(fields, RESPONDED_TO)
    message_id = responded if field & 0x8000 and responded is not None else _us(fields, MESSAGE_ID)
    return Command(
        field=field,
        message_id=message_id or 0,
        sop_class=_text(fields, AFFECTED_SOP_CLASS),
        sop_instance=_text(fields, AFFECTED_SOP_INSTANCE),
        has_data_set=_us(fields, DATA_SET_TYPE) not in (None, NO_DATA_SET),
        status=_us(fields, STATUS),
    )


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1); a data set follows it."""
    return _command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class.encode("ascii")),
            (COMMAND_FIELD, struct.pack("<H", C_STORE_RQ)),
            (MESSAGE_ID, struct.pack("<H", message_id)),
            (PRIORITY, struct.pack("<H", priority)),
            (DATA_SET_TYPE, struct.pack("<H", 0x0000)),
            (AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")),
        ]
    )


def response(request: Command, status: int) -> bytes:
    """The response command set to `request` (a C-ECHO-RSP, a C-STORE-RSP, or any request's
    failure response): its command field with bit 15 set, no data set, `status`, and the affected
    SOP class and instance when the request named them (PS3.7 9.3)."""
    elements = []
    if request.sop_class:
        elements.append((AFFECTED_SOP_CLASS, request.sop_class.encode("ascii")))
    elements += [
        (COMMAND_FIELD, struct.pack("<H", (request.field | 0x8000) & 0xFFFF)),
        (RESPONDED_TO, struct.pack("<H", request.message_id)),
        (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        (STATUS, struct.pack("<H", status)),
    ]
    if request.sop_instance:
        elements.append((AFFECTED_SOP_INSTANCE, request.sop_instance.encode("ascii")))
    return _command_set(elements)


def store_disposition(status: int) -> Disposition:
    """What a C-STORE-RSP status means for the instance (PS3.4 Table B.2-1, PS3.7 Annex C):
    Success and the Warnings (0x0001, 0xBxxx) delivered it; Refused: out of resources (0xA7xx) and
    a processing failure (0x0110) are worth another try later; everything else (0xA9xx data set
    does not match, 0xCxxx cannot understand, 0x0122 SOP class not supported, 0x0124 not
    authorized, other general failures) refuses this instance for good."""
    if status == SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "delivered"
    if 0xA700 <= status <= 0xA7FF or status == 0x0110:
        return "retry"
    return "failed"


def command_fields(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (implicit VR LE); raises PduError when it does not parse."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if pos + 8 + length > len(data):
            raise PduError(f"command element ({group:04x},{element:04x}) is truncated")
        out[(group << 16) | element] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def echo_status(command: bytes) -> int:
    """The status of a whole command set if it is a C-ECHO-RSP; else NotEchoResponse."""
    try:
        fields = command_fields(command)
    except PduError as exc:
        raise NotEchoResponse(
            f"a command set that does not parse ({exc}), not a C-ECHO-RSP"
        ) from None
    field = fields.get(COMMAND_FIELD, b"")
    if len(field) < 2:
        raise NotEchoResponse("a command set without a command field, not a C-ECHO-RSP")
    kind = struct.unpack("<H", field[:2])[0]
    if kind != C_ECHO_RSP:
        raise NotEchoResponse(f"{describe_command(kind)}, not a C-ECHO-RSP")
    status = fields.get(STATUS, b"")
    if len(status) < 2:
        raise NotEchoResponse("a C-ECHO-RSP without a status")
    return int(struct.unpack("<H", status[:2])[0])


def describe_status(status: int) -> str:
    """A DIMSE status, with the words for the ones a C-ECHO or a C-STORE can get."""
    if status in ECHO_STATUSES:
        words = ECHO_STATUSES[status]
    elif 0xA700 <= status <= 0xA7FF:
        words = "refused: out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        words = "error: data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        words = "error: cannot understand"
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
