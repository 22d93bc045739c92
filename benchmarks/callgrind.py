"""The proxy's instruction counts per association and per MB under callgrind (run.py --callgrind).

Timings on a shared 2-core machine move by tens of percent between rounds of the same code; the
number of user-space instructions the proxy executes for the same work does not. This counts them:

- the proxy runs under `valgrind --tool=callgrind --instr-atstart=no`, so its start (imports,
  config, listeners) is not counted and runs at a few times native speed;
- it is warmed up (two C-ECHO associations per direction, uncounted), then instrumentation is
  switched on (`callgrind_control -i on`), one more association per direction runs, and counters
  are zeroed;
- each measured phase is a pair of windows, N units then 2N units of the same work, each ended by
  waiting until the proxy logged every association and used no CPU for a while, then
  `callgrind_control -d` (dump and zero). The count per unit is (window 2N - window N) / N: what
  a window costs whatever its size (the dump, the last housekeeping tick) cancels out.
    per association  C-ECHO associations through the proxy (as W2), N = 10
    per MB           one association storing an instance of 32 MiB, then one of 64 MiB (as W1);
                     MB = 10^6 bytes of the DICOM files' sizes, as in CPU s/GB
  Both for termination (TLS client -> proxy -> plaintext storescp) and origination (plaintext
  client -> proxy -> storescp +tls), in one proxy process with both devices up.
- `PYTHONHASHSEED=0` in the proxy's environment: hash randomisation otherwise changes dict and
  set layouts, and so the count, from one process to the next.

The whole is repeated (`--callgrind-runs`, default 2) with a fresh proxy each time, and the
table shows every repetition and their spread. Only the proxy's user-space instructions are
counted (Ir), the kernel's work on its behalf is not: compare versions of the proxy with these,
not the proxy with stunnel.

This module measures and reports; it never changes the proxy or its config beyond the benchmark's
(setups.proxy_config).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import procs
import setups
import workloads
from setups import Endpoint, Pki, Ports, Setup, Tools
from workloads import MIB, Data

Kind = Literal["association", "MB"]
ECHOES = 10  # N for the per-association count (the second window runs 2N)
STORE_BYTES = 32 * MIB  # the smaller instance for the per-MB count (the second is twice as big)
QUICK_ECHOES = 2
QUICK_STORE_BYTES = 1 * MIB
START_TIMEOUT = 300.0  # the proxy's start under valgrind (instrumentation off) took about 10 s
QUIET_S = 1.0  # no CPU used for this long: the proxy's work after traffic (heap trim) is done
DIRECTIONS = {"termination": "proxy-term", "origination": "proxy-orig"}


@dataclass
class Count:
    """One measured phase: instructions in the window of N units and in that of 2N units."""

    direction: str  # termination | origination
    kind: Kind  # per association (W2-like) | per MB (W1-like)
    repeat: int
    units: float = 0.0  # N: associations, or MB between the two instances
    window_n: int | None = None  # instructions in the window of N units
    window_2n: int | None = None  # instructions in the window of 2N units
    error: str | None = None

    @property
    def per_unit(self) -> float | None:
        if self.window_n is None or self.window_2n is None or not self.units:
            return None
        return (self.window_2n - self.window_n) / self.units


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def measure_all(
    tools: Tools, pki: Pki, data: Data, work: Path, *, quick: bool, repeats: int
) -> list[Count]:
    """Every phase, `repeats` times, each repetition in a fresh proxy under callgrind."""
    echoes = QUICK_ECHOES if quick else ECHOES
    small = QUICK_STORE_BYTES if quick else STORE_BYTES
    files = (
        workloads.instance(data.w1.parent / f"callgrind-{small // MIB}MiB.dcm", small),
        workloads.instance(data.w1.parent / f"callgrind-{2 * small // MIB}MiB.dcm", 2 * small),
    )
    counts: list[Count] = []
    for repeat in range(repeats):
        folder = work / f"run-{repeat + 1}"
        folder.mkdir(parents=True)
        started = time.perf_counter()
        got = _one_proxy(tools, pki, files, echoes, folder, repeat)
        counts += got
        shown = ", ".join(
            f"{c.direction} per {c.kind} {_mega(c.per_unit)}" if not c.error else "FAILED"
            for c in got
        )
        print(
            f"  callgrind run {repeat + 1}: {shown}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
            file=sys.stderr,
        )
    return counts


def _one_proxy(
    tools: Tools, pki: Pki, files: tuple[Path, Path], echoes: int, work: Path, repeat: int
) -> list[Count]:
    counts = [Count(d, k, repeat) for k in ("association", "MB") for d in DIRECTIONS]
    try:
        with ExitStack() as stack:
            endpoints = _start(stack, tools, pki, work)
            pid = endpoints["termination"].measured_pid
            assert pid is not None
            logged = 0
            for endpoint in endpoints.values():  # warm-up, uncounted
                for _ in range(2):
                    workloads.echo(endpoint, tools)
                logged = workloads.wait_logged(endpoint, logged + 2)
            _control(pid, "-i", "on")
            for endpoint in endpoints.values():  # the first instrumented association
                workloads.echo(endpoint, tools)
            logged = workloads.wait_logged(endpoints["termination"], logged + 2)
            procs.wait_cpu_quiet(pid, quiet=QUIET_S, timeout=procs.TIMEOUT)
            _control(pid, "-z")
            dumps = _Dumps(work)
            for count in counts:
                endpoint = endpoints[count.direction]
                windows = []
                for size in (1, 2):
                    if count.kind == "association":
                        for _ in range(size * echoes):
                            workloads.echo(endpoint, tools)
                        logged += size * echoes
                    else:
                        argv = endpoint.dcmtk(tools.storescu, str(files[size - 1]))
                        procs.run_clients([argv], setups.CLIENT_ENV, workloads.CLIENT_TIMEOUT)
                        logged += 1
                    workloads.wait_logged(endpoint, logged)
                    procs.wait_cpu_quiet(pid, quiet=QUIET_S, timeout=procs.TIMEOUT)
                    windows.append(dumps.take(pid))
                count.window_n, count.window_2n = windows
                if count.kind == "association":
                    count.units = echoes
                else:
                    count.units = (files[1].stat().st_size - files[0].stat().st_size) / 1e6
    except (procs.BenchmarkError, subprocess.CalledProcessError, OSError) as exc:
        for count in counts:
            if count.window_2n is None:
                count.error = str(exc)
    return counts


def _start(
    stack: ExitStack, tools: Tools, pki: Pki, work: Path, *, resumption: bool = False
) -> dict[str, Endpoint]:
    """Both devices (storescp and storescp +tls) and the proxy under callgrind, listening; with
    `resumption`, W2R's config (the proxy resumes its sessions with the TLS device)."""
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={work / 'callgrind.out'}",
        tools.python,
    ]
    return proxy_with_devices(
        stack, tools, pki, work, valgrind, "proxy under callgrind", resumption=resumption
    )


def proxy_with_devices(
    stack: ExitStack,
    tools: Tools,
    pki: Pki,
    work: Path,
    python: list[str],
    name: str,
    *,
    resumption: bool = False,
) -> dict[str, Endpoint]:
    """Both devices (storescp and storescp +tls) and one proxy serving both directions, run as
    `python` + `-m dicom_tls_proxy run` (so under valgrind or cProfile), listening; the endpoints
    of its termination and origination routes by direction."""
    ports = Ports.fresh()
    for setup_name, port in (("proxy-term", ports.device), ("proxy-orig", ports.tls_device)):
        setup = next(s for s in setups.SETUPS if s.name == setup_name)
        argv = [tools.storescp, "--ignore", "-aet", setup.called_ae]
        if setup.upstream_tls:
            argv += pki.dcmtk_args("proxy")
        argv.append(str(port))
        log = work / f"storescp-{setup.direction}.log"
        stack.enter_context(procs.started("storescp", argv, log, port=port, env=setups.DEVICE_ENV))
    config = work / "proxy.toml"
    config.write_text(setups.proxy_config(pki, ports, resumption=resumption))
    log = work / "proxy.log"
    argv = [*python, "-m", "dicom_tls_proxy", "run", "-c", str(config)]
    proxy = stack.enter_context(
        procs.started(
            name,
            argv,
            log,
            port=ports.plain_in,
            cwd=tools.proxy_source,
            env={"PYTHONHASHSEED": "0"},
            timeout=START_TIMEOUT,
        )
    )
    procs.wait_listening(ports.tls_in, proxy, name, log, START_TIMEOUT)
    endpoints = {}
    for direction, setup_name in DIRECTIONS.items():
        setup: Setup = next(s for s in setups.SETUPS if s.name == setup_name)
        endpoints[direction] = Endpoint(
            setup=setup,
            port=ports.tls_in if setup.client_tls else ports.plain_in,
            called_ae=setup.called_ae,
            client_args=pki.dcmtk_args("client") if setup.client_tls else [],
            measured_pid=proxy.pid,
            log=log,
            device_port=ports.tls_device if setup.upstream_tls else ports.device,
        )
    return endpoints


def _control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)],
        check=True,
        capture_output=True,
        timeout=procs.TIMEOUT,
    )


_TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.M)


class _Dumps:
    """`callgrind_control -d`: dump the counters since the last dump (or zeroing) and zero them;
    each dump is a new file callgrind.out.N in the work folder. `take` returns its total Ir."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen = set(folder.glob("callgrind.out*"))

    def take(self, pid: int) -> int:
        _control(pid, "-d")
        new = procs.wait_until(
            lambda: sorted(set(self.folder.glob("callgrind.out*")) - self.seen),
            "callgrind's dump file",
        )
        self.seen.update(new)
        [path] = new
        match = procs.wait_until(lambda: _TOTALS.search(path.read_bytes()), f"totals in {path}")
        return int(match.group(1))


# -- report ---------------------------------------------------------------------------------


def _mega(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def spread(values: list[float]) -> float | None:
    """(max - min) / min over the repetitions, None with fewer than two."""
    if len(values) < 2 or min(values) <= 0:
        return None
    return (max(values) - min(values)) / min(values)


def table(counts: list[Count]) -> str:
    lines = [
        "callgrind: the proxy's user-space instructions (Ir), start and warm-up not counted;",
        "  per unit = (window of 2N - window of N) / N; each repetition a fresh proxy",
        f"  {'':<14}{'per association (W2-like)':>38}{'per MB (W1-like)':>38}",
    ]
    for direction in DIRECTIONS:
        cells = []
        for kind in ("association", "MB"):
            mine = [c for c in counts if c.direction == direction and c.kind == kind]
            values = [v for c in mine if (v := c.per_unit) is not None]
            text = " ".join(_mega(v) for v in values) or "-"
            if any(c.error for c in mine):
                text += " (FAILED)"
            s = spread(values)
            if s is not None:
                text += f" (spread {100 * s:.1f}%)"
            cells.append(text.rjust(38))
        lines.append(f"  {direction:<14}{''.join(cells)}")
    failed = [c for c in counts if c.error]
    lines += [f"  FAILED {c.direction} per {c.kind}, run {c.repeat + 1}: {c.error}" for c in failed]
    return "\n".join(lines)


def to_json(counts: list[Count]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": [{**asdict(c), "per_unit": c.per_unit} for c in counts]}
    for direction in DIRECTIONS:
        for kind in ("association", "MB"):
            values = [
                v
                for c in counts
                if c.direction == direction and c.kind == kind and (v := c.per_unit) is not None
            ]
            out[f"{direction}_per_{kind}"] = {"values": values, "spread": spread(values)}
    return out
