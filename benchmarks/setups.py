"""The configurations compared, and how each one is brought up for one measurement.

Every measurement starts fresh processes: the legacy device (DCMTK storescp, or the benchmark's own
acceptor for W4) and, between client and device, the proxy or stunnel. So each process's peak RSS
is that workload's peak, and no run inherits another's warm caches or fragmented heap.

    direct        storescu ------------------------------------> storescp           (plaintext)
    proxy-term    storescu +tls --> proxy (TLS listener) ------> storescp           (termination)
    stunnel-term  storescu +tls --> stunnel [termination] -----> storescp
    proxy-orig    storescu -------> proxy (plaintext listener) -> storescp +tls    (origination)
    stunnel-orig  storescu -------> stunnel [origination] -----> storescp +tls
    haproxy-term  storescu +tls --> haproxy [termination] -----> storescp           (second anchor)
    haproxy-orig  storescu -------> haproxy [origination] -----> storescp +tls

On request (`run.py --operations`, `--workers 1,2`), variants of the two proxy setups:

    proxy-term-ops, proxy-orig-ops   the same config plus [audit] file and [metrics] bind
    proxy-term-wN,  proxy-orig-wN    the same config with [proxy] workers = N

W2R (`resumption`): the same setups, every middlebox resuming its TLS sessions towards the
device too (the proxy's upstream `session_tickets = true`, stunnel's `sessionResume = yes`,
HAProxy without `no-ssl-reuse`); towards clients all three resume whenever a client offers a
session (their defaults), in every workload.
"""

from __future__ import annotations

import json
import shutil
import string
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import procs

HERE = Path(__file__).resolve().parent
STUNNEL_TEMPLATE = HERE / "stunnel.conf"
HAPROXY_TEMPLATE = HERE / "haproxy.cfg"
# DCMTK leaves Nagle on without it. The device gets it too: with Nagle and delayed ACKs on its side
# a plaintext C-ECHO association took 87 ms instead of 51 (time in which nothing is measured).
CLIENT_ENV = {"TCP_NODELAY": "1"}
DEVICE_ENV = {"TCP_NODELAY": "1"}
CALLING_AE = "BENCH"
TERMINATION_AE = "LEGACY"  # the proxy's termination route (the legacy device behind it)
ORIGINATION_AE = "PACS"  # the proxy's origination route (the TLS PACS in front of it)

Middlebox = Literal["proxy", "stunnel", "haproxy"]
Direction = Literal["plaintext", "termination", "origination"]
Upstream = Literal["storescp", "storescp-fork", "external"]


@dataclass(frozen=True)
class Setup:
    name: str
    direction: Direction
    middlebox: Middlebox | None
    operations: bool = False  # the proxy with [audit] file and [metrics] bind
    workers: int = 1  # the proxy's [proxy] workers

    @property
    def client_tls(self) -> bool:
        """Does the client speak TLS (the middlebox terminates it)?"""
        return self.direction == "termination"

    @property
    def upstream_tls(self) -> bool:
        """Does the device speak TLS (the middlebox originates it)?"""
        return self.direction == "origination"

    @property
    def called_ae(self) -> str:
        return ORIGINATION_AE if self.upstream_tls else TERMINATION_AE


SETUPS = (
    Setup("direct", "plaintext", None),
    Setup("proxy-term", "termination", "proxy"),
    Setup("stunnel-term", "termination", "stunnel"),
    Setup("proxy-orig", "origination", "proxy"),
    Setup("stunnel-orig", "origination", "stunnel"),
    Setup("haproxy-term", "termination", "haproxy"),
    Setup("haproxy-orig", "origination", "haproxy"),
)
PAIRS = {  # what the targets compare: the proxy against stunnel doing the same job
    "termination": ("proxy-term", "stunnel-term"),
    "origination": ("proxy-orig", "stunnel-orig"),
}
# the second anchor: the proxy against HAProxy doing the same job (ratios printed, no target)
HAPROXY_PAIRS = {
    "termination": ("proxy-term", "haproxy-term"),
    "origination": ("proxy-orig", "haproxy-orig"),
}
OPERATIONS_WORKLOADS = ("W1", "W3")  # where the -ops setups run (the acceptance)
# where the -wN setups run: concurrent associations (W3), and the cost of one association (W2),
# which a supervisor that kills its workers every 10 s once multiplied by 2.6
WORKERS_WORKLOADS = ("W2", "W3")
# without `direct`: W4 measures a middlebox, W2R's direct run would be W2's (no TLS to resume)
MIDDLEBOX_WORKLOADS = ("W2R", "W4")


def operations_setups() -> list[Setup]:
    """proxy-term-ops and proxy-orig-ops: the proxy with its audit file and metrics server on."""
    return [
        Setup(f"{proxy}-ops", direction, "proxy", operations=True)
        for direction, (proxy, _) in PAIRS.items()
    ]


def workers_setups(workers: int) -> list[Setup]:
    """proxy-term-wN and proxy-orig-wN: the proxy with `workers = N`."""
    return [
        Setup(f"{proxy}-w{workers}", direction, "proxy", workers=workers)
        for direction, (proxy, _) in PAIRS.items()
    ]


def chosen_setups(
    *, stunnel: bool, operations: bool, workers: list[int], haproxy: bool = False
) -> list[Setup]:
    """The setups of one run in the order they alternate: each proxy variant next to the proxy
    setup it varies, stunnel after them."""
    extra: dict[str, list[Setup]] = {proxy: [] for proxy, _ in PAIRS.values()}
    for setup in [
        *(operations_setups() if operations else []),
        *(s for n in workers if n != 1 for s in workers_setups(n)),
    ]:
        extra[PAIRS[setup.direction][0]].append(setup)
    chosen: list[Setup] = []
    for setup in SETUPS:
        if setup.middlebox == "stunnel" and not stunnel:
            continue
        if setup.middlebox == "haproxy" and not haproxy:
            continue
        chosen.append(setup)
        chosen += extra.get(setup.name, [])
    return chosen


def applies(workload: str, setup: Setup) -> bool:
    """W4 measures what a middlebox keeps per association, W2R what resuming saves a middlebox;
    direct has no middlebox. The -ops setups run in W1 and W3, the -wN setups in W2 and W3."""
    if workload in MIDDLEBOX_WORKLOADS and setup.middlebox is None:
        return False
    if setup.operations and workload not in OPERATIONS_WORKLOADS:
        return False
    return not (setup.workers != 1 and workload not in WORKERS_WORKLOADS)


def comparisons(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """The ratios to print, as (key, numerator, denominator) among the setups `names`: each
    direction's proxy / stunnel (key: the direction), proxy / haproxy (key:
    "DIRECTION/haproxy"), each proxy-X-wN / stunnel (key:
    "DIRECTION-wN") and / proxy-X with one worker (key: "DIRECTION-wN/w1"), each proxy-X-ops /
    proxy-X without operations (key: "DIRECTION-ops")."""
    present = set(names)
    out = [(d, proxy, stunnel) for d, (proxy, stunnel) in PAIRS.items()]
    out += [(f"{d}/haproxy", proxy, haproxy) for d, (proxy, haproxy) in HAPROXY_PAIRS.items()]
    for d, (proxy, stunnel) in PAIRS.items():
        for name in sorted(present):
            suffix = name.removeprefix(proxy + "-w")
            if name.startswith(proxy + "-w") and suffix.isdigit():
                out.append((f"{d}-w{suffix}", name, stunnel))
                out.append((f"{d}-w{suffix}/w1", name, proxy))
    out += [(f"{d}-ops", f"{proxy}-ops", proxy) for d, (proxy, _) in PAIRS.items()]
    return [(k, a, b) for k, a, b in out if a in present and b in present]


@dataclass(frozen=True)
class Tools:
    python: str
    storescu: str
    storescp: str
    echoscu: str
    stunnel: str | None
    haproxy: str | None = None
    proxy_source: Path = procs.REPO  # the folder `python -m dicom_tls_proxy` runs from

    def with_snapshot(self, folder: Path) -> Tools:
        """The same tools, the proxy run from a copy of dicom_tls_proxy/ taken now: every
        measurement of a run measures the same code, even if the working tree changes meanwhile.
        (Python puts the working folder before the editable install's finder.)"""
        shutil.copytree(
            procs.REPO / "dicom_tls_proxy",
            folder / "dicom_tls_proxy",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        return replace(self, proxy_source=folder)


@dataclass(frozen=True)
class Pki:
    """The development PKI of `dicom-tls-proxy certs init` (RSA-2048, as DCMTK's profile needs)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, who: Literal["proxy", "client"]) -> Path:
        return self.folder / f"{who}.pem"

    def key(self, who: Literal["proxy", "client"]) -> Path:
        return self.folder / f"{who}.key"

    def dcmtk_args(self, who: Literal["proxy", "client"]) -> list[str]:
        return ["+tls", str(self.key(who)), str(self.cert(who)), "+cf", str(self.ca)]


def make_pki(tools: Tools, folder: Path) -> Pki:
    subprocess.run(
        [tools.python, "-m", "dicom_tls_proxy", "certs", "init", str(folder)],
        check=True,
        cwd=tools.proxy_source,
        capture_output=True,
    )
    return Pki(folder)


@dataclass(frozen=True)
class Ports:
    """Fresh loopback ports for one measurement (nothing waits for TIME_WAIT to clear)."""

    tls_in: int  # the middlebox's TLS side towards clients (termination)
    plain_in: int  # the middlebox's plaintext side towards legacy clients (origination)
    device: int  # plaintext storescp
    tls_device: int  # storescp +tls
    metrics: int  # the proxy's [metrics] bind (the -ops setups)

    @classmethod
    def fresh(cls) -> Ports:
        ports: set[int] = set()
        while len(ports) < 5:
            ports.add(procs.free_port())
        return cls(*sorted(ports))


@dataclass(frozen=True)
class Endpoint:
    """Where the clients of one measurement connect, and the process whose costs are measured."""

    setup: Setup
    port: int
    called_ae: str
    client_args: list[str]  # DCMTK TLS options for the client, if it speaks TLS
    measured_pid: int | None  # the proxy or stunnel; None for direct
    log: Path | None  # the middlebox's log
    device_port: int  # where the device listens (W4's acceptor binds it itself)
    audit: Path | None = None  # the proxy's audit file (the -ops setups)
    metrics_port: int | None = None  # the proxy's /metrics (the -ops setups)
    device_pid: int | None = None  # storescp (None when `external`)

    def dcmtk(self, tool: str, *args: str) -> list[str]:
        return [
            tool,
            *self.client_args,
            "-aet",
            CALLING_AE,
            "-aec",
            self.called_ae,
            "127.0.0.1",
            str(self.port),
            *args,
        ]


# -- configs --------------------------------------------------------------------------------


def proxy_config(
    pki: Pki,
    ports: Ports,
    setup: Setup | None = None,
    work: Path | None = None,
    resumption: bool = False,
) -> str:
    """Two listeners and two routes, like a gateway in production: access checks on, log_level
    info, limits high enough for W4's 500 idle associations. With `setup.workers` > 1, that many
    workers; with `setup.operations`, an audit file in `work` and a metrics server. The listener
    issues session tickets (the default); with `resumption` (W2R) the proxy also resumes its
    sessions with the upstream."""
    q = json.dumps
    workers = f"workers = {setup.workers}\n" if setup and setup.workers != 1 else ""
    operations = ""
    if setup and setup.operations:
        assert work is not None
        operations = f"""
[audit]
file = {q(str(work / "audit.jsonl"))}

[metrics]
bind = "127.0.0.1:{ports.metrics}"
"""
    return f"""\
[proxy]
max_connections = 1024
max_pending = 1024
log_level = "info"
log_format = "text"
{workers}{operations}
[tls.inbound]
certificate = {q(str(pki.cert("proxy")))}
private_key = {q(str(pki.key("proxy")))}
ca = {q(str(pki.ca))}
verify = "chain"
peer_certificate = "required"
profile = "tls13"

[tls.to-pacs]
certificate = {q(str(pki.cert("client")))}
private_key = {q(str(pki.key("client")))}
ca = {q(str(pki.ca))}
server_name = "localhost"
profile = "tls13"
# W2 (false): no resumption towards the upstream, as stunnel's `sessionResume = no` and
# HAProxy's `no-ssl-reuse`: full handshakes on both sides. W2R (true): all three resume (issue 16).
session_tickets = {"true" if resumption else "false"}

[[listener]]
name = "tls-in"
bind = "127.0.0.1:{ports.tls_in}"
tls = "inbound"
allow_source = ["127.0.0.0/8"]

[[listener]]
name = "legacy-in"
bind = "127.0.0.1:{ports.plain_in}"
allow_source = ["127.0.0.0/8"]

[[route]]
called_ae = "{TERMINATION_AE}"
listeners = ["tls-in"]
upstream = "127.0.0.1:{ports.device}"
allow_calling_ae = ["BENCH*"]
allow_peer = ["cn:dicom-client"]
allow_source = ["127.0.0.0/8"]

[[route]]
called_ae = "{ORIGINATION_AE}"
listeners = ["legacy-in"]
upstream = "127.0.0.1:{ports.tls_device}"
upstream_tls = "to-pacs"
allow_calling_ae = ["BENCH*"]
allow_source = ["127.0.0.0/8"]
"""


def _port_fields(ports: Ports) -> dict[str, int]:
    """The listening ports stunnel.conf and haproxy.cfg name, the same in both templates."""
    return {
        "termination_port": ports.tls_in,
        "termination_upstream_port": ports.device,
        "origination_port": ports.plain_in,
        "origination_upstream_port": ports.tls_device,
    }


def stunnel_config(
    pki: Pki, ports: Ports, verify_level: str = "verifyChain", resumption: bool = False
) -> str:
    """benchmarks/stunnel.conf with its placeholders filled in; with `resumption` (W2R) the
    [origination] service resumes its sessions with the device (`sessionResume = yes`)."""
    template = string.Template(STUNNEL_TEMPLATE.read_text())
    return template.substitute(
        **_port_fields(ports),
        server_certificate=pki.cert("proxy"),
        server_key=pki.key("proxy"),
        client_certificate=pki.cert("client"),
        client_key=pki.key("client"),
        ca=pki.ca,
        verify_level=verify_level,
        session_resume="yes" if resumption else "no",
    )


# -- bringing a setup up --------------------------------------------------------------------


@contextmanager
def running(
    setup: Setup, upstream: Upstream, tools: Tools, pki: Pki, work: Path, resumption: bool = False
) -> Iterator[Endpoint]:
    """The device (unless `external`) and the middlebox, listening; both stopped on exit. With
    `resumption` (W2R), the middlebox resumes its TLS sessions with the device."""
    ports = Ports.fresh()
    device_port = ports.tls_device if setup.upstream_tls else ports.device
    with ExitStack() as stack:
        device = None
        if upstream != "external":
            argv = [tools.storescp, "--ignore", "-aet", setup.called_ae]
            if upstream == "storescp-fork":
                argv.append("--fork")
            if setup.upstream_tls:
                argv += pki.dcmtk_args("proxy")
            argv.append(str(device_port))
            device = stack.enter_context(
                procs.started(
                    "storescp", argv, work / "storescp.log", port=device_port, env=DEVICE_ENV
                )
            )
        middlebox, port, log = None, device_port, None
        if setup.middlebox is not None:
            port = ports.tls_in if setup.direction == "termination" else ports.plain_in
            log = work / f"{setup.middlebox}.log"
            middlebox = stack.enter_context(
                _start_middlebox(setup, tools, pki, ports, port, work, log, resumption)
            )
        yield Endpoint(
            setup=setup,
            port=port,
            called_ae=setup.called_ae,
            client_args=pki.dcmtk_args("client") if setup.client_tls else [],
            measured_pid=middlebox.pid if middlebox else None,
            log=log,
            device_port=device_port,
            audit=work / "audit.jsonl" if setup.operations else None,
            metrics_port=ports.metrics if setup.operations else None,
            device_pid=device.pid if device else None,
        )


def haproxy_config(pki: Pki, ports: Ports, work: Path, resumption: bool = False) -> str:
    """benchmarks/haproxy.cfg with its placeholders filled in; HAProxy reads the key from the
    certificate's PEM, so each certificate and its key are written into one file in `work`.
    Without `resumption`, `no-ssl-reuse` towards the device; with it (W2R), HAProxy's default."""
    pems = {}
    for who in ("proxy", "client"):
        pem = work / f"haproxy-{who}.pem"
        pem.write_bytes(pki.cert(who).read_bytes() + pki.key(who).read_bytes())
        pem.chmod(0o600)
        pems[who] = pem
    template = string.Template(HAPROXY_TEMPLATE.read_text())
    return template.substitute(
        **_port_fields(ports),
        server_pem=pems["proxy"],
        client_pem=pems["client"],
        ca=pki.ca,
        ssl_reuse="" if resumption else " no-ssl-reuse",
    )


def _start_middlebox(
    setup: Setup,
    tools: Tools,
    pki: Pki,
    ports: Ports,
    port: int,
    work: Path,
    log: Path,
    resumption: bool,
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    if setup.middlebox == "proxy":
        config = work / "proxy.toml"
        config.write_text(proxy_config(pki, ports, setup, work, resumption))
        argv = [tools.python, "-m", "dicom_tls_proxy", "run", "-c", str(config)]
        return procs.started("proxy", argv, log, port=port, cwd=tools.proxy_source)
    if setup.middlebox == "haproxy":
        if tools.haproxy is None:
            raise procs.BenchmarkError("haproxy is not installed")
        config = work / "haproxy.cfg"
        config.write_text(haproxy_config(pki, ports, work, resumption))
        return procs.started("haproxy", [tools.haproxy, "-db", "-f", str(config)], log, port=port)
    if tools.stunnel is None:
        raise procs.BenchmarkError("stunnel is not installed")
    config = work / "stunnel.conf"
    config.write_text(stunnel_config(pki, ports, resumption=resumption))
    return procs.started("stunnel", [tools.stunnel, str(config)], log, port=port)


def find_tools(*, with_stunnel: bool = True, with_haproxy: bool = True) -> Tools:
    missing = [t for t in ("storescu", "storescp", "echoscu") if procs.dcmtk(t) is None]
    if missing:
        print(
            f"DCMTK is not installed ({', '.join(missing)} missing): apt-get install dcmtk",
            file=sys.stderr,
        )
        sys.exit(2)
    return Tools(
        python=sys.executable,
        storescu=procs.dcmtk("storescu") or "",
        storescp=procs.dcmtk("storescp") or "",
        echoscu=procs.dcmtk("echoscu") or "",
        stunnel=procs.stunnel() if with_stunnel else None,
        haproxy=procs.executable("haproxy") if with_haproxy else None,
    )
