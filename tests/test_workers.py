"""`workers = N`: one parent binds, N workers serve, signals forwarded, dead workers restarted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.supervisor import QUICK_DEATHS, STABLE_AFTER, Backoff
from tests.support import (
    TIMEOUT,
    ProxyProcess,
    RawClient,
    build_rq,
    certificate_of,
    dcmtk,
    free_port,
    proxy_config,
    running_proxy,
    toml_dumps,
    wait_until,
)
from tests.test_audit_metrics import Samples, ctx, get, metrics_address, scrape, value
from tests.test_operations import HeldUpstream
from tests.test_termination import dcmtk_tls, storescp


def workers_config(pki: Path, upstream: str, port: int) -> dict[str, Any]:
    return proxy_config(
        pki,
        upstream,
        proxy={"workers": 2, "log_format": "json"},
        listener=[{"name": "tls", "bind": f"127.0.0.1:{port}", "tls": "in"}],
    )


def _started(proxy: ProxyProcess) -> list[int]:
    wait_until(lambda: len(proxy.find(event="listening")) == 2, what="both workers listening")
    pids = list(proxy.wait_for(event="workers-started")["pids"])
    # Two running workers, not the parent: "none of them is left alive" checks something.
    assert len(set(pids)) == 2 and proxy.proc.pid not in pids, pids
    assert all(_alive(pid) for pid in pids), pids
    return pids


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

            assert _echoes(pki, port, 40) == [0] * 40
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
            assert _echoes(pki, port, 40) == [0] * 40
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
        # Exits the parent asked for are told apart from deaths: no error, no restart.
        stopped = sorted(
            (line["worker"], line["code"]) for line in proxy.find(event="worker-stopped")
        )
        assert stopped == [(0, 0), (1, 0)]
        assert not proxy.find(event="worker-exited") and not proxy.find(level="error")
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
        _killed_supervisor_takes_its_workers(proxy, pids)


def _killed_supervisor_takes_its_workers(proxy: ProxyProcess, pids: list[int]) -> None:
    """SIGKILL gives the parent no chance to stop its workers: they follow within a second."""
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    wait_until(
        lambda: not any(_alive(pid) for pid in pids),
        timeout=1.0,
        what="workers to follow their killed parent within a second",
    )
    for index in range(len(pids)):
        line = proxy.wait_for(event="stopping", worker=index)
        assert line["cause"] == "supervisor-gone", line


IDLE = 30.0  # well past trio's idle thread lifetime (10 s), which once took every worker down
STEADY = 30.0  # seconds of one association every STEP
STEP = 0.25


@pytest.mark.dcmtk
def test_workers_stay_up_idle_and_under_steady_traffic(tmp_path: Path, pki: Path) -> None:
    """A gateway runs for months: its workers must not die on any clock of their own. (They
    were killed 10.0 s after each start: PR_SET_PDEATHSIG followed the thread that forked them.)
    The supervisor's own clocks are run past too: STABLE_AFTER resets the back-off."""
    with storescp(tmp_path, "--fork") as (device, _):
        port = free_port()
        with running_proxy(tmp_path, workers_config(pki, device, port)) as proxy:
            pids = _started(proxy)
            # Two quick deaths of worker 0 first (restarted after 1 s, then 2 s): the back-off
            # must start from 1 s again once its successor has run STABLE_AFTER.
            for n, delay in enumerate((1.0, 2.0), start=1):
                os.kill(pids[0], signal.SIGKILL)
                restarted = wait_until(
                    lambda n=n: proxy.find(event="worker-restarted", worker=0)[n - 1 :],
                    what=f"restart {n} of worker 0",
                )[0]
                assert restarted["delay"] == delay
                pids[0] = restarted["pid"]
                wait_until(lambda n=n: len(proxy.find(event="listening")) == 2 + n, what="it")
            since = time.monotonic()
            exits = len(proxy.find(event="worker-exited"))

            time.sleep(IDLE)  # no condition to wait for: the point is that nothing happens
            assert len(proxy.find(event="worker-exited")) == exits, proxy.raw
            assert [pid for pid in pids if _alive(pid)] == pids

            codes = []
            deadline = time.monotonic() + STEADY
            while time.monotonic() < deadline:
                codes.append(
                    subprocess.run(
                        [dcmtk("echoscu"), *dcmtk_tls(pki), "-aec", "CT", "127.0.0.1", str(port)],
                        capture_output=True,
                        timeout=TIMEOUT,
                    ).returncode
                )
                time.sleep(STEP)
            assert len(codes) >= STEADY / (STEP + 1.0) and codes == [0] * len(codes)
            wait_until(
                lambda: len(proxy.find(event="association", outcome="completed")) == len(codes),
                what="every association logged completed",
            )
            assert len(proxy.find(event="worker-exited")) == exits
            errors = proxy.find(level="error")
            assert [e["event"] for e in errors] == ["worker-exited"] * exits, errors
            assert [pid for pid in pids if _alive(pid)] == pids

            time.sleep(max(0.0, since + STABLE_AFTER + 1 - time.monotonic()))
            os.kill(pids[0], signal.SIGKILL)  # it ran STABLE_AFTER: 1 s again, not 4 s
            restarted = wait_until(
                lambda: proxy.find(event="worker-restarted", worker=0)[2:], what="restart 3"
            )[0]
            assert restarted["delay"] == 1.0
            pids[0] = restarted["pid"]
            wait_until(lambda: len(proxy.find(event="listening")) == 5, what="the new worker 0")
            _killed_supervisor_takes_its_workers(proxy, pids)


def _echoes(pki: Path, port: int, n: int) -> list[int]:
    """`n` DCMTK echoscu processes at once through the proxy; their exit codes."""
    clients = [
        subprocess.Popen(
            [dcmtk("echoscu"), *dcmtk_tls(pki), "-aec", "CT", "127.0.0.1", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    return [c.wait(TIMEOUT) for c in clients]


ASSOCIATIONS = "dicom_tls_proxy_associations_total"
ACTIVE = "dicom_tls_proxy_active_associations"


def _total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == ASSOCIATIONS)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


@pytest.mark.dcmtk
def test_two_workers_serve_metrics_summed_over_both(tmp_path: Path, pki: Path) -> None:
    held = HeldUpstream()
    try:
        with storescp(tmp_path, "--fork") as (device, _):
            port = free_port()
            cfg = workers_config(pki, device, port)
            cfg["route"][0].update(health_check=True, health_check_interval=1.0)
            cfg["route"].append({"called_ae": "HELD", "upstream": held.address})
            cfg["metrics"] = {"bind": "127.0.0.1:0"}
            with running_proxy(tmp_path, cfg) as proxy:
                pids = _started(proxy)
                folder = Path(proxy.wait_for(event="workers-started")["metrics_folder"])
                assert stat.S_IMODE(folder.stat().st_mode) == 0o700
                web = metrics_address(proxy)  # served by the parent
                assert get(web, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")

                def ready() -> dict[str, Any] | None:
                    status, content_type, body = get(web, "/readyz")
                    assert content_type == "application/json"
                    data: dict[str, Any] = json.loads(body)
                    assert (status == 200) is data["ready"]
                    return data if data["ready"] else None

                def checked() -> dict[str, Any] | None:
                    data = ready()
                    return data if data and data["routes"].get("CT", {}).get("ok") else None

                readyz = wait_until(checked, what="ready, with CT's upstream checked")
                assert readyz["listeners"] == [f"127.0.0.1:{port}"]
                assert readyz["config"] == str(proxy.config_path)
                assert readyz["workers"] == [
                    {"worker": i, "pid": pid, "ready": True} for i, pid in enumerate(pids)
                ]
                assert set(readyz["routes"]) == {"CT"}  # HELD has no health check

                # 40 at once, spread over both workers, counted once each in /metrics.
                assert _echoes(pki, port, 40) == [0] * 40
                wait_until(lambda: _total(scrape(web)) == 40, what="40 associations in /metrics")
                samples = scrape(web)
                assoc = {"listener": "tls", "route": "CT", "outcome": "completed"}
                assert value(samples, ASSOCIATIONS, **assoc) == 40
                assert value(samples, "dicom_tls_proxy_association_duration_seconds_count") == 40
                assert value(samples, "dicom_tls_proxy_handshake_seconds_count") == 40
                assert value(samples, "dicom_tls_proxy_bytes_total", direction="up") > 0
                assert value(samples, ACTIVE) == 0
                assert value(samples, "dicom_tls_proxy_upstream_up", route="CT") == 1
                assert value(samples, "dicom_tls_proxy_audit_dropped_total") == 0
                expiry = "dicom_tls_proxy_certificate_expiry_seconds"
                for kind, path in (("certificate", pki / "proxy.pem"), ("ca", pki / "ca.pem")):
                    expected = certificate_of(path).not_valid_after_utc.timestamp() - time.time()
                    assert abs(value(samples, expiry, tls="in", kind=kind) - expected) < 120
                # One sample per series: per-worker values were summed, not listed.
                assert not any("pid" in dict(labels) for _, labels in samples)
                per_worker = Counter(line["worker"] for line in proxy.find(event="association"))
                assert set(per_worker) == {0, 1}, per_worker

                # An association held open on worker 0 (worker 1 paused, so 0 accepts it).
                os.kill(pids[1], signal.SIGSTOP)
                try:
                    wait_until(lambda: _state(pids[1]) == "T", what="worker 1 paused")
                    client = RawClient(("127.0.0.1", port), ctx(pki))
                    client.send(build_rq("HELD"))
                    assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
                finally:
                    os.kill(pids[1], signal.SIGCONT)
                wait_until(lambda: value(scrape(web), ACTIVE) == 1, what="1 active association")
                before = scrape(web)

                # Worker 0 is killed: its association goes, its counts stay.
                os.kill(pids[0], signal.SIGKILL)
                proxy.wait_for(event="worker-exited", worker=0)
                assert client.read_eof() == b""
                client.close()

                def none_active() -> Samples | None:
                    samples = scrape(web)
                    return samples if value(samples, ACTIVE) == 0 else None

                after = wait_until(
                    none_active, what="the dead worker's association to leave the gauge"
                )
                counters = [
                    key
                    for key in before
                    if key[0].endswith(("_total", "_count", "_sum", "_bucket"))
                ]
                assert counters and all(after.get(k, 0.0) >= before[k] for k in counters)
                assert _total(after) == 40

                # The other worker serves while the parent restarts the dead one.
                assert _echoes(pki, port, 5) == [0] * 5
                restarted = proxy.wait_for(event="worker-restarted", worker=0)

                def ready_again() -> dict[str, Any] | None:
                    data = ready()
                    return data if data and data["workers"][0]["pid"] != pids[0] else None

                readyz = wait_until(ready_again, what="ready again with the new worker 0")
                assert [w["pid"] for w in readyz["workers"]] == [restarted["pid"], pids[1]]
                assert _echoes(pki, port, 10) == [0] * 10
                wait_until(lambda: _total(scrape(web)) == 55, what="55 associations in /metrics")
                samples = scrape(web)
                assert value(samples, ASSOCIATIONS, **assoc) == 55
                assert value(samples, ACTIVE) == 0
                assert all(samples.get(k, 0.0) >= after[k] for k in counters)
                assert get(web, "/healthz")[0] == 200

                proxy.proc.send_signal(signal.SIGTERM)
                assert proxy.proc.wait(TIMEOUT) == 0
            assert not folder.exists()  # the parent removed its private folder
    finally:
        held.release.set()
        held.close()


def test_worker_metrics_follow_a_reload(tmp_path: Path, pki: Path) -> None:
    """Certificate times come from the workers' generation in force, not the parent's start."""
    import datetime

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from dicom_tls_proxy.dev import pki as factory

    key, cert = tmp_path / "served.key", tmp_path / "served.pem"
    shutil.copy(pki / "proxy.key", key)
    key.chmod(0o600)
    shutil.copy(pki / "proxy.pem", cert)
    cfg = workers_config(pki, "127.0.0.1:9", free_port())
    cfg["tls"]["in"].update(certificate=cert, private_key=key)
    cfg["metrics"] = {"bind": "127.0.0.1:0"}
    expiry = "dicom_tls_proxy_certificate_expiry_seconds"
    with running_proxy(tmp_path, cfg) as proxy:
        _started(proxy)
        web = metrics_address(proxy)
        first = wait_until(
            lambda: value(scrape(web), expiry, tls="in", kind="certificate"), what="expiry"
        )
        assert first > 300 * 86400  # the development PKI's leaf
        ca: Any = (
            load_pem_private_key((pki / "ca.key").read_bytes(), None),
            certificate_of(pki / "ca.pem"),
        )
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
        new_key, new_cert = factory.make_leaf(*ca, "proxy", ips=["127.0.0.1"], not_after=soon)
        factory.write_pem_key(tmp_path / "new.key", new_key)
        factory.write_pem_cert(tmp_path / "new.pem", new_cert)
        os.replace(tmp_path / "new.key", key)
        os.replace(tmp_path / "new.pem", cert)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(proxy.find(event="reloaded")) == 2, what="both workers reloaded")
        wait_until(
            lambda: (
                abs(value(scrape(web), expiry, tls="in", kind="certificate") - 10 * 86400) < 120
            ),
            what="the reloaded certificate's expiry in /metrics",
        )


def test_sigusr1_to_the_supervisor_reports_and_stops_nothing(tmp_path: Path, pki: Path) -> None:
    """Operators signal the pid in pid_file: SIGUSR1 there must log stats, as without workers
    (it killed the supervisor, and its workers followed it)."""
    with running_proxy(tmp_path, workers_config(pki, "127.0.0.1:9", free_port())) as proxy:
        pids = _started(proxy)
        wait_until(lambda: len(proxy.find(event="started")) == 2, what="both workers started")
        proxy.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: len(proxy.find(event="stats")) == 3, what="parent and workers' stats")
        parent = [line for line in proxy.find(event="stats") if "worker" not in line]
        assert len(parent) == 1 and parent[0]["workers"] == 2, parent
        assert sorted(line["worker"] for line in proxy.find(event="stats") if "worker" in line) == [
            0,
            1,
        ]
        assert proxy.proc.poll() is None and all(_alive(pid) for pid in pids)
        assert not proxy.find(event="stopping") and not proxy.find(level="error")
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(TIMEOUT) == 0
