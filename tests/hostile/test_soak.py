"""Soak: 200 DCMTK storescu associations at once, in waves, storing over TLS through the proxy to
`storescp --fork` (which pauses a second after each C-STORE, so that a wave's associations are all
busy at once), while a second process throws every hostile case of `cases.py` at the same proxy.
Run on demand: `python -m pytest -m soak tests/hostile -s` (a few minutes).

It ends with every legitimate C-STORE delivered byte-identical (status 0x0000, each dataset
compared with what was sent), every legitimate association `completed`, no `level=error` line, no
traceback, and prints its figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.hostile.cases import proxy_config
from tests.support import (
    HAVE_DCMTK,
    RssSampler,
    dcmtk,
    free_port,
    make_dataset,
    proxy_stats,
    raise_fd_limit,
    running_proxy,
    wait_port,
    wait_until,
)

pytestmark = [
    pytest.mark.soak,
    pytest.mark.dcmtk,
    pytest.mark.skipif(not HAVE_DCMTK, reason="needs DCMTK"),
]

CONCURRENT = 200  # storescu processes, one association each, at once
WAVES = 5
FILES = 5  # per association; storescp pauses a second after each, so a wave's associations overlap
ROWS = 256  # 256 x 256 x 16 bits: 128 KiB of pixel data per file
HOSTILE_THREADS = 8


def dataset(seed: int) -> Any:
    ds = make_dataset(1, 1, seed=seed)
    ds.Rows = ds.Columns = ROWS
    ds.PixelData = random.Random(seed).randbytes(ROWS * ROWS * 2)
    return ds


@contextmanager
def polling_stats(pid: int) -> Iterator[None]:
    """SIGUSR1 to the proxy every 0.25 s, so that its stats lines show the associations at once."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.25):
            os.kill(pid, signal.SIGUSR1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def storescp_fork(folder: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--fork", "--sleep-after", "1", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def test_soak_storescu_waves_under_attack(tmp_path: Path, pki: Path) -> None:
    raise_fd_limit(8192)
    sent: dict[str, Any] = {}
    batches: list[list[str]] = []
    for n in range(CONCURRENT * WAVES):
        files = []
        for i in range(FILES):
            ds = dataset(n * FILES + i)
            path = tmp_path / f"send-{n}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent[ds.SOPInstanceUID] = ds
            files.append(str(path))
        batches.append(files)
    received = tmp_path / "received"
    received.mkdir()
    stop = tmp_path / "stop-hostile"
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
    storescu = [dcmtk("storescu"), "-v", *tls, "-aec", "CT", "-aet"]
    env = {**os.environ, "TCP_NODELAY": "1"}

    with (
        storescp_fork(received) as device,
        running_proxy(tmp_path, proxy_config(pki, device, handshake_timeout=5.0)) as proxy,
    ):
        (host, port), plain = proxy.address("tls"), proxy.address("plain")
        baseline = proxy_stats(proxy)
        hostile = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.hostile.cases",
                f"{host}:{port}",
                f"{plain[0]}:{plain[1]}",
                str(pki),
                "600",
                str(HOSTILE_THREADS),
                str(stop),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        start = time.monotonic()
        failures: list[str] = []
        with RssSampler(proxy.proc.pid) as rss, polling_stats(proxy.proc.pid):
            for wave in range(WAVES):
                clients = [
                    subprocess.Popen(
                        [*storescu, f"SOAK{n}", host, str(port), *batches[n]],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env=env,
                    )
                    for n in range(wave * CONCURRENT, (wave + 1) * CONCURRENT)
                ]
                for client in clients:
                    out, _ = client.communicate(timeout=300)
                    successes = out.count("Received Store Response (Success)")
                    if client.returncode != 0 or successes != FILES:
                        failures.append(out)
            legit = CONCURRENT * WAVES
            wait_until(
                lambda: len([x for x in proxy.find(event="association") if _legit(x)]) == legit,
                timeout=120,
                what=f"{legit} association lines",
            )
            duration = time.monotonic() - start
            stop.touch()
            hostile_counts = json.loads(hostile.communicate(timeout=60)[0])

        def refused() -> int:
            lines = len([x for x in proxy.find(event="association") if not _legit(x)])
            return lines + sum(x["count"] for x in proxy.find(event="suppressed"))

        # every hostile connection logged (the last ones may wait for a `suppressed` line)
        wait_until(lambda: refused() >= hostile_counts["connections"], what="hostile lines")
        assert refused() <= hostile_counts["connections"] + hostile_counts["errors"]
        after = proxy_stats(proxy)
        wait_until(lambda: len(list(received.iterdir())) == len(sent), what="every file stored")

    lines = [x for x in proxy.find(event="association") if _legit(x)]
    moved = sum(x["bytes_up"] + x["bytes_down"] for x in lines)
    at_once = max(x["associations"] for x in proxy.find(event="stats"))
    print(
        f"\nsoak: {legit} associations ({CONCURRENT} per wave, {WAVES} waves, at most {at_once} "
        f"relayed at once), {len(sent)} C-STOREs"
        f", {moved / 2**20:.0f} MiB relayed in {duration:.1f}s; hostile connections "
        f"{hostile_counts['connections']} (+{hostile_counts['errors']} failed on the attacker's "
        f"side), {refused()} refusals logged; proxy VmRSS {rss.first} KiB at the start, "
        f"peak {rss.peak} KiB"
    )
    assert not failures, failures[0]
    assert {x["outcome"] for x in lines} == {"completed"}
    got = {ds.SOPInstanceUID: ds for ds in map(dcmread, received.iterdir())}
    assert got.keys() == sent.keys()
    for uid, ds in sent.items():
        assert got[uid].PixelData == ds.PixelData
        assert got[uid] == ds  # every element
    assert not proxy.find(level="error")
    assert not [x for x in proxy.lines if "traceback" in x or x["event"] == "unparsed"]
    assert hostile_counts["connections"] > 0
    assert after == baseline, (after, baseline)  # no fd, no task left behind


def _legit(line: dict[str, Any]) -> bool:
    return str(line.get("calling_ae", "")).startswith("SOAK")
