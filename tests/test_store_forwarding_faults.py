"""Store-and-forward when the proxy's own side fails while forwarding (issue 14: nothing lost,
and the proxy keeps serving): the spool's disk full at the moment an instance must move to
failed/. What is asserted is what operators see: the log lines, the files, a proxy still up.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support import (
    LegacyDevice,
    ProxyProcess,
    free_port,
    make_dataset,
    running_proxy,
    toml_dumps,
    wait_until,
)
from tests.test_store_and_forward import (
    plaintext_config,
    pynetdicom_store,
    sf_route,
    small_disk,
    spooled,
)

pytestmark = pytest.mark.dcmtk


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; its path."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def disk_full_line(proxy: ProxyProcess) -> dict[str, Any] | None:
    """The first forward-failed line that blames a full disk; fails if the proxy ended."""
    if proxy.proc.poll() is not None:
        pytest.fail("the proxy ended:\n" + "\n".join(proxy.raw))
    lines = proxy.find(event="forward-failed")
    return next((x for x in lines if "No space left on device" in x["cause"]), None)


def test_a_full_disk_when_an_instance_must_go_to_failed_is_retried_not_fatal(
    tmp_path: Path,
) -> None:
    """The upstream refuses an instance for good (0xA900) while the spool's disk is full, so its
    reason cannot be written in failed/: the instance stays queued, the forwarder backs off and
    says why, the proxy goes on; once there is room it is in failed/ with its reason."""
    port = free_port()
    with small_disk(tmp_path / "small") as disk:
        spool = disk / "spool"
        route = sf_route(f"127.0.0.1:{port}", spool)
        with running_proxy(tmp_path, plaintext_config(route)) as proxy:
            instance = make_dataset(64, 64, seed=3)
            assert pynetdicom_store(proxy.address("legacy-in"), [instance]) == [0x0000]
            proxy.wait_for(event="forward-failed")  # nothing listens yet
            filler = fill(disk)
            pacs = LegacyDevice("PACS", port=port)
            pacs.store_status = lambda data_set: 0xA900
            try:
                failed = wait_until(lambda: disk_full_line(proxy), 30, "a forward-failed line")
                assert "failed/" in failed["cause"]
                assert proxy.proc.poll() is None
                assert [dcmread(p).SOPInstanceUID for p in spooled(spool)] == [
                    instance.SOPInstanceUID
                ]
                filler.unlink()
                line = proxy.wait_for(event="failed", timeout=30)
                wait_until(lambda: not spooled(spool), what="an empty queue")
            finally:
                pacs.close()
        assert line["sop_instance"] == instance.SOPInstanceUID
        assert [dcmread(p).SOPInstanceUID for p in (spool / "failed").glob("*.dcm")] == [
            instance.SOPInstanceUID
        ]
        assert not [raw for raw in proxy.raw if "Traceback" in raw]
        assert sorted(p.name for p in spool.iterdir()) == [".forwarder.lock", "failed"]


def test_a_reload_that_changes_spool_max_bytes_does_not_cut_a_batch(tmp_path: Path) -> None:
    """SIGHUP in the middle of a forwarding association, with a new spool_max_bytes (and a new
    retry_interval): the association goes on, every instance arrives once, none twice."""
    instances = [make_dataset(64, 64, seed=40 + i) for i in range(6)]
    port = free_port()
    spool = tmp_path / "spool"
    config = plaintext_config(sf_route(f"127.0.0.1:{port}", spool))
    with running_proxy(tmp_path, config) as proxy:
        assert pynetdicom_store(proxy.address("legacy-in"), instances) == [0x0000] * 6
        proxy.wait_for(event="forward-failed")  # nothing listens yet: all six wait
        pacs = LegacyDevice("PACS", port=port)

        def slowly(data_set: Any) -> int:
            time.sleep(0.3)
            return 0x0000

        pacs.store_status = slowly
        try:
            wait_until(lambda: pacs.stored, what="the first instance at the PACS")
            route = config["route"][0]
            route.update(spool_max_bytes=10_000_000, retry_interval=0.7)
            config["proxy"]["log_format"] = "json"
            proxy.config_path.write_text(toml_dumps(config))
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for(event="reloaded")
            wait_until(lambda: not spooled(spool), what="an empty spool")
            proxy.wait_for(event="forwarded")  # logged once the association is released
            forwarded = proxy.find(event="forwarded")
        finally:
            pacs.close()
    uids = [ds.SOPInstanceUID for ds in pacs.stored]
    assert sorted(uids) == sorted(ds.SOPInstanceUID for ds in instances)
    assert [x["count"] for x in forwarded] == [6]
