"""What the proxy answers when it is the association's acceptor itself, on a store-and-forward
route: which presentation contexts it accepts, the A-ASSOCIATE-AC that says so, and which status a
request gets.

Why this module exists: on a relay route the upstream negotiates and the proxy only passes its AC
on; on a store-and-forward route the upstream may be down, so the proxy answers as a Storage SCP
(issue 14): Verification and every Storage SOP Class proposed (`uids.STORAGE_SOP_CLASSES`), each
with the first transfer syntax proposed for it, everything else refused with "abstract syntax not
supported"; its own Maximum Length, Implementation Class UID and version. The decisions are pure so
that they are tested with bytes, and the driver (`engine.storescp`) only carries them out.

What it must never do: touch sockets, files, trio or clocks; raise on a hostile RQ (it was parsed
and judged by `pdu` already) anything but a PduError.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.dimse import C_ECHO_RQ, C_STORE_RQ, VERIFICATION, Command
from dicom_tls_proxy.protocol.pdu_items import (
    DICOM_APPLICATION_CONTEXT,
    ITEM_APPLICATION_CONTEXT,
    ITEM_IMPLEMENTATION_CLASS_UID,
    ITEM_IMPLEMENTATION_VERSION_NAME,
    ITEM_MAX_LENGTH,
    ITEM_PRESENTATION_CONTEXT_AC,
    ITEM_TRANSFER_SYNTAX,
    ITEM_USER_INFORMATION,
    encode_item,
)
from dicom_tls_proxy.protocol.uids import STORAGE_SOP_CLASSES

ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3  # PS3.8 Table 9-18
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4
_FIXED = slice(pdu.HEADER_LENGTH + 4, pdu.HEADER_LENGTH + pdu.ASSOCIATE_MIN_LENGTH)  # AEs, reserved


@dataclass(frozen=True, slots=True)
class Context:
    """An accepted presentation context: what its messages are about and how data sets travel."""

    abstract_syntax: str
    transfer_syntax: str

    @property
    def verification(self) -> bool:
        return self.abstract_syntax == VERIFICATION


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The proxy's answer to an RQ: the AC to send and the contexts it accepted, by ID."""

    ac: bytes
    accepted: Mapping[int, Context]


def result_for(abstract_syntax: str, transfer_syntaxes: tuple[str, ...]) -> tuple[int, str]:
    """The result (PS3.8 Table 9-18) and transfer syntax answered to one proposed context."""
    if abstract_syntax != VERIFICATION and abstract_syntax not in STORAGE_SOP_CLASSES:
        return ABSTRACT_SYNTAX_NOT_SUPPORTED, transfer_syntaxes[0] if transfer_syntaxes else ""
    if not transfer_syntaxes:
        return TRANSFER_SYNTAXES_NOT_SUPPORTED, ""
    return ACCEPTANCE, transfer_syntaxes[0]


def negotiate(
    rq: pdu.AssociateRequest,
    *,
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> Negotiation:
    """Answer every proposed context of `rq` (`result_for`) in an AC that repeats the RQ's AE
    title fields byte for byte (PS3.8 Table 9-17) and carries the proxy's own user information."""
    items = bytearray(encode_item(ITEM_APPLICATION_CONTEXT, DICOM_APPLICATION_CONTEXT.encode()))
    accepted: dict[int, Context] = {}
    for pc in rq.presentation_contexts:
        result, ts = result_for(pc.abstract_syntax, pc.transfer_syntaxes)
        if result == ACCEPTANCE:
            accepted[pc.context_id] = Context(pc.abstract_syntax, ts)
        head = bytes([pc.context_id, 0, result, 0])
        sub = encode_item(ITEM_TRANSFER_SYNTAX, ts.encode("ascii")) if ts else b""
        items += encode_item(ITEM_PRESENTATION_CONTEXT_AC, head + sub)
    user = encode_item(ITEM_MAX_LENGTH, struct.pack(">I", max_pdu_length))
    user += encode_item(ITEM_IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode("ascii"))
    user += encode_item(ITEM_IMPLEMENTATION_VERSION_NAME, implementation_version_name.encode())
    items += encode_item(ITEM_USER_INFORMATION, user)
    body = struct.pack(">Hxx", 1) + rq.raw[_FIXED] + items
    return Negotiation(pdu.HEADER.pack(pdu.A_ASSOCIATE_AC, len(body)) + body, accepted)


@dataclass(frozen=True, slots=True)
class Echo:
    """Answer a C-ECHO-RQ: success."""


@dataclass(frozen=True, slots=True)
class Store:
    """Receive the data set of a C-STORE-RQ into the spool; its status comes from the spool."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the request with `status` at once (its data set, if one follows, is read and
    dropped); `why` says it in words for the log."""

    status: int
    why: str


def request_action(command: Command, context: Context) -> Echo | Store | Refuse:
    """What a request on an accepted `context` gets: a C-ECHO its success, a C-STORE of the
    context's SOP class a place in the spool; anything else (C-FIND on a storage context, a
    C-STORE of another SOP class than its context's) a failure status. A response, which the
    requestor never has to send here, is a protocol error (PduError: A-ABORT)."""
    if command.is_response:
        raise pdu.PduError(f"a DIMSE response (command field 0x{command.field:04x}) to no request")
    if command.field == C_ECHO_RQ and context.verification:
        return Echo()
    if command.field == C_STORE_RQ and not context.verification:
        if not command.has_data_set:
            return Refuse(0xC000, "a C-STORE-RQ without a data set")
        if command.sop_class != context.abstract_syntax:
            return Refuse(
                0x0122,
                f"a C-STORE-RQ of SOP class {command.sop_class} on the presentation context "
                f"accepted for {context.abstract_syntax}",
            )
        if not command.sop_instance:
            return Refuse(0xC000, "a C-STORE-RQ without an Affected SOP Instance UID")
        return Store()
    return Refuse(0x0211, f"command field 0x{command.field:04x} is not served on this route")
