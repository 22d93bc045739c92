"""`[audit] syslog`: DICOM audit messages (PS3.15 A.5) to a collector over TLS (A.6, RFC 5425).

What is sent, as XML in the DICOM audit message schema (PS3.15 A.5.1):

- Application Activity (EventID 110100) with EventTypeCode 110120 "Application Start" when the
  proxy serves (the `started` event) and 110121 "Application Stop" when it has stopped.
- Security Alert (EventID 110113) with EventTypeCode 110126 "Node Authentication" for every
  connection refused because of who the peer is: a failed TLS handshake, a certificate that is
  untrusted, expired, revoked or not the accepted thumbprint, plaintext spoken to a TLS port (or TLS
  to a plaintext one), a refused Calling AE, peer or source address, an upstream whose certificate
  the proxy refuses. EventOutcomeIndicator 8 (serious failure) when the peer presented an identity
  that is refused (untrusted, wrong thumbprint, revoked, wrong name, not allowed); 4 (minor) else.
  Repeated identical alerts (same source address and reason) are rate-limited: one alert, then the
  repeats are counted and sent as one alert per ALERT_INTERVAL saying how many there were.
  Which refusals these are, and their codes and outcome, is `alerts.classify`: the association's
  JSON line (log and audit file) carries the same classification, never rate-limited.

How it is framed: RFC 5424 `<PRI>1 TIMESTAMP HOSTNAME dicom-tls-proxy PROCID DICOM+RFC3881 - MSG`,
facility 10 (security/authorization), severity 5 (notice) or 4 (warning) for alerts, MSG the XML
after a UTF-8 BOM; each message octet-counted (RFC 5425: `MSGLEN SP SYSLOG-MSG`).

How it stays out of the way of traffic: the sink interface (`association`, `event`) only builds
the message and appends it to a bounded queue (a deque, then a `trio.Event` wakes the writer); a
full queue drops the message and counts it. Nothing there waits. One writer task, `run`, connects
with the proxy's own TLS client (a `tls.client_context` and `TlsStream.connect`: chain or
thumbprint verification and the server name check of the `syslog_tls` table), sends what is
queued, and reconnects with exponential backoff when the collector is down; the queue keeps what
was not sent. Syslog over TLS has no acknowledgement: a message written just before the collector
died can be lost unnoticed.

Where the writer runs: a task, no thread, in a nursery of `server._run` that encloses the proxy's
own nursery. The proxy's nursery ends first (drained); then the `stopped` event queues the
Application Stop, `audit.attached` closes the sink (`close`: nothing more is let in), and `finish`
gives the writer
CLOSE_TIMEOUT to send what is queued, then the outer nursery is cancelled. What was not sent is
counted as dropped and reported (`syslog-dropped`).

Reload: `Proxy.reload` builds the new generation's client context for the `syslog_tls` table (its
certificate, key and CA files read again) and hands it to `follow`; the writer closes the current
connection (after the message being written: close_notify, then it waits briefly for the
collector to close its side) and makes the next one with the new settings. Queued messages stay
queued. The collector's address and the table's name cannot change on reload (`fixed_settings`).
With `workers = N` each worker has its own sink and connection, and follows its own reload.

The builder functions (`application_activity`, `security_alert`, `alert_of`, `syslog_message`,
`frame`) are pure; the I/O is in `SyslogSink`.
"""

from __future__ import annotations

import base64
import getpass
import logging
import os
import socket
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import trio
from OpenSSL import SSL

from dicom_tls_proxy import tls
from dicom_tls_proxy.alerts import NODE_AUTHENTICATION, SECURITY_ALERT, SUCCESS, Code, classify
from dicom_tls_proxy.audit import AssociationRecord, Throttle, event
from dicom_tls_proxy.config import Endpoint, TlsTable
from dicom_tls_proxy.streams import STREAM_ERRORS, os_error_text
from dicom_tls_proxy.vocabulary import EXPLANATIONS, Reason

APP_NAME = "dicom-tls-proxy"
MSGID = "DICOM+RFC3881"  # PS3.15 A.6
FACILITY = 10  # security/authorization messages (PS3.15 A.6)
NOTICE, WARNING = 5, 4
BOM = "\ufeff"

CAPACITY = 10_000  # messages waiting for the collector
ALERT_INTERVAL = 60.0  # seconds: one alert per source, reason and interval
CONNECT_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
BACKOFF = (0.5, 30.0)  # first and longest wait between two connection attempts
CLOSE_TIMEOUT = 5.0  # at stop: how long the last messages may take to go out
REPORT_INTERVAL = 60.0  # seconds between two syslog-failed (or syslog-dropped) log lines
TICK = 1.0  # how often the writer releases rate-limited alerts
MAX_DESCRIPTION = 1024


# -- the DICOM audit message (PS3.15 A.5), pure --------------------------------------------


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
ROLE_APPLICATION = Code("110150", "Application")
ROLE_LAUNCHER = Code("110151", "Application Launcher")
NODE_ID = Code("110182", "Node ID")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who reports: this process on this machine, and who started it."""

    hostname: str
    pid: int
    user: str = ""  # the operating system user that launched the proxy, if known
    source_id: str = ""  # AuditSourceID; the hostname when empty

    @classmethod
    def local(cls) -> Identity:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = ""
        return cls(hostname=socket.gethostname() or "localhost", pid=os.getpid(), user=user)


@dataclass(frozen=True, slots=True)
class Alert:
    """One Node Authentication alert: the node that failed, why, and what it showed."""

    reason: str
    outcome: int  # MINOR_FAILURE or SERIOUS_FAILURE
    node: str  # the offending node's address, host:port
    description: str
    requestor: bool = True  # the node asked for the connection (false: an upstream we called)
    calling_ae: str = ""
    subject: str = ""  # its certificate subject, if it showed one
    sha256: str = ""
    listener: str = ""
    repeats: int = 0  # > 0: a summary of so many identical alerts held back
    event_id: Code = SECURITY_ALERT  # as `alerts.classify` codes the reason
    event_type: Code = NODE_AUTHENTICATION

    @property
    def source(self) -> str:
        """The node's host without the port: what rate limiting counts by."""
        return _host_of(self.node)


def alert_of(record: AssociationRecord) -> Alert | None:
    """The Security Alert a finished association calls for, or None: `alerts.classify` decides,
    as it does for the association's JSON line, so the two never disagree."""
    classification = classify(record.reason)
    if classification is None:
        return None
    reason = Reason(record.reason)
    upstream = reason == Reason.UPSTREAM_TLS_FAILED
    return Alert(
        reason=reason.value,
        outcome=classification.outcome,
        node=record.upstream if upstream and record.upstream else record.peer,
        description=(record.detail or EXPLANATIONS.get(reason, reason.value))[:MAX_DESCRIPTION],
        requestor=not upstream,
        calling_ae=record.calling_ae,
        subject="" if upstream else record.peer_subject,
        sha256="" if upstream else record.peer_sha256,
        listener=record.listener,
        event_id=classification.event_id,
        event_type=classification.event_type,
    )


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or address


def _timestamp(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code.value, "codeSystemName": "DCM", "originalText": code.meaning}
    )


def _event(root: ET.Element, event_id: Code, type_code: Code, outcome: int, when: datetime) -> None:
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": "E",
            "EventDateTime": _timestamp(when),
            "EventOutcomeIndicator": str(outcome),
        },
    )
    _code(ident, "EventID", event_id)
    _code(ident, "EventTypeCode", type_code)


def _this_process(root: ET.Element, me: Identity, *, requestor: bool, role: Code | None) -> None:
    participant = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": APP_NAME,
            "AlternativeUserID": str(me.pid),  # A.5.2.1: a process's ID in the local system
            "UserIsRequestor": "true" if requestor else "false",
            "NetworkAccessPointID": me.hostname,
            "NetworkAccessPointTypeCode": "1",  # machine name
        },
    )
    if role is not None:
        _code(participant, "RoleIDCode", role)


def _audit_source(root: ET.Element, me: Identity) -> None:
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": me.source_id or me.hostname})


def _xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode", short_empty_elements=True)


def application_activity(start: bool, me: Identity, when: datetime) -> str:
    """PS3.15 A.5.3.1 Application Activity: the proxy started (true) or stopped (false)."""
    root = ET.Element("AuditMessage")
    _event(
        root,
        APPLICATION_ACTIVITY,
        APPLICATION_START if start else APPLICATION_STOP,
        SUCCESS,
        when,
    )
    _this_process(root, me, requestor=False, role=ROLE_APPLICATION)
    if me.user:
        launcher = ET.SubElement(root, "ActiveParticipant", {"UserID": me.user})
        launcher.set("UserIsRequestor", "true")
        _code(launcher, "RoleIDCode", ROLE_LAUNCHER)
    _audit_source(root, me)
    return _xml(root)


def security_alert(alert: Alert, me: Identity, when: datetime) -> str:
    """PS3.15 A.5.3.11 Security Alert, Node Authentication: the proxy reports, the node failed."""
    root = ET.Element("AuditMessage")
    _event(root, alert.event_id, alert.event_type, alert.outcome, when)
    _this_process(root, me, requestor=not alert.requestor, role=None)
    node: dict[str, str] = {"UserID": alert.node}
    if alert.calling_ae:
        node["AlternativeUserID"] = f"AETITLES={alert.calling_ae}"
    if alert.subject:
        node["UserName"] = alert.subject
    node["UserIsRequestor"] = "true" if alert.requestor else "false"
    node["NetworkAccessPointID"] = alert.source
    node["NetworkAccessPointTypeCode"] = "2"  # IP address (a name for an upstream by name)
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in alert.source else socket.AF_INET, alert.source)
    except OSError:
        node["NetworkAccessPointTypeCode"] = "1"
    ET.SubElement(root, "ActiveParticipant", node)
    _audit_source(root, me)
    subject = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": alert.node,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "13",  # security resource
        },
    )
    _code(subject, "ParticipantObjectIDTypeCode", NODE_ID)
    description = alert.description
    if alert.repeats:
        description = (
            f"{alert.repeats} more alerts like this from {alert.source} (last: {alert.description})"
        )
    details = [("Alert Description", description), ("Reason", alert.reason)]
    if alert.listener:
        details.append(("Listener", alert.listener))
    if alert.sha256:
        details.append(("Certificate SHA-256", alert.sha256))
    if alert.repeats:
        details.append(("Repeats", str(alert.repeats)))
    for kind, text in details:
        ET.SubElement(
            subject,
            "ParticipantObjectDetail",
            {"type": kind, "value": base64.b64encode(text.encode("utf-8")).decode("ascii")},
        )
    return _xml(root)


def _header_field(text: str) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, '-' when empty."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "-" for c in text)[:255]
    return cleaned or "-"


def syslog_message(xml: str, *, severity: int, me: Identity, when: datetime) -> bytes:
    """An RFC 5424 SYSLOG-MSG carrying one audit message (no structured data)."""
    header = " ".join(
        [
            f"<{FACILITY * 8 + severity}>1",
            _timestamp(when),
            _header_field(me.hostname),
            APP_NAME,
            str(me.pid),
            MSGID,
            "-",
        ]
    )
    return f"{header} {BOM}{xml}".encode()


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: `MSGLEN SP SYSLOG-MSG`."""
    return b"%d %s" % (len(message), message)


class AlertLimiter:
    """One alert per key (source, reason) and interval. Repeats within the interval are counted;
    when it ends they become one summary alert and a new interval starts, so a flood costs one
    message per interval. Pure: the clock is passed in."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._windows: dict[tuple[str, str], tuple[float, Alert | None, int]] = {}

    def admit(self, alert: Alert) -> bool:
        key, now = (alert.source, alert.reason), self.clock()
        window = self._windows.get(key)
        if window is None or (now - window[0] >= self.interval and not window[2]):
            self._windows[key] = (now, None, 0)
            return True
        self._windows[key] = (window[0], alert, window[2] + 1)
        return False

    def due(self, *, everything: bool = False) -> list[Alert]:
        """The summaries whose interval is over (all of them at stop)."""
        now, out = self.clock(), []
        for key, (start, last, count) in list(self._windows.items()):
            if everything or now - start >= self.interval:
                if count and last is not None:
                    out.append(replace(last, repeats=count))
                    self._windows[key] = (now, None, 0)
                else:
                    del self._windows[key]
        return out


# -- the connection to the collector ------------------------------------------------------


class _Lost(Exception):
    pass


_DELIVERY_ERRORS = (*STREAM_ERRORS, tls.TlsFailure, trio.TooSlowError, _Lost)


class _Connection:
    """One TLS connection to the collector, and the scope of the task that watches it."""

    def __init__(self, stream: tls.TlsStream) -> None:
        self.stream = stream
        self.watcher = trio.CancelScope()
        self.ended = trio.Event()  # the collector closed it (or it broke)


class SyslogSink:
    """A sink of `audit.emit` and `audit.event` that sends DICOM audit messages to a collector.

    `run` is the writer task; `close` (the sink protocol, at stop) lets no message in any more,
    `finish` gives the writer CLOSE_TIMEOUT to send what is queued; `follow` (a reload) makes the
    next connection use a new `[tls.NAME]` table and ends the current one."""

    def __init__(
        self,
        target: Endpoint,
        table: TlsTable,
        *,
        context: SSL.Context | None = None,
        identity: Identity | None = None,
        capacity: int = CAPACITY,
        alert_interval: float = ALERT_INTERVAL,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.target = target
        self.table, self.server_name = table, table.server_name or target.host
        self.me = identity or Identity.local()
        self.capacity = capacity
        self.backoff = backoff
        self._context = context if context is not None else tls.client_context(table)
        self._limiter = AlertLimiter(alert_interval)
        self._queue: deque[bytes] = deque()
        self._wake = trio.Event()  # something was queued, the sink closed, or a reload
        self._stop = trio.Event()  # the sink closed: cuts a back-off short
        self._done = trio.Event()  # the writer has ended
        self._connection: _Connection | None = None
        self._running = False
        self._renew = False  # a reload: end the current connection between two messages
        self._closing = False
        self._failing = False
        self._failure_lines = Throttle(REPORT_INTERVAL)
        self._drop_lines = Throttle(REPORT_INTERVAL)
        self.sent = 0  # messages written to the collector
        self.dropped = 0  # messages lost: the queue was full, or still queued at stop
        self.failures = 0  # failed connection attempts and broken connections
        self.suppressed = 0  # alerts held back by rate limiting (reported as summaries)

    # -- the sink interface (synchronous, never waits) ------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        alert = alert_of(record)
        if alert is None:
            return
        if not self._limiter.admit(alert):
            self.suppressed += 1
            return
        when = _now()
        xml = security_alert(alert, self.me, when)
        self.put(syslog_message(xml, severity=WARNING, me=self.me, when=when))

    def event(self, fields: dict[str, Any]) -> None:
        name = fields.get("event")
        if name in ("started", "stopped"):
            when = _now()
            xml = application_activity(name == "started", self.me, when)
            self.put(syslog_message(xml, severity=NOTICE, me=self.me, when=when))

    def put(self, message: bytes) -> None:
        """Queue one SYSLOG-MSG; a full queue (or a closed sink) drops it and counts it."""
        if self._closing or len(self._queue) >= self.capacity:
            self.dropped += 1
            if self._drop_lines.due():
                event(
                    "syslog-dropped",
                    logging.ERROR,
                    collector=str(self.target),
                    dropped=self.dropped,
                    msg="the syslog queue is full; audit messages are dropped, traffic goes on",
                )
            return
        self._queue.append(frame(message))
        self._wake.set()

    def close(self) -> None:
        """At stop: no message is let in any more; the writer sends what is queued (the
        Application Stop) and ends, within `finish`'s time. A sink whose writer never ran drops
        what is queued at once, counted and reported."""
        self._closing = True
        self._stop.set()
        self._wake.set()
        if not self._running:
            self._drop_left()

    def follow(self, table: TlsTable, context: SSL.Context) -> None:
        """A reload: connect with this `[tls.NAME]` table (its files read again into `context`)
        from now on. The current connection is closed after the message being written, so that a
        rotated certificate or a new CA takes effect at once; nothing queued is lost."""
        self.table, self._context = table, context
        self.server_name = table.server_name or self.target.host
        self._renew = True
        self._wake.set()

    async def finish(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close, then wait (even when cancelled) up to `timeout` for the writer to have sent
        what is queued; the caller then cancels the writer's nursery."""
        self.close()
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            await self._done.wait()

    def queued(self) -> int:
        return len(self._queue)

    # -- the writer task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send what is queued, connecting when there is something to send; reconnect with
        exponential back-off when the collector is down. Ends once closed with an empty queue
        (or a failed last attempt); cancelled, it ends at once. What is left is counted."""
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._write(nursery)
                await self._disconnect(graceful=True)  # while its watcher still runs
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):  # cancelled (`finish` timed out): at once
                await self._disconnect()
            self._running = False
            self._drop_left()
            self._done.set()

    async def _write(self, nursery: trio.Nursery) -> None:
        delay = self.backoff[0]
        while True:
            self._release_summaries(everything=self._closing)
            self._wake = trio.Event()
            if self._renew:
                self._renew = False
                await self._disconnect(graceful=True)
            if not self._queue:
                if self._closing:
                    return
                with trio.move_on_after(TICK):
                    await self._wake.wait()
                continue
            try:
                await self._deliver(nursery)
                delay = self.backoff[0]
            except _DELIVERY_ERRORS as exc:
                await self._disconnect()
                self._report_failure(exc)
                if self._closing:
                    return
                with trio.move_on_after(delay):
                    await self._stop.wait()
                delay = min(delay * 2, self.backoff[1])

    async def _deliver(self, nursery: trio.Nursery) -> None:
        """Write queued messages, one whole frame at a time, until the queue is empty or a
        reload asks for a new connection. A message leaves the queue once written."""
        if self._connection is None:
            with trio.fail_after(CONNECT_TIMEOUT):
                sock = await trio.open_tcp_stream(self.target.host, self.target.port)
                try:
                    stream = await tls.TlsStream.connect(
                        sock, self._context, self.table, self.server_name
                    )
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(sock)
                    raise
            self._connection = connection = _Connection(stream)
            nursery.start_soon(self._watch, connection)
            self._report_connected()
        connection = self._connection
        while self._queue and not self._renew:
            if connection.ended.is_set():
                raise _Lost("the collector closed the connection")
            with trio.fail_after(SEND_TIMEOUT):
                await connection.stream.send_all(self._queue[0])
            self._queue.popleft()
            self.sent += 1

    async def _watch(self, connection: _Connection) -> None:
        """The collector sends nothing (RFC 5425): end of stream or an error means it is gone."""
        with connection.watcher:
            try:
                while await connection.stream.receive_some():
                    pass
            except _DELIVERY_ERRORS:
                pass  # the writer finds out at its next message, and reports it
            connection.ended.set()
            self._wake.set()

    async def _disconnect(self, *, graceful: bool = False) -> None:
        """Close the connection. Graceful (a reload, a stop with nothing left): close_notify
        and FIN, then wait briefly for the collector to close its side, so that it has read
        everything before the socket is closed (closing with unread input would send a reset)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        stream = connection.stream
        if graceful and not connection.ended.is_set():
            with trio.move_on_after(1.0):
                await stream.send_eof()
                await connection.ended.wait()
        connection.watcher.cancel()
        with trio.move_on_after(1.0):
            try:
                await stream.aclose()
            except _DELIVERY_ERRORS:
                pass
        await trio.aclose_forcefully(stream.transport)

    # -- accounting -------------------------------------------------------------------------

    def _drop_left(self) -> None:
        left = len(self._queue)
        if not left:
            return
        self._queue.clear()
        self.dropped += left
        event(
            "syslog-dropped",
            logging.ERROR,
            collector=str(self.target),
            dropped=self.dropped,
            msg=f"{left} audit messages not delivered to the syslog collector at stop",
        )

    def _release_summaries(self, *, everything: bool = False) -> None:
        for alert in self._limiter.due(everything=everything):
            when = _now()
            xml = security_alert(alert, self.me, when)
            message = frame(syslog_message(xml, severity=WARNING, me=self.me, when=when))
            if len(self._queue) < self.capacity:
                self._queue.append(message)
            else:
                self.dropped += 1

    def _report_connected(self) -> None:
        fields: dict[str, Any] = {"collector": str(self.target), "queued": self.queued()}
        if self._failing:
            self._failing = False
            event("syslog-recovered", msg="the syslog collector is reachable again", **fields)
        else:
            event("syslog-connected", **fields)

    def _report_failure(self, exc: BaseException) -> None:
        self.failures += 1
        self._failing = True
        if self._failure_lines.due():
            if isinstance(exc, tls.TlsFailure):
                text = f"{exc.reason}: {exc}"
            elif isinstance(exc, trio.TooSlowError):
                text = "timed out"
            elif isinstance(exc, OSError):
                text = os_error_text(exc)
            else:
                text = str(exc) or type(exc).__name__
            event(
                "syslog-failed",
                logging.ERROR,
                collector=str(self.target),
                failures=self.failures,
                queued=self.queued(),
                dropped=self.dropped,
                msg=f"cannot deliver audit messages to the syslog collector ({text}); "
                "they wait in the queue, traffic goes on",
            )


def _now() -> datetime:
    return datetime.now(UTC)
