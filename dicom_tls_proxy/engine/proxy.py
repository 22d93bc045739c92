"""The proxy as a whole: the config generation in force, reload, admission counters, and drain.

Why its own module: a connection needs to know only this much of the proxy (which generation, how
many are relayed, whether it stops), and metrics and the status page read it through a narrow view;
accepting (`listener`), one connection's walk (`connection`) and the process around it (`app`) are
each elsewhere. It must never accept, read or write a socket itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio
from OpenSSL import SSL

from dicom_tls_proxy.config.load import ConfigError, load_config
from dicom_tls_proxy.config.schema import Config, TlsTable
from dicom_tls_proxy.engine.forwarder import Forwarding
from dicom_tls_proxy.engine.health import HealthChecks
from dicom_tls_proxy.ops.audit import AssociationRecord, Audit
from dicom_tls_proxy.ops.process import open_fds
from dicom_tls_proxy.ops.syslogsink import SyslogSink
from dicom_tls_proxy.transport.sessions import ServerContexts
from dicom_tls_proxy.transport.tlscontext import client_context, server_context


@dataclass(frozen=True)
class Generation:
    """One loaded config and the TLS contexts built from it. A connection keeps the generation
    it was accepted under, so a reload never changes an association in flight. The contexts
    are the generation's own, and with them the TLS sessions kept and the ticket keys: a reload
    resumes nothing made under the trust of the one before."""

    config: Config
    server_contexts: Mapping[str, SSL.Context]  # each listener table's, rotated (`sessions`)
    client_contexts: dict[str, SSL.Context]
    loaded: float = field(default_factory=time.time)  # when its config was read (the status page)

    @classmethod
    def build(cls, config: Config) -> Generation:
        tables = {li.tls: config.tls[li.tls] for li in config.listeners if li.tls}
        server = ServerContexts(tables, server_context)
        client = {
            r.upstream_tls: client_context(config.tls[r.upstream_tls])
            for r in config.routes
            if r.upstream_tls
        }
        if config.audit.syslog_tls is not None and config.audit.syslog_tls not in client:
            name = config.audit.syslog_tls  # the syslog collector's: re-read on reload too
            client[name] = client_context(config.tls[name])
        return cls(config, server, client)


def fixed_settings(config: Config) -> dict[str, object]:
    """What a reload cannot change in a running process (the sockets, the processes)."""
    return {
        "listener bind": sorted((li.name, str(li.bind)) for li in config.listeners),
        "proxy.workers": config.proxy.workers,
        "proxy.max_pending": config.proxy.max_pending,
        "proxy.log_format": config.proxy.log_format,
        "metrics.bind": str(config.metrics.bind),
        "audit.file": str(config.audit.file),
        "audit.syslog": f"{config.audit.syslog} {config.audit.syslog_tls}",
    }


class PendingSlots:
    """max_pending: connections in TLS handshake or before their RQ. An accept loop waits for room
    without holding a slot (a listener idle in accept() must not take one from the others), and
    counts its connection once accepted; with several listeners the count can pass the limit by
    at most one connection per other listener, when they accept at the same moment."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()

    async def room(self) -> None:
        while self.used >= self.limit:
            await self._freed.wait()

    def release(self) -> None:
        self.used -= 1
        freed, self._freed = self._freed, trio.Event()
        freed.set()


class Slot:
    """A max_pending slot, released exactly once."""

    def __init__(self, slots: PendingSlots) -> None:
        self._slots: PendingSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


class Proxy:
    """The running proxy: the current generation, and counters shared by all connections.
    `share` is the number of workers sharing the limits (each takes max_connections / share)."""

    def __init__(self, config: Config, audit: Audit | None = None, *, share: int = 1) -> None:
        self.config = config  # as started; `gen.config` is the one in force
        self.audit = audit or Audit()
        self.share = share
        self.gen = Generation.build(config)
        self.per_ip: Counter[str] = Counter()  # pending and relayed, by source
        self.relayed = 0  # associations that ended after relaying; housekeeping watches it
        self.moved = 0  # bytes relayed, both ways
        self.pending = PendingSlots(max(1, config.proxy.max_pending // share))
        self.relays: set[trio.CancelScope] = set()  # cancelled with `stopping` set on drain
        self.stopping = False
        self.accepting = trio.CancelScope()  # cancelled by `drain`: accept nothing more
        self.connections: trio.Nursery | None = None  # the listeners' (see `listener.serve`)
        self.all_closed = trio.Event()
        self.health = HealthChecks(config)  # run by `app`; read by /readyz and /metrics
        self.forwarding = Forwarding(self)  # store-and-forward spools and forwarders (`app`)
        self.syslog: SyslogSink | None = None  # follows a reload's `[tls.NAME]` table
        self.started = time.time()
        # Associations routed and not ended yet, by id of their record: their bytes and facts
        # as they travel, for the status page; `active` is how many.
        self.live: dict[int, AssociationRecord] = {}
        self._active = 0
        self.on_active: Callable[[int], None] | None = None  # told each change of `active`

    @property
    def worker(self) -> int | None:
        return self.audit.worker

    @property
    def active(self) -> int:
        """Associations being relayed now."""
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        if self.on_active is not None:
            self.on_active(value)

    def association_opened(self, record: AssociationRecord) -> None:
        """An association was routed: it counts as active (max_connections) until it ends."""
        self.live[id(record)] = record
        self.active = len(self.live)

    def association_closed(self, record: AssociationRecord) -> None:
        self.live.pop(id(record), None)
        self.active = len(self.live)

    @property
    def max_connections(self) -> int:
        return max(1, self.gen.config.proxy.max_connections // self.share)

    def connection_opened(self, source: str) -> None:
        """Count a connection from `source` (pending or relayed; max_connections_per_ip)."""
        self.per_ip[source] += 1

    def connection_closed(self, source: str) -> None:
        self.per_ip[source] -= 1
        if not self.per_ip[source]:
            del self.per_ip[source]
            if self.stopping and not self.per_ip:
                self.all_closed.set()

    def reload(self, path: str | os.PathLike[str]) -> bool:
        """SIGHUP, and `watch = true` on a change: re-read the config and every file it names;
        new associations use it, those in flight keep theirs. A config that fails to load
        changes nothing."""
        event = self.audit.event
        try:
            config = load_config(path)
        except ConfigError as exc:
            event(
                "reload-failed",
                logging.ERROR,
                msg="config refused; the old one stays",
                problems=exc.problems,
            )
            return False
        before, after = fixed_settings(self.gen.config), fixed_settings(config)
        changed = [key for key in before if before[key] != after[key]]
        if changed:
            event(
                "reload-failed",
                logging.ERROR,
                changed=changed,
                msg="these cannot change while running; restart instead. The old config stays",
            )
            return False
        try:
            gen = Generation.build(config)
        except Exception as exc:
            event("reload-failed", logging.ERROR, msg=f"TLS setup failed: {exc}")
            return False
        problems = self.forwarding.prepare(config)
        if problems:
            event("reload-failed", logging.ERROR, msg="a spool is unusable", problems=problems)
            return False
        self.gen = gen
        self.health.follow(config)
        self.forwarding.follow(config)
        if self.syslog is not None and config.audit.syslog_tls is not None:
            name = config.audit.syslog_tls
            self.syslog.follow(config.tls[name], gen.client_contexts[name])
        for warning in config.warnings:
            event("config-warning", logging.WARNING, msg=warning)
        event("reloaded", listeners=len(config.listeners), routes=len(config.routes))
        return True

    def stats(self) -> dict[str, int]:
        """What `kill -USR1` logs: for operators, and for tests that check nothing leaks."""
        root = trio.lowlevel.current_root_task()
        tasks, stack = 0, [root] if root is not None else []
        while stack:
            task = stack.pop()
            tasks += 1
            stack.extend(t for n in task.child_nurseries for t in n.child_tasks)
        return {
            "connections": sum(self.per_ip.values()),
            "associations": self.active,
            "tasks": tasks,
            "fds": open_fds(),
        }

    async def drain(self) -> None:
        """Graceful stop: accept nothing more, let associations finish for drain_timeout, then
        A-ABORT both ways (between PDUs) to the rest."""
        self.stopping = True
        self.accepting.cancel()
        timeout = self.gen.config.proxy.drain_timeout
        left = sum(self.per_ip.values())
        self.audit.event("draining", connections=left, drain_timeout=timeout)
        with trio.move_on_after(timeout):
            if left:
                await self.all_closed.wait()
        left = sum(self.per_ip.values())
        if left:
            self.audit.event(
                "drain-timeout", logging.WARNING, connections=left, msg="aborting the rest"
            )
            for scope in list(self.relays):
                scope.cancel()
            with trio.move_on_after(5):
                await self.all_closed.wait()
        if self.connections is not None:
            self.connections.cancel_scope.cancel()


def warn_insecure(
    audit: Audit,
    table: TlsTable,
    negotiated: str = "TLS 1.0/1.1 and CBC suites allowed",
    **where: str,
) -> None:
    """The explicit opt-outs of BCP 195, logged at start (`tls=NAME`) and on every association
    they apply to (`listener`, `peer`, and what was negotiated)."""
    if table.verify == "none":
        msg = 'verify = "none": peer not authenticated'
        audit.event("insecure", logging.WARNING, **where, msg=msg)
    if table.profile == "legacy":
        audit.event("insecure", logging.WARNING, **where, msg=f'profile = "legacy": {negotiated}')
