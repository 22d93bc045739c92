"""DIMSE messages (PS3.7) as they travel in P-DATA-TF PDUs: the command set of a C-ECHO-RQ, the
reading of a command set, and the names of commands and statuses.

Why this module exists: the proxy relays DIMSE messages without reading them, but its own probe
(`echo`: the `dicom-tls-proxy echo` command and the route health checks) sends a C-ECHO-RQ and must
tell a C-ECHO-RSP from anything else a server may answer. That is PS3.7's business, one layer
above `pdu` (PS3.8), and tests build their peers' messages with the same functions.

What it must never do: touch sockets, TLS, trio, clocks or logging; decide what the probe does
about an answer (that is `echo`'s); or raise on a hostile command set anything but PduError or
NotEchoResponse. Only the command set is handled (implicit VR little endian, PS3.7 6.3.1): data
sets are relayed, never read.
"""

from __future__ import annotations

import struct
from typing import Final

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
COMMAND_FIELD: Final = 0x00000100
STATUS: Final = 0x00000900


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
    body = (
        _element(0x00000002, VERIFICATION.encode())
        + _element(COMMAND_FIELD, struct.pack("<H", 0x0030))
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
