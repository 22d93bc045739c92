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

How it is framed: RFC 5424 `<PRI>1 TIMESTAMP HOSTNAME dicom-tls-proxy PROCID DICOM+RFC3881 - MSG`,
facility 10 (security/authorization), severity 5 (notice) or 4 (warning) for alerts, MSG the XML
after a UTF-8 BOM; each message octet-counted (RFC 5425: `MSGLEN SP SYSLOG-MSG`).

How it stays out of the way of traffic: the sink interface (`association`, `event`) only builds
the message and appends it to a bounded queue under a lock; a full queue drops the message and
counts it. One thread runs its own trio loop that connects with the proxy's own TLS client
(`tls.client_context` and `TlsStream.connect`: chain or thumbprint verification and the server name
check of the `syslog_tls` table), sends what is queued, and reconnects with exponential backoff
when the collector is down; the queue keeps what was not sent. Syslog over TLS has no
acknowledgement: a message written just before the collector died can be lost unnoticed.
A thread rather than a task of the proxy's loop, so that the `stopped` event, emitted after the
proxy's nursery has ended, is still delivered at stop (`close` waits up to CLOSE_TIMEOUT).

The builder functions (`application_activity`, `security_alert`, `alert_of`, `syslog_message`,
`frame`) are pure; the I/O is in `SyslogSink`.
"""

from __future__ import annotations

import base64
import getpass
import logging
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import trio

from dicom_tls_proxy import tls
from dicom_tls_proxy.audit import AssociationRecord, event
from dicom_tls_proxy.config import Endpoint, TlsTable
from dicom_tls_proxy.streams import STREAM_ERRORS, os_error_text
from dicom_tls_proxy.vocabulary import EXPLANATIONS, TLS_REASONS, Reason

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


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value of the DCM coding scheme: `csd-code`, `originalText` (the Code Meaning)."""

    value: str
    meaning: str


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
SECURITY_ALERT = Code("110113", "Security Alert")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
ROLE_APPLICATION = Code("110150", "Application")
ROLE_LAUNCHER = Code("110151", "Application Launcher")
NODE_ID = Code("110182", "Node ID")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

# Reasons that make a connection a Node Authentication alert; the serious ones are a peer that
# presented an identity the proxy refuses (as opposed to a misconfigured or out-of-date peer).
ALERT_REASONS: frozenset[Reason] = TLS_REASONS | {
    Reason.PLAINTEXT_ON_TLS,
    Reason.TLS_ON_PLAINTEXT,
    Reason.CALLING_AE_NOT_ALLOWED,
    Reason.PEER_NOT_ALLOWED,
    Reason.SOURCE_NOT_ALLOWED,
    Reason.UPSTREAM_TLS_FAILED,
}
SERIOUS_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.TLS_UNTRUSTED,
        Reason.TLS_THUMBPRINT_MISMATCH,
        Reason.TLS_REVOKED,
        Reason.TLS_NAME_MISMATCH,
        Reason.PEER_NOT_ALLOWED,
    }
)


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

    @property
    def source(self) -> str:
        """The node's host without the port: what rate limiting counts by."""
        return _host_of(self.node)


def alert_of(record: AssociationRecord) -> Alert | None:
    """The Security Alert a finished association calls for, or None."""
    try:
        reason = Reason(record.reason)
    except ValueError:
        return None
    if reason not in ALERT_REASONS:
        return None
    upstream = reason == Reason.UPSTREAM_TLS_FAILED
    return Alert(
        reason=reason.value,
        outcome=SERIOUS_FAILURE if reason in SERIOUS_REASONS else MINOR_FAILURE,
        node=record.upstream if upstream and record.upstream else record.peer,
        description=(record.detail or EXPLANATIONS.get(reason, reason.value))[:MAX_DESCRIPTION],
        requestor=not upstream,
        calling_ae=record.calling_ae,
        subject="" if upstream else record.peer_subject,
        sha256="" if upstream else record.peer_sha256,
        listener=record.listener,
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
    _event(root, SECURITY_ALERT, NODE_AUTHENTICATION, alert.outcome, when)
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


class SyslogSink:
    """A sink of `audit.emit` and `audit.event` that sends DICOM audit messages to a collector."""

    def __init__(
        self,
        target: Endpoint,
        table: TlsTable,
        *,
        identity: Identity | None = None,
        capacity: int = CAPACITY,
        alert_interval: float = ALERT_INTERVAL,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.target, self.table = target, table
        self.server_name = table.server_name or target.host
        self.me = identity or Identity.local()
        self.capacity = capacity
        self.backoff = backoff
        self._context = tls.client_context(table)
        self._limiter = AlertLimiter(alert_interval)
        self._queue: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake = trio.Event()
        self._stop = trio.Event()
        self._scope = trio.CancelScope()
        self._stream: tls.TlsStream | None = None
        self._watcher: trio.CancelScope | None = None
        self._lost = False
        self._closing = False
        self._failing = False
        self._last_failure_line = -1e18
        self._last_drop_line = -1e18
        self.sent = 0  # messages written to the collector
        self.dropped = 0  # messages lost: the queue was full, or still queued at stop
        self.failures = 0  # failed connection attempts and broken connections
        self.suppressed = 0  # alerts held back by rate limiting (reported as summaries)

    # -- the sink interface (synchronous, never waits) ------------------------------------

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        alert = alert_of(record)
        if alert is None:
            return
        with self._lock:
            admitted = self._limiter.admit(alert)
            if not admitted:
                self.suppressed += 1
        if admitted:
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
        with self._lock:
            if self._closing or len(self._queue) >= self.capacity:
                self.dropped += 1
                dropped, report = self.dropped, self._due_drop_line()
            else:
                self._queue.append(frame(message))
                dropped, report = 0, False
        if report:
            event(
                "syslog-dropped",
                logging.ERROR,
                collector=str(self.target),
                dropped=dropped,
                msg="the syslog queue is full; audit messages are dropped, traffic goes on",
            )
        self._call(self._set_wake)

    def start(self) -> None:
        """Start the writer thread (it connects when there is something to send)."""
        self._thread = threading.Thread(
            target=trio.run, args=(self._serve,), name="syslog", daemon=True
        )
        self._thread.start()
        self._ready.wait(CLOSE_TIMEOUT)

    def close(self) -> None:
        """Send what is queued (the Application Stop), for at most CLOSE_TIMEOUT; what is left
        is counted as dropped and reported."""
        with self._lock:
            self._closing = True
        self._call(self._set_stop)
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT)
            if self._thread.is_alive():
                self._call(self._scope.cancel)
                self._thread.join(CLOSE_TIMEOUT)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
        if left:
            event(
                "syslog-dropped",
                logging.ERROR,
                collector=str(self.target),
                dropped=self.dropped,
                msg=f"{left} audit messages not delivered to the syslog collector at stop",
            )

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- helpers called in the writer's loop -------------------------------------------------

    def _call(self, fn: Callable[[], object]) -> None:
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(fn)
            except trio.RunFinishedError:
                pass

    def _set_wake(self) -> None:
        self._wake.set()

    def _set_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _due_drop_line(self) -> bool:
        now = time.monotonic()
        if now - self._last_drop_line >= REPORT_INTERVAL:
            self._last_drop_line = now
            return True
        return False

    def _peek(self) -> bytes | None:
        with self._lock:
            return self._queue[0] if self._queue else None

    def _pop(self) -> None:
        with self._lock:
            self._queue.popleft()
            self.sent += 1

    def _release_summaries(self, *, everything: bool = False) -> None:
        with self._lock:
            due = self._limiter.due(everything=everything)
        for alert in due:
            when = _now()
            xml = security_alert(alert, self.me, when)
            message = frame(syslog_message(xml, severity=WARNING, me=self.me, when=when))
            with self._lock:
                if len(self._queue) < self.capacity:
                    self._queue.append(message)
                else:
                    self.dropped += 1

    # -- the writer (its own trio loop, in its own thread) ----------------------------------

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._wake, self._stop = trio.Event(), trio.Event()
        self._ready.set()
        delay = self.backoff[0]
        with self._scope:
            async with trio.open_nursery() as nursery:
                while True:
                    self._release_summaries(everything=self._closing)
                    self._wake = trio.Event()
                    if self._peek() is None:
                        if self._closing:
                            break
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
                            break
                        with trio.move_on_after(delay):
                            await self._stop.wait()
                        delay = min(delay * 2, self.backoff[1])
                nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._disconnect()

    async def _deliver(self, nursery: trio.Nursery) -> None:
        if self._stream is None:
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
            self._stream, self._lost = stream, False
            self._watcher = trio.CancelScope()
            nursery.start_soon(self._watch, stream, self._watcher)
            self._report_connected()
        stream = self._stream
        while (message := self._peek()) is not None:
            if self._lost:
                raise _Lost("the collector closed the connection")
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(message)
            self._pop()

    async def _watch(self, stream: tls.TlsStream, scope: trio.CancelScope) -> None:
        """The collector sends nothing (RFC 5425); end of stream or an error means it is gone."""
        with scope:
            try:
                while await stream.receive_some():
                    pass
            except Exception:
                pass
            if self._stream is stream:
                self._lost = True
                self._wake.set()

    async def _disconnect(self) -> None:
        stream, self._stream = self._stream, None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if stream is not None:
            with trio.move_on_after(1.0):
                try:
                    await stream.aclose()
                except Exception:
                    pass
            await trio.aclose_forcefully(stream.transport)

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
        now = time.monotonic()
        if now - self._last_failure_line >= REPORT_INTERVAL:
            self._last_failure_line = now
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
