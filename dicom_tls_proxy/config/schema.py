"""The configuration's shape: the frozen dataclasses a loaded config is, and nothing that loads it.

Why this exists apart from the loader (`config`): most of the package only reads a config (routing,
the TLS layer, health checks, metrics, the syslog sink, the probe), and should not pull in the TOML
reader, the file checks or OpenSSL to do so. `ProxySettings`' and `TlsTable`'s defaults are what
a TOML file gets for a key it leaves out (the loader reads them from here), so a table built in
code, the `echo` probe's `TlsTable.for_probe`, is built as a loaded one would be.

What it must never do: import OpenSSL, pyOpenSSL or cryptography at run time (their types appear
in annotations only, under TYPE_CHECKING; a test checks), or touch a file. Checking a config (which
keys a table has, what its files hold, how tables refer to each other) is the loader's business;
`parse_endpoint` is here as the inverse of `Endpoint.__str__`, which `echo HOST:PORT` uses too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cryptography import x509

    from dicom_tls_proxy.security import certload
    from dicom_tls_proxy.security.auth import IPNetwork, PeerMatcher, PlaintextSender
    from dicom_tls_proxy.security.thumbprint import Thumbprint

VerifyMode = Literal["chain", "thumbprint", "chain+thumbprint", "none"]
PeerCertificateMode = Literal["required", "optional", "none"]
Profile = Literal["bcp195", "tls13", "legacy"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("chain", "thumbprint", "chain+thumbprint", "none")
PEER_CERTIFICATE_MODES: tuple[PeerCertificateMode, ...] = ("required", "optional", "none")
PROFILES: tuple[Profile, ...] = ("bcp195", "tls13", "legacy")
# The key exchange groups `groups` may name (OpenSSL's names, any case; P-256, P-384 and P-521
# stand for the secp curves): the hybrid and pure ML-KEM groups, the curves of BCP 195 and RFC
# 8446, and the RFC 7919 finite-field groups. Smaller curves are not offered.
TLS_GROUPS = (
    "X25519MLKEM768",
    "SecP256r1MLKEM768",
    "SecP384r1MLKEM1024",
    "MLKEM512",
    "MLKEM768",
    "MLKEM1024",
    "X25519",
    "X448",
    "secp256r1",
    "secp384r1",
    "secp521r1",
    "P-256",
    "P-384",
    "P-521",
    "prime256v1",
    "brainpoolP256r1tls13",
    "brainpoolP384r1tls13",
    "brainpoolP512r1tls13",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
)
RouteMode = Literal["relay", "store-and-forward"]
ROUTE_MODES: tuple[RouteMode, ...] = ("relay", "store-and-forward")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A `host:port` pair; IPv6 literals are written `[::1]:2762`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, *, allow_port_zero: bool = False) -> Endpoint:
    """Parse `host:port` or `[v6]:port`; raises ValueError with a user-facing message."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^\s:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected host:port (IPv6 as [::1]:2762), got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return Endpoint(host, port)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    associate_timeout: float = 30.0
    idle_timeout: float = 900.0
    max_connections: int = 256
    max_pending: int = 64
    max_associate_length: int = 65536
    log_format: str = "text"
    log_level: str = "info"
    workers: int = 1
    max_connections_per_ip: int = 0  # 0 = off
    drain_timeout: float = 30.0
    pid_file: Path | None = None
    watch: bool = False  # reload when a file in a folder the config names changes (watch.py)
    watch_interval: float = 1.0  # seconds between two looks at those folders


@dataclass(frozen=True, slots=True)
class AuditSettings:
    file: Path | None = None  # JSON lines, one object per association and per event
    syslog: Endpoint | None = None  # RFC 5425 collector for PS3.15 A.5 XML audit messages
    syslog_tls: str | None = None  # the [tls.NAME] table the proxy connects to it with


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    bind: Endpoint | None = None  # /metrics, /healthz, /readyz, /status, /status.json
    allow_source: tuple[IPNetwork, ...] = ()  # who may connect to it; empty: anyone


@dataclass(frozen=True)
class TlsTable:
    """One `[tls.NAME]` table, with the files it names already loaded and checked. The defaults
    are those of a key the table leaves out (the loader reads them from here)."""

    name: str
    certificate: Path | None = None
    private_key: Path | None = None
    ca: Path | None = None
    crl: tuple[Path, ...] = ()
    verify: VerifyMode = "chain"
    peer_certificate: PeerCertificateMode = "required"
    accepted_thumbprints: tuple[Thumbprint, ...] = ()
    allow_weak_peer_certificates: bool = False
    profile: Profile = "bcp195"
    ciphers: str = ""  # "": the profile's own list
    tls13_ciphersuites: str = ""
    server_name: str = ""
    session_tickets: bool = True  # resumption: tickets issued (listener), sessions kept (upstream)
    groups: str = ""  # key exchange groups, OpenSSL's list syntax; "": OpenSSL's default
    identity: certload.Identity | None = field(repr=False, default=None)
    ca_certificates: tuple[x509.Certificate, ...] = field(repr=False, default=())
    crls: tuple[x509.CertificateRevocationList, ...] = field(repr=False, default=())

    @classmethod
    def for_probe(
        cls,
        *,
        certificate: Path | None = None,
        private_key: Path | None = None,
        ca: Path | None = None,
        accepted_thumbprints: tuple[Thumbprint, ...] = (),
        profile: Profile = "bcp195",
        server_name: str = "",
        identity: certload.Identity | None = None,
        ca_certificates: tuple[x509.Certificate, ...] = (),
    ) -> TlsTable:
        """The client table, named "probe", that `echo` verifies a server with, built from files
        its caller already loaded. What was given decides `verify`: a CA, the chain (and the
        thumbprints too when some are given); thumbprints alone, only those; neither, "none"
        (the caller decides whether that may be). Every other key has the default a `[tls.NAME]`
        table gets, so the probe checks a server as a route's `upstream_tls` would."""
        verify: VerifyMode = "none"
        if ca is not None:
            verify = "chain+thumbprint" if accepted_thumbprints else "chain"
        elif accepted_thumbprints:
            verify = "thumbprint"
        return cls(
            name="probe",
            certificate=certificate,
            private_key=private_key,
            ca=ca,
            verify=verify,
            accepted_thumbprints=accepted_thumbprints,
            profile=profile,
            server_name=server_name,
            identity=identity,
            ca_certificates=ca_certificates,
        )

    @property
    def key_path(self) -> str:
        return f"tls.{self.name}"

    @property
    def verifies_chain(self) -> bool:
        return self.verify in ("chain", "chain+thumbprint")

    @property
    def pins_thumbprint(self) -> bool:
        return self.verify in ("thumbprint", "chain+thumbprint")


@dataclass(frozen=True, slots=True)
class Listener:
    index: int
    name: str
    bind: Endpoint
    tls: str | None
    allow_source: tuple[IPNetwork, ...]
    allow_plaintext_from: tuple[PlaintextSender, ...] = ()

    @property
    def key_path(self) -> str:
        return f"listener[{self.index}]"


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    name: str
    called_ae: str  # "*" is the fallback route
    listeners: tuple[str, ...]
    upstream: Endpoint
    upstream_tls: str | None
    upstream_called_ae: str | None
    allow_calling_ae: tuple[str, ...]
    allow_peer: tuple[PeerMatcher, ...]
    allow_source: tuple[IPNetwork, ...]
    health_check: bool = False  # a periodic C-ECHO to the upstream (server.health_checks)
    health_check_interval: float = 60.0
    health_check_timeout: float = 10.0
    health_check_calling_ae: str = "DICOM_TLS_PROXY"
    # Store-and-forward (issue 14): the proxy answers the association and spools what it gets.
    mode: RouteMode = "relay"
    spool: Path | None = None  # required with store-and-forward
    spool_max_bytes: int = 0  # beyond it a C-STORE gets 0xA700; 0 = no limit
    retry_interval: float = 10.0  # first retry after a failed forward, doubling ...
    retry_max_interval: float = 600.0  # ... up to this
    forward_batch: int = 100  # instances sent in one association at most
    forward_timeout: float = 60.0  # seconds to wait for each answer of the upstream

    @property
    def key_path(self) -> str:
        return f"route[{self.index}]"

    @property
    def stores(self) -> bool:
        """The proxy answers this route's associations itself and forwards from its spool."""
        return self.mode == "store-and-forward"


@dataclass(frozen=True)
class Config:
    path: Path
    proxy: ProxySettings
    tls: Mapping[str, TlsTable]
    listeners: tuple[Listener, ...]
    routes: tuple[Route, ...]
    warnings: tuple[str, ...] = ()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    files: tuple[Path, ...] = ()  # every file or folder the config names and loading read

    def referenced_paths(self) -> tuple[Path, ...]:
        """The config file and every certificate, key, password file, CA (file or folder) and CRL
        it names: what a reload reads again, and what `watch = true` watches the folders of.
        Recorded by `config_reader.Reader.path_value`, so a key added later is covered without a
        list here."""
        return (self.path, *dict.fromkeys(self.files))

    def listener(self, name: str) -> Listener:
        return next(li for li in self.listeners if li.name == name)

    def routes_for(self, listener: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if listener in r.listeners)
