"""Shared fixtures: a development PKI made once per session with the project's own `certs init`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_tls_proxy.pki import init_pki
from tests.support import HAVE_DCMTK, LegacyDevice


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
