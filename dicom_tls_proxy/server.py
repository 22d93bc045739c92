"""The top floor: listeners, one task per connection, a cancel scope for every timeout.

A connection walks one way: accept (listener allow_source, max_pending) -> TLS handshake -> first
PDU within handshake_timeout -> routing.decide -> connect upstream (plain or TLS) within
connect_timeout -> forward the RQ, relay the answer within associate_timeout -> relay both ways ->
one log record. Every refusal is a value from a pure function, answered here in DICOM and closed
gracefully (a bare close with unread input sends a TCP reset that can destroy the answer).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket as stdlib_socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from OpenSSL import SSL

from dicom_tls_proxy import audit, pdu, policy, routing, tls
from dicom_tls_proxy.audit import AssociationRecord, event
from dicom_tls_proxy.auditfile import AuditFile
from dicom_tls_proxy.auth import IPAddress, PeerIdentity, plaintext_allowed, source_allowed
from dicom_tls_proxy.config import Config, ConfigError, Listener, Route, TlsTable, load_config
from dicom_tls_proxy.health import HealthChecks
from dicom_tls_proxy.metrics import MULTIPROC_ENV, Metrics
from dicom_tls_proxy.metrics import open_listeners as open_metrics_listeners
from dicom_tls_proxy.process import pid_file, sd_notify, supervisor_gone, trim_heap
from dicom_tls_proxy.relay import relay
from dicom_tls_proxy.sockio import LeanStream, connect
from dicom_tls_proxy.streams import (
    STREAM_ERRORS,
    abort_quietly,
    aclose_quietly,
    answer_and_close,
    graceful_close,
    os_error_text,
    read_pdu,
)
from dicom_tls_proxy.syslogsink import SyslogSink
from dicom_tls_proxy.uids import uid_name
from dicom_tls_proxy.vocabulary import REFUSALS, Abort, Close, Outcome, Reason, Reject
from dicom_tls_proxy.watch import watch_folders

ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


FIRST_READ = 65536
TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record


class Refused(Exception):
    """Internal control flow of one connection: answer with `reason` and stop."""

    def __init__(self, reason: Reason, detail: str = "", *, before_tls: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.before_tls = before_tls  # closed at accept: no TLS byte, no PDU, only the log line


def outcome_of(reason: Reason) -> Outcome:
    answer = REFUSALS.get(reason)
    if isinstance(answer, Reject):
        return Outcome.REJECTED
    if isinstance(answer, Abort):
        return Outcome.ABORTED
    if reason in (Reason.HANDSHAKE_TIMEOUT, Reason.IDLE_TIMEOUT):
        return Outcome.TIMED_OUT
    return Outcome.REFUSED


def answer_bytes(reason: Reason) -> bytes:
    answer = REFUSALS.get(reason, Close())
    if isinstance(answer, Reject):
        return pdu.encode_reject(answer.result, answer.source, answer.reason)
    if isinstance(answer, Abort):
        return pdu.encode_abort(answer.source, answer.reason)
    return b""


@dataclass(frozen=True)
class Generation:
    """One loaded config and the TLS contexts built from it. A connection keeps the generation
    it was accepted under, so a reload never changes an association in flight."""

    config: Config
    server_contexts: dict[str, SSL.Context]
    client_contexts: dict[str, SSL.Context]

    @classmethod
    def build(cls, config: Config) -> Generation:
        server = {
            li.tls: tls.server_context(config.tls[li.tls]) for li in config.listeners if li.tls
        }
        client = {
            r.upstream_tls: tls.client_context(config.tls[r.upstream_tls])
            for r in config.routes
            if r.upstream_tls
        }
        if config.audit.syslog_tls is not None and config.audit.syslog_tls not in client:
            name = config.audit.syslog_tls  # the syslog collector's: re-read on reload too
            client[name] = tls.client_context(config.tls[name])
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


@dataclass
class Proxy:
    """The running proxy: the current generation, and counters shared by all connections."""

    config: Config
    share: int = 1  # workers sharing the limits: each takes max_connections / share
    per_ip: Counter[str] = field(default_factory=Counter)  # pending and relayed, by source
    relayed: int = 0  # associations that ended after relaying; housekeeping watches it
    moved: int = 0  # bytes relayed, both ways

    def __post_init__(self) -> None:
        self.gen = Generation.build(self.config)
        self.pending = PendingSlots(max(1, self.config.proxy.max_pending // self.share))
        self.relays: set[trio.CancelScope] = set()  # cancelled with `stopping` set on drain
        self.stopping = False
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery | None = None
        self._all_closed = trio.Event()
        self.health = HealthChecks(self.config)  # run by `_run`; read by /readyz and /metrics
        self.syslog: SyslogSink | None = None  # follows a reload's `[tls.NAME]` table
        self._active = 0
        self.on_active: Callable[[int], None] | None = None  # told each change of `active`

    @property
    def active(self) -> int:
        """Associations being relayed now."""
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        if self.on_active is not None:
            self.on_active(value)

    @property
    def max_connections(self) -> int:
        return max(1, self.gen.config.proxy.max_connections // self.share)

    def reload(self, path: str | os.PathLike[str]) -> bool:
        """SIGHUP, and `watch = true` on a change: re-read the config and every file it names;
        new associations use it, those in flight keep theirs. A config that fails to load
        changes nothing."""
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
        self.gen = gen
        self.health.follow(config)
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
            "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1,
        }

    # -- listening --------------------------------------------------------------------------

    async def serve(
        self,
        bound: list[tuple[Listener, trio.SocketListener]] | None = None,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener; `bound` are sockets a supervisor bound for this worker."""
        if bound is None:
            bound = await bind_listeners(self.gen.config)
        addresses = []
        for li, sl in bound:
            address = format_address(sl.socket.getsockname())
            addresses.append(address)
            kind = f"tls:{li.tls}" if li.tls else "plaintext"
            event("listening", listener=li.name, address=address, kind=kind)
        for name, table in self.gen.config.tls.items():
            _warn_insecure(table, tls=name)
        async with trio.open_nursery() as connections:
            self._connections = connections
            with self._accepting:
                async with trio.open_nursery() as accepting:
                    for li, sl in bound:
                        accepting.start_soon(self._accept_loop, li, sl, connections)
                    task_status.started(addresses)
            for _, sl in bound:  # no new connections from here on
                await sl.aclose()
        self._connections = None

    async def drain(self) -> None:
        """Graceful stop: accept nothing more, let associations finish for drain_timeout, then
        A-ABORT both ways (between PDUs) to the rest."""
        self.stopping = True
        self._accepting.cancel()
        timeout = self.gen.config.proxy.drain_timeout
        left = sum(self.per_ip.values())
        event("draining", connections=left, drain_timeout=timeout)
        with trio.move_on_after(timeout):
            if left:
                await self._all_closed.wait()
        left = sum(self.per_ip.values())
        if left:
            event("drain-timeout", logging.WARNING, connections=left, msg="aborting the rest")
            for scope in list(self.relays):
                scope.cancel()
            with trio.move_on_after(5):
                await self._all_closed.wait()
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    async def _accept_loop(
        self, li: Listener, sl: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        async with sl:
            while True:
                await self.pending.room()  # beyond max_pending, clients wait in the backlog
                try:
                    stream = await sl.accept()
                except OSError as exc:
                    if exc.errno in ACCEPT_ERRORS:
                        event("accept-failed", logging.ERROR, listener=li.name, msg=str(exc))
                        await trio.sleep(0.1)
                        continue
                    raise
                self.pending.used += 1
                nursery.start_soon(self._connection, li, stream)

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, li: Listener, accepted: trio.SocketStream) -> None:
        stream = LeanStream(accepted)
        gen = self.gen  # this connection's config, whatever a reload does meanwhile
        li = gen.config.listener(li.name)
        peer = _peer_of(stream)
        record = AssociationRecord(listener=li.name, peer=format_address(peer))
        pending = _Slot(self.pending)
        client: tls.ByteStream = stream
        upstream: tls.ByteStream | None = None
        self.per_ip[peer[0]] += 1
        try:
            source = ipaddress.ip_address(peer[0].split("%")[0])
            per_ip_limit = gen.config.proxy.max_connections_per_ip
            if per_ip_limit and self.per_ip[peer[0]] > per_ip_limit:
                raise Refused(
                    Reason.TOO_MANY_ASSOCIATIONS,
                    f"{source} already has {per_ip_limit} connections (max_connections_per_ip)",
                    before_tls=True,
                )
            if not source_allowed(li.allow_source, source):
                raise Refused(
                    Reason.SOURCE_NOT_ALLOWED,
                    f"{source} is not in {li.name}'s allow_source",
                    before_tls=True,
                )
            with trio.move_on_after(gen.config.proxy.handshake_timeout) as scope:
                client, identity, initial = await self._secure(gen, li, stream, record)
                raw, extra = await read_pdu(
                    client, gen.config.proxy.max_associate_length, first=True, initial=initial
                )
                rq = _parse_request(raw)
                _describe_request(record, rq)
                if li.tls is not None and client is stream:
                    self._plaintext_on_tls(li, rq, source, record)
            if scope.cancelled_caught:
                raise Refused(
                    Reason.HANDSHAKE_TIMEOUT, "no complete A-ASSOCIATE-RQ within handshake_timeout"
                )
            pending.release()
            decision = routing.decide(gen.config, li, identity, source, rq)
            if isinstance(decision, routing.Refusal):
                if decision.route:
                    record.route = decision.route.name
                raise Refused(decision.reason, decision.detail)
            route = decision.route
            record.route, record.upstream = route.name, str(route.upstream)
            if self.active >= self.max_connections:
                raise Refused(Reason.TOO_MANY_ASSOCIATIONS, f"{self.active} associations relayed")
            self.active += 1
            try:
                upstream = await self._open_upstream(gen, route, record)
                after_ac = await self._associate(gen, client, upstream, route, rq, record)
                # Not kept for the association's life (hundreds may idle between studies): the
                # first read, the RQ and its parse; the route and the record hold what is needed.
                del initial, raw, rq
                if after_ac is not None:
                    await relay(
                        client,
                        upstream,
                        record,
                        gen.config.proxy.idle_timeout,
                        shutdown=self,
                        pending_up=extra,
                        pending_down=after_ac,
                    )
            finally:
                self.active -= 1
                self.relayed += 1
        except Refused as refusal:
            if refusal.before_tls:
                record.finish(Outcome.REFUSED, refusal.reason, refusal.detail)
            else:
                record.finish(outcome_of(refusal.reason), refusal.reason, refusal.detail)
                await answer_and_close(client, answer_bytes(refusal.reason))
        except pdu.PduError as exc:
            reason = {1: Reason.UNRECOGNIZED_PDU, 2: Reason.UNEXPECTED_PDU}.get(
                exc.abort_reason, Reason.INVALID_PDU
            )
            record.finish(Outcome.ABORTED, reason, str(exc))
            await answer_and_close(client, answer_bytes(reason))
        except tls.TlsFailure as failure:
            if failure.certificate is not None:
                d = policy.describe(failure.certificate)
                record.peer_subject, record.peer_sha256 = d["subject"], d["sha256"]
            record.finish(Outcome.TLS_FAILED, failure.reason, str(failure))
        except STREAM_ERRORS as exc:
            record.finish(Outcome.ABORTED, Reason.CLIENT_CLOSED, f"connection lost: {exc}")
            if upstream is not None:
                await abort_quietly(upstream)
        except Exception as exc:  # a bug of the proxy's, never blamed on the peer
            record.finish(Outcome.ABORTED, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            audit.log.exception(
                "internal error",
                extra={
                    "fields": {"event": "internal-error", "ts": audit._now(), "peer": record.peer}
                },
            )
            if upstream is not None:
                await abort_quietly(upstream)
            await answer_and_close(client, answer_bytes(Reason.INTERNAL_ERROR))
        finally:
            pending.release()
            with trio.CancelScope(shield=True):
                if upstream is not None:
                    await aclose_quietly(upstream)
                await aclose_quietly(client)
            if not record.outcome:
                record.finish(Outcome.ABORTED, Reason.SHUTDOWN)
            self.per_ip[peer[0]] -= 1
            if not self.per_ip[peer[0]]:
                del self.per_ip[peer[0]]
                if self.stopping and not self.per_ip:
                    self._all_closed.set()
            audit.emit(record)

    async def _secure(
        self, gen: Generation, li: Listener, stream: LeanStream, record: AssociationRecord
    ) -> tuple[tls.ByteStream, PeerIdentity, bytes]:
        """TLS if the listener has it; returns the stream to talk DICOM on, the peer, and bytes
        already read. The first byte tells the protocol: TLS starts with 0x16, an A-ASSOCIATE-RQ
        with 0x01, so plaintext DICOM on a TLS port can be answered in plaintext."""
        first = bytes(await stream.receive_some(FIRST_READ))
        if not first:
            raise trio.BrokenResourceError("closed before sending anything")
        if li.tls is None:
            if first[0] == TLS_HANDSHAKE:
                raise Refused(
                    Reason.TLS_ON_PLAINTEXT,
                    f"TLS handshake received on plaintext listener {li.name}: the peer expects TLS",
                    before_tls=True,
                )
            return stream, PeerIdentity(), first
        if first[0] == pdu.A_ASSOCIATE_RQ:
            return stream, PeerIdentity(), first
        tstream, identity = await self._handshake(gen, li, stream, record, first)
        return tstream, identity, b""

    def _plaintext_on_tls(
        self, li: Listener, rq: pdu.AssociateRequest, source: IPAddress, record: AssociationRecord
    ) -> None:
        """A plaintext RQ on a TLS listener: refused, unless allow_plaintext_from names it."""
        if not plaintext_allowed(li.allow_plaintext_from, rq.calling_ae, source):
            raise Refused(
                Reason.PLAINTEXT_ON_TLS,
                f"plaintext DICOM received on TLS listener {li.name} from Calling AE "
                f"{rq.calling_ae!r} at {source}",
            )
        event(
            "plaintext-allowed",
            logging.WARNING,
            listener=li.name,
            peer=record.peer,
            calling_ae=rq.calling_ae,
            msg="plaintext DICOM on a TLS listener, let through by allow_plaintext_from",
        )
        record.tls_version = "none (allow_plaintext_from)"

    async def _handshake(
        self,
        gen: Generation,
        li: Listener,
        stream: LeanStream,
        record: AssociationRecord,
        initial: bytes,
    ) -> tuple[tls.TlsStream, PeerIdentity]:
        assert li.tls is not None
        table = gen.config.tls[li.tls]
        tstream = await tls.TlsStream.accept(
            stream, gen.server_contexts[li.tls], table, initial=initial
        )
        record.handshake_done()
        info = tstream.info()
        record.tls_version, record.cipher = info.version, info.cipher
        record.encryption, record.mac = info.encryption, info.mac
        if info.certificate is not None:
            d = policy.describe(info.certificate)
            record.peer_subject, record.peer_sha256 = d["subject"], d["sha256"]
        for warning in info.warnings:
            event(
                "weak-certificate-accepted",
                logging.WARNING,
                listener=li.name,
                peer=record.peer,
                msg=warning,
            )
        _warn_insecure(table, f"{info.version} {info.cipher}", listener=li.name, peer=record.peer)
        return tstream, info.identity

    async def _open_upstream(
        self, gen: Generation, route: Route, record: AssociationRecord
    ) -> tls.ByteStream:
        timeout = gen.config.proxy.connect_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                sock = await connect(route.upstream.host, route.upstream.port)
            except OSError as exc:
                raise Refused(
                    Reason.UPSTREAM_UNREACHABLE, f"{route.upstream}: {os_error_text(exc)}"
                ) from None
            if route.upstream_tls is None:
                return sock
            table = gen.config.tls[route.upstream_tls]
            name = table.server_name or route.upstream.host
            try:
                return await tls.TlsStream.connect(
                    sock, gen.client_contexts[route.upstream_tls], table, name
                )
            except tls.TlsFailure as failure:
                await aclose_quietly(sock)
                detail = f"{route.upstream}: {failure.reason}: {failure}"
                if failure.certificate is not None:
                    d = policy.describe(failure.certificate)
                    detail += f" (upstream certificate {d['subject']}, {d['sha256']})"
                raise Refused(Reason.UPSTREAM_TLS_FAILED, detail) from None
            except STREAM_ERRORS as exc:
                await aclose_quietly(sock)
                raise Refused(Reason.UPSTREAM_TLS_FAILED, f"{route.upstream}: {exc}") from None
            except BaseException:  # connect_timeout (or a drain) in the middle of the handshake
                await trio.aclose_forcefully(sock)
                raise
        assert scope.cancelled_caught
        raise Refused(Reason.UPSTREAM_TIMEOUT, f"{route.upstream}: no connection within {timeout}s")

    async def _associate(
        self,
        gen: Generation,
        client: tls.ByteStream,
        upstream: tls.ByteStream,
        route: Route,
        rq: pdu.AssociateRequest,
        record: AssociationRecord,
    ) -> bytes | None:
        """Forward the RQ, relay the upstream's answer. When the association is up (AC), returns
        the bytes that came after the AC, for the relay; None when it is not."""
        raw = rq.raw
        if route.upstream_called_ae:
            raw = pdu.rewrite_called_ae(raw, route.upstream_called_ae)
        timeout = gen.config.proxy.associate_timeout
        answer: bytes | None = None
        after = b""
        problem = ""
        with trio.move_on_after(timeout):
            try:
                await upstream.send_all(raw)
                answer, after = await read_pdu(
                    upstream, max(gen.config.proxy.max_associate_length, 1 << 20), first=False
                )
            except STREAM_ERRORS as exc:
                if route.upstream_tls is not None:
                    # TLS 1.3: the server judges our client certificate after our side of the
                    # handshake is done; its refusal shows up here, as an alert or a reset.
                    await abort_quietly(upstream)
                    raise Refused(
                        Reason.UPSTREAM_TLS_FAILED,
                        f"{route.upstream}: the upstream ended the TLS session right after the "
                        f"handshake ({exc}): it most likely refuses the proxy's client "
                        f"certificate of [tls.{route.upstream_tls}]",
                    ) from None
                problem = f"the upstream closed the connection before answering ({exc})"
            except pdu.PduError as exc:
                problem = f"the upstream answered with an invalid PDU: {exc}"
        if answer is None:
            await abort_quietly(upstream)
            raise Refused(
                Reason.UPSTREAM_NO_ANSWER,
                problem or f"no answer within associate_timeout ({timeout}s)",
            )
        try:
            parsed = pdu.parse_pdu(answer)
        except pdu.PduError as exc:
            await abort_quietly(upstream)
            raise Refused(
                Reason.UPSTREAM_NO_ANSWER, f"the upstream answered with an invalid PDU: {exc}"
            ) from None
        if isinstance(parsed, pdu.AssociateAccept):
            if (
                route.upstream_called_ae
            ):  # the client sees the Called AE it asked for, byte for byte
                answer = answer[:10] + rq.raw[10:26] + answer[26:]
            await client.send_all(answer)
            record.bytes_down += len(answer)
            record.bytes_up += len(raw)
            return after
        if isinstance(parsed, pdu.AssociateReject):
            await client.send_all(answer)
            record.finish(
                Outcome.REJECTED,
                Reason.UPSTREAM_REJECTED,
                f"upstream rejected: result {parsed.result}, source {parsed.source}, "
                f"reason {parsed.reason}",
            )
            await graceful_close(client)
            return None
        if isinstance(parsed, pdu.Abort):
            await client.send_all(answer)
            record.finish(
                Outcome.ABORTED,
                Reason.UPSTREAM_ABORTED,
                f"upstream aborted: source {parsed.source}, reason {parsed.reason}",
            )
            return None
        await abort_quietly(upstream)
        raise Refused(
            Reason.UPSTREAM_NO_ANSWER, f"the upstream answered with {type(parsed).__name__}"
        )


async def _housekeeping(proxy: Proxy) -> None:
    """Once a second: report suppressed log lines; and when traffic has gone quiet, give freed
    memory back to the system. glibc keeps freed relay buffers (up to 256 KiB each) in its heap,
    so a gateway that moved a burst of studies would otherwise keep that memory while idle."""
    moved, relayed, dirty = proxy.moved, proxy.relayed, False
    while True:
        await trio.sleep(audit.limiter.interval)
        audit.flush_suppressed()
        if (proxy.moved, proxy.relayed) != (moved, relayed):
            moved, relayed, dirty = proxy.moved, proxy.relayed, True
        elif dirty:
            dirty = False
            trim_heap()


class StartError(Exception):
    """The proxy cannot start (a port in use, a bad address); the message says which key."""


async def bind_listeners(config: Config) -> list[tuple[Listener, trio.SocketListener]]:
    """Bind every listener once. A port already in use is an error, never shared silently."""
    bound: list[tuple[Listener, trio.SocketListener]] = []
    try:
        for li in config.listeners:
            host = None if li.bind.host in ("", "*") else li.bind.host
            try:
                listeners = await trio.open_tcp_listeners(li.bind.port, host=host, backlog=1024)
            except OSError as exc:
                raise StartError(
                    f"{config.path}: {li.key_path}.bind: cannot listen on {li.bind}: "
                    f"{os_error_text(exc)}"
                ) from None
            bound.extend((li, sl) for sl in listeners)
    except BaseException:
        for _, sl in bound:
            sl.socket.close()
        raise
    return bound


def listeners_from_fds(config: Config, spec: str) -> list[tuple[Listener, trio.SocketListener]]:
    """Sockets a supervisor bound and passed down, as `NAME=FD,NAME=FD`."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, fd = item.partition("=")
        sock = trio.socket.from_stdlib_socket(stdlib_socket.socket(fileno=int(fd)))
        out.append((config.listener(name), trio.SocketListener(sock)))
    return out


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


class _Slot:
    """A max_pending slot, released exactly once."""

    def __init__(self, slots: PendingSlots) -> None:
        self._slots: PendingSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


def _parse_request(raw: bytes) -> pdu.AssociateRequest:
    parsed = pdu.parse_pdu(raw)
    if not isinstance(parsed, pdu.AssociateRequest):
        raise pdu.PduError(
            f"first PDU is {type(parsed).__name__}, not an A-ASSOCIATE-RQ", pdu.UNEXPECTED_PDU
        )
    return parsed


def _describe_request(record: AssociationRecord, rq: pdu.AssociateRequest) -> None:
    record.calling_ae, record.called_ae = rq.calling_ae, rq.called_ae
    names: list[str] = []
    for pc in rq.presentation_contexts:
        name = uid_name(pc.abstract_syntax)
        if name not in names:
            names.append(name)
    record.abstract_syntaxes = names


def _warn_insecure(
    table: TlsTable, negotiated: str = "TLS 1.0/1.1 and CBC suites allowed", **where: str
) -> None:
    """The explicit opt-outs of BCP 195, logged at start (`tls=NAME`) and on every association
    they apply to (`listener`, `peer`, and what was negotiated)."""
    if table.verify == "none":
        event("insecure", logging.WARNING, **where, msg='verify = "none": peer not authenticated')
    if table.profile == "legacy":
        event("insecure", logging.WARNING, **where, msg=f'profile = "legacy": {negotiated}')


def _peer_of(stream: LeanStream) -> tuple[str, int]:
    try:
        name = stream.socket.getpeername()
        return str(name[0]), int(name[1])
    except OSError:
        return ("0.0.0.0", 0)


def format_address(addr: tuple[str, int] | tuple[str, int, int, int] | object) -> str:
    if isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


async def _run(config: Config, listen: str | None, share: int, lifeline: int | None) -> int:
    """The process's trio structure: an outer nursery for the syslog writer, which outlives the
    proxy's own nursery (`_serve`) so that the Application Stop, emitted once the proxy has
    stopped, still goes out; it gets CLOSE_TIMEOUT for what is queued, then is cancelled."""
    proxy = Proxy(config, share=share)
    # Bound before any nursery opens, so that a port in use is a plain StartError.
    bound = listeners_from_fds(config, listen) if listen else await bind_listeners(config)
    trail, syslog, telemetry, metrics_sockets = await _open_sinks(config, proxy)
    code = 1
    async with trio.open_nursery() as outlives_proxy:
        if syslog is not None:
            await outlives_proxy.start(syslog.run)
            proxy.syslog = syslog
        try:
            code = await _serve(
                proxy, listen, bound, (trail, syslog, telemetry), metrics_sockets, lifeline
            )
        finally:
            if syslog is not None:
                await syslog.finish()  # shielded, at most CLOSE_TIMEOUT
            outlives_proxy.cancel_scope.cancel()
    return code


async def _serve(
    proxy: Proxy,
    listen: str | None,
    bound: list[tuple[Listener, trio.SocketListener]],
    sinks: tuple[AuditFile | None, SyslogSink | None, Metrics | None],
    metrics_sockets: list[trio.SocketListener],
    lifeline: int | None,
) -> int:
    """The proxy's nursery: listeners, housekeeping, health checks, signals, and for a worker
    its supervisor's lifeline (the supervisor gone, the worker drains as on SIGTERM); ends
    drained."""
    config = proxy.config
    trail, _, telemetry = sinks
    code = 0
    with (
        audit.attached(*sinks),
        pid_file(config.proxy.pid_file if listen is None else None),
    ):
        # Signals are caught before READY=1: a stop right after start drains like any other.
        signals_wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*signals_wanted) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_housekeeping, proxy)
                if trail is not None:
                    await nursery.start(trail.run)
                if telemetry is not None and telemetry.folder is None:
                    await nursery.start(telemetry.serve, metrics_sockets)
                elif telemetry is not None:  # a worker: the supervisor serves the pages
                    nursery.start_soon(telemetry.publish)
                addresses = await nursery.start(proxy.serve, bound)
                if telemetry is not None:
                    telemetry.listening = addresses
                    telemetry.changed()
                if audit.worker_index in (None, 0):  # with workers = N, worker 0 checks for all
                    nursery.start_soon(proxy.health.run)

                def reload() -> None:  # SIGHUP and `watch = true` alike
                    proxy.reload(config.path)

                if audit.worker_index is None:  # with workers = N, the parent watches for all
                    nursery.start_soon(watch_folders, lambda: proxy.gen.config, reload)

                def stop(cause: str, **why: str) -> None:
                    """The first stop request drains; a second one stops at once."""
                    nonlocal code
                    if not proxy.stopping:
                        event(
                            "stopping",
                            logging.INFO,
                            cause=cause,
                            **why,
                            msg="draining; a second signal stops at once",
                        )
                        sd_notify("STOPPING=1")

                        async def drain_then_stop() -> None:
                            await proxy.drain()
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(drain_then_stop)
                    else:
                        event("stopping-now", logging.WARNING, cause=cause, **why)
                        code = 1
                        nursery.cancel_scope.cancel()

                if lifeline is not None:

                    async def follow_the_supervisor(fd: int) -> None:
                        await supervisor_gone(fd)
                        stop(cause="supervisor-gone")

                    nursery.start_soon(follow_the_supervisor, lifeline)
                event("started", config=str(config.path), listeners=addresses)
                sd_notify("READY=1")
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGUSR1:
                        event("stats", **proxy.stats())
                    elif signum == signal.SIGHUP:
                        reload()
                    else:
                        stop(cause="signal", signal=name)
        event("stopped", code=code)  # still inside `attached`: the audit file gets it
    return code


async def _open_sinks(
    config: Config, proxy: Proxy
) -> tuple[AuditFile | None, SyslogSink | None, Metrics | None, list[trio.SocketListener]]:
    """The audit file, the syslog collector and the metrics server of `[audit]` and `[metrics]`,
    if configured."""
    trail = None
    if config.audit.file is not None:
        extra = {} if audit.worker_index is None else {"worker": audit.worker_index}
        trail = AuditFile(config.audit.file, extra=extra)
        trail.open()
    syslog = None  # its writer is started by `_run`, in a nursery that outlives the proxy's
    if config.audit.syslog is not None and config.audit.syslog_tls is not None:
        name = config.audit.syslog_tls
        syslog = SyslogSink(
            config.audit.syslog, config.tls[name], context=proxy.gen.client_contexts[name]
        )
    if config.metrics.bind is None:
        return trail, syslog, None, []
    if audit.worker_index is not None:  # the supervisor serves; this worker writes its share
        folder = os.environ.get(MULTIPROC_ENV)
        metrics = Metrics(proxy, trail, syslog, folder=Path(folder)) if folder else None
        return trail, syslog, metrics, []
    try:
        sockets = await bind_metrics(config)
    except StartError:
        if syslog is not None:
            syslog.close()
        raise
    return trail, syslog, Metrics(proxy, trail, syslog), sockets


async def bind_metrics(config: Config) -> list[trio.SocketListener]:
    """Bind `[metrics] bind` (StartError if it cannot be)."""
    assert config.metrics.bind is not None
    try:
        return await open_metrics_listeners(config.metrics.bind)
    except OSError as exc:
        raise StartError(
            f"{config.path}: metrics.bind: cannot listen on {config.metrics.bind}: "
            f"{os_error_text(exc)}"
        ) from None


def serve_forever(
    config: Config,
    *,
    listen: str | None = None,
    worker: int | None = None,
    lifeline: int | None = None,
) -> int:
    """Run one proxy process: the only one, or worker `worker` on sockets passed as `listen`,
    following its supervisor through the `lifeline` pipe (see `process`)."""
    audit.setup_logging(config.proxy.log_format, config.proxy.log_level, worker=worker)
    if worker is None:
        for warning in config.warnings:
            event("config-warning", logging.WARNING, msg=warning)
    share = config.proxy.workers if worker is not None else 1
    try:
        return trio.run(_run, config, listen, share, lifeline)
    except StartError as exc:
        event("start-failed", logging.ERROR, msg=str(exc))
        return 1
