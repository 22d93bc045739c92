"""Shared fixtures: a development PKI made once per session with the project's own `certs init`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_tls_proxy.dev.pki import init_pki
from tests.support import EVERY_PAGE, EVERY_PROXY_LINE, HAVE_DCMTK, LegacyDevice


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    init_pki(directory)
    return directory


@pytest.fixture
def legacy() -> Iterator[LegacyDevice]:
    device = LegacyDevice()
    try:
        yield device
    finally:
        device.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_DCMTK:
        return
    skip = pytest.mark.skip(
        reason="DCMTK (storescu/storescp) is not installed: apt-get install dcmtk"
    )
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)


BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]{64}")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{64,}")


def holds_key_line(line: str, key_lines: set[str]) -> bool:
    """Whether any 64-character line of a PEM key is in `line`, at any offset: a log line holds a
    key's newlines escaped (JSON `\\n`, whose n runs into the next PEM line)."""
    return any(
        run[i : i + 64] in key_lines
        for run in (m.group(0) for m in BASE64_RUN.finditer(line))
        for i in range(len(run) - 63)
    )


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_or_audit_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session: no line any proxy logged, no line of any audit file, and no line
    of any status page a test fetched (`EVERY_PAGE`), holds a line of any private key or any
    password file the tests wrote."""
    yield
    base = tmp_path_factory.getbasetemp()
    key_lines: set[str] = set()
    for key in base.rglob("*.key"):
        text = key.read_text(errors="replace") if key.is_file() else ""
        key_lines.update(m.group(0) for m in BASE64_LINE.finditer(text))
    passwords = {
        p.read_text(errors="replace").strip()
        for pattern in ("*.pass", "*pw*", "*password*")
        for p in base.rglob(pattern)
        if p.is_file() and p.stat().st_size < 200
    }
    passwords = {pw for pw in passwords if len(pw) >= 8}  # "wrong" is also an ordinary word
    lines = list(EVERY_PROXY_LINE)
    lines += [line for page in EVERY_PAGE for line in page.splitlines()]
    for trail in base.rglob("*.jsonl"):
        lines += trail.read_text(errors="replace").splitlines() if trail.is_file() else []
    leaks = [
        line
        for line in lines
        if holds_key_line(line, key_lines) or any(pw in line for pw in passwords)
    ]
    assert not leaks, (
        f"{len(leaks)} log/audit/page lines hold key material or a password: {leaks[:3]}"
    )
