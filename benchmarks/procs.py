"""Processes for the benchmark: starting and always stopping them, waiting on conditions, and
reading what the kernel says they cost (/proc/PID/stat and /proc/PID/status).

CPU is utime + stime of the whole process (every thread, live or exited) plus its waited-for
children, in clock ticks (10 ms). Memory is VmRSS (now) and VmHWM (the peak since the process
started): every measured process is started fresh for one (workload, run), so its VmHWM is that
workload's peak. A measured process with live children (the proxy's `workers = N` parent) is
measured as its tree: `tree_cpu_seconds` and `tree_peak_kib` add up the parent and every live
descendant (found through the ppid field of /proc/*/stat).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

TIMEOUT = 60.0  # upper bound for a wait; a healthy run never sleeps it out
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


class BenchmarkError(Exception):
    """A measurement could not be taken (a process failed, a condition never came true)."""


# -- tools ----------------------------------------------------------------------------------


def dcmtk(tool: str) -> str | None:
    """The DCMTK binary, not pynetdicom's same-named Python scripts that may come first on PATH."""
    for folder in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        path = Path(folder) / tool
        try:
            if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
                return str(path)
        except OSError:
            continue
    return None


def stunnel() -> str | None:
    return executable("stunnel4", "stunnel")


def executable(*names: str) -> str | None:
    """The first of `names` found in the usual folders (sbin too: Debian puts haproxy there)."""
    folders = ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"]
    for name in names:
        for folder in [*folders, *os.environ.get("PATH", "").split(os.pathsep)]:
            path = Path(folder) / name
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for this process and the children it starts; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- waiting --------------------------------------------------------------------------------


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    """Poll `condition` (5 ms, backing off to 50 ms) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_listening(port: int) -> bool:
    """True when a socket listens on 127.0.0.1:port, read from /proc/net/tcp: no probe
    connection, so the measured process does not see (nor log) a connection that is not a test."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] in wanted and fields[3] == "0A":  # 0A = LISTEN
            return True
    return False


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = TIMEOUT
) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchmarkError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        return is_listening(port)

    wait_until(ready, f"{name} to listen on 127.0.0.1:{port}", timeout)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- what a process costs -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of the process, all threads included."""
    fields = _stat_fields(pid)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after "pid (comm) " (comm may hold spaces): field 3 (state) is index 0."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of `pid` as (pid, start time in ticks), children before
    grandchildren: a scan of /proc/*/stat for their parent pid."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, ValueError):
            continue  # it exited meanwhile
        parents.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: list[tuple[int, int]] = []
    queue = [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += [child for child, _ in children]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of the process plus that of each live descendant (a descendant that exits
    and is waited for moves into its parent's cutime + cstime, so it is still counted once)."""
    total = cpu_seconds(pid)
    for child, _ in descendants(pid):
        try:
            total += cpu_seconds(child)
        except (OSError, ValueError):
            continue
    return total


def tree_peak_kib(pid: int) -> list[int]:
    """VmHWM of the process and of each live descendant, in KiB (the process's own first)."""
    peaks = [memory_kib(pid)["VmHWM"]]
    for child, _ in descendants(pid):
        try:
            peaks.append(memory_kib(child)["VmHWM"])
        except (OSError, KeyError, ValueError):
            continue
    return peaks


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def io_bytes(pid: int) -> dict[str, int]:
    """/proc/PID/io: `rchar` and `wchar`, the bytes the process read and wrote through
    system calls (sockets and files alike)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("rchar", "wchar"):
            values[key] = int(rest)
    return values


def machine_cpu() -> tuple[float, float]:
    """CPU seconds since boot, all cores: (busy in user and system mode, stolen by the host)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system) / CLOCK_TICKS, steal / CLOCK_TICKS


def own_cpu() -> float:
    """CPU seconds of this process and every child it has waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def foreign_load(into: dict[str, float]) -> Iterator[None]:
    """Fill `into` with what other processes on the machine used while the block ran (its own
    processes must all have been waited for by then): `foreign_cpu_s`, `steal_s` and `elapsed_s`.
    A busy machine makes every number noisy; the report says so."""
    busy0, steal0 = machine_cpu()
    own0, t0 = own_cpu(), time.monotonic()
    try:
        yield
    finally:
        busy1, steal1 = machine_cpu()
        into["foreign_cpu_s"] = round(max(0.0, (busy1 - busy0) - (own_cpu() - own0)), 2)
        into["steal_s"] = round(steal1 - steal0, 2)
        into["elapsed_s"] = round(time.monotonic() - t0, 2)


def wait_cpu_quiet(pid: int, quiet: float = 0.15, timeout: float = 30.0) -> float:
    """Wait until the process and its live descendants used no CPU for `quiet` seconds (it
    finished its last work: closing connections, writing log lines); returns their CPU seconds
    then (`tree_cpu_seconds`: the process alone when it has no children)."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(pid)
    while True:
        time.sleep(quiet)
        now = tree_cpu_seconds(pid)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


# -- starting and stopping ------------------------------------------------------------------


@contextmanager
def started(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    port: int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = TIMEOUT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, stderr and stdout to `log`, wait until it listens on `port` (at
    most `timeout` seconds); it is stopped (SIGTERM, then SIGKILL) however the block ends."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # storescp --fork children go with it (killpg)
        )
    try:
        wait_listening(port, proc, name, log, timeout)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    # The proxy's workers run in sessions of their own (the parent forwards SIGTERM to them):
    # any still there once the parent is gone are killed by pid, if still the same process.
    children = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _signal_group(proc, signal.SIGKILL)  # forked children left behind by the leader, if any
    for child, start in children:
        try:
            if int(_stat_fields(child)[19]) == start:
                os.kill(child, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def py_spy(pid: int | None, output: Path | None, subprocesses: bool = False) -> Iterator[None]:
    """A py-spy profile (Python and native frames) of `pid` while the block runs, as collapsed
    stacks (what `profile_summary.py`, speedscope and flamegraph.pl read); nothing
    when `output` is None. Sampling stops the process 100 times a second: a profiled run's
    numbers are not comparable with an unprofiled one's. With `subprocesses`, its children too
    (the proxy's workers)."""
    if pid is None or output is None:
        yield
        return
    exe = shutil.which("py-spy")
    if exe is None:
        raise BenchmarkError("py-spy is not installed: pip install py-spy")
    log = output.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--native",
                "--rate",
                "500",  # W1 lasts about half a second: py-spy's default 100 Hz gives 50 samples
                *(["--subprocesses"] if subprocesses else []),
                "--format",
                "raw",  # collapsed stacks, one per line
                "--output",
                str(output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or b"Sampling process" in log.read_bytes(),
            "py-spy to attach",
        )
        if proc.poll() is not None:
            raise BenchmarkError(f"py-spy failed:\n{tail(log)}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_clients(argvs: Sequence[Sequence[str]], env: dict[str, str], timeout: float) -> float:
    """Start every client at once, wait for all; returns the wall time from first start to last
    exit. Raises BenchmarkError with the first failure's stderr."""
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for argv in argvs:
            procs.append(
                subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env={**os.environ, **env},
                )
            )
        errors = []
        for argv, proc in zip(argvs, procs, strict=True):
            _, err = proc.communicate(timeout=max(1.0, t0 + timeout - time.perf_counter()))
            if proc.returncode != 0:
                errors.append(f"{argv[0]} exited {proc.returncode}: {err.decode()[-2000:]}")
        wall = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"client timed out after {timeout:.0f}s") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise BenchmarkError(errors[0])
    return wall
