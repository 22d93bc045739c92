"""The pure half of store-and-forward, with bytes and no sockets: the SCP's own AC, which request
gets what, DIMSE messages cut into P-DATA-TFs and joined again, the strict data set walk, the
forwarder's proposal and plan, C-STORE command sets and statuses. Property tests for every parser.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_tls_proxy.protocol import dataset, dimse, forwarding, messages, pdu, storescp
from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem, PresentationContextResult
from dicom_tls_proxy.protocol.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    STORAGE_SOP_CLASSES,
)
from tests.support import make_dataset

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R FIND
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def rq_with(*contexts: PresentationContextItem, max_pdu: int = 16384) -> pdu.AssociateRequest:
    raw = pdu.encode_associate_rq(
        "PACS", "US_CART", contexts, max_pdu_length=max_pdu, implementation_class_uid="2.25.9"
    )
    parsed = pdu.parse_pdu(raw)
    assert isinstance(parsed, pdu.AssociateRequest)
    return parsed


# -- the SCP's AC -------------------------------------------------------------------------------


def test_the_ac_accepts_verification_and_storage_with_the_first_syntax_and_refuses_the_rest() -> (
    None
):
    rq = rq_with(
        PresentationContextItem(1, Verification, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
        PresentationContextItem(3, CTImageStorage, (JPEG_BASELINE, EXPLICIT_VR_LE)),
        PresentationContextItem(5, FIND, (IMPLICIT_VR_LE,)),
        PresentationContextItem(7, STORAGE_COMMITMENT, (IMPLICIT_VR_LE,)),
    )
    answer = storescp.negotiate(
        rq,
        max_pdu_length=1 << 20,
        implementation_class_uid="2.25.5",
        implementation_version_name="V1",
    )
    ac = pdu.parse_pdu(answer.ac)
    assert isinstance(ac, pdu.AssociateAccept)
    assert answer.ac[10:74] == rq.raw[10:74]  # AE titles and reserved bytes as in the RQ
    assert ac.presentation_contexts == (
        PresentationContextResult(1, 0, EXPLICIT_VR_LE),
        PresentationContextResult(3, 0, JPEG_BASELINE),
        PresentationContextResult(5, 3, None),
        PresentationContextResult(7, 3, None),
    )
    assert ac.max_pdu_length == 1 << 20
    assert ac.implementation_class_uid == "2.25.5" and ac.implementation_version_name == "V1"
    assert answer.accepted == {
        1: storescp.Context(Verification, EXPLICIT_VR_LE),
        3: storescp.Context(CTImageStorage, JPEG_BASELINE),
    }


def test_the_ac_is_one_pynetdicom_reads() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC

    rq = rq_with(PresentationContextItem(1, CTImageStorage, (IMPLICIT_VR_LE,)))
    answer = storescp.negotiate(
        rq, max_pdu_length=65536, implementation_class_uid="2.25.5", implementation_version_name="V"
    )
    decoded = A_ASSOCIATE_AC()
    decoded.decode(answer.ac)
    (context,) = decoded.presentation_context
    assert context.result == 0 and context.transfer_syntax == IMPLICIT_VR_LE


def test_storage_sop_classes_are_the_dictionarys() -> None:
    assert CTImageStorage in STORAGE_SOP_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.6.1" in STORAGE_SOP_CLASSES  # Ultrasound Image Storage
    assert "1.2.840.10008.5.1.4.1.1.6" in STORAGE_SOP_CLASSES  # ... its retired ancestor
    assert STORAGE_COMMITMENT not in STORAGE_SOP_CLASSES
    assert "1.2.840.10008.1.3.10" not in STORAGE_SOP_CLASSES  # Media Storage Directory
    assert Verification not in STORAGE_SOP_CLASSES and len(STORAGE_SOP_CLASSES) > 150


@pytest.mark.parametrize(
    ("command", "context", "expected"),
    [
        (dimse.Command(0x0030, 1), storescp.Context(Verification, IMPLICIT_VR_LE), storescp.Echo()),
        (
            dimse.Command(0x0001, 2, CTImageStorage, "1.2.3", has_data_set=True),
            storescp.Context(CTImageStorage, IMPLICIT_VR_LE),
            storescp.Store(),
        ),
        (
            dimse.Command(0x0001, 2, "1.2.840.10008.5.1.4.1.1.4", "1.2.3", has_data_set=True),
            storescp.Context(CTImageStorage, IMPLICIT_VR_LE),
            0x0122,
        ),
        (
            dimse.Command(0x0001, 2, CTImageStorage, "", has_data_set=True),
            storescp.Context(CTImageStorage, IMPLICIT_VR_LE),
            0xC000,
        ),
        (
            dimse.Command(0x0001, 2, CTImageStorage, "1.2.3", has_data_set=False),
            storescp.Context(CTImageStorage, IMPLICIT_VR_LE),
            0xC000,
        ),
        (
            dimse.Command(0x0020, 3, CTImageStorage, has_data_set=True),
            storescp.Context(CTImageStorage, IMPLICIT_VR_LE),
            0x0211,
        ),
        (dimse.Command(0x0030, 1), storescp.Context(CTImageStorage, IMPLICIT_VR_LE), 0x0211),
    ],
)
def test_request_actions(command: dimse.Command, context: storescp.Context, expected: Any) -> None:
    action = storescp.request_action(command, context)
    if isinstance(expected, int):
        assert isinstance(action, storescp.Refuse) and action.status == expected
    else:
        assert action == expected


def test_a_response_from_the_requestor_is_a_protocol_error() -> None:
    with pytest.raises(pdu.PduError, match="response"):
        storescp.request_action(
            dimse.Command(0x8001, 1, status=0), storescp.Context(CTImageStorage, IMPLICIT_VR_LE)
        )


# -- command sets ------------------------------------------------------------------------------

uids = st.from_regex(r"[1-9][0-9]{0,8}(\.[1-9][0-9]{0,8}){1,6}", fullmatch=True)


@given(st.integers(0, 0xFFFF), uids, uids)
def test_c_store_rq_and_its_response_round_trip(message_id: int, sop_class: str, sop: str) -> None:
    request = dimse.parse_command(dimse.c_store_rq(message_id, sop_class, sop))
    assert request == dimse.Command(0x0001, message_id, sop_class, sop, has_data_set=True)
    answer = dimse.parse_command(dimse.response(request, 0xA700))
    assert answer == dimse.Command(0x8001, message_id, sop_class, sop, False, 0xA700)
    assert answer.is_response


def test_pynetdicom_reads_our_c_store_rsp() -> None:
    from io import BytesIO

    from pynetdicom.dsutils import decode
    from pynetdicom.pdu import P_DATA_TF

    request = dimse.Command(0x0001, 9, CTImageStorage, "1.2.3.4", has_data_set=True)
    command = b""
    for raw in messages.fragments(1, dimse.response(request, 0x0000), 40, command=True):
        decoded = P_DATA_TF()
        decoded.decode(raw)
        for item in decoded.presentation_data_value_items:
            assert item.presentation_data_value[0] & 1  # a command fragment
            command += item.presentation_data_value[1:]
    data_set = decode(BytesIO(command), True, True)
    assert data_set.CommandField == 0x8001 and data_set.Status == 0
    assert data_set.MessageIDBeingRespondedTo == 9
    assert data_set.AffectedSOPInstanceUID == "1.2.3.4"
    assert data_set.AffectedSOPClassUID == CTImageStorage
    assert data_set.CommandDataSetType == 0x0101


@pytest.mark.parametrize(
    ("status", "disposition"),
    [
        (0x0000, "delivered"),
        (0xB000, "delivered"),
        (0xB006, "delivered"),
        (0xB007, "delivered"),
        (0xA700, "retry"),
        (0xA7FF, "retry"),
        (0x0110, "retry"),
        (0xA900, "failed"),
        (0xC000, "failed"),
        (0xCFFF, "failed"),
        (0x0122, "failed"),
        (0x0124, "failed"),
    ],
)
def test_store_dispositions(status: int, disposition: str) -> None:
    assert dimse.store_disposition(status) == disposition


@given(st.binary(max_size=300))
def test_parse_command_raises_only_pdu_error(data: bytes) -> None:
    try:
        dimse.parse_command(data)
    except pdu.PduError:
        pass


# -- messages in P-DATA-TFs --------------------------------------------------------------------


@given(
    command=st.binary(min_size=1, max_size=3000),
    data=st.binary(max_size=20000),
    max_pdu=st.integers(7, 5000) | st.none(),
)
@settings(max_examples=60)
def test_fragments_join_back(command: bytes, data: bytes, max_pdu: int | None) -> None:
    """A message cut for any peer's maximum PDU length joins back to the same bytes; no
    P-DATA-TF is longer than allowed."""
    real = dimse.c_store_rq(5, CTImageStorage, "1.2.3") if len(command) % 2 else dimse.c_echo_rq()
    announced = dimse.parse_command(real).has_data_set
    pdus = list(messages.fragments(3, real, max_pdu, command=True))
    if announced:
        pdus += list(messages.fragments(3, data, max_pdu, command=False))
    assert all(len(raw) - 6 <= (max_pdu or messages.UNLIMITED_PDU) for raw in pdus)
    reader = messages.MessageReader({3})
    events = [event for raw in pdus for event in reader.feed(raw)]
    assert isinstance(events[0], messages.CommandReceived)
    assert events[0].command == dimse.parse_command(real)
    pieces = [e for e in events[1:] if isinstance(e, messages.DataReceived)]
    if announced:
        assert b"".join(bytes(p.data) for p in pieces) == data and pieces[-1].last
    assert reader.idle


def pdv(context: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context, control) + data
    return struct.pack(">BxI", 4, len(item)) + item


@pytest.mark.parametrize(
    ("pdus", "words"),
    [
        ([pdv(5, 3, dimse.c_echo_rq())], "context 5, which was not accepted"),
        ([pdv(1, 0, b"data")], "without a command"),
        ([pdv(1, 1, b"\0" * 10), pdv(3, 3, b"")], "in the middle of a command"),
        ([pdv(1, 3, dimse.c_store_rq(1, CTImageStorage, "1.2")), pdv(3, 2, b"x")], "its command"),
        (
            [pdv(1, 3, dimse.c_store_rq(1, CTImageStorage, "1.2")), pdv(1, 3, b"")],
            "while a data set was due",
        ),
        ([pdv(1, 1, b"\0" * 40000), pdv(1, 1, b"\0" * 30000)], "over 65536 bytes"),
    ],
)
def test_message_rules(pdus: list[bytes], words: str) -> None:
    reader = messages.MessageReader({1, 3})
    with pytest.raises(pdu.PduError, match=words):
        for raw in pdus:
            reader.feed(raw)


@given(st.lists(st.binary(max_size=60), max_size=8))
def test_message_reader_raises_only_pdu_error(bodies: list[bytes]) -> None:
    reader = messages.MessageReader({1, 3})
    for body in bodies:
        try:
            reader.feed(struct.pack(">BxI", 4, len(body)) + body)
        except pdu.PduError:
            return


# -- the data set walk ---------------------------------------------------------------------------


def encoded(ds: Dataset, transfer_syntax: str) -> bytes:
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        import zlib

        raw = encoded(ds, EXPLICIT_VR_LE)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(raw) + deflater.flush()
    buffer = DicomBytesIO()
    buffer.is_little_endian = transfer_syntax != EXPLICIT_VR_BE
    buffer.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
    write_dataset(buffer, ds)
    return bytes(buffer.getvalue())


def rich_dataset(seed: int = 3) -> Dataset:
    ds = make_dataset(16, 16, seed=seed)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "T-D1100", "SRT"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    item.ReferencedSOPSequence = [inner]
    ds.AnatomicRegionSequence = [item, item]
    ds.ImageComments = "odd"
    del ds.file_meta
    return ds


TRANSFER_SYNTAXES = [IMPLICIT_VR_LE, EXPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE]


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
def test_data_sets_pydicom_writes_parse(transfer_syntax: str) -> None:
    assert dataset.data_set_problem(encoded(rich_dataset(), transfer_syntax), transfer_syntax) == ""


def test_undefined_length_sequences_and_encapsulated_pixel_data_parse() -> None:
    def element(group: int, elem: int, vr: bytes, value: bytes, undefined: bool = False) -> bytes:
        length = 0xFFFFFFFF if undefined else len(value)
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", length) + value

    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item += struct.pack("<HH", 0x0008, 0x0100) + b"SH" + struct.pack("<H", 2) + b"T1"
    item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence = element(0x0008, 0x2218, b"SQ", item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), True)
    offsets = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    fragment = struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9"
    pixels = element(
        0x7FE0, 0x0010, b"OB", offsets + fragment + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), True
    )
    assert dataset.data_set_problem(sequence + pixels, JPEG_BASELINE) == ""
    assert "not closed" in dataset.data_set_problem(sequence + pixels[:-8], JPEG_BASELINE)


@given(st.sampled_from(TRANSFER_SYNTAXES[:3]), st.integers(1, 60))
def test_a_cut_in_the_last_element_is_found(transfer_syntax: str, cut: int) -> None:
    raw = encoded(rich_dataset(), transfer_syntax)  # ends with 512 bytes of pixel data
    assert "runs past" in dataset.data_set_problem(raw[:-cut], transfer_syntax)


@given(st.binary(max_size=400), st.sampled_from([*TRANSFER_SYNTAXES, JPEG_BASELINE]))
def test_the_walk_never_raises(data: bytes, transfer_syntax: str) -> None:
    assert isinstance(dataset.data_set_problem(data, transfer_syntax), str)


def test_nesting_is_bounded() -> None:
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    deep = (sq + item_start) * 200
    assert "deeper than" in dataset.data_set_problem(deep, EXPLICIT_VR_LE)


# -- the forwarder's decisions -------------------------------------------------------------------


def ac_with(*results: tuple[int, int, str | None]) -> pdu.AssociateAccept:
    return pdu.AssociateAccept(
        protocol_version=1,
        called_ae="PACS",
        calling_ae="US",
        application_context="1.2.840.10008.3.1.1.1",
        presentation_contexts=tuple(PresentationContextResult(*r) for r in results),
        user_items=(),
        unknown_items=(),
        raw=b"",
    )


def test_proposal_offers_native_syntaxes_for_native_instances_only() -> None:
    kinds = [(CTImageStorage, IMPLICIT_VR_LE), (CTImageStorage, JPEG_BASELINE)]
    proposal = forwarding.Proposal.of([*kinds, kinds[0]])
    assert [c.transfer_syntaxes for c in proposal.contexts] == [
        (IMPLICIT_VR_LE, EXPLICIT_VR_LE),
        (JPEG_BASELINE,),
    ]
    assert proposal.ids == {kinds[0]: 1, kinds[1]: 3}


def test_plan_converts_native_and_fails_compressed() -> None:
    native, jpeg = (CTImageStorage, EXPLICIT_VR_BE), (CTImageStorage, JPEG_BASELINE)
    proposal = forwarding.Proposal.of([native, jpeg])
    accept = ac_with((1, 0, IMPLICIT_VR_LE), (3, 4, None))
    assert forwarding.plan(accept, proposal, native) == forwarding.Send(1, IMPLICIT_VR_LE)
    refused = forwarding.plan(accept, proposal, jpeg)
    assert isinstance(refused, forwarding.Refuse)
    assert "transfer syntaxes not supported" in refused.reason and "is compressed" in refused.reason
    no_class = forwarding.plan(ac_with((1, 3, None)), forwarding.Proposal.of([native]), native)
    assert isinstance(no_class, forwarding.Refuse) and "SOP class" in no_class.reason


def test_a_batch_holds_at_most_128_kinds() -> None:
    kinds = [(f"1.2.840.10008.5.1.4.1.1.{i}", IMPLICIT_VR_LE) for i in range(200)]
    assert forwarding.batch(kinds, 1000) == 128
    assert forwarding.batch(kinds[:3] * 100, 50) == 50
