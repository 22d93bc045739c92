"""`workers = N`: one parent binds, N workers serve, signals forwarded, dead workers restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dicom_tls_proxy.supervisor import QUICK_DEATHS, STABLE_AFTER, Backoff
from tests.support import (
    TIMEOUT,
    ProxyProcess,
    dcmtk,
    free_port,
    running_proxy,
    toml_dumps,
    wait_until,
)
from tests.test_termination import dcmtk_tls, storescp


def workers_config(pki: Path, upstream: str, port: int) -> dict[str, Any]:
    return {
        "proxy": {"workers": 2, "log_format": "json"},
        "tls": {
            "in": {
                "certificate": pki / "proxy.pem",
                "private_key": pki / "proxy.key",
                "ca": pki / "ca.pem",
            }
        },
        "listener": [{"name": "tls", "bind": f"127.0.0.1:{port}", "tls": "in"}],
        "route": [{"called_ae": "CT", "upstream": upstream}],
    }


def _started(proxy: ProxyProcess) -> list[int]:
    wait_until(lambda: len(proxy.find(event="listening")) == 2, what="both workers listening")
    return list(proxy.wait_for(event="workers-started")["pids"])


@pytest.mark.dcmtk
def test_two_workers_share_the_load_and_the_port(tmp_path: Path, pki: Path) -> None:
    with storescp(tmp_path, "--fork") as (device, _):
        port = free_port()
        cfg = workers_config(pki, device, port)
        with running_proxy(tmp_path, cfg) as proxy:
            pids = _started(proxy)
            # A second `run` on the same port fails clearly instead of sharing it.
            other = tmp_path / "other"
            other.mkdir()
            (other / "proxy.toml").write_text(toml_dumps({**cfg, "proxy": {"log_format": "json"}}))
            second = subprocess.run(
                [sys.executable, "-m", "dicom_tls_proxy", "run", "-c", str(other / "proxy.toml")],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert second.returncode == 1
            assert (
                "listener[0].bind: cannot listen on" in second.stderr and "in use" in second.stderr
            )

            clients = [
                subprocess.Popen(
                    [dcmtk("echoscu"), *dcmtk_tls(pki), "-aec", "CT", "127.0.0.1", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(40)
            ]
            assert [c.wait(TIMEOUT) for c in clients] == [0] * 40
            wait_until(
                lambda: len(proxy.find(event="association", outcome="completed")) == 40, what="40"
            )
            per_worker = Counter(line["worker"] for line in proxy.find(event="association"))
            assert set(per_worker) == {0, 1}, per_worker  # both workers served

            # A worker dies: the other keeps serving while the parent starts it again.
            os.kill(pids[0], signal.SIGKILL)
            proxy.wait_for(event="worker-exited", worker=0)
            during = [
                subprocess.run(
                    [dcmtk("echoscu"), *dcmtk_tls(pki), "-aec", "CT", "127.0.0.1", str(port)],
                    capture_output=True,
                    timeout=TIMEOUT,
                ).returncode
                for _ in range(5)
            ]
            assert during == [0] * 5
            restarted = proxy.wait_for(event="worker-restarted", worker=0)
            assert restarted["code"] == -signal.SIGKILL and restarted["delay"] == 1.0
            new_pid = restarted["pid"]
            assert new_pid not in pids and _alive(new_pid) and _alive(pids[1])
            wait_until(lambda: len(proxy.find(event="listening")) == 3, what="the new worker")
            before = len(proxy.find(event="association", worker=0))
            clients = [
                subprocess.Popen(
                    [dcmtk("echoscu"), *dcmtk_tls(pki), "-aec", "CT", "127.0.0.1", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(40)
            ]
            assert [c.wait(TIMEOUT) for c in clients] == [0] * 40
            wait_until(
                lambda: len(proxy.find(event="association", outcome="completed")) == 85, what="85"
            )
            assert len(proxy.find(event="association", worker=0)) > before  # the new one serves

            proxy.proc.send_signal(signal.SIGTERM)  # and the parent still stops cleanly
            assert proxy.proc.wait(TIMEOUT) == 0
    assert not any(_alive(pid) for pid in (*pids, new_pid))


def test_sigterm_stops_parent_and_workers(tmp_path: Path, pki: Path) -> None:
    with running_proxy(tmp_path, workers_config(pki, "127.0.0.1:9", free_port())) as proxy:
        pids = _started(proxy)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(TIMEOUT) == 0
    assert not any(_alive(pid) for pid in pids)


def test_a_worker_that_keeps_dying_makes_the_parent_give_up(tmp_path: Path, pki: Path) -> None:
    with running_proxy(tmp_path, workers_config(pki, "127.0.0.1:9", free_port())) as proxy:
        pids = _started(proxy)
        proxy.config_path.write_text("[proxy\n")  # every new worker now fails at once
        os.kill(pids[0], signal.SIGKILL)
        assert proxy.proc.wait(90) == 1  # restarts after 1, 2, 4, 8 s, each dying at once
        delays = [line["delay"] for line in proxy.find(event="worker-restarted", worker=0)]
        assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
        assert "in a row" in proxy.find(event="worker-exited", worker=0)[-1]["msg"]
    assert not any(_alive(pid) for pid in pids)


def test_backoff_doubles_caps_resets_and_gives_up() -> None:
    backoff = Backoff()
    assert [backoff.died(30.0) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.died(STABLE_AFTER) == 1  # ran long enough: from the start again
    quick = Backoff()
    assert [quick.died(0.5) for _ in range(QUICK_DEATHS)] == [1, 2, 4, 8, None]
    mixed = Backoff()
    assert [mixed.died(u) for u in (1, 1, 1, 1, 20, 1)] == [1, 2, 4, 8, 16, 32]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of the parent is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_never_outlive_a_killed_supervisor(tmp_path: Path, pki: Path) -> None:
    with running_proxy(tmp_path, workers_config(pki, "127.0.0.1:9", free_port())) as proxy:
        pids = _started(proxy)
        proxy.proc.send_signal(signal.SIGKILL)  # no chance to stop its workers itself
        proxy.proc.wait(TIMEOUT)
        wait_until(
            lambda: not any(_alive(pid) for pid in pids), what="workers to follow their parent"
        )
