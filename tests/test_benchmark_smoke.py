"""The benchmark (benchmarks/run.py) runs end to end on tiny inputs, so that it cannot rot.

Nothing here asserts a timing or a target: numbers from one tiny run on a shared machine mean
nothing. Only that every workload was measured on every setup and the results were written.
The one run also takes the optional setups (--operations, --workers 1,2), so they cannot rot
either: their checks (audit file, /metrics) fail the run when they do not hold. It takes W2R too
(issue 16: W2 with TLS sessions resumed; about 8 s more), whose own check fails the run when the
associations did not resume. HAProxy and
stunnel are measured when installed (scripts/test.sh installs both). A second run counts the
proxy's instructions under callgrind (--callgrind; skipped without valgrind).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MEASURED = {  # what each workload is for (the columns of benchmarks/report.py)
    "W1": {"throughput_mb_s", "cpu_s_per_gb", "machine_busy_pct", "peak_rss_mib"},
    "W2": {"associations_per_s", "cpu_ms_per_assoc", "peak_rss_mib"},
    "W2R": {"associations_per_s", "cpu_ms_per_assoc", "resumed_pct", "peak_rss_mib"},
    "W3": {"throughput_mb_s", "cpu_s_per_gb", "machine_busy_pct", "peak_rss_mib"},
    "W4": {"idle_kib_handshake", "idle_kib_traffic", "peak_rss_mib"},
}
POSITIVE = {"throughput_mb_s", "associations_per_s", "peak_rss_mib"}
MACHINE = {  # the facts printed beside every figure (benchmarks/machine.py)
    "date",
    "cpu",
    "cores",
    "cpu_flags",
    "kernel",
    "python",
    "proxy_openssl",
    "proxy_openssl_cryptography",
    "stunnel",
    "haproxy",
    "dcmtk",
    "git_commit",
}


def run_benchmark(script: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """benchmarks/SCRIPT with `args`, its results into `out`; it must exit 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.dcmtk
def test_quick_benchmark_measures_every_workload(tmp_path: Path) -> None:
    done = run_benchmark(
        "run.py",
        tmp_path,
        "--quick",
        "--workloads",
        "W1,W2,W2R,W3,W4",
        "--operations",
        "--workers",
        "1,2",
    )
    [result] = tmp_path.glob("run-*.json")
    data = json.loads(result.read_text())
    assert [r for r in data["runs"] if r["error"]] == []
    assert set(data["medians"]) == {"W1", "W2", "W2R", "W3", "W4"}
    ops = {"proxy-term-ops", "proxy-orig-ops"}
    w2 = {"proxy-term-w2", "proxy-orig-w2"}
    plain = [s for s in data["setups"] if s not in ops | w2]
    middleboxes = [s for s in plain if s != "direct"]
    assert {"proxy-term", "proxy-orig"} <= set(middleboxes)
    assert ops | w2 <= set(data["setups"])
    extra = {"W1": ops, "W2": w2, "W2R": set(), "W3": ops | w2, "W4": set()}
    for workload, per_setup in data["medians"].items():
        expected = set(plain if workload not in ("W2R", "W4") else middleboxes) | extra[workload]
        assert set(per_setup) == expected
    for run in data["runs"]:
        if run["setup"] in ops:  # audit file and /metrics held every association
            checks = run["checks"]
            assert checks["audit_associations"] == checks["associations_logged"] > 0
            assert checks["metrics_associations"] == checks["associations_logged"]
        if run["setup"] in w2:  # the parent and its two workers
            assert len(run["peak_rss_each_kib"]) == 3
        if run["workload"] == "W2R" and run["setup"].startswith("proxy-"):  # every one resumed
            assert run["checks"]["resumed"] == run["checks"]["associations"] > 0, run
    assert {"termination-ops", "origination-ops"} <= set(data["ratios"]["W3"])  # no stunnel needed
    if "haproxy-term" in data["setups"]:  # the second anchor: ratios against it too
        for workload in ("W1", "W2", "W2R", "W3", "W4"):
            keys = set(data["ratios"][workload])
            assert {"termination/haproxy", "origination/haproxy"} <= keys, (workload, keys)
        assert "ratio termination/haproxy" in done.stdout
    assert set(data["machine"]) >= MACHINE, data["machine"]
    assert data["machine"]["proxy_openssl"].startswith("OpenSSL")
    assert "machine: " in done.stdout and "proxy: OpenSSL" in done.stdout
    # workers = 2 against workers = 1, per association (issue 12's acceptance), judged
    assert {"termination-w2/w1", "origination-w2/w1"} <= set(data["ratios"]["W2"])
    for target in ("W2 CPU ms/assoc, workers", "W3 MB/s, workers = 2"):
        workers = [t for t in data["targets"] if t["target"].startswith(target)]
        assert [t["direction"] for t in workers] == ["origination-w2/w1", "termination-w2/w1"]
        assert all(t["value"] > 0 for t in workers)
    resumed = [t for t in data["targets"] if t["target"].startswith("W2R CPU ms/assoc")]
    assert [t["direction"] for t in resumed] == ["termination", "origination"]
    assert [t["direction"] for t in data["targets"] if t["target"].startswith("operations on")] == [
        "termination",
        "origination",
    ]
    # Each of the proxy's setups has a number for everything its workload is for; sizes mean
    # nothing on a tiny run, except that what cannot be zero is not.
    for workload, names in MEASURED.items():
        for setup in ("proxy-term", "proxy-orig"):
            got = data["medians"][workload][setup]
            assert names <= set(got), (workload, setup, got)
            assert all(math.isfinite(got[name]) for name in names), (workload, setup, got)
            assert all(got[name] > 0 for name in names & POSITIVE), (workload, setup, got)
    assert "targets (proxy):" in done.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert result.with_suffix(".png").stat().st_size > 0


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_quick_callgrind_counts_per_association_and_per_mb(tmp_path: Path) -> None:
    done = run_benchmark(
        "run.py",
        tmp_path,
        "--quick",
        "--workloads",
        "W2",
        "--without-stunnel",
        "--without-haproxy",
        "--callgrind",
        "--callgrind-runs",
        "1",
    )
    [result] = tmp_path.glob("run-*.json")
    counts = json.loads(result.read_text())["callgrind"]
    phases = {(r["direction"], r["kind"]) for r in counts["runs"]}
    assert phases == {(d, k) for d in ("termination", "origination") for k in ("association", "MB")}
    for run in counts["runs"]:
        assert run["error"] is None, run
        # the window of 2N units cost more than the window of N: the difference is the count
        assert run["window_2n"] > run["window_n"] > 0, run
        assert run["per_unit"] > 0, run
    assert "callgrind: the proxy's user-space instructions" in done.stdout


@pytest.mark.dcmtk
def test_store_and_forward_benchmark_runs_on_a_tiny_study(tmp_path: Path) -> None:
    """benchmarks/store_and_forward.py (issue 14) on 20 instances of 16 KiB: every setup
    measured, every instance delivered (the script checks it), the table printed."""
    done = run_benchmark("store_and_forward.py", tmp_path, "--instances", "20", "--size-kb", "16")
    assert "| relay |" in done.stdout
    assert "| s&f, PACS down: drain alone |" in done.stdout
    [result] = tmp_path.glob("sf-*.json")
    data = json.loads(result.read_text())
    assert [r["setup"] for r in data["runs"]] == ["direct", "relay", "sf-up", "sf-down"]
    assert [r for r in data["runs"] if r["error"]] == []
    assert all(r["checks"]["pacs_received"] == 20 for r in data["runs"])
    assert set(data["ratios_vs_relay"]) >= {
        "s&f, PACS up: end to end",
        "s&f, PACS down: ingest alone",
    }
    assert data["machine"]["cpu"]
