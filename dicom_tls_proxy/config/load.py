"""Loading the configuration: a TOML file in, a `config_schema.Config` out, every mistake named
by file and key path (``FILE: key.path: message``), all of them at once.

This is the proxy's public interface: `check`, `run`, `reload`, the tests and the README all go
through `load_config`, and a SIGHUP or `watch = true` calls it again. Loading reads the config
file and every file it names (certificates, keys, passwords, CAs, CRLs: `config_tls`), refuses a
file that others could change, and asks OpenSSL about cipher strings, so that a config that loads
is a config that can run. This module holds the top-level tables, listeners and routes, and how
they refer to each other; `config_reader` reads single values, `config_schema` is what comes out.

What it must never do: echo a password or key material in an error (passwords are never literal
in the file: `password_file` or `password_env`), stop at the first mistake, or open a socket.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_tls_proxy.config import spooling
from dicom_tls_proxy.config.reader import (
    Reader,
    at_least,
    between,
    one_of,
    positive,
    seconds_between,
)
from dicom_tls_proxy.config.schema import (
    LOG_FORMATS,
    LOG_LEVELS,
    AuditSettings,
    Config,
    Listener,
    MetricsSettings,
    ProxySettings,
    Route,
    TlsTable,
    parse_endpoint,
)
from dicom_tls_proxy.config.tls_table import tls_table
from dicom_tls_proxy.protocol.pdu import validate_ae_title
from dicom_tls_proxy.security.auth import (
    IPNetwork,
    PeerMatcher,
    PlaintextSender,
    parse_peer_matcher,
)


class ConfigError(Exception):
    """One or more configuration mistakes; each line reads ``FILE: key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # "*", "" (every address) or a host name


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
    return _build(Reader(path), data, now or datetime.now(UTC))


def _build(r: Reader, data: dict[str, Any], now: datetime) -> Config:
    r.unknown(data, "", {"proxy", "tls", "listener", "route", "audit", "metrics"})
    proxy = _proxy(r, r.table(data.get("proxy", {}), "proxy"))
    audit_data = r.table(data.get("audit", {}), "audit")
    audit = _audit(r, audit_data, data.get("tls", {}))
    metrics_data = r.table(data.get("metrics", {}), "metrics")
    r.unknown(metrics_data, "metrics", {"bind", "allow_source"})
    metrics = MetricsSettings(
        bind=r.value(
            metrics_data,
            "metrics",
            "bind",
            str,
            None,
            lambda t: parse_endpoint(t, allow_port_zero=True),
        ),
        allow_source=r.string_list(metrics_data, "metrics", "allow_source", _network),
    )
    if metrics.bind is not None and not metrics.allow_source and not _loopback(metrics.bind.host):
        r.warn(
            "metrics.bind",
            f"{metrics.bind} is not a loopback address and metrics.allow_source is empty: "
            "anyone who reaches it reads the status page (AE titles, addresses, certificate "
            "names); list the monitoring hosts in allow_source",
        )
    tls_data = r.table(data.get("tls", {}), "tls")
    tables: dict[str, TlsTable] = {}
    for name, table in tls_data.items():
        try:
            _name(name)
        except ValueError as exc:
            r.error(f"tls.{name}", str(exc))
            continue
        tls = tls_table(r, name, r.table(table, f"tls.{name}"), now)
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


def _audit(r: Reader, d: dict[str, Any], tls_data: Any) -> AuditSettings:
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


def _proxy(r: Reader, d: dict[str, Any]) -> ProxySettings:
    r.unknown(d, "proxy", _PROXY_KEYS)
    k, base = "proxy", ProxySettings()
    settings = ProxySettings(
        handshake_timeout=r.value(
            d, k, "handshake_timeout", float, base.handshake_timeout, positive
        ),
        connect_timeout=r.value(d, k, "connect_timeout", float, base.connect_timeout, positive),
        associate_timeout=r.value(
            d, k, "associate_timeout", float, base.associate_timeout, positive
        ),
        idle_timeout=r.value(d, k, "idle_timeout", float, base.idle_timeout, positive),
        max_connections=r.value(d, k, "max_connections", int, base.max_connections, at_least(1)),
        max_pending=r.value(d, k, "max_pending", int, base.max_pending, at_least(1)),
        max_associate_length=r.value(
            d, k, "max_associate_length", int, base.max_associate_length, at_least(68 + 6)
        ),
        log_format=r.value(d, k, "log_format", str, base.log_format, one_of(*LOG_FORMATS)),
        log_level=r.value(d, k, "log_level", str, base.log_level, one_of(*LOG_LEVELS)),
        workers=r.value(d, k, "workers", int, base.workers, between(1, 64)),
        max_connections_per_ip=r.value(
            d, k, "max_connections_per_ip", int, base.max_connections_per_ip, at_least(0)
        ),
        drain_timeout=r.value(d, k, "drain_timeout", float, base.drain_timeout, positive),
        pid_file=r.value(d, k, "pid_file", str, None, r.new_file),
        watch=r.value(d, k, "watch", bool, base.watch),
        watch_interval=r.value(
            d, k, "watch_interval", float, base.watch_interval, seconds_between(0.1, 3600.0)
        ),
    )
    return settings


def _listeners(
    r: Reader, raw: Any, tables: Mapping[str, TlsTable], declared_tls: Mapping[str, Any]
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


def _plaintext_senders(r: Reader, d: dict[str, Any], key: str) -> tuple[PlaintextSender, ...]:
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
    r: Reader,
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
        r.unknown(d, key, _ROUTE_KEYS | spooling.KEYS)
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
        interval = r.value(d, key, "health_check_interval", float, 60.0, positive)
        check_timeout = r.value(d, key, "health_check_timeout", float, 10.0, positive)
        check_ae = r.value(
            d, key, "health_check_calling_ae", str, "DICOM_TLS_PROXY", validate_ae_title
        )
        if health_check and called_ae == "*" and upstream_called_ae is None:
            r.error(
                f"{key}.health_check",
                "the fallback route has no Called AE to probe: set upstream_called_ae",
            )
        forwarding = spooling.read(r, d, key)
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
                    **forwarding,
                )
            )
    spooling.check_shared(r, out)
    return out


def _name_or_ae(text: str) -> str:
    if not text.strip() or len(text) > 64 or not text.isprintable():
        raise ValueError(f"{text!r} is not a usable route name")
    return text


def _check_peer_rules(
    r: Reader,
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
