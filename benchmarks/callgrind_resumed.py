"""The proxy's instructions per association with TLS sessions resumed (W2R), under callgrind.

`run.py --callgrind` counts full handshakes (W2's config: no resumption towards the device, and
`echoscu`, which never resumes). This counts, in one proxy with W2R's config, as `callgrind.py`
does ((window 2N - window N) / N, fresh proxy, warm-up uncounted):

    termination, full handshake        echoscu (the control: as --callgrind's)
    termination, resumed               resuming_echo.py, every association resuming the last
    origination, resumed               echoscu in plaintext; the proxy resumes with storescp +tls

    python3 benchmarks/callgrind_resumed.py [-n 10]

The primed association of `resuming_echo` (a full handshake) is in both windows and cancels out.
Session 5 of benchmarks/README.md has its figures. It measures and prints; it changes nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import callgrind
import procs
import resuming_echo
import setups
import workloads
from setups import Endpoint

PHASES = ("termination, full handshake", "termination, resumed", "origination, resumed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=callgrind.ECHOES, help="N (default 10)")
    args = parser.parse_args()
    tools = setups.find_tools()
    work = Path(tempfile.mkdtemp(prefix="dicom-tls-proxy-cg-resumed-"))
    pki = setups.make_pki(tools, work / "pki")
    with ExitStack() as stack:
        endpoints = callgrind._start(stack, tools, pki, work, resumption=True)
        term, orig = endpoints["termination"], endpoints["origination"]
        pid = term.measured_pid
        assert pid is not None
        logged = 0
        for endpoint in (term, orig):  # warm-up, uncounted
            for _ in range(2):
                workloads.echo(endpoint, tools)
            logged = workloads.wait_logged(endpoint, logged + 2)
        callgrind._control(pid, "-i", "on")
        for endpoint in (term, orig):
            workloads.echo(endpoint, tools)
        logged = workloads.wait_logged(term, logged + 2)
        procs.wait_cpu_quiet(pid, quiet=callgrind.QUIET_S, timeout=procs.TIMEOUT)
        callgrind._control(pid, "-z")
        dumps = callgrind._Dumps(work)

        def echoes(endpoint: Endpoint) -> Callable[[int], int]:
            def run(count: int) -> int:
                for _ in range(count):
                    workloads.echo(endpoint, tools)
                return count

            return run

        def resumed(count: int) -> int:
            with resuming_echo.primed(term, pki, count, workloads.CLIENT_TIMEOUT) as client:
                tally = client.go(workloads.CLIENT_TIMEOUT)
            if tally["resumed"] != count:
                raise procs.BenchmarkError(f"{count - tally['resumed']} did not resume: {tally}")
            return count + 1  # and the primed one

        for phase, run in zip(PHASES, (echoes(term), resumed, echoes(orig)), strict=True):
            windows = []
            for size in (1, 2):
                logged = workloads.wait_logged(term, logged + run(size * args.n))
                procs.wait_cpu_quiet(pid, quiet=callgrind.QUIET_S, timeout=procs.TIMEOUT)
                windows.append(dumps.take(pid))
            print(f"{phase}: {(windows[1] - windows[0]) / args.n / 1e6:.2f} M instructions")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
