"""Python-level calls per resumed association (W2R termination), by area: where the interpreter's
share of an association goes.

The proxy runs under cProfile twice, once for N and once for 4N associations of
`resuming_echo.py` (every one resuming the session of the last); the difference of the two
profiles, divided by 3N, is what one more association costs, start-up and warm-up cancelled out:

    python3 benchmarks/calls_per_association.py [-n 100] [--top 25]

It prints the calls per association by area (trio with the builtins it calls, each proxy module
with its builtins, the standard library) and the functions called most. Session 5 of
benchmarks/README.md has its figures. cProfile slows the proxy; only counts are read from it.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import signal
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import procs
import resuming_echo
import setups
import workloads
from setups import Endpoint, Ports

Stats = dict[tuple[str, int, str], Any]


def profile(tools: setups.Tools, pki: setups.Pki, work: Path, count: int) -> Stats:
    """The proxy's cProfile stats after `count` resumed termination associations."""
    out = work / f"proxy-{count}.prof"
    with ExitStack() as stack:
        ports = Ports.fresh()
        setup = next(s for s in setups.SETUPS if s.name == "proxy-term")
        argv = [tools.storescp, "--ignore", "-aet", setup.called_ae, str(ports.device)]
        log = work / f"storescp-{count}.log"
        stack.enter_context(
            procs.started("storescp", argv, log, port=ports.device, env=setups.DEVICE_ENV)
        )
        config = work / "proxy.toml"
        config.write_text(setups.proxy_config(pki, ports, resumption=True))
        log = work / f"proxy-{count}.log"
        argv = [tools.python, "-m", "cProfile", "-o", str(out), "-m", "dicom_tls_proxy"]
        argv += ["run", "-c", str(config)]
        proxy = stack.enter_context(
            procs.started(
                "proxy",
                argv,
                log,
                port=ports.tls_in,
                env={"PYTHONHASHSEED": "0"},
                cwd=tools.proxy_source,
            )
        )
        endpoint = Endpoint(
            setup=setup,
            port=ports.tls_in,
            called_ae=setup.called_ae,
            client_args=pki.dcmtk_args("client"),
            measured_pid=proxy.pid,
            log=log,
            device_port=ports.device,
        )
        with resuming_echo.primed(endpoint, pki, count, workloads.CLIENT_TIMEOUT) as client:
            tally = client.go(workloads.CLIENT_TIMEOUT)
        if tally["resumed"] != count:
            raise procs.BenchmarkError(f"{count - tally['resumed']} did not resume: {tally}")
        workloads.wait_logged(endpoint, count + 1)
        proxy.send_signal(signal.SIGTERM)  # cProfile writes its file as the proxy exits
        proxy.wait(procs.TIMEOUT)
    stats: Stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    return stats


def area(filename: str) -> str | None:
    """Where a function lives; None for a builtin (counted with its caller's area)."""
    if filename == "~":
        return None
    if any(part in filename for part in ("site-packages/trio", "site-packages/outcome")):
        return "trio"
    if filename.startswith("<attrs generated methods") and (
        " trio." in filename or " outcome." in filename
    ):
        return "trio"  # trio's attrs classes
    if "/dicom_tls_proxy/" in filename:
        return "proxy " + filename.split("/dicom_tls_proxy/")[1].removesuffix(".py")
    if "site-packages/OpenSSL" in filename:
        return "pyOpenSSL"
    return "stdlib " + Path(filename).name


def difference(small: Stats, big: Stats, n: float) -> tuple[collections.Counter[str], list[Any]]:
    by_area: collections.Counter[str] = collections.Counter()
    functions = []
    for key, (_, calls, _, _, callers) in big.items():
        before = small.get(key, (0, 0, 0, 0, {}))
        functions.append(((calls - before[1]) / n, key))
        where = area(key[0])
        if where is not None:
            by_area[where] += (calls - before[1]) / n
            continue
        for caller, figures in callers.items():  # a builtin: its callers' areas
            earlier = before[4].get(caller, (0, 0, 0, 0))
            by_area[(area(caller[0]) or "builtins") + ""] += (figures[1] - earlier[1]) / n
    functions.sort(reverse=True)
    return by_area, functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="N (default 100; then 4N)")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args()
    tools = setups.find_tools()
    work = Path(tempfile.mkdtemp(prefix="dicom-tls-proxy-calls-"))
    pki = setups.make_pki(tools, work / "pki")
    small = profile(tools, pki, work, args.n)
    big = profile(tools, pki, work, 4 * args.n)
    by_area, functions = difference(small, big, 3 * args.n)
    total = sum(by_area.values())
    print(f"Python-level calls per resumed association: {total:.0f}")
    for where, calls in by_area.most_common():
        if calls >= 5:
            print(f"  {calls:7.0f}  {100 * calls / total:4.1f}%  {where}")
    print("most called:")
    for calls, (filename, line, name) in functions[: args.top]:
        print(f"  {calls:7.1f}  {Path(filename).name}:{line}({name})")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
