"""The long run of issue 12: one proxy, `workers = 1` and `workers = 2`, for minutes of mixed
traffic, the way a gateway lives for months and a test for seconds.

    SOAK_SECONDS=600 python -m pytest -m soak tests/soak -s    # 10 minutes per worker count
    python -m pytest tests/soak -s                             # the 40-second smoke

`SOAK_SECONDS` (default 600) is how long the traffic runs under `-m soak`; the smoke, 40 s per
worker count, is part of the normal suite. `-s` shows the report; it is also written as JSON to the
test's tmp folder and, under `-m soak`, to `benchmarks/results/soak-wN-TIMESTAMP.json` (beside it
the proxy's log, `.log`).

One proxy process (a TLS listener, a thumbprint-pinned TLS listener, a route CT to DCMTK
`storescp --fork` (its socket timeout, 60 s by default, raised past the idle holds), a route
OUTAGE to a second storescp that is stopped and started again, `watch = true`, `[audit] file`,
`[metrics] bind`, `pid_file`) and bounded loops that stop by themselves at the deadline:

- `store`: DCMTK storescu over TLS, 3 new images per association; each image is read back from
  what storescp wrote and compared with what was sent, every element and the pixel bytes;
- `echo`: DCMTK echoscu;
- `idle`: pynetdicom associations held idle for minutes (within `idle_timeout`), then a C-ECHO;
- `wrong-ca`: a client certificate from another CA: a TLS alert, `tls-untrusted`;
- `thumbprint`: the development client certificate on the pinned listener: a TLS alert,
  `tls-thumbprint-mismatch`; `pinned`: the pinned certificate there: accepted;
- `plaintext`: plaintext DICOM on the TLS port: A-ASSOCIATE-RJ (1, 1, 1);
- `outage`: associations to OUTAGE; while its storescp is down, A-ASSOCIATE-RJ (2, 3, 1);
- `swap`: every 30 s a new server certificate (a Kubernetes-style `..data` symlink swap) and
  SIGHUP to the pid in `pid_file`; then clients must be served the new certificate;
- `watch`: 15 s after each swap a change to the config file, which `watch = true` must see
  (`watch-changed` naming it, then `reloaded` from every worker).

Each connection a client opens is an attempt, which ends completed, refused as expected (the
answer the refusal table promises) or lost (anything else). The audit file must then hold one
record per attempt, each of the kind the client saw. The run fails on any lost association, any
worker restart, any error-level log line, and on RSS or open fds of any proxy process drifting
from the start (after a warm-up) to the end beyond the bounds below.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydicom import dcmread

from dicom_tls_proxy.dev import pki as factory
from dicom_tls_proxy.protocol import dimse, pdu
from dicom_tls_proxy.protocol.pdu_items import pdv_items
from tests.support import (
    HAVE_DCMTK,
    TIMEOUT,
    RawClient,
    build_rq,
    client_ssl_context,
    dcmtk,
    make_dataset,
    proxy_config,
    proxy_stats,
    running_proxy,
    sha256_of,
    tls_in,
    vm_rss_kib,
    wait_port,
    wait_until,
)
from tests.test_audit_metrics import metrics_address, scrape
from tests.test_watch import publish, server_identity

pytestmark = [pytest.mark.dcmtk, pytest.mark.skipif(not HAVE_DCMTK, reason="needs DCMTK")]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SMOKE_SECONDS = 40.0  # past the 10-s timers, the swap at 10 s and the watch change at 25 s

# Drift allowed from the start (after the warm-up) to the end, for every proxy process.
RSS_SLACK_KIB = 20 * 1024  # end RSS <= start + 20 MiB ...
RSS_FACTOR = 1.5  # ... and <= 1.5 x start
FD_SLACK = 10  # end open fds <= start + 10

FILES = 3  # images per storescu association
ROWS = 128  # 128 x 128 x 16 bits: 32 KiB of pixel data per image
STORE_LOOPS = 2
IDLE_LOOPS = 3
PACE = 1.0  # seconds between two attempts of one loop
SWAP_EVERY = 30.0
FIRST_SWAP = 10.0  # seconds into the run; the watch change comes SWAP_EVERY / 2 after each swap
OUTAGE_UP, OUTAGE_DOWN = 15.0, 8.0  # seconds the OUTAGE upstream is up, then down, in turn

KINDS = (
    "store",
    "echo",
    "idle",
    "pinned",
    "wrong-ca",
    "thumbprint",
    "plaintext",
    "outage",
    "swap",
)
CALLING_AE = {kind: f"SOAK_{kind.upper()}" for kind in ("store", "echo", "idle", "pinned", "swap")}
CALLING_AE["outage"] = "SOAK_OUTAGE"
REFUSALS = {  # what the audit file says for an expected refusal: kind by (listener, reason)
    ("tls", "tls-untrusted"): "wrong-ca",
    ("pinned", "tls-thumbprint-mismatch"): "thumbprint",
    ("tls", "plaintext-on-tls"): "plaintext",
}


def hold_seconds(seconds: float) -> float:
    """How long an idle association is held: minutes in a soak, a third of a smoke."""
    return max(15.0, min(180.0, seconds * 0.3))


class Lost(Exception):
    """An attempt that ended other than as expected."""


@dataclass
class Counts:
    attempted: int = 0
    completed: int = 0
    refused: int = 0  # as expected
    lost: int = 0


@dataclass
class Tally:
    """What the clients saw, per kind; thread-safe."""

    kinds: dict[str, Counts] = field(default_factory=lambda: {k: Counts() for k in KINDS})
    lost: list[str] = field(default_factory=list)
    datasets_compared: int = 0
    bytes_compared: int = 0
    problems: list[str] = field(default_factory=list)  # the operator's checks that failed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, kind: str, step: Callable[[], str]) -> None:
        """Run one attempt; `step` returns "completed" or "refused", or raises."""
        with self.lock:
            self.kinds[kind].attempted += 1
        try:
            result = step()
        except Exception as exc:
            detail = f"{kind}: {type(exc).__name__}: {exc}"
            if not isinstance(exc, Lost):
                detail += "\n" + traceback.format_exc()
            with self.lock:
                self.kinds[kind].lost += 1
                self.lost.append(detail)
            return
        with self.lock:
            setattr(self.kinds[kind], result, getattr(self.kinds[kind], result) + 1)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def attempts(self) -> int:
        with self.lock:
            return sum(c.attempted for c in self.kinds.values())


# -- devices and peers --------------------------------------------------------------------------


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range, so that no outgoing connection takes it
    while the OUTAGE device is down."""
    rnd = random.Random()
    for _ in range(200):
        port = rnd.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-32000")


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


class Storescp:
    """DCMTK `storescp --fork` storing into `folder`; can be stopped and started again. Its
    socket timeout (DCMTK's default: 60 s, then it closes an idle association) is `timeout`."""

    def __init__(self, folder: Path, port: int, timeout: float = 60.0) -> None:
        self.folder, self.port, self.timeout = folder, port, timeout
        self.address = f"127.0.0.1:{port}"
        folder.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                dcmtk("storescp"),
                "--fork",
                *("-ts", str(int(self.timeout)), "-aet", "DEVICE"),
                *("-od", str(self.folder), str(self.port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
        self.proc = None
        wait_until(lambda: port_closed(self.port), what=f"port {self.port} closed")


def dcmtk_tls(pki: Path) -> list[str]:
    return ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]


def sha256_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def raw_echo(
    address: tuple[str, int], ctx: ssl.SSLContext | None, called: str, calling: str
) -> tuple[bytes, str]:
    """An association from PDUs: A-ASSOCIATE-RQ; on A-ASSOCIATE-AC a C-ECHO (status 0) and a
    release. Returns the answer to the RQ and the server certificate's `sha256:HEX` (TLS)."""
    client = RawClient(address, ctx)
    try:
        der = client.sock.getpeercert(binary_form=True) if ctx is not None else None
        seen = sha256_der(der) if der else ""
        client.send(build_rq(called, calling))
        answer = client.read_pdu()
        if answer[0] != pdu.A_ASSOCIATE_AC:
            client.read_eof()  # the proxy closes after a refusal
            return answer, seen
        client.send(dimse.encode_p_data(1, dimse.c_echo_rq(), command=True))
        response = client.read_pdu()
        if response[0] != pdu.P_DATA_TF:
            raise Lost(f"C-ECHO answered with PDU type {response[0]:#04x}")
        status = dimse.echo_status(b"".join(v[2] for v in pdv_items(response, pdu.HEADER_LENGTH)))
        if status != 0:
            raise Lost(f"C-ECHO status {status:#06x}")
        client.send(pdu.encode_release_rq())
        if client.read_pdu() != pdu.encode_release_rp():
            raise Lost("no A-RELEASE-RP")
        return answer, seen
    finally:
        client.close()


def tls_refused(address: tuple[str, int], ctx: ssl.SSLContext) -> str:
    """A client whose certificate the proxy refuses: a TLS alert during the handshake or, with
    TLS 1.3, on the first read after it; never a DICOM byte."""
    try:
        client = RawClient(address, ctx)
    except ssl.SSLError as exc:
        if "alert" in str(exc).lower():
            return "refused"
        raise Lost(f"handshake failed without an alert: {exc}") from None
    try:
        client.send(build_rq("CT", "SOAK_REFUSED"))
        data = client.sock.recv(1)
    except ssl.SSLError as exc:
        if "alert" in str(exc).lower():
            return "refused"
        raise Lost(f"TLS error without an alert: {exc}") from None
    finally:
        client.close()
    raise Lost(f"accepted, read {data!r}")


def image(seed: int) -> Any:
    ds = make_dataset(1, 1, seed=seed)
    ds.Rows = ds.Columns = ROWS
    ds.PixelData = random.Random(seed).randbytes(ROWS * ROWS * 2)
    return ds


def foreign_identity(folder: Path) -> tuple[Path, Path]:
    """A client certificate from a CA the proxy does not trust: (certificate file, key file)."""
    ca_key, ca_cert = factory.make_ca("another CA")
    key, cert = factory.make_leaf(ca_key, ca_cert, "foreign-client")
    factory.write_pem_key(folder / "foreign.key", key)
    factory.write_pem_cert(folder / "foreign.pem", cert)
    return folder / "foreign.pem", folder / "foreign.key"


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Sample:
    pid: int
    rss_kib: int
    fds: int


def sample(pid: int) -> Sample | None:
    try:
        return Sample(pid, vm_rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd")))
    except (OSError, AssertionError):  # gone
        return None


# -- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, tmp: Path, pki: Path, workers: int, seconds: float) -> None:
        self.tmp, self.pki, self.workers, self.seconds = tmp, pki, workers, seconds
        self.hold = hold_seconds(seconds)
        self.tally = Tally()
        self.stop = threading.Event()  # set only to abandon the run early
        self.swaps = self.watch_changes = 0
        self.served = ""  # sha256 of the certificate the TLS listener must serve now
        self.client_ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        peers = tmp / "peers"
        peers.mkdir()
        foreign = foreign_identity(peers)
        self.foreign_ctx = client_ssl_context(pki / "ca.pem", *foreign)
        self.pinned_sha256 = sha256_of(foreign[0])
        self.secret = tmp / "secret"
        self.secret.mkdir()
        self.version = 0
        self.publish_identity()
        self.idle_timeout = self.hold + 60.0  # longer than an idle association is held
        self.ct = Storescp(tmp / "ct", quiet_port(), timeout=self.idle_timeout)
        self.outage = Storescp(tmp / "outage", quiet_port())
        self.outbox = tmp / "outbox"
        self.outbox.mkdir()
        self.seed = 0
        self.samples: dict[str, dict[str, Sample | None]] = {}
        self.peaks: dict[str, int] = {}
        self.stats: dict[str, dict[str, dict[str, int] | None]] = {}

    def config(self) -> dict[str, Any]:
        conf = self.tmp / "conf"
        conf.mkdir(exist_ok=True)
        return proxy_config(
            self.pki,
            self.ct.address,
            proxy={
                "log_format": "json",
                "workers": self.workers,
                "watch": True,
                "watch_interval": 0.5,
                "idle_timeout": self.idle_timeout,
                "pid_file": str(conf / "proxy.pid"),
            },
            tls={
                "in": tls_in(
                    self.pki,
                    certificate=self.secret / "tls.crt",
                    private_key=self.secret / "tls.key",
                ),
                "pinned": tls_in(
                    self.pki,
                    ca=None,
                    verify="thumbprint",
                    accepted_thumbprints=[self.pinned_sha256],
                ),
            },
            listener=[
                {"name": "tls", "bind": "127.0.0.1:0", "tls": "in"},
                {"name": "pinned", "bind": "127.0.0.1:0", "tls": "pinned"},
            ],
            route=[
                {"called_ae": "CT", "upstream": self.ct.address},
                {"called_ae": "OUTAGE", "upstream": self.outage.address},
            ],
            audit={"file": str(conf / "audit.jsonl")},
            metrics={"bind": "127.0.0.1:0"},
        )

    def publish_identity(self) -> None:
        """A new server certificate from the test CA, swapped in as kubelet does."""
        self.version += 1
        files = server_identity(self.pki, f"soak-{self.version}")
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
        publish(self.secret, f"{stamp}.{self.version}", files)
        cert = x509.load_pem_x509_certificate(files["tls.crt"])
        self.served = sha256_der(cert.public_bytes(Encoding.DER))

    # -- the steps, one attempt each ------------------------------------------------------------

    def store(self) -> str:
        with self.tally.lock:
            self.seed += 1
            base = self.seed * FILES
        sent, paths = [], []
        for i in range(FILES):
            ds = image(base + i)
            path = self.outbox / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent.append(ds)
            paths.append(str(path))
        host, port = self.tls
        try:
            run = subprocess.run(
                [
                    dcmtk("storescu"),
                    "-v",
                    *dcmtk_tls(self.pki),
                    *("-aet", CALLING_AE["store"], "-aec", "CT", host, str(port)),
                    *paths,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=60,
            )
        finally:
            for path in paths:
                Path(path).unlink()
        successes = run.stdout.count("Received Store Response (Success)")
        if run.returncode != 0 or successes != FILES:
            raise Lost(f"storescu exit {run.returncode}, {successes} of {FILES}:\n{run.stdout}")
        for ds in sent:
            found = wait_until(
                lambda uid=ds.SOPInstanceUID: list(self.ct.folder.glob(f"*{uid}*")),
                timeout=10,
                what="the stored file",
            )
            got = dcmread(found[0])
            if got.PixelData != ds.PixelData or got != ds:
                raise Lost(f"{ds.SOPInstanceUID} differs at the device")
            found[0].unlink()
            with self.tally.lock:
                self.tally.datasets_compared += 1
                self.tally.bytes_compared += len(ds.PixelData)
        return "completed"

    def echo(self) -> str:
        host, port = self.tls
        run = subprocess.run(
            [
                dcmtk("echoscu"),
                *dcmtk_tls(self.pki),
                *("-aet", CALLING_AE["echo"], "-aec", "CT", host, str(port)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        if run.returncode != 0:
            raise Lost(f"echoscu exit {run.returncode}: {run.stdout}")
        return "completed"

    def idle(self, seconds: float) -> str:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(CALLING_AE["idle"])
        ae.acse_timeout = ae.dimse_timeout = TIMEOUT
        ae.network_timeout = seconds + 60.0
        ae.add_requested_context(Verification)
        assoc = ae.associate(*self.tls, ae_title="CT", tls_args=(self.client_ctx, None))
        if not assoc.is_established:
            raise Lost("association not established")
        try:
            self.stop.wait(seconds)  # no byte either way meanwhile
            status = assoc.send_c_echo()
            if not status or status.Status != 0:
                raise Lost(f"C-ECHO after {seconds:.0f}s idle: {status!r}")
        finally:
            if assoc.is_established:
                assoc.release()
        if not assoc.is_released:
            raise Lost("not released")
        return "completed"

    def accepted(
        self, address: tuple[str, int], ctx: ssl.SSLContext, called: str, kind: str
    ) -> str:
        answer, _ = raw_echo(address, ctx, called, CALLING_AE[kind])
        if answer[0] != pdu.A_ASSOCIATE_AC:
            raise Lost(f"answer {answer.hex()}")
        return "completed"

    def pinned(self) -> str:
        return self.accepted(self.pinned_address, self.foreign_ctx, "CT", "pinned")

    def wrong_ca(self) -> str:
        return tls_refused(self.tls, self.foreign_ctx)

    def thumbprint(self) -> str:
        return tls_refused(self.pinned_address, self.client_ctx)

    def plaintext(self) -> str:
        client = RawClient(self.tls)
        try:
            client.send(build_rq("CT", "SOAK_PLAIN"))
            answer = client.read_pdu()
            client.read_eof()
        finally:
            client.close()
        if answer != pdu.encode_reject(1, 1, 1):
            raise Lost(f"answer {answer.hex()}")
        return "refused"

    def outage_echo(self, up: bool) -> str:
        answer, _ = raw_echo(self.tls, self.client_ctx, "OUTAGE", CALLING_AE["outage"])
        if up and answer[0] == pdu.A_ASSOCIATE_AC:
            return "completed"
        if not up and answer == pdu.encode_reject(2, 3, 1):
            return "refused"
        raise Lost(f"upstream {'up' if up else 'down'}, answer {answer.hex()}")

    def swap_check(self) -> str:
        answer, seen = raw_echo(self.tls, self.client_ctx, "CT", CALLING_AE["swap"])
        if answer[0] != pdu.A_ASSOCIATE_AC:
            raise Lost(f"answer {answer.hex()}")
        if seen != self.served:
            raise Lost(f"served {seen} after the swap, not the new {self.served}")
        return "completed"

    # -- the operator ----------------------------------------------------------------------------

    def reloaded_by_all(self, mark: int) -> bool:
        """Every worker (or the one process) logged `reloaded` after line `mark`."""
        who = {
            line.get("worker") for line in self.proxy.lines[mark:] if line["event"] == "reloaded"
        }
        return who >= (set(range(self.workers)) if self.workers > 1 else {None})

    def swap(self) -> None:
        """A new server certificate, SIGHUP to the pid in pid_file, and clients served it."""
        self.publish_identity()
        mark = len(self.proxy.lines)
        pid = int(self.pid_file.read_text())
        if pid != self.proxy.proc.pid:
            self.tally.problem(f"pid_file holds {pid}, the proxy is {self.proxy.proc.pid}")
        os.kill(pid, signal.SIGHUP)
        try:
            wait_until(lambda: self.reloaded_by_all(mark), what="reloaded after SIGHUP")
        except AssertionError as exc:
            self.tally.problem(f"swap {self.version}: {exc}")
            return
        self.swaps += 1
        for _ in range(2 * self.workers):
            self.tally.attempt("swap", self.swap_check)

    def touch_config(self) -> None:
        """A change to the config file: `watch = true` must see it and reload everywhere."""
        mark = len(self.proxy.lines)
        with self.proxy.config_path.open("a") as f:
            f.write(f"# soak: changed at {time.time():.3f}\n")
        path = str(self.proxy.config_path)

        def seen() -> int | None:
            for i, line in enumerate(self.proxy.lines[mark:], mark):
                if line["event"] == "watch-changed" and path in line["changed"]:
                    return i + 1
            return None

        try:
            after = wait_until(seen, what="watch-changed naming the config")
            wait_until(lambda: self.reloaded_by_all(after), what="reloaded after watch-changed")
        except AssertionError as exc:
            self.tally.problem(f"watch: {exc}")
            return
        self.watch_changes += 1

    # -- loops -----------------------------------------------------------------------------------

    def every(self, kind: str, step: Callable[[], str], pace: float = PACE) -> None:
        while time.monotonic() < self.deadline and not self.stop.is_set():
            self.tally.attempt(kind, step)
            self.stop.wait(pace)

    def refusals(self) -> None:
        steps = [
            ("wrong-ca", self.wrong_ca),
            ("thumbprint", self.thumbprint),
            ("plaintext", self.plaintext),
            ("pinned", self.pinned),
        ]
        n = 0
        while time.monotonic() < self.deadline and not self.stop.is_set():
            kind, step = steps[n % len(steps)]
            self.tally.attempt(kind, step)
            n += 1
            self.stop.wait(PACE)

    def idle_loop(self, index: int) -> None:
        self.stop.wait(index * self.hold / IDLE_LOOPS)  # staggered
        while not self.stop.is_set():
            seconds = min(self.hold, self.deadline - time.monotonic() - 2.0)
            if seconds < 5.0:
                return
            self.tally.attempt("idle", lambda s=seconds: self.idle(s))

    def outage_loop(self) -> None:
        while time.monotonic() < self.deadline and not self.stop.is_set():
            for up, length in ((True, OUTAGE_UP), (False, OUTAGE_DOWN)):
                end = min(time.monotonic() + length, self.deadline)
                while time.monotonic() < end and not self.stop.is_set():
                    self.tally.attempt("outage", lambda up=up: self.outage_echo(up))
                    self.stop.wait(PACE)
                if up:
                    self.outage.stop()
                else:
                    self.outage.start()
        if self.outage.proc is None:
            self.outage.start()

    def operator(self) -> None:
        """A swap every SWAP_EVERY seconds, a config change half-way between two swaps."""
        k = 0
        while not self.stop.is_set():
            swap_at = self.t0 + FIRST_SWAP + k * SWAP_EVERY
            for at, action in ((swap_at, self.swap), (swap_at + SWAP_EVERY / 2, self.touch_config)):
                if at >= self.deadline or self.stop.wait(max(0.0, at - time.monotonic())):
                    return
                action()
            k += 1

    def sampler(self) -> None:
        """Peak RSS every 5 s; the middle sample half-way."""
        middle = self.t0 + self.seconds / 2
        while time.monotonic() < self.deadline and not self.stop.is_set():
            if "middle" not in self.samples and time.monotonic() >= middle:
                self.take("middle")
            for name, pid in self.processes().items():
                if (s := sample(pid)) is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0), s.rss_kib)
            left = middle - time.monotonic()
            self.stop.wait(5.0 if "middle" in self.samples else min(5.0, max(0.05, left)))

    # -- figures ---------------------------------------------------------------------------------

    def processes(self) -> dict[str, int]:
        """The proxy's processes now: the one process, or the parent and each worker slot's
        current process."""
        if self.workers == 1:
            return {"proxy": self.proxy.proc.pid}
        pids = list(self.proxy.wait_for(event="workers-started")["pids"])
        for line in self.proxy.find(event="worker-restarted"):
            pids[line["worker"]] = line["pid"]
        return {"parent": self.proxy.proc.pid, **{f"worker {i}": p for i, p in enumerate(pids)}}

    def take(self, when: str) -> None:
        self.samples[when] = {name: sample(pid) for name, pid in self.processes().items()}

    def worker_stats(self) -> dict[str, dict[str, int] | None]:
        """`event=stats` of each serving process (SIGUSR1 goes to a worker itself, once it has
        started: before, the signal would end it, and the parent has no handler for it); None
        for one that gives none."""
        if self.workers == 1:
            return {"proxy": proxy_stats(self.proxy)}
        out: dict[str, dict[str, int] | None] = {}
        for name, pid in self.processes().items():
            if name == "parent":
                continue
            index = int(name.split()[1])
            starts = 1 + len(self.proxy.find(event="worker-restarted", worker=index))
            before = len(self.proxy.find(event="stats", worker=index))
            try:
                wait_until(
                    lambda i=index, n=starts: len(self.proxy.find(event="started", worker=i)) >= n,
                    timeout=10,
                    what=f"worker {index} started",
                )
                os.kill(pid, signal.SIGUSR1)
                wait_until(
                    lambda i=index, n=before: len(self.proxy.find(event="stats", worker=i)) > n,
                    timeout=10,
                    what=f"stats of worker {index}",
                )
            except (AssertionError, ProcessLookupError) as exc:
                self.tally.problem(f"no stats from {name} (pid {pid}): {exc}")
                out[name] = None
                continue
            line = self.proxy.find(event="stats", worker=index)[before]
            out[name] = {k: int(line[k]) for k in ("connections", "associations", "tasks", "fds")}
        return out

    def settled_stats(
        self, start: dict[str, dict[str, int] | None] | None = None
    ) -> dict[str, dict[str, int] | None]:
        """The stats once every connection's task has ended (a connection closes just after its
        audit record is written): no connection, no association and, given the `start`, its
        number of tasks; or, after 10 s, the last ones seen."""
        seen: list[dict[str, dict[str, int] | None]] = []

        def idle(name: str, s: dict[str, int] | None) -> bool:
            if s is None or (s["connections"], s["associations"]) != (0, 0):
                return False
            return start is None or (start.get(name) or {}).get("tasks") == s["tasks"]

        def settled() -> bool:
            seen.append(self.worker_stats())
            return all(idle(name, s) for name, s in seen[-1].items())

        try:
            wait_until(settled, timeout=10, what="no connection left")
        except AssertionError:
            pass
        return seen[-1]

    def audit_records(self) -> list[dict[str, Any]]:
        lines = self.audit_file.read_text().splitlines() if self.audit_file.exists() else []
        records = [json.loads(x) for x in lines]
        return [r for r in records if r.get("event") == "association"]

    def settle(self) -> list[dict[str, Any]]:
        """Wait until the audit file holds a record per attempt (or 30 s); its records."""
        try:
            wait_until(
                lambda: len(self.audit_records()) >= self.tally.attempts(),
                what="an audit record per attempt",
            )
        except AssertionError:
            pass
        return self.audit_records()

    # -- the whole run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with running_proxy(self.tmp / "conf", self.config()) as proxy:
            self.proxy = proxy
            self.tls = proxy.address("tls")
            self.pinned_address = proxy.address("pinned")
            self.pid_file = self.tmp / "conf" / "proxy.pid"
            self.audit_file = self.tmp / "conf" / "audit.jsonl"
            if self.workers > 1:
                proxy.wait_for(event="workers-started")
                wait_until(
                    lambda: len(proxy.find(event="listening")) == 2 * self.workers,
                    what="every worker listening",
                )
            proxy.wait_for(event="watching")
            web = metrics_address(proxy)

            # Warm-up: each kind of traffic once, a swap and a watched change.
            self.deadline = self.t0 = time.monotonic()
            started = time.monotonic()
            for kind, step in (
                ("store", self.store),
                ("echo", self.echo),
                ("idle", lambda: self.idle(1.0)),
                ("pinned", self.pinned),
                ("wrong-ca", self.wrong_ca),
                ("thumbprint", self.thumbprint),
                ("plaintext", self.plaintext),
                ("outage", lambda: self.outage_echo(True)),
            ):
                self.tally.attempt(kind, step)
            self.swap()
            self.touch_config()
            self.settle()
            self.stats["start"] = self.settled_stats()
            self.take("start")
            warm_up = time.monotonic() - started

            self.t0 = time.monotonic()
            self.deadline = self.t0 + self.seconds
            loops: list[Callable[[], None]] = [
                *[lambda: self.every("store", self.store)] * STORE_LOOPS,
                lambda: self.every("echo", self.echo),
                *[lambda i=i: self.idle_loop(i) for i in range(IDLE_LOOPS)],
                self.refusals,
                self.outage_loop,
                self.operator,
                self.sampler,
            ]
            threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    t.join(max(1.0, self.deadline - time.monotonic()) + 120.0)
                    if t.is_alive():
                        self.tally.problem(f"a loop still runs 120 s after the deadline: {t}")
            finally:
                self.stop.set()
            traffic = time.monotonic() - self.t0

            records = self.settle()
            self.stats["end"] = self.settled_stats(self.stats["start"])
            self.take("end")

            def summed() -> float:
                return sum(
                    v
                    for (name, _), v in scrape(web).items()
                    if name == "dicom_tls_proxy_associations_total"
                )

            try:
                metrics_total = wait_until(
                    lambda: (n := summed()) == len(records) and n, timeout=10, what="metrics"
                )
            except AssertionError:
                metrics_total = summed()
        code = proxy.proc.returncode
        (self.tmp / "proxy.log").write_text("\n".join(proxy.raw) + "\n")
        return self.report(records, metrics_total, warm_up, traffic, code)

    def report(
        self,
        records: list[dict[str, Any]],
        metrics_total: float,
        warm_up: float,
        traffic: float,
        code: int | None,
    ) -> dict[str, Any]:
        by_ae = {ae: kind for kind, ae in CALLING_AE.items()}
        proxy_side = {k: Counts() for k in KINDS}
        unexpected: list[dict[str, Any]] = []
        for r in records:
            key = (r["listener"], r["reason"])
            kind = by_ae.get(r.get("calling_ae", ""))
            if kind and (r["outcome"], r["reason"]) == ("completed", "released"):
                proxy_side[kind].completed += 1
            elif kind == "outage" and (r["outcome"], r["reason"]) == (
                "rejected",
                "upstream-unreachable",
            ):
                proxy_side[kind].refused += 1
            elif key in REFUSALS:
                proxy_side[REFUSALS[key]].refused += 1
            else:
                unexpected.append(r)
        kinds = {}
        for kind in KINDS:
            c, p = self.tally.kinds[kind], proxy_side[kind]
            # lost: every attempt not seen to end as expected by both the client and the audit file
            confirmed = min(c.completed, p.completed) + min(c.refused, p.refused)
            kinds[kind] = {
                **asdict(c),
                "lost": c.attempted - confirmed,
                "audit_completed": p.completed,
                "audit_refused": p.refused,
            }
        restarts = max(
            len(self.proxy.find(event="worker-exited")),
            len(self.proxy.find(event="worker-restarted")),
        )
        errors = [
            x
            for x in self.proxy.lines
            if x.get("level") == "error" or x["event"] == "unparsed" or "traceback" in x
        ]
        processes = {}
        for name in self.samples["start"]:
            row: dict[str, Any] = {}
            for when in WHEN:
                s = self.samples.get(when, {}).get(name)
                row[when] = asdict(s) if s else None
            row["peak_rss_kib"] = self.peaks.get(name)
            processes[name] = row
        totals = {
            key: sum(k[key] for k in kinds.values())
            for key in ("attempted", "completed", "refused", "lost")
        }
        totals["lost"] += len(unexpected)
        return {
            "workers": self.workers,
            "seconds": self.seconds,
            "traffic_s": round(traffic, 1),
            "warm_up_s": round(warm_up, 1),
            "idle_hold_s": self.hold,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "kinds": kinds,
            "totals": totals,
            "audit_records": len(records),
            "unexpected_audit_records": unexpected[:20],
            "metrics_associations_total": metrics_total,
            "datasets_compared": self.tally.datasets_compared,
            "bytes_compared": self.tally.bytes_compared,
            "bytes_relayed": sum(r["bytes_up"] + r["bytes_down"] for r in records),
            "swaps": self.swaps,
            "watch_changes": self.watch_changes,
            "worker_restarts": restarts,
            "error_lines": len(errors),
            "first_error_lines": [json.dumps(x)[:500] for x in errors[:10]],
            "lost_details": self.tally.lost[:20],
            "problems": self.tally.problems,
            "processes": processes,
            "stats": self.stats,
            "bounds": {
                "rss_slack_kib": RSS_SLACK_KIB,
                "rss_factor": RSS_FACTOR,
                "fd_slack": FD_SLACK,
            },
            "exit_code": code,
        }


def drift(report: dict[str, Any]) -> list[str]:
    """Processes whose RSS or fds grew beyond the bounds from start to end."""
    out = []
    for name, row in report["processes"].items():
        start, end = row["start"], row["end"]
        if start is None or end is None:
            out.append(f"{name}: not sampled at start and end (gone?)")
            continue
        if start["pid"] != end["pid"]:
            out.append(f"{name}: another process at the end (pid {start['pid']} -> {end['pid']})")
            continue
        limit = min(start["rss_kib"] + RSS_SLACK_KIB, start["rss_kib"] * RSS_FACTOR)
        if end["rss_kib"] > limit:
            out.append(
                f"{name}: RSS {start['rss_kib']} -> {end['rss_kib']} KiB (bound {limit:.0f})"
            )
        if end["fds"] > start["fds"] + FD_SLACK:
            out.append(
                f"{name}: fds {start['fds']} -> {end['fds']} (bound {start['fds'] + FD_SLACK})"
            )
    return out


WHEN = ("start", "middle", "end")


def table(report: dict[str, Any]) -> str:
    lines = [
        f"soak: workers = {report['workers']}, {report['traffic_s']:.0f} s of traffic "
        f"(after a {report['warm_up_s']:.0f} s warm-up), idle associations held "
        f"{report['idle_hold_s']:.0f} s",
        f"{'kind':<12}{'attempted':>10}{'completed':>10}{'refused':>9}{'lost':>6}"
        f"{'audit: completed':>18}{'refused':>9}",
    ]
    for kind, k in [*report["kinds"].items(), ("total", report["totals"])]:
        audit = (
            f"{k['audit_completed']:>18}{k['audit_refused']:>9}"
            if "audit_completed" in k
            else f"{report['audit_records']:>18}{'':>9}"
        )
        lines.append(
            f"{kind:<12}{k['attempted']:>10}{k['completed']:>10}{k['refused']:>9}{k['lost']:>6}"
            + audit
        )
    lines += [
        f"unexpected audit records {len(report['unexpected_audit_records'])}, "
        f"associations_total in /metrics {report['metrics_associations_total']:.0f}",
        f"compared at the device: {report['datasets_compared']} images, "
        f"{report['bytes_compared']} pixel bytes; relayed {report['bytes_relayed']} bytes",
        f"certificate swaps (SIGHUP) {report['swaps']}, config changes seen by watch "
        f"{report['watch_changes']}, worker restarts {report['worker_restarts']}, "
        f"error-level lines {report['error_lines']}, exit code {report['exit_code']}",
        f"{'process':<10}{'pid':>14}{'RSS MiB start':>14}{'middle':>8}{'end':>8}{'peak':>8}"
        f"{'fds start':>11}{'middle':>8}{'end':>6}",
    ]
    for name, row in report["processes"].items():
        rss = [f"{row[w]['rss_kib'] / 1024:.1f}" if row[w] else "-" for w in WHEN]
        fds = [str(row[w]["fds"]) if row[w] else "-" for w in WHEN]
        pids = list(dict.fromkeys(str(row[w]["pid"]) for w in WHEN if row[w]))
        peak = f"{row['peak_rss_kib'] / 1024:.1f}" if row["peak_rss_kib"] else "-"
        lines.append(
            f"{name:<10}{'>'.join(pids):>14}{rss[0]:>14}{rss[1]:>8}{rss[2]:>8}{peak:>8}"
            f"{fds[0]:>11}{fds[1]:>8}{fds[2]:>6}"
        )
    lines.append(
        f"drift bounds, start to end: RSS +{RSS_SLACK_KIB // 1024} MiB and x{RSS_FACTOR}, "
        f"fds +{FD_SLACK}: " + ("; ".join(drift(report)) or "within")
    )
    for when, per in report["stats"].items():
        lines.append(f"stats at {when}: " + "; ".join(f"{n} {s}" for n, s in per.items()))
    lines += [f"problem: {p}" for p in report["problems"]]
    lines += [f"lost: {x}" for x in report["lost_details"][:5]]
    lines += [f"error line: {x}" for x in report["first_error_lines"][:5]]
    return "\n".join(lines)


def check(report: dict[str, Any]) -> None:
    text = table(report)
    assert report["totals"]["lost"] == 0, text
    assert report["worker_restarts"] == 0, text
    assert report["error_lines"] == 0, text
    assert not report["problems"], text
    assert not drift(report), "\n".join(drift(report)) + "\n" + text
    assert report["audit_records"] == report["totals"]["attempted"], text
    assert report["metrics_associations_total"] == report["audit_records"], text
    assert report["datasets_compared"] > 0 and report["swaps"] > 0, text
    assert report["watch_changes"] > 0, text
    for kind, k in report["kinds"].items():
        assert k["completed"] + k["refused"] > 0, f"no {kind} at all\n{text}"
    start, end = report["stats"]["start"], report["stats"]["end"]
    for name, s in end.items():  # nothing left behind: no connection, no task
        assert s is not None and start[name] is not None, text
        assert s["connections"] == 0 and s["associations"] == 0, text
        assert s["tasks"] == start[name]["tasks"], text
    assert report["exit_code"] == 0, text


def soak(tmp_path: Path, pki: Path, workers: int, seconds: float) -> dict[str, Any]:
    run = Soak(tmp_path, pki, workers, seconds)
    try:
        report = run.run()
    finally:
        run.stop.set()
        run.ct.stop()
        run.outage.stop()
    (tmp_path / "soak-report.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(report))
    return report


@pytest.mark.parametrize("workers", [1, 2])
def test_a_minute_of_mixed_traffic(tmp_path: Path, pki: Path, workers: int) -> None:
    check(soak(tmp_path, pki, workers, SMOKE_SECONDS))


@pytest.mark.soak
@pytest.mark.parametrize("workers", [1, 2])
def test_soak_mixed_traffic(tmp_path: Path, pki: Path, workers: int) -> None:
    report = soak(tmp_path, pki, workers, SOAK_SECONDS)
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (results / f"soak-w{workers}-{stamp}.json").write_text(json.dumps(report, indent=2))
    shutil.copy(tmp_path / "proxy.log", results / f"soak-w{workers}-{stamp}.log")
    check(report)
