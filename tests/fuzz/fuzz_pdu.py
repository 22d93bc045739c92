#!/usr/bin/env python3
"""Coverage-guided fuzzing of the PDU decoder with atheris (see README.md beside this file).

    pip install atheris
    python tests/fuzz/fuzz_pdu.py tests/fuzz/corpus -max_total_time=60

`one_input` is the whole harness: any exception other than `PduError` is a crash, and so is a
broken promise (an AssertionError): a parsed PDU must describe itself in one printable line, an RQ's
AE titles must be valid, and `BoundaryTracker` must see the same PDUs whether the bytes come at once
or in pieces. `test_corpus.py` replays the checked-in corpus through the same function, so the
corpus is a regression test that needs no atheris. Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # instrument the decoder before its first import, for coverage
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this repository's package
    with atheris.instrument_imports(include=["dicom_tls_proxy"]):
        from dicom_tls_proxy.protocol import pdu, pdu_framing
else:
    from dicom_tls_proxy.protocol import pdu, pdu_framing

PIECES = (1, 2, 3, 5, 8, 13, 64, 4096)  # chunk sizes for the second tracker, in turn


def _tracker(data: bytes, pieces: tuple[int, ...] | None, limit: int | None) -> tuple[object, ...]:
    """Feed `data` to a tracker at once or in pieces; its state, and whether it raised."""
    tracker = pdu_framing.BoundaryTracker(limit)
    failed = False
    try:
        if pieces is None:
            tracker.feed(data)
        else:
            pos, turn = 0, 0
            while pos < len(data):
                size = pieces[turn % len(pieces)]
                tracker.feed(memoryview(data)[pos : pos + size])
                pos, turn = pos + size, turn + 1
    except pdu.PduError:
        failed = True
    state = (
        failed,
        tracker.pdus,
        tracker.last_type,
        tracker.seen_release_rq,
        tracker.seen_release_rp,
        tracker.seen_abort,
    )
    return state if failed else (*state, tracker.at_boundary)


def _check_parsed(parsed: pdu.Pdu, raw: bytes) -> None:
    line = pdu.describe(parsed)
    assert line.isprintable(), f"describe() is not one printable line: {line!r}"
    if isinstance(parsed, pdu.AssociateRequest):
        for title in (parsed.called_ae, parsed.calling_ae):
            assert pdu.validate_ae_title(title) == title, title
        assert parsed.raw == raw
        for pc in parsed.presentation_contexts:
            for uid in (pc.abstract_syntax, *pc.transfer_syntaxes):
                assert uid.isascii() and uid.isprintable(), uid
        assert pdu.rewrite_called_ae(raw, "OTHER")[:10] == raw[:10]
    if isinstance(parsed, pdu.AssociateAccept):
        assert parsed.called_ae.isprintable() and parsed.calling_ae.isprintable()


def one_input(data: bytes) -> None:
    """One fuzz input: parse it as one PDU, as a stream of PDUs, and track its boundaries."""
    try:
        _check_parsed(pdu.parse_pdu(data), data)
    except pdu.PduError:
        pass
    pos = 0  # a stream of PDUs, as the proxy reads them: header first, then the body
    while pos < len(data):
        try:
            needed = pdu_framing.pdu_length_needed(data[pos:], max_pdu_length=1 << 16)
        except pdu.PduError:
            break
        if needed is None or pos + needed > len(data):
            break
        try:
            _check_parsed(pdu.parse_pdu(data[pos : pos + needed]), data[pos : pos + needed])
        except pdu.PduError:
            pass
        pos += needed
    for limit in (None, 64):
        whole = _tracker(data, None, limit)
        assert _tracker(data, PIECES, limit) == whole, "pieces changed what the tracker saw"


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
