"""The benchmark (benchmarks/run.py) runs end to end on tiny inputs, so that it cannot rot.

Nothing here asserts a timing or a target: numbers from one tiny run on a shared machine mean
nothing. Only that every workload was measured on every setup and the results were written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.dcmtk
def test_quick_benchmark_measures_every_workload(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = tmp_path.glob("run-*.json")
    data = json.loads(result.read_text())
    assert [r for r in data["runs"] if r["error"]] == []
    assert set(data["medians"]) == {"W1", "W2", "W3", "W4"}
    middleboxes = [s for s in data["setups"] if s != "direct"]
    assert {"proxy-term", "proxy-orig"} <= set(middleboxes)
    for workload, per_setup in data["medians"].items():
        assert set(per_setup) == set(data["setups"] if workload != "W4" else middleboxes)
    assert data["medians"]["W1"]["proxy-term"]["throughput_mb_s"] > 0
    assert data["medians"]["W2"]["proxy-term"]["cpu_ms_per_assoc"] >= 0
    assert data["medians"]["W4"]["proxy-term"]["idle_kib_handshake"] is not None
    assert "targets (proxy):" in done.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert result.with_suffix(".png").stat().st_size > 0
