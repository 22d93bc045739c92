"""Benchmark dicom-tls-proxy against plaintext, stunnel and HAProxy, side by side, in one run.

    python benchmarks/run.py [--quick] [--runs N] [--workloads W1,W2,W2R,W3,W4] [--out DIR]
                             [--operations] [--workers 1,2] [--callgrind]

For each workload, each round measures every setup in turn (direct, proxy-term, stunnel-term,
haproxy-term, proxy-orig, stunnel-orig, haproxy-orig, then again), each with fresh processes; it
prints the machine's facts, medians, proxy/stunnel and proxy/haproxy ratios, judges the targets
(against stunnel), and writes DIR/run-TIMESTAMP.{json,png,txt}.
--callgrind adds the proxy's instruction counts per association and per MB (callgrind.py).
--operations adds proxy-term-ops and proxy-orig-ops (audit file and metrics on) to W1 and W3;
--workers 1,2 adds proxy-term-w2 and proxy-orig-w2 (`workers = 2`) to W3.
Exit status: 0 when every measurement was taken (targets met or not), 1 when one failed, 2 on a
usage error or missing DCMTK. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import callgrind
import machine
import procs
import report
import setups
import workloads
from setups import Pki, Setup, Tools
from workloads import (
    DEFAULT_WORKLOADS,
    FULL,
    PDU_SIZE,
    QUICK,
    RESUMING,
    WORKLOADS,
    Data,
    Run,
    Sizes,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, 1 run (smoke test)")
    parser.add_argument("--runs", type=int, help="rounds per workload (default 3; 1 with --quick)")
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all but W2R)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--without-stunnel", action="store_true", help="leave stunnel out even if installed"
    )
    parser.add_argument(
        "--without-haproxy", action="store_true", help="leave HAProxy out even if installed"
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="also count the proxy's instructions per association and per MB under callgrind "
        "(valgrind; slow: several minutes)",
    )
    parser.add_argument(
        "--callgrind-runs",
        type=int,
        default=2,
        help="repeat each callgrind count this many times, to show its spread (default 2)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy profiles (collapsed stacks) of the proxy per measurement (numbers perturbed)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (configs, PKI, every log)"
    )
    parser.add_argument(
        "--operations",
        action="store_true",
        help="also the proxy with its audit file and metrics server on (W1 and W3)",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="comma-separated `workers = N` values for W3 (default 1; 1,2 adds proxy-*-w2)",
    )
    args = parser.parse_args(argv)
    try:
        args.workers = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--workers: not a list of numbers: {args.workers!r}")
    if not args.workers or not all(1 <= n <= 64 for n in args.workers):
        parser.error("--workers: numbers from 1 to 64")
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown or not args.workloads:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.callgrind_runs < 1:
        parser.error("--callgrind-runs must be at least 1")
    return args


def upstream_for(workload: str) -> setups.Upstream:
    """W3's concurrent associations need storescp --fork; W4 brings its own device."""
    if workload == "W3":
        return "storescp-fork"
    return "external" if workload == "W4" else "storescp"


def measure_one(
    workload: str,
    setup: Setup,
    round_: int,
    tools: Tools,
    pki: Pki,
    data: Data,
    sizes: Sizes,
    work: Path,
    profiles: Path | None,
) -> Run:
    run = Run(workload, setup.name, round_)
    name = f"{workload}-{round_ + 1}-{setup.name}"
    folder = work / name
    folder.mkdir()
    profile = profiles / f"{name}.txt" if profiles and setup.middlebox == "proxy" else None
    upstream = upstream_for(workload)
    # storescp --fork does not wait for its children: their CPU would look like another's.
    other_load = run.machine if upstream != "storescp-fork" else {}
    started = time.perf_counter()
    try:
        with (
            procs.foreign_load(other_load),
            setups.running(
                setup, upstream, tools, pki, folder, resumption=workload in RESUMING
            ) as endpoint,
        ):
            workloads.measure(workload, endpoint, tools, pki, data, sizes, run, profile)
    except procs.BenchmarkError as exc:
        run.error = str(exc)
    print(_progress(run, time.perf_counter() - started), file=sys.stderr, flush=True)
    return run


def _progress(run: Run, seconds: float) -> str:
    head = f"  {run.workload} round {run.round + 1} {run.setup:<13}"
    if run.error:
        return f"{head} FAILED: {run.error}"
    shown = ", ".join(f"{report.LABELS[m]} {v:.1f}" for m, v in report.metrics(run).items())
    return f"{head} {shown}  ({seconds:.1f} s)"


def source_digest(folder: Path) -> str:
    """SHA-256 over the measured proxy's .py files (names and contents): which code was measured,
    also when the working tree had uncommitted changes."""
    digest = hashlib.sha256()
    for path in sorted((folder / "dicom_tls_proxy").rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def measure_all(
    args: argparse.Namespace, tools: Tools, sizes: Sizes, chosen: list[Setup], base: Path
) -> tuple[list[Run], str, list[callgrind.Count]]:
    """Every workload, round after round, every setup in turn within a round; then, with
    --callgrind, the proxy's instruction counts. Returns the runs, the digest of the proxy's
    source that was measured, and the counts."""
    runs: list[Run] = []
    counts: list[callgrind.Count] = []
    profiles = base.with_name(base.name + "-profiles") if args.profile else None
    if profiles:
        profiles.mkdir()
        print(f"profiling the proxy into {profiles}: these numbers are perturbed", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="dicom-tls-proxy-bench-"))
    try:
        tools = tools.with_snapshot(work / "src")
        digest = source_digest(tools.proxy_source)
        pki = setups.make_pki(tools, work / "pki")
        print("test data ...", file=sys.stderr, flush=True)
        data = workloads.make_data(args.out / "data", sizes, args.workloads)
        for workload in args.workloads:
            print(f"{workload}: {sizes.describe(workload)}", file=sys.stderr, flush=True)
            for round_ in range(args.runs):
                for setup in chosen:
                    if setups.applies(workload, setup):
                        runs.append(
                            measure_one(
                                workload, setup, round_, tools, pki, data, sizes, work, profiles
                            )
                        )
        if args.callgrind:
            counts = callgrind.measure_all(
                tools, pki, data, work / "callgrind", quick=args.quick, repeats=args.callgrind_runs
            )
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return runs, digest, counts


def summarize(
    args: argparse.Namespace,
    runs: list[Run],
    sizes: Sizes,
    names: list[str],
    facts: dict[str, Any],
    counts: list[callgrind.Count],
) -> str:
    med = report.medians(runs)
    rat = report.ratios(med)
    verdicts = report.judge(med, rat)
    descriptions = {w: sizes.describe(w) for w in WORKLOADS}
    text = machine.describe(facts) + "\n\n"
    text += report.table(med, rat, verdicts, names, descriptions, args.runs)
    if args.callgrind:
        text += "\n\n" + callgrind.table(counts)
    if args.quick:
        text += "\n(--quick: tiny inputs, one run; the targets are not meaningful here)"
    if args.profile:
        text += "\n(--profile: py-spy sampled the proxy; its numbers are perturbed)"
    text += "\n" + busy_machine_note(runs)
    failed = [r for r in runs if r.error]
    if failed:
        text += f"\n{len(failed)} measurement(s) FAILED:" + "".join(
            f"\n  {r.workload} round {r.round + 1} {r.setup}: {r.error}" for r in failed
        )
    return text


def busy_machine_note(runs: list[Run]) -> str:
    """How much CPU other processes took during the measurements: more than a little, and the
    numbers above are noisy (the alternation spreads the noise over every setup)."""
    cores = os.cpu_count() or 1
    foreign = sum(r.machine.get("foreign_cpu_s", 0.0) for r in runs)
    steal = sum(r.machine.get("steal_s", 0.0) for r in runs)
    capacity = cores * sum(r.machine.get("elapsed_s", 0.0) for r in runs) or 1.0
    note = (
        f"other processes used {foreign:.0f} CPU-s ({100 * foreign / capacity:.0f}% of the "
        f"machine) during the measurements; the host stole {steal:.0f} CPU-s (W3 not counted: "
        "storescp --fork does not wait for its children)"
    )
    if (foreign + steal) / capacity > 0.05:
        note += "\nWARNING: the machine was busy with other work: expect noisy numbers, run again"
    return note


def write_results(
    args: argparse.Namespace,
    base: Path,
    runs: list[Run],
    sizes: Sizes,
    names: list[str],
    text: str,
    facts: dict[str, Any],
    counts: list[callgrind.Count],
) -> None:
    med = report.medians(runs)
    rat = report.ratios(med)
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["benchmarks/run.py", *sys.argv[1:]]),
        "quick": args.quick,
        "profiled": args.profile,
        "runs_per_setup": args.runs,
        "sizes": vars(sizes),
        "workloads": {w: sizes.describe(w) for w in args.workloads},
        "setups": names,
        "operations": args.operations,
        "workers": args.workers,
        "pdu_bytes": PDU_SIZE,
        "machine": facts,
        "callgrind": callgrind.to_json(counts) if args.callgrind else None,
    }
    report.write_json(base.with_suffix(".json"), runs, med, rat, report.judge(med, rat), meta)
    base.with_suffix(".txt").write_text(text + "\n")
    print(f"results: {base.with_suffix('.json')}", file=sys.stderr)
    print(report.write_chart(base.with_suffix(".png"), runs, med, names), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = procs.raise_fd_limit()
    tools = setups.find_tools(
        with_stunnel=not args.without_stunnel, with_haproxy=not args.without_haproxy
    )
    sizes = QUICK if args.quick else FULL
    chosen = setups.chosen_setups(
        stunnel=bool(tools.stunnel),
        haproxy=bool(tools.haproxy),
        operations=args.operations,
        workers=args.workers,
    )
    names = [s.name for s in chosen]
    if not tools.stunnel:
        print("without stunnel (apt-get install -y stunnel4 to compare)", file=sys.stderr)
    if not tools.haproxy:
        print("without HAProxy (apt-get install -y haproxy to compare)", file=sys.stderr)
    if args.callgrind and not callgrind.available():
        print("--callgrind: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    print(
        f"setups: {', '.join(names)}; {args.runs} run(s) each; P-DATA PDUs of {PDU_SIZE} bytes "
        f"(storescp's default -pdu); fd limit {fd_limit}",
        file=sys.stderr,
    )
    for extra, where in [
        ([s for s in chosen if s.operations], setups.OPERATIONS_WORKLOADS),
        ([s for s in chosen if s.workers != 1], setups.WORKERS_WORKLOADS),
    ]:
        if extra and not set(where) & set(args.workloads):
            print(
                f"{', '.join(s.name for s in extra)} run only in {'/'.join(where)}: not chosen",
                file=sys.stderr,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
    # read before measuring: a commit made during a long run is not the code it measured
    facts = machine.facts(
        storescu=tools.storescu, stunnel=tools.stunnel, haproxy=tools.haproxy, started=started
    )
    runs, digest, counts = measure_all(args, tools, sizes, chosen, base)
    facts["proxy_source_sha256"] = digest
    text = summarize(args, runs, sizes, names, facts, counts)
    print(text)
    write_results(args, base, runs, sizes, names, text, facts, counts)
    failed = any(r.error for r in runs) or any(c.error for c in counts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
