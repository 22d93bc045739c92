"""The workloads, their test data, and one measurement of one workload on one setup.

    W1   one association, one 256 MiB instance        storescu           throughput, CPU/GB
    W2   300 sequential C-ECHO associations           echoscu            CPU/association
    W2R  W2 with TLS sessions resumed                 resuming_echo.py   CPU/association
                                                      (termination), echoscu (origination)
    W3   20 concurrent associations x 20 x 512 KiB    storescu (--fork)  throughput, CPU/GB, RSS
    W4   500 idle associations, then 1 MiB each       idle_associations  memory/association

W2R (issue 16: "a W2 variant whose clients resume") is chosen with --workloads; it is not in the
default run. Termination: resuming_echo.py, one process making every association, each offering
the session of the one before; it makes its first association (a full handshake) before the CPU
is read, and counts how many of the measured ones resumed. Origination: echoscu as in W2, the
middlebox resuming towards the device (setups.running's `resumption`); that it resumed is read
from the device: a resumed TLS 1.3 handshake has no Certificate message, so storescp writes at
least its certificate's length less than in the warm-up association, which is always a full
handshake (/proc/PID/io, read around each association; DCMTK logs a resumed handshake as it
logs a full one).

Every measurement warms the middlebox up with one C-ECHO association first (a long-running proxy
has done that long ago), waits until it is idle, reads its CPU time, runs the clients, waits until
the middlebox logged every association and is idle again, and reads its CPU time and peak RSS.

A proxy with `workers = N` is measured with its workers (CPU and peak RSS summed over the parent
and its live children), and is warmed up until every worker served one association. A proxy with
its operations on (audit file, metrics server) is checked after the workload: its audit file must
hold one JSON line per association it logged, and one scrape of /metrics must count them all
too; a failed check fails the measurement. Both come after the CPU reading (a scrape costs well
under a millisecond; waiting for the audit batch inside the window took in the proxy's heap trim).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import idle_associations
import procs
import resuming_echo
from setups import CLIENT_ENV, Endpoint, Pki, Tools

KIB = 1024
MIB = 1024 * KIB
FRAME = 512 * KIB  # one 8-bit frame of 512 x 1024 pixels
CLIENT_TIMEOUT = 900.0
PDU_SIZE = 16384  # storescp's default maximum PDU (-pdu), so the size of every P-DATA it receives

WORKLOADS = ("W1", "W2", "W2R", "W3", "W4")
DEFAULT_WORKLOADS = ("W1", "W2", "W3", "W4")  # W2R on request (its results are new in issue 16)
RESUMING = ("W2R",)  # the middleboxes resume their sessions towards the device too
ECHO_WORKLOADS = ("W2", "W2R")  # sequential C-ECHO associations: CPU per association
DATA_WORKLOADS = ("W1", "W3")  # storescu sending instances: throughput, CPU per GB, machine busy
DESCRIPTIONS = {
    "W1": "one association, one {w1} instance",
    "W2": "{w2} sequential C-ECHO associations",
    "W2R": "{w2} sequential C-ECHO associations, TLS sessions resumed on both sides",
    "W3": "{w3c} concurrent associations x {w3f} x {w3s} instances",
    "W4": "{w4} idle associations, then {w4t} of P-DATA each",
}


@dataclass(frozen=True)
class Sizes:
    w1_bytes: int
    w2_echoes: int
    w3_clients: int
    w3_files: int
    w3_file_bytes: int
    w4_associations: int
    w4_traffic_bytes: int
    w4_settle_s: float = 2.5  # W4: idle time before each RSS reading (idle_associations)

    def describe(self, workload: str) -> str:
        return DESCRIPTIONS[workload].format(
            w1=_size(self.w1_bytes),
            w2=self.w2_echoes,
            w3c=self.w3_clients,
            w3f=self.w3_files,
            w3s=_size(self.w3_file_bytes),
            w4=self.w4_associations,
            w4t=_size(self.w4_traffic_bytes),
        )


FULL = Sizes(256 * MIB, 300, 20, 20, 512 * KIB, 500, 1 * MIB)
QUICK = Sizes(4 * MIB, 10, 2, 2, 512 * KIB, 20, 1 * MIB, w4_settle_s=0.25)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


@dataclass
class Run:
    """One measurement; raw numbers only (report.py derives the metrics)."""

    workload: str
    setup: str
    round: int
    payload_bytes: int = 0
    associations: int = 0
    wall_s: float | None = None
    cpu_s: float | None = None  # the middlebox's, during the workload (with its workers)
    peak_rss_kib: int | None = None  # the middlebox's VmHWM (summed with its workers')
    peak_rss_each_kib: list[int] = field(default_factory=list)  # with workers: parent's first
    checks: dict[str, int] = field(default_factory=dict)  # -ops: what the audit and /metrics held
    idle: dict[str, int] = field(default_factory=dict)  # W4's RSS readings, KiB
    machine: dict[str, float] = field(default_factory=dict)  # what other processes used meanwhile
    # W1, W3: CPU seconds the whole machine (every process, this benchmark's own included) was
    # busy while the clients ran: how much room was left for a faster middlebox
    machine_busy_s: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- test data ------------------------------------------------------------------------------


def instance(path: Path, pixel_bytes: int) -> Path:
    """A Multi-frame Grayscale Byte Secondary Capture instance with `pixel_bytes` of random OB
    pixel data (frames of 512 x 1024); reused when already there."""
    frames = max(1, pixel_bytes // FRAME)
    if path.exists() and path.stat().st_size > frames * FRAME:
        return path
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "BENCH^MARK"
    ds.PatientID = "BENCH"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 1024, frames
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add_new(0x7FE00010, "OB", os.urandom(frames * FRAME))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    ds.save_as(partial, enforce_file_format=True)
    partial.replace(path)
    return path


@dataclass(frozen=True)
class Data:
    w1: Path
    w3: list[Path]


def make_data(folder: Path, sizes: Sizes, workloads: list[str]) -> Data:
    w1 = folder / f"w1-{_size(sizes.w1_bytes).replace(' ', '')}.dcm"
    w3 = [
        folder / f"w3-{_size(sizes.w3_file_bytes).replace(' ', '')}-{i}.dcm"
        for i in range(sizes.w3_files)
    ]
    if "W1" in workloads:
        instance(w1, sizes.w1_bytes)
    if "W3" in workloads:
        for path in w3:
            instance(path, sizes.w3_file_bytes)
    return Data(w1, w3)


# -- one measurement ------------------------------------------------------------------------


def measure(
    workload: str,
    endpoint: Endpoint,
    tools: Tools,
    pki: Pki,
    data: Data,
    sizes: Sizes,
    run: Run,
    profile: Path | None = None,
) -> None:
    """Fill `run` with one measurement of `workload` through `endpoint` (already up); with
    `profile`, a py-spy profile of the middlebox during the workload goes there."""
    if workload == "W4":
        with procs.py_spy(endpoint.measured_pid, profile):
            _measure_idle(endpoint, pki, sizes, run)
        return
    pid = endpoint.measured_pid
    with ExitStack() as stack:
        device_before = _device_written(endpoint)
        logged = _warm_up(endpoint, tools)
        full_handshake = _device_written(endpoint) - device_before
        _check_audit(endpoint, logged)  # its batch written now, not during the workload
        client = None
        if workload == "W2R" and endpoint.setup.client_tls:
            client = stack.enter_context(
                resuming_echo.primed(endpoint, pki, sizes.w2_echoes, CLIENT_TIMEOUT)
            )
            logged = wait_logged(endpoint, logged + 1)
        cpu_before = procs.wait_cpu_quiet(pid) if pid else None
        with procs.py_spy(pid, profile, subprocesses=endpoint.setup.workers > 1):
            if workload == "W2R":
                _resume(endpoint, tools, pki, sizes, run, client, full_handshake)
            else:
                _run_clients(workload, endpoint, tools, data, sizes, run)
    if pid is not None:
        logged = wait_logged(endpoint, logged + run.associations)
        # CPU is read at the same point for every setup. The checks below wait up to a second
        # for the audit batch: inside the window, that wait took in the proxy's heap trim after
        # traffic (housekeeping, a second later) for the -ops setups only (+12-15% in W1).
        run.cpu_s = procs.wait_cpu_quiet(pid) - (cpu_before or 0.0)
        if endpoint.setup.operations:
            run.checks = {
                "associations_logged": logged,
                "audit_associations": _check_audit(endpoint, logged),
                "metrics_associations": _scrape_metrics(endpoint, logged),
            }
        peaks = procs.tree_peak_kib(pid)
        run.peak_rss_kib = sum(peaks)
        if len(peaks) > 1:
            run.peak_rss_each_kib = peaks


def _run_clients(
    workload: str, endpoint: Endpoint, tools: Tools, data: Data, sizes: Sizes, run: Run
) -> None:
    if workload in DATA_WORKLOADS:
        busy = procs.machine_cpu()[0]
        _run_data_clients(workload, endpoint, tools, data, sizes, run)
        run.machine_busy_s = round(procs.machine_cpu()[0] - busy, 2)
    elif workload == "W2":
        run.associations = sizes.w2_echoes
        t0 = time.perf_counter()
        for _ in range(sizes.w2_echoes):
            echo(endpoint, tools)
        run.wall_s = time.perf_counter() - t0
    else:
        raise ValueError(workload)


def _run_data_clients(
    workload: str, endpoint: Endpoint, tools: Tools, data: Data, sizes: Sizes, run: Run
) -> None:
    if workload == "W1":
        run.payload_bytes, run.associations = data.w1.stat().st_size, 1
        run.wall_s = procs.run_clients(
            [endpoint.dcmtk(tools.storescu, str(data.w1))], CLIENT_ENV, CLIENT_TIMEOUT
        )
    else:
        files = [str(p) for p in data.w3]
        run.payload_bytes = sizes.w3_clients * sum(p.stat().st_size for p in data.w3)
        run.associations = sizes.w3_clients
        argvs = [endpoint.dcmtk(tools.storescu, *files) for _ in range(sizes.w3_clients)]
        run.wall_s = procs.run_clients(argvs, CLIENT_ENV, CLIENT_TIMEOUT)


def _resume(
    endpoint: Endpoint,
    tools: Tools,
    pki: Pki,
    sizes: Sizes,
    run: Run,
    client: resuming_echo.Primed | None,
    full_handshake: int,
) -> None:
    """W2R: `sizes.w2_echoes` associations, by the primed resuming client (termination) or by
    echoscu (origination, the device's bytes read around each one); `run.checks` gets the
    associations and how many resumed. Fewer resumed than all but one per core (HAProxy keeps
    one session per thread) fails the measurement: it would not be W2R."""
    run.associations = sizes.w2_echoes
    t0 = time.perf_counter()
    if client is not None:
        run.checks = client.go(CLIENT_TIMEOUT)
        run.wall_s = time.perf_counter() - t0
    else:
        certificate = len(ssl.PEM_cert_to_DER_cert(pki.cert("proxy").read_text()))
        resumed, elapsed = 0, 0.0
        for _ in range(sizes.w2_echoes):
            before, started = _device_written(endpoint), time.perf_counter()
            echo(endpoint, tools)
            elapsed += time.perf_counter() - started
            resumed += _device_written(endpoint) - before <= full_handshake - certificate
        run.wall_s = elapsed
        run.checks = {
            "associations": sizes.w2_echoes,
            "resumed": resumed,
            "device_bytes_full_handshake": full_handshake,
        }
    if run.checks["resumed"] < run.associations - (os.cpu_count() or 1):
        raise procs.BenchmarkError(
            f"W2R: {run.checks['resumed']} of {run.associations} associations resumed"
        )


def _device_written(endpoint: Endpoint) -> int:
    """Bytes the device (storescp) has written; 0 without a device of ours or TLS towards it."""
    if endpoint.device_pid is None or not endpoint.setup.upstream_tls:
        return 0
    return procs.io_bytes(endpoint.device_pid)["wchar"]


def echo(endpoint: Endpoint, tools: Tools) -> None:
    procs.run_clients([endpoint.dcmtk(tools.echoscu)], CLIENT_ENV, procs.TIMEOUT)


WARM_UP_TRIES = 10  # C-ECHOs per worker at most, to reach every worker of a `workers = N` proxy


def _warm_up(endpoint: Endpoint, tools: Tools) -> int:
    """One C-ECHO association through the middlebox; with `workers = N`, more until every worker
    logged one (the kernel hands each connection to whichever worker accepts first), at most
    WARM_UP_TRIES x N. Returns the associations the middlebox has logged."""
    workers = endpoint.setup.workers
    for tries in range(1, WARM_UP_TRIES * workers + 1):
        echo(endpoint, tools)
        logged = wait_logged(endpoint, tries)
        if workers == 1 or len(_workers_logged(endpoint)) >= workers:
            break
    return logged


def _workers_logged(endpoint: Endpoint) -> set[str]:
    """The `worker` field of the proxy's association lines (`workers = N` adds it)."""
    assert endpoint.log is not None
    lines = endpoint.log.read_text(errors="replace").splitlines()
    return {
        m.group(1)
        for line in lines
        if "event=association " in line and (m := re.search(r"\bworker=(\d+)", line))
    }


def _check_audit(endpoint: Endpoint, logged: int) -> int:
    """With an audit file: wait until it holds `logged` association lines (it is written in
    batches, at most once a second), and check every line is JSON and there are no more."""
    if endpoint.audit is None:
        return 0

    def associations() -> int:
        try:
            text = endpoint.audit.read_text() if endpoint.audit else ""
        except FileNotFoundError:
            return 0
        count = 0
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise procs.BenchmarkError(f"audit file line {number} is not JSON: {exc}") from exc
            count += record.get("event") == "association"
        return count

    procs.wait_until(lambda: associations() >= logged, f"{logged} association lines in the audit")
    found = associations()
    if found != logged:
        raise procs.BenchmarkError(f"audit file: {found} association lines, {logged} logged")
    return found


_ASSOCIATIONS_TOTAL = re.compile(r"^dicom_tls_proxy_associations_total\{[^}]*\} (\S+)$", re.M)


def _scrape_metrics(endpoint: Endpoint, logged: int) -> int:
    """One GET /metrics; dicom_tls_proxy_associations_total summed over its labels must be
    `logged` (the proxy counts an association where it logs it)."""
    url = f"http://127.0.0.1:{endpoint.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=procs.TIMEOUT) as response:
            text = response.read().decode()
    except OSError as exc:
        raise procs.BenchmarkError(f"GET {url}: {exc}") from exc
    counted = round(sum(float(v) for v in _ASSOCIATIONS_TOTAL.findall(text)))
    if counted != logged:
        raise procs.BenchmarkError(f"/metrics: associations_total {counted}, {logged} logged")
    return counted


def _measure_idle(endpoint: Endpoint, pki: Pki, sizes: Sizes, run: Run) -> None:
    assert endpoint.measured_pid is not None
    readings = idle_associations.measure(
        endpoint, pki, sizes.w4_associations, sizes.w4_traffic_bytes, sizes.w4_settle_s
    )
    run.associations = readings.associations
    run.payload_bytes = readings.associations * readings.traffic_bytes
    run.idle = {
        "rss_before_kib": readings.rss_before_kib,
        "rss_handshake_kib": readings.rss_handshake_kib,
        "rss_traffic_kib": readings.rss_traffic_kib,
    }
    run.peak_rss_kib = procs.memory_kib(endpoint.measured_pid)["VmHWM"]


# -- the middlebox's log --------------------------------------------------------------------


def associations_logged(endpoint: Endpoint) -> int:
    """Associations the middlebox has finished and logged: the proxy's `event=association`
    lines, HAProxy's `event=connection` lines (benchmarks/haproxy.cfg's log-format), stunnel's
    `Connection closed`/`Connection reset` lines."""
    if endpoint.log is None:
        return 0
    text = endpoint.log.read_text(errors="replace")
    if endpoint.setup.middlebox == "proxy":
        return text.count("event=association ")
    if endpoint.setup.middlebox == "haproxy":
        return text.count("event=connection ")
    return text.count("Connection closed") + text.count("Connection reset")


def wait_logged(endpoint: Endpoint, count: int) -> int:
    if endpoint.log is None:
        return 0
    procs.wait_until(
        lambda: associations_logged(endpoint) >= count,
        f"{count} association log lines from {endpoint.setup.middlebox}",
    )
    return associations_logged(endpoint)
