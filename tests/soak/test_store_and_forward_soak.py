"""The long run of issue 14: a store-and-forward route living through PACS outages, reloads and
minutes of traffic, `workers = 1` and `workers = 2`.

    SOAK_SECONDS=600 python -m pytest -m soak tests/soak/test_store_and_forward_soak.py -s

Modalities (DCMTK storescu over TLS, a few new images per association) send without pause; the
PACS (DCMTK storescp) goes down for OUTAGE seconds every CYCLE seconds; every RELOAD seconds the
proxy gets SIGHUP. At the end the PACS stays up until the spool is empty. The run fails unless
every instance a modality got Success for arrived, byte for byte, exactly as sent; on any instance
in failed/, any error-level log line, any worker restart, and on open fds of the proxy drifting.
Under `-m soak` only: it runs for minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support import (
    HAVE_DCMTK,
    TIMEOUT,
    ProxyProcess,
    dcmtk,
    free_port,
    make_dataset,
    proxy_config,
    running_proxy,
    storescp_command,
    wait_port,
    wait_until,
)
from tests.test_origination import data_set
from tests.test_termination import dcmtk_tls

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CYCLE, OUTAGE, RELOAD = 45.0, 20.0, 60.0
PER_ASSOCIATION = 4
FD_SLACK = 10

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK (storescu, storescp) is not installed"),
]


class Pacs:
    """DCMTK storescp on a fixed port, stopped and started again by the outage loop."""

    def __init__(self, port: int, out: Path) -> None:
        self.port, self.out = port, out
        out.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            storescp_command(self.port, self.out, aet="PACS"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
            self.proc = None


def fds_of(proxy: ProxyProcess) -> dict[int, int]:
    """Open fds of the proxy's processes: the one process, or the parent and its workers."""
    pids = [proxy.proc.pid, *(proxy.find(event="workers-started") or [{"pids": []}])[-1]["pids"]]
    return {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in pids}


def soak(tmp_path: Path, pki: Path, workers: int, seconds: float) -> dict[str, Any]:
    spool, port = tmp_path / "spool", free_port()
    pacs = Pacs(port, tmp_path / "pacs")
    route = {
        "called_ae": "PACS",
        "upstream": f"127.0.0.1:{port}",
        "mode": "store-and-forward",
        "spool": str(spool),
        "retry_interval": 1.0,
        "retry_max_interval": 8.0,
        "listeners": ["tls"],
    }
    config = proxy_config(pki, "unused:1", route=[route])
    config["proxy"].update(workers=workers, pid_file=str(tmp_path / "proxy.pid"))
    sent: dict[str, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()
    source = tmp_path / "source"
    source.mkdir()

    def modality(address: tuple[str, int]) -> None:
        seed = 0
        while not stop.is_set():
            files = []
            for _ in range(PER_ASSOCIATION):
                seed += 1
                path = source / f"{seed}.dcm"
                make_dataset(96, 96, seed=seed).save_as(path, enforce_file_format=True)
                files.append(path)
            run = subprocess.run(
                [
                    dcmtk("storescu"),
                    *dcmtk_tls(pki),
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "PACS",
                    address[0],
                    str(address[1]),
                    *map(str, files),
                ],
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 2,
            )
            if run.returncode != 0:
                errors.append(f"storescu failed: {run.stderr[-500:]}")
                return
            for path in files:
                sent[dcmread(path).SOPInstanceUID] = data_set(path)
                path.unlink()

    def outages() -> None:
        while not stop.wait(CYCLE - OUTAGE):
            pacs.stop()
            if stop.wait(OUTAGE):
                break
            pacs.start()

    pacs.start()
    with running_proxy(tmp_path, config) as proxy:
        address = proxy.address("tls")
        wait_until(lambda: proxy.find(event="started"), what="a serving worker")
        start = fds_of(proxy)
        threads = [
            threading.Thread(target=modality, args=(address,)),
            threading.Thread(target=outages),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + seconds
        next_reload = time.monotonic() + RELOAD
        while time.monotonic() < deadline and not errors:
            time.sleep(0.5)
            if time.monotonic() > next_reload:
                os.kill(int((tmp_path / "proxy.pid").read_text()), signal.SIGHUP)
                next_reload += RELOAD
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        if pacs.proc is None:
            pacs.start()
        wait_until(lambda: not list(spool.glob("*.dcm")), timeout=120.0, what="an empty spool")
        end = fds_of(proxy)
        bad = [x for x in proxy.lines if x.get("level") == "error"]
        restarts = proxy.find(event="worker-exited")
    pacs.stop()
    arrived = {dcmread(p).SOPInstanceUID: data_set(p) for p in pacs.out.iterdir()}
    report = {
        "workers": workers,
        "seconds": seconds,
        "sent": len(sent),
        "arrived": len(arrived),
        "forward_failed_lines": len([x for x in proxy.lines if x.get("event") == "forward-failed"]),
        "forwarded_associations": len([x for x in proxy.lines if x.get("event") == "forwarded"]),
        "fds": {pid: (start[pid], end.get(pid)) for pid in start},
    }
    print(report)
    assert not errors, errors
    assert not bad, bad[:3]
    assert not restarts, restarts
    assert not list((spool / "failed").glob("*")), "instances in failed/"
    missing = sent.keys() - arrived.keys()
    assert not missing, f"{len(missing)} acknowledged instances never arrived"
    assert all(arrived[uid] == sent[uid] for uid in sent), "an instance arrived changed"
    assert all(end[pid] <= start[pid] + FD_SLACK for pid in start), report
    return report


@pytest.mark.parametrize("workers", [1, 2])
def test_store_and_forward_soak(tmp_path: Path, pki: Path, workers: int) -> None:
    report = soak(tmp_path, pki, workers, SOAK_SECONDS)
    assert report["forward_failed_lines"] > 0  # the outages did happen
