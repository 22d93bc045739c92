"""The spool on a real filesystem: what `finish` leaves (and does not leave), the limits, the
forwarder lock, failed/ and back, and what a crash leaves behind being cleaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_tls_proxy.store.spool import LOCK, Meta, Refused, Spool
from tests.test_store_protocol import encoded, rich_dataset

IMPLICIT = "1.2.840.10008.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def spool_at(tmp_path: Path, limit: int = 0) -> Spool:
    spool = Spool(tmp_path / "spool", limit, "2.25.77", "TESTIMPL")
    spool.prepare()
    return spool


def store(spool: Spool, data: bytes, sop: str = "1.2.3.4", pieces: int = 3) -> Meta:
    incoming = spool.begin(
        calling_ae="US_CART",
        called_ae="PACS",
        sop_class=CT,
        sop_instance=sop,
        transfer_syntax=IMPLICIT,
    )
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        if incoming.add(data[start : start + step]):
            incoming.flush()
    return incoming.finish()


def test_a_finished_instance_is_a_part10_file_with_its_json(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    data = encoded(rich_dataset(), IMPLICIT)
    meta = store(spool, data)
    path = spool.path_of(meta)
    assert path.read_bytes()[meta.data_offset :] == data
    read = pydicom.dcmread(path)
    assert read.file_meta.TransferSyntaxUID == IMPLICIT
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert read.file_meta.SourceApplicationEntityTitle == "US_CART"
    assert read.file_meta.ImplementationClassUID == "2.25.77"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["calling_ae"] == "US_CART" and sidecar["called_ae"] == "PACS"
    assert sidecar["size"] == len(data) and sidecar["attempts"] == 0
    assert {p.name for p in spool.folder.iterdir()} == {
        path.name,
        path.with_suffix(".json").name,
        "failed",
    }
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in spool.folder.iterdir() if p.is_file())
    assert (spool.folder.stat().st_mode & 0o777, spool.failed_folder.stat().st_mode & 0o777) == (
        0o700,
        0o700,
    )
    assert spool.usage().queued == 1 and spool.queued()[0] == meta


def test_a_data_set_that_does_not_parse_leaves_nothing(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    with pytest.raises(Refused) as refused:
        store(spool, encoded(rich_dataset(), IMPLICIT)[:-7])
    assert refused.value.status == 0xC000
    assert [p.name for p in spool.folder.iterdir()] == ["failed"]


def test_spool_max_bytes_refuses_with_a700_and_keeps_what_was_stored(tmp_path: Path) -> None:
    data = encoded(rich_dataset(), IMPLICIT)
    spool = spool_at(tmp_path, limit=2 * len(data) + 700)
    store(spool, data, "1.1")
    store(spool, data, "1.2")
    with pytest.raises(Refused) as refused:
        store(spool, data, "1.3")
    assert refused.value.status == 0xA700 and "spool_max_bytes" in str(refused.value)
    assert [m.sop_instance for m in spool.queued()] == ["1.1", "1.2"]
    assert not list(spool.folder.glob("*.tmp"))


def test_fail_and_retry_failed(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    meta = store(spool, encoded(rich_dataset(), IMPLICIT))
    spool.fail(meta, "the upstream answered status 0xa900")
    assert spool.queued() == [] and spool.usage().failed == 1
    (failed,) = spool.failed()
    assert failed.failed_reason == "the upstream answered status 0xa900" and failed.attempts == 1
    assert spool.retry_failed() == 1
    (back,) = spool.queued()
    assert (back.attempts, back.failed_reason) == (0, "") and spool.usage().failed == 0


def test_orphans_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (spool.folder / f"1-{dead}-000001.{dead}.tmp").write_bytes(b"half")
    (spool.folder / f"2-{os.getpid()}-000001.{os.getpid()}.tmp").write_bytes(b"being written")
    (spool.folder / "3-1-000001.json").write_text("{}")  # its instance never got renamed
    assert sorted(spool.remove_orphans()) == [f"1-{dead}-000001.{dead}.tmp", "3-1-000001.json"]
    assert (spool.folder / f"2-{os.getpid()}-000001.{os.getpid()}.tmp").exists()


def test_a_lost_json_is_rebuilt_from_the_file_meta(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    meta = store(spool, encoded(rich_dataset(), IMPLICIT))
    spool.path_of(meta).with_suffix(".json").unlink()
    (rebuilt,) = spool.queued()
    assert (rebuilt.sop_instance, rebuilt.calling_ae, rebuilt.size) == (
        "1.2.3.4",
        "US_CART",
        meta.size,
    )
    assert rebuilt.data_offset == meta.data_offset
    assert rebuilt.called_ae == "PACS"  # the file meta's Receiving AE Title


def test_the_forwarder_lock_is_held_by_one(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    with spool.forwarder_lock() as first:
        with spool.forwarder_lock() as second:
            assert (first, second) == (True, False)
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
                "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                str(spool.folder / LOCK),
            ],
            capture_output=True,
        )
        assert other.returncode != 0  # another process cannot take it either
    with spool.forwarder_lock() as again:
        assert again
