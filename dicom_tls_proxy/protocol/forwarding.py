"""What the store-and-forward forwarder proposes to an upstream, and what each spooled instance
becomes once the upstream answered: sent as it is, sent converted, or refused for good.

Why this exists: the decisions of forwarding are rules of DICOM negotiation (PS3.8 9.3.3, Table
9-18) and of issue 14 ("if the upstream does not accept the instance's transfer syntax but accepts
an uncompressed one, an uncompressed instance is converted; a compressed one goes to failed/"),
and they are tested with plain values here; `engine.forwarder` only carries them out.

One presentation context is proposed per SOP class and transfer syntax in the batch: the
instance's own syntax first, then, for a native (uncompressed or deflated) one, explicit and
implicit VR little endian, which pydicom can rewrite it in. At most MAX_CONTEXTS contexts (odd IDs
1 to 255, PS3.8 9.3.2.2) go in one RQ; `batch` stops adding instances before that.

What it must never do: touch sockets, files, trio or clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem
from dicom_tls_proxy.protocol.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    UNCOMPRESSED,
    uid_name,
)

MAX_CONTEXTS = 128
CONVERTIBLE = frozenset({*UNCOMPRESSED, DEFLATED_EXPLICIT_VR_LE})
RESULTS = {  # PS3.8 Table 9-18, in the words of a failed/ reason
    1: "rejected it (user rejection)",
    2: "rejected it (no reason given)",
    3: "does not support the SOP class (abstract syntax not supported)",
    4: "accepts none of the transfer syntaxes offered (transfer syntaxes not supported)",
}

Kind = tuple[str, str]  # (SOP class, transfer syntax) of an instance


def offered(transfer_syntax: str) -> tuple[str, ...]:
    """The transfer syntaxes proposed for an instance in `transfer_syntax`, its own first."""
    if transfer_syntax not in CONVERTIBLE:
        return (transfer_syntax,)
    others = [ts for ts in (EXPLICIT_VR_LE, IMPLICIT_VR_LE) if ts != transfer_syntax]
    return (transfer_syntax, *others)


def batch(kinds: Sequence[Kind], limit: int) -> int:
    """How many of `kinds` (oldest first) go in one association: at most `limit`, and no more
    distinct kinds than MAX_CONTEXTS."""
    seen: set[Kind] = set()
    for n, kind in enumerate(kinds[:limit]):
        seen.add(kind)
        if len(seen) > MAX_CONTEXTS:
            return n
    return min(len(kinds), limit)


@dataclass(frozen=True)
class Proposal:
    """The presentation contexts of the forwarder's RQ, and which one carries which kind."""

    contexts: tuple[PresentationContextItem, ...]
    ids: dict[Kind, int]

    @classmethod
    def of(cls, kinds: Sequence[Kind]) -> Proposal:
        ids: dict[Kind, int] = {}
        contexts = []
        for kind in dict.fromkeys(kinds):
            context_id = 2 * len(ids) + 1
            ids[kind] = context_id
            contexts.append(PresentationContextItem(context_id, kind[0], offered(kind[1])))
        return cls(tuple(contexts), ids)


@dataclass(frozen=True, slots=True)
class Send:
    """Send the instance on `context_id` in `transfer_syntax` (converted when it is not the
    instance's own)."""

    context_id: int
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """The upstream refused this kind of instance in its AC: to failed/, for `reason`."""

    reason: str


def plan(accept: pdu.AssociateAccept, proposal: Proposal, kind: Kind) -> Send | Refuse:
    """What becomes of an instance of `kind` on an association the upstream accepted with
    `accept`."""
    context_id = proposal.ids[kind]
    answer = next((pc for pc in accept.presentation_contexts if pc.context_id == context_id), None)
    sop_class, own = kind
    what = f"{uid_name(sop_class)} in {uid_name(own)}"
    if answer is None:
        return Refuse(f"the upstream did not answer the presentation context for {what}")
    if answer.result != 0:
        words = RESULTS.get(answer.result, f"refused it (result {answer.result})")
        if answer.result == 4 and own not in CONVERTIBLE:
            words += f"; {uid_name(own)} is compressed and is not converted"
        return Refuse(f"the upstream {words}: {what}")
    chosen = answer.transfer_syntax or ""
    if chosen == own or (chosen in CONVERTIBLE and own in CONVERTIBLE and chosen in offered(own)):
        return Send(context_id, chosen)
    return Refuse(
        f"the upstream accepted {what} in {uid_name(chosen)}, which was not offered for it"
    )
