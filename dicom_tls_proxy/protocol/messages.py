"""DIMSE messages in and out of P-DATA-TF PDUs (PS3.8 9.3.5 and Annex E): whole P-DATA-TFs become
events (a command set, a piece of a data set), and a message becomes the P-DATA-TFs that carry it
within the peer's maximum PDU length.

Why this module exists: a relay never looks inside a P-DATA-TF, but a store-and-forward route
answers C-ECHO and C-STORE itself and its forwarder sends C-STOREs, so both must cut messages into
fragments and join them again, by the same rules. A data set can be far larger than memory should
hold (a multi-frame study of hundreds of MB), so it is handed on piece by piece as it arrives, never
joined here; a command set is small and is joined, up to COMMAND_LIMIT.

What it must never do: touch sockets, files, trio or clocks; keep the PDUs it was given beyond the
events it returns (data pieces are views into the caller's PDU, valid while the caller keeps it); or
raise on hostile bytes anything but PduError. The rules it enforces (each a PduError, answered with
A-ABORT reason 6): a PDV on a presentation context that was not accepted; a command's fragments on
one context, all before its data set; data only after a command that announced a data set, on the
same context; a command set of at most COMMAND_LIMIT bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.dimse import Command, encode_p_data, parse_command
from dicom_tls_proxy.protocol.pdu_items import ItemError, pdv_items

COMMAND_LIMIT = 64 * 1024  # a command set is a few hundred bytes; beyond this it is not one
PDV_OVERHEAD = 6  # a PDV item's length (4), context ID and message control header
UNLIMITED_PDU = 1 << 20  # what "Maximum Length Received 0" (no limit) is sent as


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A whole command set arrived on `context_id`; its data set, if any, follows."""

    context_id: int
    command: Command


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A piece of the data set of the last command; `last` ends the message."""

    context_id: int
    data: memoryview
    last: bool


Event = CommandReceived | DataReceived


class MessageReader:
    """Joins the fragments of the messages one side sends, on the presentation contexts
    `contexts` (the accepted ones). Feed it whole P-DATA-TF PDUs in the order they came."""

    def __init__(self, contexts: Collection[int]) -> None:
        self.contexts = frozenset(contexts)
        self._command = bytearray()
        self._command_context: int | None = None  # a command is being joined on this context
        self._data_context: int | None = None  # the data set of this context's command is due

    @property
    def idle(self) -> bool:
        """Between messages: no command or data set is half received."""
        return self._command_context is None and self._data_context is None

    def feed(self, raw: bytes) -> list[Event]:
        """The events of one whole P-DATA-TF `raw`; PduError when it breaks a rule."""
        try:
            items = pdv_items(memoryview(raw), pdu.HEADER_LENGTH)
        except ItemError as exc:
            raise pdu.PduError(f"P-DATA-TF: {exc}") from None
        events: list[Event] = []
        for context, control, data in items:
            if context not in self.contexts:
                raise pdu.PduError(
                    f"a PDV on presentation context {context}, which was not accepted"
                )
            if control & 0x01:
                event = self._command_fragment(context, control, data)
                if event is not None:
                    events.append(event)
            else:
                events.append(self._data_fragment(context, control, data))
        return events

    def _command_fragment(self, context: int, control: int, data: memoryview) -> Event | None:
        if self._data_context is not None:
            raise pdu.PduError("a command fragment while a data set was due")
        if self._command_context not in (None, context):
            raise pdu.PduError(
                f"a command fragment on context {context} in the middle of a command on "
                f"context {self._command_context}"
            )
        self._command_context = context
        self._command += data
        if len(self._command) > COMMAND_LIMIT:
            raise pdu.PduError(f"a command set of over {COMMAND_LIMIT} bytes")
        if not control & 0x02:
            return None
        command = parse_command(bytes(self._command))
        self._command.clear()
        self._command_context = None
        if command.has_data_set:
            self._data_context = context
        return CommandReceived(context, command)

    def _data_fragment(self, context: int, control: int, data: memoryview) -> Event:
        if self._data_context is None:
            raise pdu.PduError("a data set fragment without a command that announced one")
        if context != self._data_context:
            raise pdu.PduError(
                f"a data set fragment on context {context}; its command came on "
                f"context {self._data_context}"
            )
        last = bool(control & 0x02)
        if last:
            self._data_context = None
        return DataReceived(context, data, last)


def fragments(
    context_id: int,
    payload: bytes | memoryview,
    max_pdu_length: int | None,
    *,
    command: bool,
    last: bool = True,
) -> Iterator[bytes]:
    """The P-DATA-TFs that carry `payload` on `context_id` to a peer whose Maximum Length Received
    is `max_pdu_length` (None or 0: no limit, sent in UNLIMITED_PDU pieces). With `last` False
    the final fragment does not end the message (a data set sent in several calls)."""
    limit = (max_pdu_length or UNLIMITED_PDU) - PDV_OVERHEAD
    if limit < 1:
        raise ValueError(f"a maximum PDU length of {max_pdu_length} cannot carry data")
    view = memoryview(payload)
    if not view:
        yield encode_p_data(context_id, b"", command=command, last=last)
        return
    for start in range(0, len(view), limit):
        piece = view[start : start + limit]
        final = last and start + limit >= len(view)
        yield encode_p_data(context_id, bytes(piece), command=command, last=final)
