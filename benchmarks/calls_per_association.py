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
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import callgrind
import procs
import resuming_echo
import setups
import workloads

Stats = dict[tuple[str, int, str], Any]


def profile(tools: setups.Tools, pki: setups.Pki, work: Path, count: int) -> Stats:
    """The proxy's cProfile stats after `count` resumed termination associations."""
    folder = work / f"n{count}"
    folder.mkdir()
    out = folder / "proxy.prof"
    with ExitStack() as stack:
        cprofile = [tools.python, "-m", "cProfile", "-o", str(out)]
        endpoints = callgrind.proxy_with_devices(
            stack, tools, pki, folder, cprofile, "proxy under cProfile", resumption=True
        )
        term = endpoints["termination"]
        with resuming_echo.primed(term, pki, count, workloads.CLIENT_TIMEOUT) as client:
            tally = client.go(workloads.CLIENT_TIMEOUT)
        if tally["resumed"] != count:
            raise procs.BenchmarkError(f"{count - tally['resumed']} did not resume: {tally}")
        workloads.wait_logged(term, count + 1)
    # Leaving the block stops the proxy with SIGTERM: cProfile writes its file as it exits.
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
            by_area[area(caller[0]) or "builtins"] += (figures[1] - earlier[1]) / n
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
