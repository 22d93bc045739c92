"""One association's life as one model, sans-I/O: the states it passes through, the steps that move
it, and for every way it can end, what that ending is called and what each side gets on the wire.

Why a model of its own (as h11's `_state.py` is for HTTP): the connection driver used to decide
outcomes in its control flow, in five places that had started to disagree. Here every state change
is one row of `TRANSITIONS` and every ending one row of `ENDINGS`; the driver only reports what
happened and carries out what it is told. Logs, metrics, the audit trail, the README's refusal
table and the tests all read the same rows.

This module must stay pure: no trio, no sockets, no clock. It never sends anything itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.pdu import Abort
from dicom_tls_proxy.protocol.pdu import AssociateReject as Reject
from dicom_tls_proxy.protocol.vocabulary import Outcome, Reason


class State(enum.Enum):
    ACCEPTED = "accepted"  # TCP accepted: nothing read yet (listener allow_source, per-IP limit)
    AWAITING_RQ = "awaiting-rq"  # TLS handshake and a complete first PDU (handshake_timeout)
    ROUTING = "routing"  # the A-ASSOCIATE-RQ is parsed: route, allow lists, max_connections
    CONNECTING = "connecting"  # TCP (and TLS) to the upstream (connect_timeout)
    AWAITING_AC = "awaiting-ac"  # the RQ went upstream: its answer is awaited (associate_timeout)
    RELAYING = "relaying"  # the A-ASSOCIATE-AC went to the client: bytes both ways (idle_timeout)
    SERVING = "serving"  # store-and-forward: the proxy's own AC went out; it answers (idle_timeout)
    ENDED = "ended"


class Step(enum.Enum):
    """What moves an association forward; every way back or out is an ending."""

    ADMITTED = "admitted"  # passed the checks at accept
    REQUEST = "request"  # a well-formed A-ASSOCIATE-RQ arrived (plaintext allowed where it came)
    ROUTED = "routed"  # a route admits it, and there is room
    CONNECTED = "connected"  # the upstream connection is up; the RQ is forwarded
    ACCEPTED = "accepted"  # the upstream's A-ASSOCIATE-AC was relayed to the client
    SERVED = "served"  # a store-and-forward route admits it: the proxy accepts it itself


TRANSITIONS: dict[tuple[State, Step], State] = {
    (State.ACCEPTED, Step.ADMITTED): State.AWAITING_RQ,
    (State.AWAITING_RQ, Step.REQUEST): State.ROUTING,
    (State.ROUTING, Step.ROUTED): State.CONNECTING,
    (State.CONNECTING, Step.CONNECTED): State.AWAITING_AC,
    (State.AWAITING_AC, Step.ACCEPTED): State.RELAYING,
    (State.ROUTING, Step.SERVED): State.SERVING,
}


@dataclass(frozen=True, slots=True)
class Close:
    """No PDU is possible or appropriate: the connection is closed. `graceful`: our write side
    is shut first and what the peer still sends is read (briefly), so that a peer that waits for
    our answer sees an orderly end; not where TLS already said it (an alert) or nothing was read."""

    graceful: bool = False


@dataclass(frozen=True, slots=True)
class Relayed:
    """The other side's own PDU (an upstream's RJ, either side's A-ABORT) went through as sent."""


Answer = Reject | Abort | Close | Relayed | None  # None: nothing is said to that side


@dataclass(frozen=True, slots=True)
class Ending:
    """How an association ended: the outcome logged, and what the client and the upstream get."""

    outcome: Outcome
    client: Answer
    upstream: Abort | Relayed | None = None


ABORT = Abort(2, 0)  # service provider, reason not specified
NO_UPSTREAM = Reject(2, 3, 1)  # transient, presentation provider, temporary congestion

# The table: every reason, what it means on the wire. A refusal in state ACCEPTED (nothing read
# yet) is always a plain close (`ending`); the upstream hears from us only once it got the RQ.
ENDINGS: dict[Reason, Ending] = {
    Reason.RELEASED: Ending(Outcome.COMPLETED, None),
    Reason.NO_ROUTE: Ending(Outcome.REJECTED, Reject(1, 1, 7)),
    Reason.CALLING_AE_NOT_ALLOWED: Ending(Outcome.REJECTED, Reject(1, 1, 3)),
    Reason.PEER_NOT_ALLOWED: Ending(Outcome.REJECTED, Reject(1, 1, 1)),
    Reason.SOURCE_NOT_ALLOWED: Ending(Outcome.REJECTED, Reject(1, 1, 1)),
    Reason.PLAINTEXT_ON_TLS: Ending(Outcome.REJECTED, Reject(1, 1, 1)),
    Reason.PROTOCOL_VERSION: Ending(Outcome.REJECTED, Reject(1, 2, 2)),
    Reason.UPSTREAM_UNREACHABLE: Ending(Outcome.REJECTED, NO_UPSTREAM),
    Reason.UPSTREAM_TIMEOUT: Ending(Outcome.REJECTED, NO_UPSTREAM),
    Reason.UPSTREAM_TLS_FAILED: Ending(Outcome.REJECTED, NO_UPSTREAM, ABORT),
    Reason.UPSTREAM_NO_ANSWER: Ending(Outcome.REJECTED, NO_UPSTREAM, ABORT),
    Reason.UPSTREAM_REJECTED: Ending(Outcome.REJECTED, Relayed()),
    Reason.TOO_MANY_ASSOCIATIONS: Ending(Outcome.REJECTED, Reject(2, 3, 2)),
    Reason.UNRECOGNIZED_PDU: Ending(Outcome.ABORTED, Abort(2, 1)),
    Reason.UNEXPECTED_PDU: Ending(Outcome.ABORTED, Abort(2, 2)),
    Reason.INVALID_PDU: Ending(Outcome.ABORTED, Abort(2, 6)),
    Reason.HANDSHAKE_TIMEOUT: Ending(Outcome.TIMED_OUT, Close(graceful=True)),
    Reason.IDLE_TIMEOUT: Ending(Outcome.TIMED_OUT, ABORT, ABORT),
    Reason.CLIENT_CLOSED: Ending(Outcome.ABORTED, None, ABORT),
    Reason.UPSTREAM_CLOSED: Ending(Outcome.ABORTED, ABORT),
    Reason.CLIENT_ABORTED: Ending(Outcome.ABORTED, None, Relayed()),
    Reason.UPSTREAM_ABORTED: Ending(Outcome.ABORTED, Relayed()),
    Reason.TLS_UNTRUSTED: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_THUMBPRINT_MISMATCH: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_EXPIRED: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_NOT_YET_VALID: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_REVOKED: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_CRL_STALE: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_WEAK_CERTIFICATE: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_WRONG_USAGE: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_NO_CERTIFICATE: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_NAME_MISMATCH: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_PROTOCOL: Ending(Outcome.TLS_FAILED, Close()),
    Reason.TLS_ON_PLAINTEXT: Ending(Outcome.REFUSED, Close()),
    Reason.SHUTDOWN: Ending(Outcome.ABORTED, ABORT, ABORT),
    Reason.INTERNAL_ERROR: Ending(Outcome.ABORTED, ABORT, ABORT),
}

# Mid-association, an invalid PDU is not passed on; neither side gets a reason that would blame
# it for what the other one sent, so both get the unspecified A-ABORT.
RELAYING_ENDINGS: dict[Reason, Ending] = {
    Reason.INVALID_PDU: Ending(Outcome.ABORTED, ABORT, ABORT),
}

BEFORE_ANY_BYTE = Ending(Outcome.REFUSED, Close())  # closed at accept: no TLS byte, no PDU
UPSTREAM_HEARS = frozenset({State.AWAITING_AC, State.RELAYING})  # it has our RQ: it may get PDUs


def ending(state: State, reason: Reason) -> Ending:
    """What an association that ends in `state` for `reason` does."""
    if state is State.ACCEPTED:
        return BEFORE_ANY_BYTE
    row = RELAYING_ENDINGS.get(reason) if state is State.RELAYING else None
    row = row or ENDINGS[reason]
    if row.upstream is not None and state not in UPSTREAM_HEARS:
        return Ending(row.outcome, row.client)
    return row


def wire(answer: Answer) -> bytes:
    """The PDU an answer sends (b"" for a close, a relayed PDU or silence)."""
    if isinstance(answer, Reject):
        return pdu.encode_reject(answer.result, answer.source, answer.reason)
    if isinstance(answer, Abort):
        return pdu.encode_abort(answer.source, answer.reason)
    return b""


@dataclass(frozen=True, slots=True)
class RelayFacts:
    """What the relay saw when it stopped; `relay_reason` names it."""

    client_aborted: bool = False
    upstream_aborted: bool = False
    released: bool = False  # an A-RELEASE-RP went through, either way
    invalid: bool = False  # a side sent an invalid PDU (not passed on)
    idle: bool = False  # the idle deadline passed
    stopping: bool = False  # ... while the proxy drains: that is the drain_timeout
    client_closed: bool = False  # the client's side closed (not our write to it failing)


def relay_reason(facts: RelayFacts) -> Reason:
    """Why a relayed association ended, in order of precedence: an A-ABORT says most, then a
    release, then our own verdicts, then whichever side went away."""
    if facts.client_aborted:
        return Reason.CLIENT_ABORTED
    if facts.upstream_aborted:
        return Reason.UPSTREAM_ABORTED
    if facts.released:
        return Reason.RELEASED
    if facts.invalid:
        return Reason.INVALID_PDU
    if facts.idle:
        return Reason.SHUTDOWN if facts.stopping else Reason.IDLE_TIMEOUT
    if facts.client_closed:
        return Reason.CLIENT_CLOSED
    return Reason.UPSTREAM_CLOSED


@dataclass(frozen=True, slots=True)
class Forward:
    """The upstream accepted: these bytes go to the client, and the association is up."""

    answer: bytes


@dataclass(frozen=True, slots=True)
class Stop:
    """The association ends for `reason`; `detail` says why in words."""

    reason: Reason
    detail: str = ""


def upstream_answer(
    answer: bytes, client_rq: bytes, *, called_ae_rewritten: bool
) -> Forward | Stop:
    """Judge the upstream's first PDU. An AC goes to the client carrying the Called AE the client
    asked for, byte for byte, when `upstream_called_ae` rewrote it on the way up; an RJ or an
    A-ABORT goes through as sent; anything else is no answer."""
    try:
        parsed = pdu.parse_pdu(answer)
    except pdu.PduError as exc:
        return Stop(Reason.UPSTREAM_NO_ANSWER, f"the upstream answered with an invalid PDU: {exc}")
    if isinstance(parsed, pdu.AssociateAccept):
        if called_ae_rewritten:
            answer = pdu.echo_called_ae(answer, client_rq)
        return Forward(answer)
    if isinstance(parsed, pdu.AssociateReject):
        return Stop(
            Reason.UPSTREAM_REJECTED,
            f"upstream rejected: result {parsed.result}, source {parsed.source}, "
            f"reason {parsed.reason}",
        )
    if isinstance(parsed, pdu.Abort):
        return Stop(
            Reason.UPSTREAM_ABORTED,
            f"upstream aborted: source {parsed.source}, reason {parsed.reason}",
        )
    return Stop(Reason.UPSTREAM_NO_ANSWER, f"the upstream answered with {type(parsed).__name__}")


class StateError(Exception):
    """A step the table has no row for: a bug in the driver, never the peer's doing."""


class Association:
    """One association's state; the driver tells it each step and asks it how to end."""

    __slots__ = ("ended", "state")

    def __init__(self) -> None:
        self.state = State.ACCEPTED
        self.ended: Ending | None = None

    def step(self, step: Step) -> None:
        try:
            self.state = TRANSITIONS[(self.state, step)]
        except KeyError:
            raise StateError(f"{step.value} in state {self.state.value}") from None

    def end(self, reason: Reason) -> Ending:
        """The association ends here, for `reason`: its ending, decided once."""
        if self.ended is None:
            self.ended = ending(self.state, reason)
            self.state = State.ENDED
        return self.ended
