"""The configuration: TOML in, frozen dataclasses out, every mistake named by file and key path.

This is the proxy's public interface, so the schema lives here once: `check`, `run`, the tests and
the README all go through `load_config`. Loading reads every referenced file (certificates, keys,
passwords, CAs, CRLs) so that a config that loads is a config that can run. It never echoes a
password or key material in an error, and it never opens a socket.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from cryptography import x509
from OpenSSL import SSL

from dicom_tls_proxy import certload, policy
from dicom_tls_proxy.auth import IPNetwork, PeerMatcher, PlaintextSender, parse_peer_matcher
from dicom_tls_proxy.pdu import validate_ae_title
from dicom_tls_proxy.thumbprint import Thumbprint, parse_thumbprint

T = TypeVar("T")

VerifyMode = Literal["chain", "thumbprint", "chain+thumbprint", "none"]
PeerCertificateMode = Literal["required", "optional", "none"]
Profile = Literal["bcp195", "tls13", "legacy"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("chain", "thumbprint", "chain+thumbprint", "none")
PEER_CERTIFICATE_MODES: tuple[PeerCertificateMode, ...] = ("required", "optional", "none")
PROFILES: tuple[Profile, ...] = ("bcp195", "tls13", "legacy")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """One or more configuration mistakes; each line reads ``FILE: key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
    bind: Endpoint | None = None  # /metrics, /healthz, /readyz


@dataclass(frozen=True)
class TlsTable:
    """One `[tls.NAME]` table, with the files it names already loaded and checked."""

    name: str
    certificate: Path | None
    private_key: Path | None
    ca: Path | None
    crl: tuple[Path, ...]
    verify: VerifyMode
    peer_certificate: PeerCertificateMode
    accepted_thumbprints: tuple[Thumbprint, ...]
    allow_weak_peer_certificates: bool
    profile: Profile
    ciphers: str
    tls13_ciphersuites: str
    server_name: str
    identity: certload.Identity | None = field(repr=False, default=None)
    ca_certificates: tuple[x509.Certificate, ...] = field(repr=False, default=())
    crls: tuple[x509.CertificateRevocationList, ...] = field(repr=False, default=())

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

    @property
    def key_path(self) -> str:
        return f"route[{self.index}]"


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
        Recorded by `_Reader.path_value`, so a key added later is covered without a list here."""
        return (self.path, *dict.fromkeys(self.files))

    def listener(self, name: str) -> Listener:
        return next(li for li in self.listeners if li.name == name)

    def routes_for(self, listener: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if listener in r.listeners)


# --------------------------------------------------------------------------------------------
# Loading


class _Reader:
    """Collects every problem instead of stopping at the first, so one `check` shows them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.files: list[Path] = []  # every file or folder read through path_value

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {message}")

    def table(self, data: Any, key: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.error(key, f"expected a table, got {_type_name(data)}")
            return {}
        return data

    def unknown(self, data: Mapping[str, Any], key: str, known: set[str]) -> None:
        for name in data:
            if name not in known:
                hint = ""
                if name == "password":
                    hint = " (passwords are never literal: use password_file or password_env)"
                self.error(_join(key, name), f"unknown key{hint}")

    def value(
        self,
        data: Mapping[str, Any],
        key: str,
        name: str,
        kind: type | tuple[type, ...],
        default: T,
        check: Callable[[Any], T] | None = None,
    ) -> T:
        """Read `name` from `data`, type-check it, then run `check` (which may convert)."""
        if name not in data:
            return default
        raw = data[name]
        full = _join(key, name)
        if isinstance(raw, bool) and kind in (int, float, (int, float)):
            self.error(full, f"expected a number, got {_type_name(raw)}")
            return default
        if kind is float and isinstance(raw, int):
            raw = float(raw)
        if not isinstance(raw, kind):
            self.error(full, f"expected {_kind_name(kind)}, got {_type_name(raw)}")
            return default
        if check is None:
            return cast(T, raw)
        try:
            return check(raw)
        except ValueError as exc:
            self.error(full, str(exc))
            return default

    def path_value(
        self, data: Mapping[str, Any], key: str, name: str, *, folder: bool = False
    ) -> Path | None:
        def resolve(text: str) -> Path:
            if not text:
                raise ValueError("must not be empty")
            p = Path(text).expanduser()
            p = p if p.is_absolute() else self.base / p
            if not p.exists():
                raise ValueError(f"{p} does not exist")
            if not folder and p.is_dir():
                raise ValueError(f"{p} is a folder, expected a file")
            # Every file a config names is a key, a password or a trust anchor.
            insecure = certload.insecure_file_reason(p)
            if insecure:
                raise ValueError(f"refused: {insecure}")
            self.files.append(p)
            return p

        found: Path | None = self.value(data, key, name, str, None, resolve)
        return found

    def new_file(self, text: str) -> Path:
        """A file the proxy writes (pid file, audit log): its folder must exist."""
        if not text:
            raise ValueError("must not be empty")
        p = Path(text).expanduser()
        p = p if p.is_absolute() else self.base / p
        if not p.parent.is_dir():
            raise ValueError(f"folder {p.parent} does not exist")
        if p.is_dir():
            raise ValueError(f"{p} is a folder, expected a file")
        return p

    def string_list(
        self, data: Mapping[str, Any], key: str, name: str, check: Callable[[str], T]
    ) -> tuple[T, ...]:
        raw = data.get(name, [])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            self.error(_join(key, name), f"expected a list of strings, got {_type_name(raw)}")
            return ()
        out: list[T] = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.error(f"{_join(key, name)}[{i}]", f"expected a string, got {_type_name(item)}")
                continue
            try:
                out.append(check(item))
            except ValueError as exc:
                self.error(f"{_join(key, name)}[{i}]", str(exc))
        return tuple(out)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_type_name(k()) for k in kinds)


def _positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return value


def _seconds_between(low: float, high: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value}")
        return value

    return check


def _at_least(minimum: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return check


def _between(low: int, high: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def _openssl_list(setter: str) -> Callable[[str], str]:
    """A cipher list OpenSSL accepts (asked of a throwaway context, as the proxy's own will be),
    so that a typo is a config error at `check`, not a traceback when the proxy starts."""

    def check(value: str) -> str:
        if value:
            try:
                getattr(SSL.Context(SSL.TLS_METHOD), setter)(value.encode())
            except (SSL.Error, UnicodeEncodeError):
                raise ValueError(f"OpenSSL matches no cipher in {value!r}") from None
        return value

    return check


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise ValueError(f"{text!r} is not a valid name (letters, digits, '_', '.', '-')")
    return text


def _called_ae(text: str) -> str:
    return "*" if text.strip() == "*" else validate_ae_title(text)


def _ae_glob(text: str) -> str:
    if not text or len(text.strip()) > 16 or "\\" in text or not text.isascii():
        raise ValueError(f"{text!r} is not an AE title pattern (at most 16 ASCII characters)")
    return text.strip()


_PROXY_KEYS = {f.name for f in fields(ProxySettings)}  # the dataclass is the schema
_TLS_KEYS = {
    "certificate",
    "private_key",
    "password_file",
    "password_env",
    "ca",
    "crl",
    "verify",
    "peer_certificate",
    "accepted_thumbprints",
    "allow_weak_peer_certificates",
    "profile",
    "ciphers",
    "tls13_ciphersuites",
    "server_name",
}
_LISTENER_KEYS = {"name", "bind", "tls", "allow_source", "allow_plaintext_from"}
_ROUTE_KEYS = {
    "name",
    "called_ae",
    "listeners",
    "upstream",
    "upstream_tls",
    "upstream_called_ae",
    "allow_calling_ae",
    "allow_peer",
    "allow_source",
    "health_check",
    "health_check_interval",
    "health_check_timeout",
    "health_check_calling_ae",
}


def load_config(path: str | os.PathLike[str], *, now: datetime | None = None) -> Config:
    """Load and validate a config file; raises ConfigError listing every problem found."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{m.group(1)}:{m.group(2)}" if m else "1:1"
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError([f"{path}:{where}: {message}"]) from None
    return _build(_Reader(path), data, now or datetime.now(UTC))


def _build(r: _Reader, data: dict[str, Any], now: datetime) -> Config:
    r.unknown(data, "", {"proxy", "tls", "listener", "route", "audit", "metrics"})
    proxy = _proxy(r, r.table(data.get("proxy", {}), "proxy"))
    audit_data = r.table(data.get("audit", {}), "audit")
    audit = _audit(r, audit_data, data.get("tls", {}))
    metrics_data = r.table(data.get("metrics", {}), "metrics")
    r.unknown(metrics_data, "metrics", {"bind"})
    metrics = MetricsSettings(
        bind=r.value(
            metrics_data,
            "metrics",
            "bind",
            str,
            None,
            lambda t: parse_endpoint(t, allow_port_zero=True),
        )
    )
    tls_data = r.table(data.get("tls", {}), "tls")
    tables: dict[str, TlsTable] = {}
    for name, table in tls_data.items():
        try:
            _name(name)
        except ValueError as exc:
            r.error(f"tls.{name}", str(exc))
            continue
        tls = _tls_table(r, name, r.table(table, f"tls.{name}"), now)
        if tls is not None:
            tables[name] = tls

    listeners = _listeners(r, data.get("listener", []), tables, tls_data)
    routes = _routes(r, data.get("route", []), listeners, tables, tls_data)
    if not listeners and "listener" not in data:
        r.error("listener", "at least one [[listener]] is needed")
    if not routes and "route" not in data:
        r.error("route", "at least one [[route]] is needed")
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        path=r.path,
        proxy=proxy,
        tls=tables,
        listeners=tuple(listeners),
        routes=tuple(routes),
        warnings=tuple(r.warnings),
        audit=audit,
        metrics=metrics,
        files=tuple(r.files),
    )


def _audit(r: _Reader, d: dict[str, Any], tls_data: Any) -> AuditSettings:
    """`[audit]`: the JSON-lines file, and the syslog collector (always over TLS, PS3.15 A.6)."""
    r.unknown(d, "audit", {"file", "syslog", "syslog_tls"})
    syslog = r.value(d, "audit", "syslog", str, None, parse_endpoint)
    syslog_tls = r.value(d, "audit", "syslog_tls", str, None)
    if syslog is not None and syslog.host in ("", "*"):
        r.error("audit.syslog", "needs the collector's host name or address")
    if "syslog" in d and "syslog_tls" not in d:
        r.error(
            "audit.syslog_tls",
            "missing: audit messages go to the syslog collector over TLS only (DICOM PS3.15 "
            "A.6, RFC 5425); name the [tls.NAME] table to connect with",
        )
    if syslog_tls is not None:
        if "syslog" not in d:
            r.error("audit.syslog_tls", "set without audit.syslog")
        if not isinstance(tls_data, dict) or syslog_tls not in tls_data:
            r.error("audit.syslog_tls", f"no [tls.{syslog_tls}] table")
        elif isinstance(table := tls_data[syslog_tls], dict) and table.get("verify") == "none":
            r.warn(
                "audit.syslog_tls",
                f'[tls.{syslog_tls}] has verify = "none": the collector is not authenticated',
            )
    return AuditSettings(
        file=r.value(d, "audit", "file", str, None, r.new_file),
        syslog=syslog,
        syslog_tls=syslog_tls,
    )


def _proxy(r: _Reader, d: dict[str, Any]) -> ProxySettings:
    r.unknown(d, "proxy", _PROXY_KEYS)
    k, base = "proxy", ProxySettings()
    settings = ProxySettings(
        handshake_timeout=r.value(
            d, k, "handshake_timeout", float, base.handshake_timeout, _positive
        ),
        connect_timeout=r.value(d, k, "connect_timeout", float, base.connect_timeout, _positive),
        associate_timeout=r.value(
            d, k, "associate_timeout", float, base.associate_timeout, _positive
        ),
        idle_timeout=r.value(d, k, "idle_timeout", float, base.idle_timeout, _positive),
        max_connections=r.value(d, k, "max_connections", int, base.max_connections, _at_least(1)),
        max_pending=r.value(d, k, "max_pending", int, base.max_pending, _at_least(1)),
        max_associate_length=r.value(
            d, k, "max_associate_length", int, base.max_associate_length, _at_least(68 + 6)
        ),
        log_format=r.value(d, k, "log_format", str, base.log_format, _one_of(*LOG_FORMATS)),
        log_level=r.value(d, k, "log_level", str, base.log_level, _one_of(*LOG_LEVELS)),
        workers=r.value(d, k, "workers", int, base.workers, _between(1, 64)),
        max_connections_per_ip=r.value(
            d, k, "max_connections_per_ip", int, base.max_connections_per_ip, _at_least(0)
        ),
        drain_timeout=r.value(d, k, "drain_timeout", float, base.drain_timeout, _positive),
        pid_file=r.value(d, k, "pid_file", str, None, r.new_file),
        watch=r.value(d, k, "watch", bool, base.watch),
        watch_interval=r.value(
            d, k, "watch_interval", float, base.watch_interval, _seconds_between(0.1, 3600.0)
        ),
    )
    return settings


def _password(r: _Reader, d: dict[str, Any], key: str) -> tuple[bytes | None, str]:
    """The password and the key to blame when it is wrong."""
    if "password_file" in d and "password_env" in d:
        r.error(f"{key}.password_env", "give password_file or password_env, not both")
        return None, f"{key}.password_env"
    if "password_env" in d:
        var = r.value(d, key, "password_env", str, "")
        if var and var not in os.environ:
            r.error(f"{key}.password_env", f"environment variable {var} is not set")
            return None, f"{key}.password_env"
        return (os.environ[var].encode() if var else None), f"{key}.password_env"
    pw_path = r.path_value(d, key, "password_file")
    if pw_path is None:
        return None, f"{key}.password_file"
    for warning in certload.key_file_warnings(pw_path):
        r.warn(f"{key}.password_file", warning)
    try:
        text = pw_path.read_bytes()
    except OSError as exc:
        r.error(f"{key}.password_file", f"cannot read {pw_path}: {exc.strerror}")
        return None, f"{key}.password_file"
    return text.rstrip(b"\r\n"), f"{key}.password_file"


def _tls_table(r: _Reader, name: str, d: dict[str, Any], now: datetime) -> TlsTable | None:
    key = f"tls.{name}"
    r.unknown(d, key, _TLS_KEYS)
    before = len(r.problems)
    certificate = r.path_value(d, key, "certificate")
    private_key = r.path_value(d, key, "private_key")
    password, password_key = _password(r, d, key)
    ca = r.path_value(d, key, "ca", folder=True)
    crl_paths = r.string_list(d, key, "crl", lambda s: s)
    verify = cast(VerifyMode, r.value(d, key, "verify", str, "chain", _one_of(*VERIFY_MODES)))
    peer_certificate = cast(
        PeerCertificateMode,
        r.value(d, key, "peer_certificate", str, "required", _one_of(*PEER_CERTIFICATE_MODES)),
    )
    thumbprints = r.string_list(d, key, "accepted_thumbprints", parse_thumbprint)
    allow_weak = r.value(d, key, "allow_weak_peer_certificates", bool, False)
    profile = cast(Profile, r.value(d, key, "profile", str, "bcp195", _one_of(*PROFILES)))
    ciphers = r.value(d, key, "ciphers", str, "", _openssl_list("set_cipher_list"))
    tls13 = r.value(d, key, "tls13_ciphersuites", str, "", _openssl_list("set_tls13_ciphersuites"))
    server_name = r.value(d, key, "server_name", str, "")

    if private_key is not None and certificate is None:
        r.error(f"{key}.certificate", "private_key is given but certificate is missing")
    if verify in ("thumbprint", "chain+thumbprint") and not thumbprints:
        r.error(f"{key}.accepted_thumbprints", f'verify = "{verify}" needs at least one thumbprint')
    if verify in ("chain", "chain+thumbprint") and "ca" not in d:
        r.error(f"{key}.ca", f'verify = "{verify}" needs a ca (file or folder)')
    if verify == "none":
        r.warn(f"{key}.verify", 'verify = "none": peers are not authenticated; use only for tests')
    if profile == "legacy":
        r.warn(
            f"{key}.profile", 'profile = "legacy" allows TLS 1.0/1.1 and CBC suites (not BCP 195)'
        )
    if allow_weak:
        r.warn(f"{key}.allow_weak_peer_certificates", "weak peer certificates are accepted")
    if peer_certificate == "none":
        r.warn(
            f"{key}.peer_certificate",
            'peer_certificate = "none": clients of listeners with this table are not authenticated',
        )

    identity = None
    if certificate is not None:
        for warning in (
            certload.key_file_warnings(private_key or certificate)
            if private_key or _is_p12(certificate)
            else []
        ):
            r.warn(f"{key}.private_key" if private_key else f"{key}.certificate", warning)
        try:
            identity = certload.load_identity(certificate, private_key, password)
        except certload.CertificateError as exc:
            blame = {"password": password_key, "key": f"{key}.private_key"}.get(
                exc.blame, f"{key}.certificate"
            )
            if exc.blame == "key" and private_key is None:
                blame = f"{key}.certificate"
            r.error(blame, str(exc))
    ca_certs: list[x509.Certificate] = []
    if ca is not None:
        try:
            ca_certs = certload.load_ca(ca)
        except certload.CertificateError as exc:
            r.error(f"{key}.ca", str(exc))
    crls: list[x509.CertificateRevocationList] = []
    for i, text in enumerate(crl_paths):
        sub = {"crl": text}
        p = r.path_value(sub, key, "crl")
        if p is None:
            if r.problems and r.problems[-1].startswith(f"{r.path}: {key}.crl:"):
                r.problems[-1] = r.problems[-1].replace(f"{key}.crl:", f"{key}.crl[{i}]:", 1)
            continue
        try:
            loaded = certload.load_crls([p])
        except certload.CertificateError as exc:
            r.error(f"{key}.crl[{i}]", str(exc))
            continue
        for c in loaded:
            if certload.crl_is_stale(c, now):
                r.warn(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} is past its nextUpdate (or has none): "
                    "peers it covers will be refused (tls-crl-stale)",
                )
            elif certload.crl_expires_soon(c, now):
                r.warn(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} reaches its nextUpdate within 7 days",
                )
        for c in loaded:
            if ca_certs and not policy.crl_signed_by(c, ca_certs):
                r.error(
                    f"{key}.crl[{i}]",
                    f"CRL from {c.issuer.rfc4514_string()} is not signed by a CA in {key}.ca",
                )
        crls.extend(loaded)

    if len(r.problems) > before:
        return None
    return TlsTable(
        name=name,
        certificate=certificate,
        private_key=private_key,
        ca=ca,
        crl=tuple(Path(p) for p in crl_paths),
        verify=verify,
        peer_certificate=peer_certificate,
        accepted_thumbprints=thumbprints,
        allow_weak_peer_certificates=allow_weak,
        profile=profile,
        ciphers=ciphers,
        tls13_ciphersuites=tls13,
        server_name=server_name,
        identity=identity,
        ca_certificates=tuple(ca_certs),
        crls=tuple(crls),
    )


def _is_p12(path: Path) -> bool:
    return path.suffix.lower() in (".p12", ".pfx")


def _listeners(
    r: _Reader, raw: Any, tables: Mapping[str, TlsTable], declared_tls: Mapping[str, Any]
) -> list[Listener]:
    if not isinstance(raw, list):
        r.error("listener", "expected an array of tables: [[listener]]")
        return []
    out: list[Listener] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        key = f"listener[{i}]"
        d = r.table(item, key)
        r.unknown(d, key, _LISTENER_KEYS)
        if "name" not in d:
            r.error(f"{key}.name", "missing")
        if "bind" not in d:
            r.error(f"{key}.bind", "missing")
        name = r.value(d, key, "name", str, "", _name)
        bind = r.value(d, key, "bind", str, None, lambda s: parse_endpoint(s, allow_port_zero=True))
        tls = r.value(d, key, "tls", str, None)
        if tls is not None and tls not in declared_tls:
            r.error(f"{key}.tls", f"no [tls.{tls}] table")
        elif tls is not None and tls in tables:
            table = tables[tls]
            if table.identity is None:
                r.error(
                    f"{key}.tls", f"[tls.{tls}] has no certificate and private_key to serve with"
                )
        allow_source = r.string_list(d, key, "allow_source", _network)
        plaintext = _plaintext_senders(r, d, key)
        if plaintext and tls is None:
            r.error(f"{key}.allow_plaintext_from", "only a TLS listener can let plaintext through")
        if name and name in seen:
            r.error(
                f"{key}.name", f"duplicate listener name {name!r} (also listener[{seen[name]}])"
            )
        elif name:
            seen[name] = i
        if name and bind is not None:
            out.append(Listener(i, name, bind, tls, allow_source, plaintext))
    return out


def _plaintext_senders(r: _Reader, d: dict[str, Any], key: str) -> tuple[PlaintextSender, ...]:
    raw = d.get("allow_plaintext_from", [])
    full = f"{key}.allow_plaintext_from"
    if not isinstance(raw, list):
        r.error(full, "expected a list of {calling_ae = ..., source = ...} tables")
        return ()
    out = []
    for j, item in enumerate(raw):
        sub = f"{full}[{j}]"
        entry = r.table(item, sub)
        r.unknown(entry, sub, {"calling_ae", "source"})
        for required in ("calling_ae", "source"):
            if required not in entry:
                r.error(f"{sub}.{required}", "missing (both are needed)")
        ae = r.value(entry, sub, "calling_ae", str, "", validate_ae_title)
        net = r.value(entry, sub, "source", str, None, _network)
        if ae and net is not None:
            out.append(PlaintextSender(ae, net))
    return tuple(out)


def _routes(
    r: _Reader,
    raw: Any,
    listeners: list[Listener],
    tables: Mapping[str, TlsTable],
    declared_tls: Mapping[str, Any],
) -> list[Route]:
    if not isinstance(raw, list):
        r.error("route", "expected an array of tables: [[route]]")
        return []
    by_name = {li.name: li for li in listeners}
    out: list[Route] = []
    reachable: dict[tuple[str, str], int] = {}
    for i, item in enumerate(raw):
        key = f"route[{i}]"
        d = r.table(item, key)
        r.unknown(d, key, _ROUTE_KEYS)
        for required in ("called_ae", "upstream"):
            if required not in d:
                r.error(f"{key}.{required}", "missing")
        called_ae = r.value(d, key, "called_ae", str, "", _called_ae)
        name = r.value(d, key, "name", str, called_ae or f"route{i}", _name_or_ae)
        upstream = r.value(d, key, "upstream", str, None, parse_endpoint)
        upstream_tls = r.value(d, key, "upstream_tls", str, None)
        if upstream_tls is not None and upstream_tls not in declared_tls:
            r.error(f"{key}.upstream_tls", f"no [tls.{upstream_tls}] table")
        upstream_called_ae = r.value(d, key, "upstream_called_ae", str, None, validate_ae_title)
        allow_calling_ae = r.string_list(d, key, "allow_calling_ae", _ae_glob)
        allow_peer = r.string_list(d, key, "allow_peer", parse_peer_matcher)
        allow_source = r.string_list(d, key, "allow_source", _network)
        health_check = r.value(d, key, "health_check", bool, False)
        interval = r.value(d, key, "health_check_interval", float, 60.0, _positive)
        check_timeout = r.value(d, key, "health_check_timeout", float, 10.0, _positive)
        check_ae = r.value(
            d, key, "health_check_calling_ae", str, "DICOM_TLS_PROXY", validate_ae_title
        )
        if health_check and called_ae == "*" and upstream_called_ae is None:
            r.error(
                f"{key}.health_check",
                "the fallback route has no Called AE to probe: set upstream_called_ae",
            )
        if "listeners" in d:
            names = r.string_list(d, key, "listeners", lambda s: s)
            for j, ln in enumerate(names):
                if ln not in by_name:
                    r.error(f"{key}.listeners[{j}]", f"no listener named {ln!r}")
            if not names and isinstance(d.get("listeners"), list):
                r.error(
                    f"{key}.listeners",
                    "must name at least one listener (omit it for every TLS listener)",
                )
        else:
            names = tuple(li.name for li in listeners if li.tls is not None)
            if listeners and not names:
                r.error(
                    f"{key}.listeners",
                    "there is no TLS listener: name the plaintext listener(s) this route serves",
                )
        for ln in names:
            li = by_name.get(ln)
            if li is None:
                continue
            if called_ae and (ln, called_ae) in reachable:
                r.error(
                    f"{key}.called_ae",
                    f"{called_ae!r} is already routed from listener {ln!r} "
                    f"by route[{reachable[(ln, called_ae)]}]",
                )
            elif called_ae:
                reachable[(ln, called_ae)] = i
            _check_peer_rules(r, key, allow_peer, li, tables)
        if called_ae and upstream is not None:
            out.append(
                Route(
                    index=i,
                    name=name,
                    called_ae=called_ae,
                    listeners=tuple(names),
                    upstream=upstream,
                    upstream_tls=upstream_tls,
                    upstream_called_ae=upstream_called_ae,
                    allow_calling_ae=allow_calling_ae,
                    allow_peer=allow_peer,
                    allow_source=allow_source,
                    health_check=health_check,
                    health_check_interval=interval,
                    health_check_timeout=check_timeout,
                    health_check_calling_ae=check_ae,
                )
            )
    return out


def _name_or_ae(text: str) -> str:
    if not text.strip() or len(text) > 64 or not text.isprintable():
        raise ValueError(f"{text!r} is not a usable route name")
    return text


def _check_peer_rules(
    r: _Reader,
    key: str,
    allow_peer: tuple[PeerMatcher, ...],
    li: Listener,
    tables: Mapping[str, TlsTable],
) -> None:
    if not allow_peer:
        return
    if li.tls is None:
        r.error(
            f"{key}.allow_peer",
            f"listener {li.name!r} is plaintext: no peer certificate can ever match",
        )
        return
    table = tables.get(li.tls)
    if table is None:
        return
    if table.peer_certificate == "none":
        r.error(
            f"{key}.allow_peer",
            f'[tls.{li.tls}] does not ask for a peer certificate (peer_certificate = "none")',
        )
    if not table.verifies_chain:
        for j, m in enumerate(allow_peer):
            if m.is_name:
                r.error(
                    f"{key}.allow_peer[{j}]",
                    f"{m.kind}: names are only proven by a verified chain, but [tls.{li.tls}] "
                    f'(listener {li.name!r}) has verify = "{table.verify}"',
                )
