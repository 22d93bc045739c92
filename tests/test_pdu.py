"""Tests for dicom_tls_proxy.protocol.pdu: plain bytes in, values or PduError out; no sockets.

pynetdicom is the independent reference: what it encodes we must parse, and what we encode it must
decode to the same fields. Hypothesis checks the one promise a wire parser must keep: whatever the
bytes, the answer is a PDU or a PduError, never another exception.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom import pdu as pyn_pdu
from pynetdicom import pdu_primitives as prim
from pynetdicom.presentation import build_context

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.pdu import (
    Abort,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    DataTransfer,
    PduError,
    ReleaseReply,
    ReleaseRequest,
)
from dicom_tls_proxy.protocol.pdu_items import (
    PresentationContextItem,
    PresentationContextResult,
    UserItem,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
RESULT_TYPES = (
    AssociateRequest,
    AssociateAccept,
    AssociateReject,
    Abort,
    ReleaseRequest,
    ReleaseReply,
    DataTransfer,
)


# --------------------------------------------------------------------------- builders


def make_pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def make_item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def context_rq(context_id: int = 1, abstract: str = VERIFICATION, *ts: str) -> bytes:
    subs = make_item(0x30, abstract.encode()) + b"".join(
        make_item(0x40, t.encode()) for t in (ts or (IMPLICIT,))
    )
    return make_item(0x20, bytes([context_id, 0, 0, 0]) + subs)


def user_info(max_length: int = 16384, uid: bytes = b"1.2.3.4") -> bytes:
    return make_item(0x50, make_item(0x51, struct.pack(">I", max_length)) + make_item(0x52, uid))


def make_associate(
    items: list[bytes] | None = None,
    called: bytes = b"CALLED".ljust(16),
    calling: bytes = b"CALLING".ljust(16),
    pdu_type: int = pdu.A_ASSOCIATE_RQ,
    version: int = 1,
) -> bytes:
    if items is None:
        items = [make_item(0x10, APP_CONTEXT.encode()), context_rq(), user_info()]
    fixed = struct.pack(">Hxx", version) + called + calling + bytes(32)
    return make_pdu(pdu_type, fixed + b"".join(items))


def pyn_rq(
    called: str = "STORESCP",
    calling: str = "STORESCU",
    contexts: list[tuple[str, list[str]]] | None = None,
    extra: list[Any] | None = None,
) -> bytes:
    primitive = prim.A_ASSOCIATE()
    primitive.application_context_name = APP_CONTEXT
    primitive.called_ae_title = called
    primitive.calling_ae_title = calling
    primitive.user_information = user_items_primitive() + (extra or [])
    cxs = []
    for index, (abstract, syntaxes) in enumerate(contexts or [(VERIFICATION, [IMPLICIT])]):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * index + 1
        cxs.append(cx)
    primitive.presentation_context_definition_list = cxs
    encoded: bytes = pyn_pdu.A_ASSOCIATE_RQ(primitive).encode()
    return encoded


def user_items_primitive() -> list[Any]:
    max_length = prim.MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    class_uid = prim.ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    version = prim.ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    return [max_length, class_uid, version]


def pyn_ac(results: list[tuple[int, int, str]]) -> bytes:
    primitive = prim.A_ASSOCIATE()
    primitive.application_context_name = APP_CONTEXT
    primitive.called_ae_title = "STORESCP"
    primitive.calling_ae_title = "STORESCU"
    primitive.result = 0
    primitive.user_information = user_items_primitive()
    cxs = []
    for context_id, result, syntax in results:
        cx = build_context(CT_STORAGE, [syntax])
        cx.context_id = context_id
        cx.result = result
        cxs.append(cx)
    primitive.presentation_context_definition_results_list = cxs
    encoded: bytes = pyn_pdu.A_ASSOCIATE_AC(primitive).encode()
    return encoded


def parse_error(data: bytes) -> PduError:
    with pytest.raises(PduError) as info:
        pdu.parse_pdu(data)
    return info.value


# --------------------------------------------------------------------------- against pynetdicom


def test_parse_pynetdicom_request() -> None:
    raw = pyn_rq(
        contexts=[(VERIFICATION, [IMPLICIT]), (CT_STORAGE, [EXPLICIT, IMPLICIT])],
        extra=[role_selection()],
    )
    rq = pdu.parse_pdu(raw)
    assert isinstance(rq, AssociateRequest)
    assert (rq.called_ae, rq.calling_ae) == ("STORESCP", "STORESCU")
    assert rq.protocol_version == 1 and rq.protocol_version_supported
    assert rq.application_context == APP_CONTEXT
    assert rq.presentation_contexts == (
        PresentationContextItem(1, VERIFICATION, (IMPLICIT,)),
        PresentationContextItem(3, CT_STORAGE, (EXPLICIT, IMPLICIT)),
    )
    assert rq.max_pdu_length == 16382
    assert rq.implementation_class_uid == "1.2.826.0.1.3680043.9.3811.3.0.4"
    assert rq.implementation_version_name == "PYNETDICOM_304"
    assert [item.item_type for item in rq.user_items] == [0x51, 0x52, 0x55, 0x54]
    assert rq.unknown_items == ()
    assert rq.raw == raw


def role_selection() -> Any:
    role = prim.SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_STORAGE
    role.scu_role = True
    role.scp_role = True
    return role


def test_parse_pynetdicom_accept() -> None:
    raw = pyn_ac([(1, 0, EXPLICIT), (3, 3, IMPLICIT), (5, 4, IMPLICIT)])
    ac = pdu.parse_pdu(raw)
    assert isinstance(ac, AssociateAccept)
    assert ac.presentation_contexts == (
        PresentationContextResult(1, 0, EXPLICIT),
        PresentationContextResult(3, 3, None),
        PresentationContextResult(5, 4, None),
    )
    assert ac.application_context == APP_CONTEXT
    assert ac.max_pdu_length == 16382
    assert ac.implementation_version_name == "PYNETDICOM_304"
    assert ac.raw == raw


@pytest.mark.parametrize(
    ("result", "source", "reason"),
    [(r, s, why) for r in (1, 2) for s, reasons in pdu.REJECT_REASONS.items() for why in reasons],
)
def test_encode_reject_decoded_by_pynetdicom(result: int, source: int, reason: int) -> None:
    encoded = pdu.encode_reject(result, source, reason)
    assert len(encoded) == 10
    theirs = pyn_pdu.A_ASSOCIATE_RJ()
    theirs.decode(encoded)
    assert (theirs.result, theirs.source, theirs.reason_diagnostic) == (result, source, reason)
    assert pdu.parse_pdu(encoded) == AssociateReject(result, source, reason)


@pytest.mark.parametrize(
    ("source", "reason"), [(s, r) for s, reasons in pdu.ABORT_REASONS.items() for r in reasons]
)
def test_encode_abort_decoded_by_pynetdicom(source: int, reason: int) -> None:
    encoded = pdu.encode_abort(source, reason)
    assert len(encoded) == 10
    theirs = pyn_pdu.A_ABORT_RQ()
    theirs.decode(encoded)
    assert (theirs.source, theirs.reason_diagnostic) == (source, reason)
    assert pdu.parse_pdu(encoded) == Abort(source, reason)


def test_parse_pynetdicom_abort_reject_release() -> None:
    provider = prim.A_P_ABORT()
    provider.provider_reason = 6
    assert pdu.parse_pdu(pyn_pdu.A_ABORT_RQ(provider).encode()) == Abort(2, 6)
    user = prim.A_ABORT()
    user.abort_source = 0
    assert pdu.parse_pdu(pyn_pdu.A_ABORT_RQ(user).encode()) == Abort(0, 0)
    reject = prim.A_ASSOCIATE()
    reject.result, reject.result_source, reject.diagnostic = 1, 1, 7
    assert pdu.parse_pdu(pyn_pdu.A_ASSOCIATE_RJ(reject).encode()) == AssociateReject(1, 1, 7)
    assert pyn_pdu.A_RELEASE_RQ().encode() == pdu.encode_release_rq()
    assert pyn_pdu.A_RELEASE_RP().encode() == pdu.encode_release_rp()
    assert pdu.parse_pdu(pdu.encode_release_rq()) == ReleaseRequest()
    assert pdu.parse_pdu(pdu.encode_release_rp()) == ReleaseReply()


@pytest.mark.parametrize("bad", [(0, 1, 1), (3, 1, 1), (1, 1, 0), (1, 3, 0), (1, 4, 1)])
def test_encode_reject_refuses_undefined_combinations(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="no A-ASSOCIATE-RJ"):
        pdu.encode_reject(*bad)


@pytest.mark.parametrize("bad", [(0, 6), (1, 0), (2, 3), (2, 7)])
def test_encode_abort_refuses_undefined_combinations(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="no A-ABORT"):
        pdu.encode_abort(*bad)


def test_parse_pynetdicom_data_transfer() -> None:
    primitive = prim.P_DATA()
    pdvs: Any = [[1, b"\x03" + b"x" * 100], [1, b"\x02" + b"y"]]  # lists, as pynetdicom insists
    primitive.presentation_data_value_list = pdvs
    raw = pyn_pdu.P_DATA_TF(primitive).encode()
    assert pdu.parse_pdu(raw) == DataTransfer(raw)


@pytest.mark.parametrize(
    "body",
    [b"", struct.pack(">I", 1) + b"\x01", struct.pack(">I", 10) + b"\x01\x03", b"\x00\x00\x00"],
)
def test_data_transfer_with_broken_pdv_framing(body: bytes) -> None:
    assert parse_error(make_pdu(pdu.P_DATA_TF, body)).abort_reason == pdu.INVALID_PARAMETER


@pytest.mark.parametrize("make", [lambda: pyn_rq(), lambda: pyn_ac([(1, 0, IMPLICIT)])])
def test_rewrite_called_ae_changes_only_bytes_10_to_25(make: Any) -> None:
    raw = make()
    rewritten = pdu.rewrite_called_ae(raw, "ARCHIVE")
    assert len(rewritten) == len(raw)
    assert rewritten[:10] == raw[:10] and rewritten[26:] == raw[26:]
    assert rewritten[10:26] == b"ARCHIVE".ljust(16)
    parsed = pdu.parse_pdu(rewritten)
    assert isinstance(parsed, AssociateRequest | AssociateAccept)
    assert parsed.called_ae == "ARCHIVE"
    if raw[0] == pdu.A_ASSOCIATE_RQ:
        theirs = pyn_pdu.A_ASSOCIATE_RQ()
        theirs.decode(rewritten)
        assert theirs.called_ae_title == "ARCHIVE"
        assert theirs.calling_ae_title == "STORESCU"
    else:
        theirs_ac = pyn_pdu.A_ASSOCIATE_AC()
        theirs_ac.decode(rewritten)
        assert theirs_ac.reserved_aet == "ARCHIVE"


def test_rewrite_called_ae_refuses_other_pdus_and_bad_titles() -> None:
    with pytest.raises(PduError):
        pdu.rewrite_called_ae(pdu.encode_abort(0, 0), "ARCHIVE")
    with pytest.raises(ValueError, match="backslash"):
        pdu.rewrite_called_ae(pyn_rq(), "A\\B")


def test_echo_called_ae_gives_the_client_its_own_title_back() -> None:
    """The route calls the upstream ARCHIVE; its AC repeats ARCHIVE; the client called CT (padded
    with NULs, as older devices do) and gets those 16 bytes back as it sent them."""
    client_rq = make_associate(called=b"CT".ljust(16, b"\x00"))
    upstream_rq = pdu.rewrite_called_ae(client_rq, "ARCHIVE")
    assert upstream_rq[10:26] == b"ARCHIVE".ljust(16)
    upstream_ac = pdu.rewrite_called_ae(pyn_ac([(1, 0, IMPLICIT)]), "ARCHIVE")
    answer = pdu.echo_called_ae(upstream_ac, client_rq)
    assert answer[10:26] == b"CT" + bytes(14)
    assert answer[:10] == upstream_ac[:10] and answer[26:] == upstream_ac[26:]
    assert answer == upstream_ac[:10] + client_rq[10:26] + upstream_ac[26:]  # as server.py did
    ac = pdu.parse_pdu(answer)
    assert isinstance(ac, AssociateAccept) and ac.called_ae == "CT"
    assert ac.presentation_contexts == (PresentationContextResult(1, 0, IMPLICIT),)
    theirs = pyn_pdu.A_ASSOCIATE_AC()
    theirs.decode(answer)
    assert theirs.reserved_aet.rstrip("\x00 ") == "CT"  # what the client sent, NULs and all


def test_echo_called_ae_of_an_unchanged_title_changes_nothing() -> None:
    rq = pyn_rq()
    ac = pdu.rewrite_called_ae(pyn_ac([(1, 0, IMPLICIT)]), "STORESCP")
    assert pdu.echo_called_ae(ac, rq) == ac


@pytest.mark.parametrize(
    ("ac", "rq", "words"),
    [
        (lambda: pyn_rq(), lambda: pyn_rq(), "A-ASSOCIATE-AC"),
        (lambda: pdu.encode_reject(1, 1, 7), lambda: pyn_rq(), "A-ASSOCIATE-AC"),
        (lambda: pyn_ac([(1, 0, IMPLICIT)])[:73], lambda: pyn_rq(), "A-ASSOCIATE-AC"),
        (lambda: pyn_ac([(1, 0, IMPLICIT)]), lambda: pyn_ac([(1, 0, IMPLICIT)]), "-RQ"),
        (lambda: pyn_ac([(1, 0, IMPLICIT)]), lambda: pyn_rq()[:26], "-RQ"),
        (lambda: b"", lambda: b"", "A-ASSOCIATE-AC"),
    ],
)
def test_echo_called_ae_refuses_what_is_no_whole_ac_and_rq(ac: Any, rq: Any, words: str) -> None:
    with pytest.raises(PduError, match=words):
        pdu.echo_called_ae(ac(), rq())


# --------------------------------------------------------------------------- AE titles


def ae_field(text: bytes) -> bytes:
    return text.ljust(16, b" ")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"STORESCP".ljust(16, b"\x00"), "STORESCP"),
        (b"STORESCP  \x00\x00 \x00".ljust(16, b"\x00"), "STORESCP"),
        (ae_field(b"  PACS"), "PACS"),
        (b"X" * 16, "X" * 16),
        (ae_field(b"MY AE"), "MY AE"),
    ],
)
def test_parse_ae_title_accepts(raw: bytes, expected: str) -> None:
    assert pdu.parse_ae_title(raw) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b" " * 16, "empty"),
        (b"\x00" * 16, "empty"),
        (ae_field(b"A\\B"), "backslash"),
        (ae_field(b"A\x00B"), "control"),
        (ae_field(b"\x00AB"), "control"),
        (ae_field(b"A\tB"), "control"),
        (ae_field(b"A\nB"), "control"),
        (ae_field(b"A\x7fB"), "control"),
        (ae_field("PÄCS".encode("latin-1")), "non-ASCII"),
        (ae_field("PÄCS".encode()), "non-ASCII"),
        (b"SHORT", "16"),
    ],
)
def test_parse_ae_title_rejects(raw: bytes, problem: str) -> None:
    with pytest.raises(PduError, match=problem) as info:
        pdu.parse_ae_title(raw)
    assert info.value.abort_reason == pdu.INVALID_PARAMETER


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" " * 16, "empty"),
        ("A" * 17, "17 characters"),
        ("A\\B", "backslash"),
        ("A\x00B", "control"),
        ("A\rB", "control"),
        ("PÄCS", "non-ASCII"),
    ],
)
def test_validate_ae_title_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        pdu.validate_ae_title(text)


def test_validate_and_encode_ae_title() -> None:
    assert pdu.validate_ae_title("  PACS ") == "PACS"
    assert pdu.validate_ae_title(" " + "A" * 16 + " ") == "A" * 16
    assert pdu.encode_ae_title(" PACS") == b"PACS" + b" " * 12
    with pytest.raises(ValueError):
        pdu.encode_ae_title("A" * 17)


def test_request_with_invalid_called_or_calling_ae() -> None:
    error = parse_error(make_associate(called=b" " * 16))
    assert "called AE title" in str(error) and error.abort_reason == 6
    error = parse_error(make_associate(calling=ae_field(b"A\\B")))
    assert "calling AE title" in str(error) and "backslash" in str(error)


def test_request_with_nul_padded_titles_and_uids() -> None:
    items = [
        make_item(0x10, APP_CONTEXT.encode() + b"\x00"),
        context_rq(1, VERIFICATION + "\x00", IMPLICIT + "\x00"),
        user_info(uid=b"1.2.3\x00"),
    ]
    rq = pdu.parse_pdu(make_associate(items, called=b"PACS".ljust(16, b"\x00")))
    assert isinstance(rq, AssociateRequest)
    assert rq.called_ae == "PACS" and rq.application_context == APP_CONTEXT
    assert rq.presentation_contexts[0] == PresentationContextItem(1, VERIFICATION, (IMPLICIT,))
    assert rq.implementation_class_uid == "1.2.3"


def test_accept_does_not_judge_its_reserved_ae_fields() -> None:
    accepted = make_item(0x21, b"\x01\x00\x00\x00" + make_item(0x40, IMPLICIT.encode()))
    items = [make_item(0x10, APP_CONTEXT.encode()), accepted]
    raw = make_associate(
        items, called=b" " * 16, calling=b"\xff\n\\X".ljust(16), pdu_type=pdu.A_ASSOCIATE_AC
    )
    ac = pdu.parse_pdu(raw)
    assert isinstance(ac, AssociateAccept)
    assert (ac.called_ae, ac.calling_ae) == ("", "??\\X")


# --------------------------------------------------------------------------- malformed PDUs


@pytest.mark.parametrize("pdu_type", [pdu.A_ASSOCIATE_RJ, pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, 7])
@pytest.mark.parametrize("length", [0, 3, 5, 100])
def test_fixed_size_pdus_must_have_length_4(pdu_type: int, length: int) -> None:
    error = parse_error(make_pdu(pdu_type, bytes(length)))
    assert error.abort_reason == pdu.INVALID_PARAMETER
    assert "must be 4" in str(error)


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x16, 0xFF])
def test_unknown_pdu_type(pdu_type: int) -> None:
    error = parse_error(make_pdu(pdu_type, bytes(4)))
    assert error.abort_reason == pdu.UNRECOGNIZED_PDU
    assert f"0x{pdu_type:02x}" in str(error)


def test_length_field_must_match_data() -> None:
    raw = pdu.encode_abort(2, 6)
    assert parse_error(raw + b"\x00").abort_reason == 6
    assert parse_error(raw[:-1]).abort_reason == 6
    assert parse_error(raw[:5]).abort_reason == 6
    assert parse_error(b"").abort_reason == 6


def test_truncated_request() -> None:
    """Every cut is an error, except right before the optional user information item."""
    raw = pyn_rq()
    user_info_at = raw.index(b"\x50\x00", 74)
    for cut in range(6, len(raw)):
        truncated = raw[:2] + struct.pack(">I", cut - 6) + raw[6:cut]
        if cut == user_info_at:
            rq = pdu.parse_pdu(truncated)
            assert isinstance(rq, AssociateRequest) and rq.user_items == ()
        else:
            assert parse_error(truncated).abort_reason == pdu.INVALID_PARAMETER


def test_request_shorter_than_68() -> None:
    error = parse_error(make_pdu(pdu.A_ASSOCIATE_RQ, bytes(67)))
    assert "less than 68" in str(error) and error.abort_reason == 6


def test_item_length_overrun_names_the_item() -> None:
    raw = bytearray(make_associate())
    offset = raw.index(b"\x50\x00", 74)
    raw[offset + 2 : offset + 4] = struct.pack(">H", 200)
    assert "item 0x50 length 200 runs past the end" in str(parse_error(bytes(raw)))


def test_trailing_garbage_inside_an_item() -> None:
    garbage_in_user_info = make_item(0x50, make_item(0x51, bytes(4)) + b"\x52\x00")
    items = [make_item(0x10, APP_CONTEXT.encode()), context_rq(), garbage_in_user_info]
    assert "stray bytes" in str(parse_error(make_associate(items)))


@pytest.mark.parametrize(
    ("items", "problem"),
    [
        ([context_rq(), user_info()], "no application context"),
        ([make_item(0x10, APP_CONTEXT.encode())] * 2 + [context_rq()], "more than one application"),
        ([make_item(0x10, APP_CONTEXT.encode()), user_info()], "no presentation context"),
        ([make_item(0x10, b""), context_rq()], "application context name is empty"),
        ([make_item(0x10, APP_CONTEXT.encode()), context_rq(), user_info(), user_info()], "user"),
        ([make_item(0x10, "1.2.ü".encode()), context_rq()], "not printable ASCII"),
        ([make_item(0x10, b"1.2\n3"), context_rq()], "not printable ASCII"),
        (
            [make_item(0x10, APP_CONTEXT.encode()), make_item(0x20, b"\x01\x00\x00")],
            "less than 4",
        ),
        (
            [
                make_item(0x10, APP_CONTEXT.encode()),
                make_item(0x20, b"\x01\x00\x00\x00" + make_item(0x40, IMPLICIT.encode())),
            ],
            "no abstract syntax",
        ),
        (
            [
                make_item(0x10, APP_CONTEXT.encode()),
                make_item(0x20, b"\x01\x00\x00\x00" + make_item(0x30, VERIFICATION.encode())),
            ],
            "no transfer syntax",
        ),
        (
            [
                make_item(0x10, APP_CONTEXT.encode()),
                make_item(
                    0x20,
                    b"\x01\x00\x00\x00"
                    + make_item(0x30, VERIFICATION.encode()) * 2
                    + make_item(0x40, IMPLICIT.encode()),
                ),
            ],
            "more than one abstract syntax",
        ),
        (
            [
                make_item(0x10, APP_CONTEXT.encode()),
                context_rq(),
                make_item(0x50, make_item(0x51, bytes(3))),
            ],
            "maximum length sub-item",
        ),
    ],
)
def test_malformed_request_items(items: list[bytes], problem: str) -> None:
    error = parse_error(make_associate(items))
    assert problem in str(error)
    assert error.abort_reason == pdu.INVALID_PARAMETER


def test_lenient_choices_in_requests() -> None:
    """Any item order, no user information item, unknown items kept, version bits ignored."""
    items = [user_info(), make_item(0x7E, b"x"), context_rq(3), make_item(0x10, b"1.2")]
    rq = pdu.parse_pdu(make_associate(items, version=0x0003))
    assert isinstance(rq, AssociateRequest)
    assert rq.unknown_items == ((0x7E, b"x"),)
    assert rq.protocol_version_supported and rq.max_pdu_length == 16384
    rq = pdu.parse_pdu(make_associate([make_item(0x10, b"1.2"), context_rq()], version=2))
    assert isinstance(rq, AssociateRequest)
    assert rq.user_items == () and rq.max_pdu_length is None and not rq.protocol_version_supported


def test_accept_checks_accepted_context_transfer_syntax() -> None:
    app = make_item(0x10, APP_CONTEXT.encode())
    two = make_item(0x21, b"\x01\x00\x00\x00" + make_item(0x40, b"1.2") * 2)
    error = parse_error(make_associate([app, two], pdu_type=pdu.A_ASSOCIATE_AC))
    assert "2 transfer syntaxes" in str(error)
    short = make_item(0x21, b"\x01\x00\x00")
    assert "less than 4" in str(parse_error(make_associate([app, short], pdu_type=2)))
    bad_but_rejected = make_item(0x21, b"\x01\x00\x03\x00" + make_item(0x40, b"\xff"))
    ac = pdu.parse_pdu(make_associate([app, bad_but_rejected], pdu_type=pdu.A_ASSOCIATE_AC))
    assert isinstance(ac, AssociateAccept)
    assert ac.presentation_contexts == (PresentationContextResult(1, 3, None),)


def test_user_item_properties_on_constructed_objects() -> None:
    items = (UserItem(0x51, b"\x00\x00\x40\x00"), UserItem(0x55, b"MY_IMPL\x00"))
    rq = AssociateRequest(1, "A", "B", APP_CONTEXT, (), items, (), b"")
    assert rq.max_pdu_length == 16384
    assert rq.implementation_version_name == "MY_IMPL"
    assert rq.implementation_class_uid is None
    assert "raw" not in repr(rq)
    assert not hasattr(rq, "__dict__")  # slots all the way down, mixin included
    with pytest.raises(AttributeError):
        rq.called_ae = "X"  # type: ignore[misc]


def test_informational_user_items_are_sanitized_not_judged() -> None:
    odd = make_item(0x50, make_item(0x52, b"1.2\n3") + make_item(0x55, "VÉR\x00".encode()))
    items = [make_item(0x10, APP_CONTEXT.encode()), context_rq(), odd]
    rq = pdu.parse_pdu(make_associate(items))
    assert isinstance(rq, AssociateRequest)
    assert (rq.implementation_class_uid, rq.implementation_version_name) == ("1.2?3", "V??R")


# --------------------------------------------------------------------------- describe


def test_describe() -> None:
    assert "STORESCU" in pdu.describe(pdu.parse_pdu(pyn_rq()))
    assert "A-ASSOCIATE-AC" in pdu.describe(pdu.parse_pdu(pyn_ac([(1, 0, IMPLICIT)])))
    assert "called AE title not recognized" in pdu.describe(AssociateReject(1, 1, 7))
    assert "invalid PDU parameter value" in pdu.describe(Abort(2, 6))
    assert pdu.describe(ReleaseRequest()) == "A-RELEASE-RQ"
    assert pdu.describe(ReleaseReply()) == "A-RELEASE-RP"
    assert pdu.describe(DataTransfer(make_pdu(4, bytes(10)))) == "P-DATA-TF 10 bytes"


# --------------------------------------------------------------------------- properties


@given(st.binary(max_size=512))
def test_any_bytes_parse_or_pdu_error(data: bytes) -> None:
    try:
        result = pdu.parse_pdu(data)
    except PduError as error:
        assert error.abort_reason in (1, 2, 6) and str(error)
    else:
        assert isinstance(result, RESULT_TYPES)


@given(st.integers(0, 9), st.binary(max_size=400))
def test_any_body_with_a_valid_header_parses_or_pdu_error(pdu_type: int, body: bytes) -> None:
    try:
        result = pdu.parse_pdu(make_pdu(pdu_type, body))
    except PduError as error:
        assert str(error)
    else:
        assert isinstance(result, RESULT_TYPES)
        pdu.describe(result)


AE_TITLES = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
    min_size=1,
    max_size=16,
).filter(lambda text: text.strip(" ") != "")
UIDS = st.lists(st.integers(1, 10**9), min_size=1, max_size=6).map(
    lambda parts: ".".join(["1", *map(str, parts)])
)


@st.composite
def requests(
    draw: st.DrawFn, unknown_items: bool = False
) -> tuple[bytes, str, str, list[tuple[int, str, list[str]]]]:
    called, calling = draw(AE_TITLES), draw(AE_TITLES)
    contexts = [
        (2 * index + 1, draw(UIDS), draw(st.lists(UIDS, min_size=1, max_size=4, unique=True)))
        for index in range(draw(st.integers(1, 5)))
    ]
    items = [make_item(0x10, APP_CONTEXT.encode())]
    items += [context_rq(cid, abstract, *syntaxes) for cid, abstract, syntaxes in contexts]
    items.append(user_info(draw(st.integers(0, 2**32 - 1)), draw(UIDS).encode()))
    if unknown_items:  # pynetdicom 3.0.4 raises KeyError on these, so not in every case
        unknown = st.tuples(st.integers(0x60, 0xFF), st.binary(max_size=8))
        items += [make_item(t, v) for t, v in draw(st.lists(unknown, max_size=2))]
    raw = make_associate(
        items, called=ae_field(called.encode()), calling=ae_field(calling.encode())
    )
    return raw, called.strip(" "), calling.strip(" "), contexts


@given(requests())
def test_generated_requests_agree_with_pynetdicom(
    case: tuple[bytes, str, str, list[tuple[int, str, list[str]]]],
) -> None:
    raw, called, calling, contexts = case
    rq = pdu.parse_pdu(raw)
    assert isinstance(rq, AssociateRequest)
    assert (rq.called_ae, rq.calling_ae) == (called, calling)
    expected = tuple(PresentationContextItem(c, a, tuple(t)) for c, a, t in contexts)
    assert rq.presentation_contexts == expected
    theirs = pyn_pdu.A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert (theirs.called_ae_title, theirs.calling_ae_title) == (called, calling)
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax)
        for c in theirs.to_primitive().presentation_context_definition_list
    ] == [(c, a, t) for c, a, t in contexts]
    assert rq.max_pdu_length == theirs.to_primitive().maximum_length_received


@given(requests(unknown_items=True), st.data())
def test_mutated_requests_parse_or_pdu_error(
    case: tuple[bytes, str, str, list[tuple[int, str, list[str]]]], data: st.DataObject
) -> None:
    raw = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 3))):
        mutation = data.draw(st.sampled_from(["length", "byte", "cut", "insert"]))
        offset = data.draw(st.integers(6, len(raw) - 1))
        if mutation == "length":  # most hits land on or near an item length field
            raw[offset : offset + 2] = struct.pack(">H", data.draw(st.integers(0, 0xFFFF)))
        elif mutation == "byte":
            raw[offset] = data.draw(st.integers(0, 255))
        elif mutation == "cut":
            del raw[offset:]
        else:
            raw[offset:offset] = data.draw(st.binary(min_size=1, max_size=6))
        if len(raw) < 7:
            break
    raw[2:6] = struct.pack(">I", max(len(raw) - 6, 0))  # keep the outer framing right
    try:
        result = pdu.parse_pdu(bytes(raw))
    except PduError as error:
        assert error.abort_reason == pdu.INVALID_PARAMETER and str(error)
    else:
        assert isinstance(result, AssociateRequest)
