"""The fuzzing corpus as a regression test: every input atheris found interesting (and the seeds it
started from) goes through the same harness, without atheris. See README.md beside this file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.fuzz_pdu import one_input

CORPUS = sorted((Path(__file__).parent / "corpus").iterdir())


def test_corpus_is_small_and_present() -> None:
    assert 10 <= len(CORPUS) <= 60
    assert all(path.stat().st_size <= 8192 for path in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=[path.name[:16] for path in CORPUS])
def test_corpus_input(path: Path) -> None:
    one_input(path.read_bytes())
