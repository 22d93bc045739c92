"""`[audit] syslog`: DICOM audit messages (PS3.15 A.5) to a collector over TLS (A.6, RFC 5425).

What is sent and how it is framed is `auditmessage`: an Application Start and Stop, and a Security
Alert (Node Authentication) for every connection refused because of who the peer is, as
`alerts.classify` decides. Repeated identical alerts (same source address and reason) are
rate-limited here (`AlertLimiter`): one alert, then the repeats are counted and sent as one alert
per ALERT_INTERVAL saying how many there were. The association's JSON line (log and audit file)
carries the same classification, never rate-limited.

How it stays out of the way of traffic: the sink interface (`association`, `event`) only builds
the message and appends it to a bounded queue (a deque, then a `trio.Event` wakes the writer); a
full queue drops the message and counts it. Nothing there waits. One writer task, `run`, connects
with the proxy's own TLS client (a `tlscontext.client_context` and `TlsStream.connect`: chain or
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

The builders (`auditmessage`) and `AlertLimiter` are pure; the I/O is in `SyslogSink`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import trio
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import Endpoint, TlsTable
from dicom_tls_proxy.ops.audit import AssociationRecord, event
from dicom_tls_proxy.ops.auditmessage import (
    NOTICE,
    WARNING,
    Alert,
    Identity,
    alert_of,
    application_activity,
    frame,
    security_alert,
    syslog_message,
)
from dicom_tls_proxy.ops.ratelimit import Throttle, Windows
from dicom_tls_proxy.transport.streams import STREAM_ERRORS, os_error_text
from dicom_tls_proxy.transport.tlscontext import TlsFailure, client_context
from dicom_tls_proxy.transport.tlsstream import TlsStream

CAPACITY = 10_000  # messages waiting for the collector
ALERT_INTERVAL = 60.0  # seconds: one alert per source, reason and interval
CONNECT_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
BACKOFF = (0.5, 30.0)  # first and longest wait between two connection attempts
CLOSE_TIMEOUT = 5.0  # at stop: how long the last messages may take to go out
# After each handshake: how long the collector has to refuse the connection before anything is
# written. With TLS 1.3 the client's handshake is over before the server has checked the client
# certificate: a collector that refuses it answers with an alert after the handshake. Written
# at once, the first messages would be lost unnoticed (counted as sent), the collector reported
# reachable, and the back-off started again from its first step at every attempt.
ACCEPT_WAIT = 0.5
REPORT_INTERVAL = 60.0  # seconds between two syslog-failed (or syslog-dropped) log lines
TICK = 1.0  # how often the writer releases rate-limited alerts


class AlertLimiter(Windows[tuple[str, str], Alert]):
    """One alert per key (source, reason) and interval. Repeats within the interval are counted;
    when it ends they become one summary alert and a new interval starts, so a flood costs one
    message per interval. Pure: the clock is passed in."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(1, interval, clock, reopen=True)

    def admit(self, alert: Alert) -> bool:
        return self.allow((alert.source, alert.reason), alert)

    def due(self, *, everything: bool = False) -> list[Alert]:
        """The summaries whose interval is over (all of them at stop)."""
        return [
            replace(last, repeats=count)
            for _, count, last in self.release(everything=everything)
            if last is not None
        ]


# -- the connection to the collector ------------------------------------------------------


class _Lost(Exception):
    pass


_DELIVERY_ERRORS = (*STREAM_ERRORS, TlsFailure, trio.TooSlowError, _Lost)


class _Connection:
    """One TLS connection to the collector, and the scope of the task that watches it."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream
        self.watcher = trio.CancelScope()
        self.ended = trio.Event()  # the collector closed it (or it broke)
        self.error: BaseException | None = None  # why, when it broke (an alert, a reset)


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
        self._tls_context = context if context is not None else client_context(table)
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
        self.table, self._tls_context = table, context
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
                    stream = await TlsStream.connect(
                        sock, self._tls_context, self.table, self.server_name
                    )
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(sock)
                    raise
            self._connection = connection = _Connection(stream)
            nursery.start_soon(self._watch, connection)
            with trio.move_on_after(ACCEPT_WAIT):  # a refusal after the handshake
                await connection.ended.wait()
            if connection.ended.is_set():
                raise connection.error or _Lost("the collector closed the connection at once")
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
            except _DELIVERY_ERRORS as exc:
                connection.error = exc  # the writer finds out at its next message, and reports it
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
            if isinstance(exc, TlsFailure):
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
