"""Tests for dicom_tls_proxy.protocol.pdu_framing (and the header judge in pdu it shares): cutting
a byte stream into PDUs, whole (`split_pdu`, which `streams.read_pdu` reads with) or by
boundaries only (`BoundaryTracker`, the relay's). Plain bytes, no sockets.

Hypothesis checks the promises of a framer: however a valid stream is cut into chunks, the same
PDUs come out; a header that announces too much is refused with the same PduError however it
arrives and whoever reads it; and any bytes at all give PDUs, "need more" or a PduError, never
another exception."""

from __future__ import annotations

import itertools
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_tls_proxy.protocol import pdu, pdu_framing
from dicom_tls_proxy.protocol.pdu import PduError
from dicom_tls_proxy.protocol.pdu_framing import BoundaryTracker, split_pdu
from dicom_tls_proxy.transport.streams import PeerClosed, read_pdu
from tests.test_pdu import make_associate, make_pdu, pyn_rq

# --------------------------------------------------------------------------- framing


def test_parse_header_and_length_needed() -> None:
    raw = pyn_rq()
    assert pdu.parse_header(raw) == (1, len(raw) - 6)
    assert pdu.parse_header(memoryview(raw)[:6]) == (1, len(raw) - 6)
    with pytest.raises(PduError) as info:
        pdu.parse_header(raw[:5])
    assert info.value.abort_reason == 6
    assert pdu_framing.pdu_length_needed(raw[:5]) is None
    assert pdu_framing.pdu_length_needed(bytearray(raw[:6])) == len(raw)
    assert pdu_framing.pdu_length_needed(raw + pdu.encode_release_rq()) == len(raw)
    with pytest.raises(PduError, match="more than the limit"):
        pdu_framing.pdu_length_needed(raw, max_pdu_length=100)
    with pytest.raises(PduError) as info:
        pdu_framing.pdu_length_needed(b"\x09\x00\xff\xff\xff\xff")
    assert info.value.abort_reason == pdu.UNRECOGNIZED_PDU
    with pytest.raises(PduError, match="must be 4"):
        pdu_framing.pdu_length_needed(b"\x07\x00\x00\x00\x00\x05")


def test_tracker_basics() -> None:
    tracker = BoundaryTracker()
    assert tracker.at_boundary and tracker.pdus == 0 and tracker.last_type is None
    data_tf = make_pdu(pdu.P_DATA_TF, struct.pack(">I", 3) + b"\x01\x03x")
    stream = pyn_rq() + data_tf + pdu.encode_release_rq()
    tracker.feed(stream[:3])
    assert not tracker.at_boundary
    tracker.feed(memoryview(stream)[3:-1])
    assert not tracker.at_boundary and tracker.pdus == 2 and tracker.last_type == pdu.P_DATA_TF
    assert not tracker.seen_release_rq
    tracker.feed(stream[-1:])
    assert tracker.at_boundary and tracker.pdus == 3 and tracker.seen_release_rq
    assert not tracker.seen_release_rp and not tracker.seen_abort
    tracker.feed(b"")
    tracker.feed(pdu.encode_release_rp() + pdu.encode_abort(0, 0))
    assert tracker.seen_release_rp and tracker.seen_abort and tracker.last_type == pdu.A_ABORT


def test_tracker_empty_body_completes_at_header() -> None:
    tracker = BoundaryTracker()
    tracker.feed(make_pdu(pdu.P_DATA_TF, b""))
    assert tracker.at_boundary and tracker.pdus == 1


def test_tracker_errors_are_sticky() -> None:
    tracker = BoundaryTracker(max_pdu_length=1000)
    tracker.feed(make_pdu(pdu.P_DATA_TF, bytes(1000)))
    with pytest.raises(PduError, match="more than the limit 1000") as info:
        tracker.feed(b"\x04\x00\x00\x00" + b"\x03\xe9")
    assert info.value.abort_reason == 6
    with pytest.raises(PduError, match="more than the limit"):
        tracker.feed(pdu.encode_release_rq())
    assert tracker.pdus == 1

    tracker = BoundaryTracker()
    with pytest.raises(PduError) as info:
        tracker.feed(b"\x00\x00\x00\x00\x00\x00")
    assert info.value.abort_reason == pdu.UNRECOGNIZED_PDU
    tracker = BoundaryTracker()
    with pytest.raises(PduError, match="must be 4"):
        tracker.feed(b"\x06\x00\x00")
        tracker.feed(b"\x00\x00\x00")


def test_tracker_skips_bodies_without_looking() -> None:
    """A body full of bytes that look like headers must not be read as headers."""
    fake_headers = pdu.encode_abort(2, 6) * 1000
    pdv = struct.pack(">I", len(fake_headers) + 2) + b"\x01\x00" + fake_headers
    tracker = BoundaryTracker()
    tracker.feed(make_pdu(pdu.P_DATA_TF, pdv))
    assert tracker.pdus == 1 and tracker.at_boundary and not tracker.seen_abort


def test_parse_header_at_an_offset() -> None:
    stream = pdu.encode_release_rq() + pdu.encode_abort(2, 6)
    assert pdu.parse_header(stream, 10) == (pdu.A_ABORT, 4)
    with pytest.raises(PduError, match="needs 6 bytes, got 5"):
        pdu.parse_header(stream, 15)


@pytest.mark.parametrize(
    ("header", "first", "limit", "reason", "words"),
    [
        ((0x08, 4), False, None, pdu.UNRECOGNIZED_PDU, "unknown PDU type 0x08"),
        ((0x00, 0xFFFFFFFF), True, 10, pdu.UNRECOGNIZED_PDU, "unknown PDU type 0x00"),
        ((pdu.P_DATA_TF, 0xFFFFFFFF), True, 10, pdu.UNEXPECTED_PDU, "not an A-ASSOCIATE-RQ"),
        ((pdu.A_ABORT, 5), True, None, pdu.UNEXPECTED_PDU, "first PDU has type 0x07"),
        ((pdu.A_ABORT, 5), False, 4, pdu.INVALID_PARAMETER, "A-ABORT has length 5, must be 4"),
        (
            (pdu.A_ASSOCIATE_RQ, 11),
            True,
            10,
            pdu.INVALID_PARAMETER,
            "A-ASSOCIATE-RQ announces 11 bytes, more than the limit 10",
        ),
    ],
)
def test_check_header_judges_in_order(
    header: tuple[int, int], first: bool, limit: int | None, reason: int, words: str
) -> None:
    """Unknown type, then (for a first PDU) unexpected type, then a fixed size, then the limit."""
    with pytest.raises(PduError) as info:
        pdu.check_header(*header, limit, first=first)
    assert (info.value.abort_reason, words in str(info.value)) == (reason, True)


def test_check_header_passes() -> None:
    pdu.check_header(pdu.A_ASSOCIATE_RQ, 10, 10, first=True)
    pdu.check_header(pdu.P_DATA_TF, 0xFFFFFFFF)
    pdu.check_header(pdu.A_RELEASE_RP, 4, 4)


def test_split_pdu() -> None:
    rq, release = pyn_rq(), pdu.encode_release_rq()
    assert split_pdu(b"") is None
    assert split_pdu(rq[:5]) is None
    assert split_pdu(rq[:-1]) is None
    assert split_pdu(rq) == (rq, b"")
    assert split_pdu(bytearray(rq + release[:3])) == (rq, release[:3])
    assert split_pdu(memoryview(rq + release), first=True) == (rq, release)
    assert split_pdu(release + rq) == (release, rq)
    whole = split_pdu(bytearray(rq))
    assert whole is not None and all(type(part) is bytes for part in whole)
    with pytest.raises(PduError, match="not an A-ASSOCIATE-RQ") as info:
        split_pdu(release[:6], first=True)  # judged on the header, no body waited for
    assert info.value.abort_reason == pdu.UNEXPECTED_PDU
    with pytest.raises(PduError, match="more than the limit 100"):
        split_pdu(rq[:6], max_pdu_length=100)
    assert split_pdu(rq, max_pdu_length=len(rq) - 6) == (rq, b"")


def test_split_pdu_and_the_tracker_refuse_in_the_same_words() -> None:
    """One header judge: the message a client gets logged for a long first PDU is the relay's."""
    header = struct.pack(">BxI", pdu.P_DATA_TF, 1001)
    with pytest.raises(PduError) as framed:
        split_pdu(header, max_pdu_length=1000)
    with pytest.raises(PduError) as tracked:
        BoundaryTracker(1000).feed(header)
    with pytest.raises(PduError) as measured:
        pdu_framing.pdu_length_needed(header, max_pdu_length=1000)
    assert str(framed.value) == str(tracked.value) == str(measured.value)
    assert str(framed.value) == "P-DATA-TF announces 1001 bytes, more than the limit 1000"
    unknown = b"\x0a\x00\x00\x00\x00\x04"
    with pytest.raises(PduError) as framed:
        split_pdu(unknown)
    with pytest.raises(PduError) as tracked:
        BoundaryTracker().feed(unknown)
    with pytest.raises(PduError) as parsed:
        pdu.parse_pdu(unknown + b"abcd")
    assert str(framed.value) == str(tracked.value) == str(parsed.value) == "unknown PDU type 0x0a"


# --------------------------------------------------------------------------- properties


def valid_pdus() -> st.SearchStrategy[bytes]:
    fixed = st.sampled_from(
        [pdu.encode_release_rq(), pdu.encode_release_rp(), pdu.encode_abort(2, 1)]
    )
    data_tf = st.binary(max_size=300).map(
        lambda b: make_pdu(pdu.P_DATA_TF, struct.pack(">I", len(b) + 2) + b"\x01\x00" + b)
    )
    associate = st.sampled_from([make_associate(), pdu.encode_reject(1, 1, 7)])
    return st.one_of(fixed, data_tf, associate)


@given(st.lists(valid_pdus(), max_size=12), st.data())
@settings(max_examples=300)
def test_tracker_chunking_does_not_matter(pdus: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pdus)
    boundaries, total = set(), 0
    for one in pdus:
        total += len(one)
        boundaries.add(total)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    tracker = BoundaryTracker()
    previous = 0
    for cut in [*cuts, len(stream)]:
        tracker.feed(memoryview(stream)[previous:cut])
        previous = cut
        assert tracker.at_boundary == (cut == 0 or cut in boundaries)
        assert tracker.pdus == sum(1 for b in boundaries if b <= cut)
    whole = BoundaryTracker()
    whole.feed(stream)
    assert (
        (tracker.pdus, tracker.last_type)
        == (whole.pdus, whole.last_type)
        == (
            len(pdus),
            pdus[-1][0] if pdus else None,
        )
    )
    for flag, pdu_type in [("seen_release_rq", 5), ("seen_release_rp", 6), ("seen_abort", 7)]:
        assert getattr(tracker, flag) == getattr(whole, flag) == any(p[0] == pdu_type for p in pdus)


@given(st.lists(st.binary(max_size=64), max_size=10), st.one_of(st.none(), st.integers(0, 100)))
def test_tracker_on_any_bytes_only_raises_pdu_error(chunks: list[bytes], cap: int | None) -> None:
    tracker = BoundaryTracker(max_pdu_length=cap)
    try:
        for chunk in chunks:
            tracker.feed(chunk)
    except PduError as error:
        assert error.abort_reason in (1, 6)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in chunks, cut at the given offsets (sorted, repeats give empty chunks)."""
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def frame_all(
    chunks: list[bytes], max_pdu_length: int | None = None, first: bool = False
) -> tuple[list[bytes], bytes]:
    """What a reader gets from `split_pdu` as the chunks arrive: the PDUs, and what is left."""
    buffer, pdus = bytearray(), []
    for chunk in chunks:
        buffer += chunk
        while (whole := split_pdu(buffer, max_pdu_length=max_pdu_length, first=first)) is not None:
            one, rest = whole
            pdus.append(one)
            buffer = bytearray(rest)
    return pdus, bytes(buffer)


@given(st.lists(valid_pdus(), max_size=12), st.binary(max_size=5), st.data())
@settings(max_examples=300)
def test_framer_chunking_does_not_matter(
    pdus: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(pdus) + tail  # tail: less than a header of the next PDU
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert frame_all(cut(stream, cuts)) == (pdus, tail)
    assert frame_all([stream]) == (pdus, tail)


@given(
    st.sampled_from([pdu.A_ASSOCIATE_RQ, pdu.A_ASSOCIATE_AC, pdu.P_DATA_TF]),
    st.integers(0, 1000),
    st.integers(1, 0xFFFFFFFF),
    st.binary(max_size=64),
    st.data(),
)
def test_a_too_long_header_raises_the_same_error_however_it_arrives(
    pdu_type: int, limit: int, excess: int, body: bytes, data: st.DataObject
) -> None:
    length = min(limit + excess, 0xFFFFFFFF)
    stream = struct.pack(">BxI", pdu_type, length) + body  # any part of the body may be there
    words = f"{pdu.PDU_NAMES[pdu_type]} announces {length} bytes, more than the limit {limit}"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    with pytest.raises(PduError) as framed:
        frame_all(cut(stream, cuts), max_pdu_length=limit)
    tracker = BoundaryTracker(limit)
    with pytest.raises(PduError) as tracked:
        for chunk in cut(stream, cuts):
            tracker.feed(chunk)
    for error in (framed.value, tracked.value):
        assert (str(error), error.abort_reason) == (words, pdu.INVALID_PARAMETER)


@given(
    st.lists(st.binary(max_size=64), max_size=10),
    st.one_of(st.none(), st.integers(0, 100)),
    st.booleans(),
)
def test_framer_on_any_bytes_only_raises_pdu_error(
    chunks: list[bytes], limit: int | None, first: bool
) -> None:
    try:
        pdus, rest = frame_all(chunks, max_pdu_length=limit, first=first)
    except PduError as error:
        assert error.abort_reason in (1, 2, 6) and str(error)
    else:
        assert b"".join(pdus) + rest == b"".join(chunks)
        for one in pdus:
            assert len(one) == pdu.HEADER_LENGTH + pdu.parse_header(one)[1]


# --------------------------------------------------------------------------- read_pdu


class Chunks:
    """A stream that delivers the given chunks, one per read, then end of stream."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [chunk for chunk in chunks if chunk]  # b"" would mean the end

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


async def read_all(chunks: list[bytes], limit: int, initial: bytes = b"") -> list[bytes]:
    stream, pdus, rest = Chunks(chunks), [], initial
    while True:
        try:
            one, rest = await read_pdu(stream, limit, first=False, initial=rest)
        except PeerClosed:
            return pdus
        pdus.append(one)


@given(st.lists(valid_pdus(), min_size=1, max_size=8), st.data())
@settings(max_examples=100)
def test_read_pdu_chunking_does_not_matter(pdus: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pdus)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = cut(stream, cuts)
    assert trio.run(read_all, chunks, 1 << 16) == pdus
    initial = data.draw(st.integers(0, len(chunks)))  # some chunks already read by the caller
    assert trio.run(read_all, chunks[initial:], 1 << 16, b"".join(chunks[:initial])) == pdus


async def test_read_pdu_limit_counts_the_header() -> None:
    rq = make_associate()
    assert await read_pdu(Chunks([rq]), len(rq), first=True) == (rq, b"")
    with pytest.raises(PduError, match=f"announces {len(rq) - 6} bytes, more than the limit"):
        await read_pdu(Chunks([rq[:6]]), len(rq) - 1, first=True)


async def test_read_pdu_ends() -> None:
    with pytest.raises(PeerClosed, match="closed before sending a PDU"):
        await read_pdu(Chunks([]), 1 << 16, first=True)
    with pytest.raises(PduError, match="closed after 7 bytes of a PDU") as info:
        await read_pdu(Chunks([make_associate()[:7]]), 1 << 16, first=True)
    assert info.value.abort_reason == pdu.INVALID_PARAMETER
    with pytest.raises(PduError, match="not an A-ASSOCIATE-RQ"):  # no body waited for
        await read_pdu(Chunks([b"\x04\x00\xff\xff\xff\xff"]), 1 << 16, first=True)
