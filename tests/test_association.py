"""The association model, without sockets: every transition, every ending, every row of the table,
and the README's refusal table read against it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.association import (
    ABORT,
    BEFORE_ANY_BYTE,
    ENDINGS,
    TRANSITIONS,
    Association,
    Close,
    Ending,
    Forward,
    Relayed,
    RelayFacts,
    State,
    StateError,
    Step,
    Stop,
    ending,
    relay_reason,
    upstream_answer,
    wire,
)
from dicom_tls_proxy.protocol.pdu import Abort
from dicom_tls_proxy.protocol.pdu import AssociateReject as Reject
from dicom_tls_proxy.protocol.vocabulary import TLS_REASONS, Outcome, Reason
from tests.support import build_ac, build_rq

HAPPY_PATH = [
    (Step.ADMITTED, State.AWAITING_RQ),
    (Step.REQUEST, State.ROUTING),
    (Step.ROUTED, State.CONNECTING),
    (Step.CONNECTED, State.AWAITING_AC),
    (Step.ACCEPTED, State.RELAYING),
]


def test_the_happy_path_walks_every_state_once() -> None:
    association = Association()
    assert association.state is State.ACCEPTED
    for step, state in HAPPY_PATH:
        association.step(step)
        assert association.state is state
    assert len(TRANSITIONS) == len(HAPPY_PATH) + len(STORE_PATH)


# A store-and-forward route: the proxy accepts the association itself once routed.
STORE_PATH = [(Step.SERVED, State.SERVING)]


def test_a_store_and_forward_association_is_served_and_the_upstream_never_hears() -> None:
    association = Association()
    for step, _ in HAPPY_PATH[:2]:
        association.step(step)
    for step, state in STORE_PATH:
        association.step(step)
        assert association.state is state
    for reason in Reason:
        assert ending(State.SERVING, reason).upstream is None
    assert ending(State.SERVING, Reason.INVALID_PDU) == Ending(Outcome.ABORTED, Abort(2, 6))
    assert ending(State.SERVING, Reason.IDLE_TIMEOUT) == Ending(Outcome.TIMED_OUT, Abort(2, 0))
    assert association.end(Reason.RELEASED) == Ending(Outcome.COMPLETED, None)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("step", list(Step))
def test_a_step_without_a_row_is_a_state_error(state: State, step: Step) -> None:
    association = Association()
    association.state = state
    if (state, step) in TRANSITIONS:
        association.step(step)
        assert association.state is TRANSITIONS[(state, step)]
    else:
        with pytest.raises(StateError, match=f"{step.value} in state {state.value}"):
            association.step(step)


def test_every_reason_has_an_ending() -> None:
    assert set(ENDINGS) == set(Reason)


# The table as the README promises it: (reason, outcome, client, upstream once it has our RQ).
EXPECTED = {
    **{r: (Outcome.TLS_FAILED, Close(), None) for r in TLS_REASONS},
    Reason.RELEASED: (Outcome.COMPLETED, None, None),
    Reason.NO_ROUTE: (Outcome.REJECTED, Reject(1, 1, 7), None),
    Reason.CALLING_AE_NOT_ALLOWED: (Outcome.REJECTED, Reject(1, 1, 3), None),
    Reason.PEER_NOT_ALLOWED: (Outcome.REJECTED, Reject(1, 1, 1), None),
    Reason.SOURCE_NOT_ALLOWED: (Outcome.REJECTED, Reject(1, 1, 1), None),
    Reason.PLAINTEXT_ON_TLS: (Outcome.REJECTED, Reject(1, 1, 1), None),
    Reason.PROTOCOL_VERSION: (Outcome.REJECTED, Reject(1, 2, 2), None),
    Reason.UPSTREAM_UNREACHABLE: (Outcome.REJECTED, Reject(2, 3, 1), None),
    Reason.UPSTREAM_TIMEOUT: (Outcome.REJECTED, Reject(2, 3, 1), None),
    Reason.UPSTREAM_TLS_FAILED: (Outcome.REJECTED, Reject(2, 3, 1), ABORT),
    Reason.UPSTREAM_NO_ANSWER: (Outcome.REJECTED, Reject(2, 3, 1), ABORT),
    Reason.UPSTREAM_REJECTED: (Outcome.REJECTED, Relayed(), None),
    Reason.TOO_MANY_ASSOCIATIONS: (Outcome.REJECTED, Reject(2, 3, 2), None),
    Reason.UNRECOGNIZED_PDU: (Outcome.ABORTED, Abort(2, 1), None),
    Reason.UNEXPECTED_PDU: (Outcome.ABORTED, Abort(2, 2), None),
    Reason.INVALID_PDU: (Outcome.ABORTED, Abort(2, 6), None),
    Reason.HANDSHAKE_TIMEOUT: (Outcome.TIMED_OUT, Close(graceful=True), None),
    Reason.IDLE_TIMEOUT: (Outcome.TIMED_OUT, Abort(2, 0), ABORT),
    Reason.CLIENT_CLOSED: (Outcome.ABORTED, None, ABORT),
    Reason.UPSTREAM_CLOSED: (Outcome.ABORTED, Abort(2, 0), None),
    Reason.CLIENT_ABORTED: (Outcome.ABORTED, None, Relayed()),
    Reason.UPSTREAM_ABORTED: (Outcome.ABORTED, Relayed(), None),
    Reason.TLS_ON_PLAINTEXT: (Outcome.REFUSED, Close(), None),
    Reason.SHUTDOWN: (Outcome.ABORTED, Abort(2, 0), ABORT),
    Reason.INTERNAL_ERROR: (Outcome.ABORTED, Abort(2, 0), ABORT),
}


@pytest.mark.parametrize("reason", list(Reason))
def test_each_row_of_the_table(reason: Reason) -> None:
    outcome, client, upstream = EXPECTED[reason]
    assert ENDINGS[reason] == Ending(outcome, client, upstream)
    # The upstream hears from the proxy only once it has the RQ.
    assert ending(State.AWAITING_AC, reason).upstream == upstream
    assert ending(State.CONNECTING, reason) == Ending(outcome, client)
    assert ending(State.AWAITING_RQ, reason) == Ending(outcome, client)
    # Nothing read yet: whatever the reason, a plain close, logged as refused.
    assert ending(State.ACCEPTED, reason) == BEFORE_ANY_BYTE == Ending(Outcome.REFUSED, Close())


def test_mid_association_an_invalid_pdu_aborts_both_sides_unspecified() -> None:
    assert ending(State.RELAYING, Reason.INVALID_PDU) == Ending(Outcome.ABORTED, ABORT, ABORT)
    assert ending(State.AWAITING_RQ, Reason.INVALID_PDU).client == Abort(2, 6)


def test_an_association_ends_once_and_keeps_its_first_ending() -> None:
    association = Association()
    association.step(Step.ADMITTED)
    first = association.end(Reason.HANDSHAKE_TIMEOUT)
    assert association.state is State.ENDED
    assert association.end(Reason.CLIENT_CLOSED) is first
    with pytest.raises(StateError):
        association.step(Step.REQUEST)


def test_wire_bytes_of_each_answer() -> None:
    assert (
        wire(Reject(1, 1, 7)) == pdu.encode_reject(1, 1, 7) == bytes.fromhex("03000000000400010107")
    )
    assert wire(Abort(2, 6)) == bytes.fromhex("07000000000400000206")
    assert wire(Close()) == wire(Relayed()) == wire(None) == b""


PRECEDENCE = [
    ("client_aborted", Reason.CLIENT_ABORTED),
    ("upstream_aborted", Reason.UPSTREAM_ABORTED),
    ("released", Reason.RELEASED),
    ("invalid", Reason.INVALID_PDU),
    ("idle", None),  # SHUTDOWN while stopping, else IDLE_TIMEOUT
    ("client_closed", Reason.CLIENT_CLOSED),
]


@given(st.fixed_dictionaries({name: st.booleans() for name in RelayFacts.__slots__}))
def test_relay_reason_follows_its_precedence(flags: dict[str, bool]) -> None:
    facts = RelayFacts(**flags)
    expected = Reason.UPSTREAM_CLOSED
    for name, reason in PRECEDENCE:
        if flags[name]:
            if reason is None:
                reason = Reason.SHUTDOWN if flags["stopping"] else Reason.IDLE_TIMEOUT
            expected = reason
            break
    assert relay_reason(facts) == expected


def test_the_upstream_s_answer() -> None:
    rq = build_rq("CT")
    ac = build_ac(pdu.rewrite_called_ae(rq, "DEVICE"))
    echoed = upstream_answer(ac, rq, called_ae_rewritten=True)
    assert isinstance(echoed, Forward)
    assert echoed.answer[10:26] == rq[10:26] and echoed.answer[26:] == ac[26:]
    assert echoed.answer[:10] == ac[:10]
    assert upstream_answer(ac, rq, called_ae_rewritten=False) == Forward(ac)
    rejected = upstream_answer(pdu.encode_reject(1, 1, 7), rq, called_ae_rewritten=False)
    assert rejected == Stop(
        Reason.UPSTREAM_REJECTED, "upstream rejected: result 1, source 1, reason 7"
    )
    aborted = upstream_answer(pdu.encode_abort(0, 0), rq, called_ae_rewritten=False)
    assert aborted == Stop(Reason.UPSTREAM_ABORTED, "upstream aborted: source 0, reason 0")
    other = upstream_answer(pdu.encode_release_rq(), rq, called_ae_rewritten=False)
    assert isinstance(other, Stop) and other.reason is Reason.UPSTREAM_NO_ANSWER
    assert "ReleaseRequest" in other.detail
    garbage = upstream_answer(b"\x0a\x00\x00\x00\x00\x00", rq, called_ae_rewritten=False)
    assert isinstance(garbage, Stop) and garbage.reason is Reason.UPSTREAM_NO_ANSWER
    assert "invalid PDU" in garbage.detail


README = Path(__file__).resolve().parents[1] / "README.md"
ANSWER = re.compile(r"(A-ASSOCIATE-RJ|A-ABORT) \((\d), (\d)(?:, (\d))?\)")


def _readme_rows() -> list[tuple[str, list[Reason]]]:
    text = README.read_text()
    table = text[text.index("Refusals, and what the client sees") :]
    table = table[: table.index("\n\n", table.index("|---"))]
    rows = []
    for line in [line for line in table.splitlines() if line.startswith("|")][2:]:
        _, answer, reasons = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append((answer, [Reason(r) for r in re.findall(r"`([a-z0-9-]+)`", reasons)]))
    return rows


def test_the_readme_table_says_what_the_model_does() -> None:
    rows = _readme_rows()
    assert len(rows) >= 15
    for answer, reasons in rows:
        assert reasons, answer
        for reason in reasons:
            row = ending(State.AWAITING_AC, reason)
            found = ANSWER.search(answer)
            if found and not answer.startswith("A-ABORT to"):
                kind, *numbers = found.groups()
                code = tuple(int(n) for n in numbers if n is not None)
                expected = Reject(*code) if kind == "A-ASSOCIATE-RJ" else Abort(*code)
                assert row.client == expected, (reason, answer)
            elif answer.startswith("that RJ"):
                assert row.client == Relayed(), reason
            elif answer in ("close", "TLS alert"):
                assert isinstance(row.client, Close), reason
            elif answer == "A-ABORT to the upstream":
                assert row.client is None and row.upstream == ABORT, reason
            if "to both" in answer or "A-ABORT to the upstream" in answer:
                assert row.upstream == ABORT, (reason, answer)
