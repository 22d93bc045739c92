"""A study through a store-and-forward route, beside the relay route of the same study (issue 14).

    python benchmarks/store_and_forward.py [--instances 2000] [--size-kb 512] [--runs 1]
                                           [--tls] [--pacs-ignore] [--out DIR] [--work DIR]

One study (N CT instances of about SIZE KB each, 16-bit random pixels, distinct SOP Instance UIDs)
is generated once with pydicom. DCMTK `storescp` plays the PACS, DCMTK `storescu` the modality (one
association for the whole study). The proxy runs with one listener and two routes to the same
PACS: `RELAY` (mode relay) and `SPOOL` (mode store-and-forward, its spool in the work folder, the
same disk as the study and the PACS's folder). Each run measures, with fresh processes each time:

    direct    storescu ---------------------------------> storescp      (no proxy: the baseline)
    relay     storescu --> proxy (route RELAY) ---------> storescp
    sf-up     storescu --> proxy (route SPOOL) --spool--> storescp      the PACS up all along
    sf-down   storescu --> proxy (route SPOOL) --spool    storescp down while the study arrives,
                                               --spool--> storescp      then started

Wall time is from starting storescu to its exit for `direct`, `relay` and each ingest (storescu
exits once every C-STORE got Success: for a store-and-forward route, once every instance is durable
in the spool), and for a drain until the spool holds no instance. For `sf-down` the drain is
timed from the first instance leaving the spool (the wait for the forwarder's next retry, at most
`retry_max_interval`, is reported apart as `retry_wait_s`). CPU is the proxy's utime + stime (all
threads, from /proc/PID/stat) over the same interval; the PACS's is given too. MB/s and CPU s/GB
are per the study's bytes (the files' sizes; 10^6 and 10^9). Ratios are store-and-forward / relay.
Delivery is checked after every measurement: N files at the PACS, none left in the spool or its
failed/ folder, and the pixel data of a sample of instances identical to what was sent.

Writes OUT/sf-TIMESTAMP.json and .txt. Exit status 0 when every measurement was taken, 1 when one
failed, 2 when DCMTK is missing. See benchmarks/README.md, "Store-and-forward (issue 14)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import procs
from setups import CLIENT_ENV, DEVICE_ENV, Pki, Tools, find_tools, make_pki

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SETUPS = ("direct", "relay", "sf-up", "sf-down")
CALLING_AE = "BENCH"
PACS_AE = "PACS"
RELAY_AE = "RELAY"
SPOOL_AE = "SPOOL"
RETRY = (1.0, 2.0)  # the route's retry_interval and retry_max_interval while the PACS is down
SAMPLE = 5  # instances whose pixel data are compared after each measurement
LONG = 1800.0  # upper bound for one storescu or one drain (a healthy 1 GB run takes seconds)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2000, help="instances in the study")
    parser.add_argument("--size-kb", type=int, default=512, help="pixel data per instance, KiB")
    parser.add_argument("--runs", type=int, default=1, help="rounds (medians when more than 1)")
    parser.add_argument("--tls", action="store_true", help="the modality side speaks TLS")
    parser.add_argument(
        "--pacs-ignore",
        action="store_true",
        help="storescp --ignore (stores nothing: no PACS disk cost; delivery counted in its log)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--data", type=Path, help="keep the generated study here and reuse it")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the proxy during each measurement"
    )
    args = parser.parse_args(argv)
    if args.instances < 1 or args.size_kb < 1 or args.runs < 1:
        parser.error("--instances, --size-kb and --runs must be at least 1")
    return args


# -- the study ------------------------------------------------------------------------------


def make_study(folder: Path, count: int, size_kb: int) -> list[Path]:
    """`count` CT instances of one study, 512 rows x `size_kb` columns of 16-bit random pixels
    (`size_kb` KiB each), reused when a complete one is already there."""
    study = folder / f"study-{count}x{size_kb}k"
    done = folder / f"study-{count}x{size_kb}k.complete"
    paths = [study / f"ct{i:05d}.dcm" for i in range(count)]
    if done.exists():
        return paths
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "BENCH^STUDY"
    ds.PatientID = "BENCH"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 512, size_kb
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for number, path in enumerate(paths, start=1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        ds.PixelData = os.urandom(512 * size_kb * 2)
        ds.save_as(path, enforce_file_format=True)
    done.touch()
    return paths


# -- the proxy's config ---------------------------------------------------------------------


def proxy_config(port: int, pacs_port: int, spool: Path, pki: Pki | None) -> str:
    """One listener (TLS when `pki`), the relay route RELAY and the store-and-forward route
    SPOOL to the same PACS, access checks on as in production, one JSON log line per event."""
    q = json.dumps
    tls = listener_tls = peer = ""
    if pki is not None:
        tls = f"""
[tls.inbound]
certificate = {q(str(pki.cert("proxy")))}
private_key = {q(str(pki.key("proxy")))}
ca = {q(str(pki.ca))}
verify = "chain"
peer_certificate = "required"
profile = "tls13"
"""
        listener_tls = 'tls = "inbound"\n'
        peer = 'allow_peer = ["cn:dicom-client"]\n'
    route = f"""listeners = ["in"]
upstream = "127.0.0.1:{pacs_port}"
upstream_called_ae = "{PACS_AE}"
allow_calling_ae = ["{CALLING_AE}*"]
allow_source = ["127.0.0.0/8"]
{peer}"""
    return f"""\
[proxy]
log_level = "info"
log_format = "json"
{tls}
[[listener]]
name = "in"
bind = "127.0.0.1:{port}"
{listener_tls}allow_source = ["127.0.0.0/8"]

[[route]]
called_ae = "{RELAY_AE}"
{route}
[[route]]
called_ae = "{SPOOL_AE}"
mode = "store-and-forward"
spool = {q(str(spool))}
retry_interval = {RETRY[0]}
retry_max_interval = {RETRY[1]}
{route}"""


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Run:
    setup: str
    round: int
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # wall_s, cpu_s per phase
    checks: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)  # other processes' CPU meanwhile


@dataclass(frozen=True)
class Bench:
    tools: Tools
    pki: Pki | None
    study: list[Path]
    payload: int  # bytes of the study's files
    pacs_ignore: bool
    profiles: Path | None

    def client(self, tool: str, called_ae: str, port: int, *args: str) -> list[str]:
        tls = self.pki.dcmtk_args("client") if self.pki and called_ae != PACS_AE else []
        return [tool, *tls, "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port), *args]


def measure(bench: Bench, setup: str, round_: int, work: Path) -> Run:
    run = Run(setup, round_)
    folder = work / f"{setup}-{round_}"
    folder.mkdir()
    try:
        with procs.foreign_load(run.machine):
            _measure(bench, run, folder)
    except (procs.BenchmarkError, OSError, subprocess.SubprocessError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        # No dirty page of this measurement is written back during the next one.
        shutil.rmtree(folder / "pacs", ignore_errors=True)
        shutil.rmtree(folder / "spool", ignore_errors=True)
        os.sync()
    return run


def _measure(bench: Bench, run: Run, folder: Path) -> None:
    ports = {procs.free_port(), procs.free_port()}
    while len(ports) < 2:
        ports.add(procs.free_port())
    pacs_port, proxy_port = sorted(ports)
    pacs_out, spool = folder / "pacs", folder / "spool"
    pacs_out.mkdir()
    pacs_argv = [bench.tools.storescp, "-v", "-aet", PACS_AE]
    pacs_argv += ["--ignore"] if bench.pacs_ignore else ["+B", "-od", str(pacs_out)]
    pacs_argv.append(str(pacs_port))
    pacs_log = folder / "storescp.log"

    def start_pacs() -> subprocess.Popen[bytes]:
        return stack.enter_context(
            procs.started("storescp", pacs_argv, pacs_log, port=pacs_port, env=DEVICE_ENV)
        )

    with ExitStack() as stack:
        pacs = start_pacs() if run.setup != "sf-down" else None
        proxy = None
        if run.setup != "direct":
            config = folder / "proxy.toml"
            config.write_text(proxy_config(proxy_port, pacs_port, spool, bench.pki))
            argv = [bench.tools.python, "-m", "dicom_tls_proxy", "run", "-c", str(config)]
            proxy = stack.enter_context(
                procs.started(
                    "proxy",
                    argv,
                    folder / "proxy.log",
                    port=proxy_port,
                    cwd=bench.tools.proxy_source,
                )
            )
        called = {"direct": PACS_AE, "relay": RELAY_AE}.get(run.setup, SPOOL_AE)
        port = pacs_port if proxy is None else proxy_port
        _echo(bench, called, port)  # warm: the first association of a fresh proxy
        watched = proxy.pid if proxy is not None else None
        cpu = _Cpu(watched, pacs.pid if pacs else None)
        profile = bench.profiles / f"{run.setup}-{run.round}.txt" if bench.profiles else None
        stack.enter_context(procs.py_spy(watched, profile))
        cpu.mark("start")
        storescu = bench.client(
            bench.tools.storescu, called, port, "+sd", str(bench.study[0].parent)
        )
        wall = procs.run_clients([storescu], CLIENT_ENV, LONG)
        cpu.mark("sent")
        if run.setup in ("direct", "relay"):
            cpu.quiet("done")
            run.timings |= {"wall_s": wall, **cpu.between("start", "done", "")}
        elif run.setup == "sf-up":
            run.timings |= {"ingest_wall_s": wall, **cpu.between("start", "sent", "ingest_")}
            drain = _wait_drained(spool, len(bench.study))
            cpu.mark("drained")
            cpu.quiet("done")
            run.timings |= {
                "drain_wall_s": drain,
                **cpu.between("sent", "done", "drain_"),
                "e2e_wall_s": wall + drain,
                **cpu.between("start", "done", "e2e_"),
            }
        else:
            run.checks["spooled"] = _count(spool, ".dcm")
            if run.checks["spooled"] != len(bench.study):
                raise procs.BenchmarkError(
                    f"{run.checks['spooled']} instances in the spool after storescu, "
                    f"not {len(bench.study)}"
                )
            cpu.quiet("ingested")
            run.timings |= {"ingest_wall_s": wall, **cpu.between("start", "ingested", "ingest_")}
            t_up = time.perf_counter()
            pacs = start_pacs()
            cpu.pacs = pacs.pid
            cpu.mark("up")
            first = _wait_first_forwarded(spool, len(bench.study))
            drain = _wait_drained(spool, len(bench.study))
            cpu.quiet("done")
            run.timings |= {
                "retry_wait_s": first - t_up,
                "drain_wall_s": drain,
                **cpu.between("up", "done", "drain_"),
            }
        if called == SPOOL_AE:
            run.checks |= _forwarding(folder / "proxy.log")
        if proxy is not None:
            run.checks["proxy_peak_rss_mib"] = round(procs.memory_kib(proxy.pid)["VmHWM"] / 1024, 1)
        run.checks |= _verify(
            bench, pacs_out, pacs_log, spool, proxy is not None and called == SPOOL_AE
        )


class _Cpu:
    """CPU seconds of the proxy and of the PACS at named points of a measurement."""

    def __init__(self, proxy: int | None, pacs: int | None) -> None:
        self.proxy, self.pacs = proxy, pacs
        self.points: dict[str, tuple[float, float, float]] = {}  # time, proxy, pacs
        self.system: dict[str, float] = {}  # the proxy's system time

    def _read(self, pid: int | None) -> float:
        return procs.cpu_seconds(pid) if pid is not None else 0.0

    def _system(self) -> float:
        """The proxy's stime (+ cstime): its part of `cpu_seconds` spent in the kernel."""
        if self.proxy is None:
            return 0.0
        fields = procs._stat_fields(self.proxy)
        return (int(fields[12]) + int(fields[14])) / procs.CLOCK_TICKS

    def mark(self, name: str) -> None:
        self.points[name] = (time.perf_counter(), self._read(self.proxy), self._read(self.pacs))
        self.system[name] = self._system()

    def quiet(self, name: str) -> None:
        """Wait until the proxy used no CPU for a moment (it finished closing, logging)."""
        if self.proxy is not None:
            procs.wait_cpu_quiet(self.proxy)
        self.mark(name)

    def between(self, a: str, b: str, prefix: str) -> dict[str, float]:
        (_, proxy_a, pacs_a), (_, proxy_b, pacs_b) = self.points[a], self.points[b]
        return {
            f"{prefix}cpu_s": proxy_b - proxy_a,
            f"{prefix}sys_s": self.system[b] - self.system[a],
            f"{prefix}pacs_cpu_s": pacs_b - pacs_a,
        }


def _echo(bench: Bench, called: str, port: int) -> None:
    argv = bench.client(bench.tools.echoscu, called, port)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, **CLIENT_ENV}
    )
    if done.returncode != 0:
        raise procs.BenchmarkError(f"echoscu to {called} failed: {done.stderr[-2000:]}")


def _count(folder: Path, suffix: str) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.name.endswith(suffix))
    except FileNotFoundError:
        return 0


def _wait_first_forwarded(spool: Path, total: int) -> float:
    """When the first instance left the spool (polled every 2 ms: it marks the drain's start)."""
    deadline = time.perf_counter() + LONG
    while _count(spool, ".dcm") >= total:
        if time.perf_counter() > deadline:
            raise procs.BenchmarkError("the forwarder sent nothing")
        time.sleep(0.002)
    return time.perf_counter()


def _wait_drained(spool: Path, total: int) -> float:
    """Seconds until the spool holds no instance (since the call)."""
    t0 = time.perf_counter()
    procs.wait_until(lambda: _count(spool, ".dcm") == 0, "the spool to empty", timeout=LONG)
    return time.perf_counter() - t0


def _forwarding(log: Path) -> dict[str, int]:
    """What the proxy's log says the forwarder did: associations, instances, failed attempts."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    forwarded = [e for e in events if e.get("event") == "forwarded"]
    return {
        "forward_associations": len(forwarded),
        "forwarded_instances": sum(int(e.get("count", 0)) for e in forwarded),
        "forward_failed": sum(1 for e in events if e.get("event") == "forward-failed"),
        "stored_lines": sum(1 for e in events if e.get("event") == "stored"),
    }


def _verify(
    bench: Bench, pacs_out: Path, pacs_log: Path, spool: Path, spooled: bool
) -> dict[str, Any]:
    """N instances at the PACS, none left in the spool, a sample's pixel data identical."""
    total = len(bench.study)
    if bench.pacs_ignore:
        received = procs.wait_until(
            lambda: (
                pacs_log.read_text(errors="replace").count("Received Store Request") >= total
                and pacs_log.read_text(errors="replace").count("Received Store Request")
            ),
            "the PACS to log every instance",
        )
    else:
        received = _count(pacs_out, "")
    checks: dict[str, Any] = {"pacs_received": received}
    if received != total:
        raise procs.BenchmarkError(f"the PACS received {received} instances, not {total}")
    if spooled:
        left = _count(spool, ".dcm") + _count(spool / "failed", ".dcm")
        if left:
            raise procs.BenchmarkError(f"{left} instances left in the spool or spool/failed")
    if not bench.pacs_ignore:
        from pydicom import dcmread

        sample = random.Random(len(bench.study)).sample(bench.study, min(SAMPLE, total))
        for path in sample:
            sent = dcmread(path)
            [got] = pacs_out.glob(f"*{sent.SOPInstanceUID}*")
            if dcmread(got).PixelData != sent.PixelData:
                raise procs.BenchmarkError(f"pixel data of {path.name} differ at the PACS")
        checks["pixel_data_identical"] = len(sample)
    return checks


# -- results --------------------------------------------------------------------------------

ROWS = (  # (label, setup, timing prefix); every row but one moves the whole study
    ("direct (no proxy)", "direct", ""),
    ("relay", "relay", ""),
    ("s&f, PACS up: ingest", "sf-up", "ingest_"),
    ("s&f, PACS up: drain after ingest", "sf-up", "drain_"),
    ("s&f, PACS up: end to end", "sf-up", "e2e_"),
    ("s&f, PACS down: ingest alone", "sf-down", "ingest_"),
    ("s&f, PACS down: drain alone", "sf-down", "drain_"),
)
# What is left to forward once storescu exits: no throughput of its own (the forwarder sent
# most of the study during the ingest), only its time and CPU.
TAIL = "s&f, PACS up: drain after ingest"


def medians(runs: list[Run]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for setup in SETUPS:
        good = [r for r in runs if r.setup == setup and r.error is None]
        keys = {k for r in good for k in r.timings}
        out[setup] = {k: statistics.median(r.timings[k] for r in good) for k in sorted(keys)}
    return out


def derived(med: dict[str, dict[str, float]], payload: int) -> dict[str, dict[str, float]]:
    """Per row: wall s, MB/s, proxy CPU s, proxy CPU s/GB, PACS CPU s."""
    rows: dict[str, dict[str, float]] = {}
    for label, setup, prefix in ROWS:
        got = med.get(setup, {})
        wall = got.get(f"{prefix}wall_s")
        if wall is None:
            continue
        cpu = got.get(f"{prefix}cpu_s", 0.0)
        if label == TAIL:
            rows[label] = {
                "wall_s": round(wall, 2),
                "proxy_cpu_s": round(cpu, 2),
                "proxy_sys_s": round(got.get(f"{prefix}sys_s", 0.0), 2),
                "pacs_cpu_s": round(got.get(f"{prefix}pacs_cpu_s", 0.0), 2),
            }
            continue
        rows[label] = {
            "wall_s": round(wall, 2),
            "mb_s": round(payload / wall / 1e6, 1),
            "proxy_cpu_s": round(cpu, 2),
            "proxy_sys_s": round(got.get(f"{prefix}sys_s", 0.0), 2),
            "proxy_cpu_s_per_gb": round(cpu / (payload / 1e9), 2),
            "pacs_cpu_s": round(got.get(f"{prefix}pacs_cpu_s", 0.0), 2),
        }
    return rows


def ratios(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    relay = rows.get("relay")
    if relay is None:
        return {}
    out = {}
    for label, _, _ in ROWS[2:]:
        row = rows.get(label)
        if row is None or label == TAIL:
            continue
        cpu = relay["proxy_cpu_s_per_gb"]
        out[label] = {
            "throughput": round(row["mb_s"] / relay["mb_s"], 2),
            "cpu_per_gb": round(row["proxy_cpu_s_per_gb"] / cpu, 2) if cpu else float("nan"),
        }
    return out


COLUMNS = (  # (heading, key in a row, format)
    ("wall s", "wall_s", "{:.2f}"),
    ("MB/s", "mb_s", "{:.1f}"),
    ("proxy CPU s", "proxy_cpu_s", "{:.2f}"),
    ("of which system", "proxy_sys_s", "{:.2f}"),
    ("proxy CPU s/GB", "proxy_cpu_s_per_gb", "{:.2f}"),
    ("PACS CPU s", "pacs_cpu_s", "{:.2f}"),
)


def table(rows: dict[str, dict[str, float]], rat: dict[str, dict[str, float]]) -> str:
    """A Markdown table (it reads as well in a terminal): one line per row of `ROWS` measured,
    "-" where a figure does not apply (no proxy, or no throughput of its own)."""
    heads = ["", *(c[0] for c in COLUMNS), "MB/s / relay", "CPU/GB / relay"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label, row in rows.items():
        cells = [label]
        for _, key, fmt in COLUMNS:
            no_proxy = key.startswith("proxy") and label.startswith("direct")
            cells.append("-" if key not in row or no_proxy else fmt.format(row[key]))
        r = rat.get(label)
        cells += [f"{r['throughput']:.2f}x", f"{r['cpu_per_gb']:.2f}x"] if r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(tools: Tools, work: Path) -> dict[str, Any]:
    from OpenSSL import SSL

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    df = out(["df", "-PT", "-h", str(work)]).splitlines()[-1].split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "proxy_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "dcmtk": (out([tools.storescu, "--version"]).splitlines() or ["unknown"])[0].strip("$ "),
        "work_disk": {"device": df[0], "type": df[1], "size": df[2], "mount": df[6]}
        if len(df) > 6
        else {},
        "git_commit": out(["git", "-C", str(procs.REPO), "rev-parse", "HEAD"]),
        "git_dirty": bool(
            out(["git", "-C", str(procs.REPO), "status", "--porcelain", "--", "dicom_tls_proxy"])
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def describe(facts: dict[str, Any], args: argparse.Namespace, payload: int) -> str:
    disk = facts.get("work_disk", {})
    pacs = (
        "--ignore (stores nothing)" if args.pacs_ignore else "+B -od (writes each file as received)"
    )
    modality = "TLS 1.3" if args.tls else "plaintext"
    dirty = " (dicom_tls_proxy/ changed)" if facts["git_dirty"] else ""
    return "\n".join(
        [
            f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB; "
            f"kernel {facts['kernel']}; Python {facts['python']}; {facts['proxy_openssl']}; "
            f"{facts['dcmtk']}",
            f"disk of the work folder (study, spool, PACS): {disk.get('device')} "
            f"{disk.get('type')} {disk.get('size')} on {disk.get('mount')}",
            f"study: {args.instances} CT instances x {args.size_kb} KiB pixel data = "
            f"{payload / 1e6:.0f} MB, one storescu association; modality side {modality}, "
            f"upstream plaintext; PACS: storescp {pacs}",
            f"runs: {args.runs} (medians); git {facts['git_commit'][:10]}{dirty}; {facts['date']}",
        ]
    )


def busy_note(runs: list[Run]) -> str:
    """What other processes took from the machine while it measured (noise, when large)."""
    foreign = sum(r.machine.get("foreign_cpu_s", 0.0) for r in runs)
    steal = sum(r.machine.get("steal_s", 0.0) for r in runs)
    capacity = (os.cpu_count() or 1) * sum(r.machine.get("elapsed_s", 0.0) for r in runs) or 1.0
    note = (
        f"other processes used {foreign:.0f} CPU-s ({100 * foreign / capacity:.0f}% of the "
        f"machine) during the measurements; the host stole {steal:.0f} CPU-s\n"
    )
    if foreign / capacity > 0.05:
        note += "WARNING: the machine was busy with other work: expect noisy numbers\n"
    return note


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = find_tools(with_stunnel=False)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    procs.raise_fd_limit()
    try:
        tools = tools.with_snapshot(work)
        print(f"generating the study ({args.instances} x {args.size_kb} KiB) ...", flush=True)
        study = make_study(args.data or work, args.instances, args.size_kb)
        payload = sum(p.stat().st_size for p in study)
        pki = make_pki(tools, work / "pki") if args.tls else None
        profiles = None
        if args.profile:
            profiles = args.out / f"sf-{time.strftime('%Y%m%d-%H%M%S')}-profiles"
            profiles.mkdir(parents=True)
        bench = Bench(tools, pki, study, payload, args.pacs_ignore, profiles)
        facts = machine(tools, work)
        print(describe(facts, args, payload), flush=True)
        runs: list[Run] = []
        for round_ in range(1, args.runs + 1):
            for setup in SETUPS:
                run = measure(bench, setup, round_, work)
                runs.append(run)
                shown = {k: round(v, 2) for k, v in run.timings.items()}
                print(f"  round {round_} {setup}: {run.error or shown}", flush=True)
        med = medians(runs)
        rows = derived(med, payload)
        rat = ratios(rows)
        text = describe(facts, args, payload) + "\n\n" + table(rows, rat) + "\n"
        text += (
            f"\nsf-down drain timed from the first instance leaving the spool; the wait for the "
            f"forwarder's next retry (retry_interval {RETRY[0]} s, max {RETRY[1]} s) before it: "
            f"{med.get('sf-down', {}).get('retry_wait_s', float('nan')):.2f} s\n"
        )
        text += busy_note(runs)
        failed = [r for r in runs if r.error]
        for r in failed:
            text += f"FAILED round {r.round} {r.setup}: {r.error}\n"
        print("\n" + text, flush=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"sf-{stamp}.txt").write_text(text)
        result = {
            "machine": facts,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "payload_bytes": payload,
            "pacs": "ignore" if args.pacs_ignore else "bit-preserving files",
            "retry_interval_s": RETRY,
            "runs": [r.__dict__ for r in runs],
            "medians": med,
            "rows": rows,
            "ratios_vs_relay": rat,
        }
        (args.out / f"sf-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out / f'sf-{stamp}.json'}")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        elif args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
