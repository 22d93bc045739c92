"""The record of one association, and the log lines it becomes.

One record per connection, filled in as the connection travels and written once when it ends, by
`emit`: the single place every association ends. The log line, the audit trail (`auditfile`) and the
metrics (`metrics`) all read the same record there, so field names are defined here once and no
counter can disagree with the log. It holds no secret: certificates appear only as subject and
SHA-256 thumbprint.

A refusal of who the peer is also carries its classification as a security event (`security_alert`,
from `alerts.classify`, the decision the syslog sink sends its Security Alerts by), so that whoever
reads the JSON lines can filter them. Text lines leave it out: their `reason` says it to a person.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any, Protocol

from dicom_tls_proxy import alerts
from dicom_tls_proxy.vocabulary import EXPLANATIONS, Outcome, Reason

log = logging.getLogger("dicom_tls_proxy")


@dataclass
class AssociationRecord:
    listener: str
    peer: str
    tls_version: str = ""
    cipher: str = ""
    encryption: str = ""
    mac: str = ""
    peer_subject: str = ""
    peer_sha256: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    abstract_syntaxes: list[str] = field(default_factory=list)
    route: str = ""
    upstream: str = ""
    outcome: str = ""
    reason: str = ""
    detail: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    duration_s: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)
    tls_established: float = field(default=0.0, repr=False)  # monotonic; 0.0 = no TLS handshake

    def handshake_done(self) -> None:
        """Marks the end of the inbound TLS handshake, for the handshake-time histogram."""
        self.tls_established = time.monotonic()

    @property
    def handshake_s(self) -> float | None:
        """Seconds from accept to TLS established; None without a completed handshake."""
        return self.tls_established - self.started if self.tls_established else None

    def finish(self, outcome: Outcome, reason: Reason, detail: str = "") -> None:
        if self.outcome:  # the first cause wins; later ones are consequences
            return
        self.outcome = outcome.value
        self.reason = reason.value
        self.detail = detail or EXPLANATIONS.get(reason, "")
        self.duration_s = round(time.monotonic() - self.started, 4)

    def fields(self) -> dict[str, Any]:
        """The log line's fields, in declaration order (`asdict` would deep-copy every value),
        then `security_alert` when the ending is a security event (absent otherwise)."""
        data: dict[str, Any] = {"ts": _now(), "event": "association"}
        for name in _RECORD_FIELDS:
            value = getattr(self, name)
            data[name] = list(value) if isinstance(value, list) else value
        classification = alerts.classify(self.reason)
        if classification is not None:
            data[alerts.FIELD] = classification.fields()
        return data


_RECORD_FIELDS = tuple(
    f.name
    for f in dataclass_fields(AssociationRecord)
    if f.name not in ("started", "tls_established")
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_QUOTED = frozenset(' "=\\')  # a text value with one of these is written as a JSON string
# Fields for machines only: a text line would show a nested object as noise; its `reason` says it.
_JSON_ONLY = frozenset({alerts.FIELD})


def _text_value(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if not text or not _QUOTED.isdisjoint(text) or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.extra = extra or {}

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {
            "ts": _now(),
            "event": getattr(record, "event", "message"),
            "msg": record.getMessage(),
        }
        fields = {"ts": fields["ts"], "level": record.levelname.lower(), **self.extra, **fields}
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        if self.json:
            return json.dumps(fields, ensure_ascii=False)
        return " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k not in _JSON_ONLY)


def make_formatter(fmt: str, **extra: Any) -> logging.Formatter:
    """The `text` (key=value) or `json` formatter of the proxy's log lines; `extra` fields
    (such as the worker number) go on every line."""
    return _Formatter(fmt, extra)


worker_index: int | None = None  # this process's worker number with `workers = N`, else None


def setup_logging(fmt: str = "text", level: str = "info", *, worker: int | None = None) -> None:
    global worker_index
    worker_index = worker
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, **({} if worker is None else {"worker": worker})))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


class Throttle:
    """One log line per `interval` seconds for a condition that repeats (a full queue, a failing
    disk): the counts travel in the next line."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf

    def due(self) -> bool:
        now = self._clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


class RateLimiter:
    """At most `burst` lines per key and `interval`; the rest are counted and reported once per
    interval, so a scanner refusing itself a thousand times a second costs one line a second."""

    def __init__(
        self, burst: int = 5, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.interval, self.clock = burst, interval, clock
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}  # start, seen, dropped

    def allow(self, key: tuple[str, str]) -> bool:
        now = self.clock()
        start, seen, dropped = self._windows.get(key, (now, 0, 0))
        if now - start >= self.interval and not dropped:
            start, seen = now, 0
        seen += 1
        allowed = seen <= self.burst
        self._windows[key] = (start, seen, dropped + (0 if allowed else 1))
        return allowed

    def flush(self) -> list[tuple[tuple[str, str], int]]:
        """(key, count) for every key whose interval is over with lines held back."""
        now = self.clock()
        out = []
        for key, (start, _, dropped) in list(self._windows.items()):
            if now - start >= self.interval:
                if dropped:
                    out.append((key, dropped))
                del self._windows[key]
        return out


limiter = RateLimiter()


class Sink(Protocol):
    """Something fed every association and every audited event: the audit file, the metrics.
    Called synchronously from the connection's task, so it must never block or wait."""

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None: ...

    def event(self, fields: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """The proxy stops: make everything received durable (the syslog sink: let nothing
        more in; its writer task, which outlives the proxy's nursery, sends what is queued)."""


_sinks: list[Sink] = []

# Events an auditor needs besides the associations: when the proxy served, with which config, and
# how it stopped. Chatty operational lines (stats, suppressed, warnings) stay in the log only.
AUDITED_EVENTS = frozenset(
    {
        "started",
        "listening",
        "reloaded",
        "reload-failed",
        "stopping",
        "draining",
        "drain-timeout",
        "stopping-now",
        "stopped",
    }
)


def attach(sink: Sink) -> None:
    _sinks.append(sink)


def detach(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


@contextmanager
def attached(*sinks: Sink | None) -> Iterator[None]:
    """Feed these sinks while the block runs; on the way out (stop, or a crash) close them,
    so the audit file is flushed and fsynced whatever ended the proxy."""
    present = [sink for sink in sinks if sink is not None]
    for sink in present:
        attach(sink)
    try:
        yield
    finally:
        for sink in present:
            detach(sink)
            sink.close()


_sink_errors = RateLimiter(burst=1, interval=60.0)


def _feed(call: Callable[[Sink], None]) -> None:
    """Hand something to every sink. A sink's bug must not end the connection task that is
    reporting (it runs in a `finally`): it becomes one rate-limited error line."""
    for sink in list(_sinks):
        try:
            call(sink)
        except Exception:
            if _sink_errors.allow(("sink", type(sink).__name__)):
                log.exception(
                    "sink failed",
                    extra={"fields": {"ts": _now(), "event": "internal-error", "sink": str(sink)}},
                )


def emit(record: AssociationRecord) -> None:
    """The end of every association: one log line (info when it completed, warning otherwise;
    refusals rate-limited per source address and reason), and every sink gets the record,
    never rate-limited: the audit trail must hold every refusal, metrics must count them all."""
    completed = record.outcome in (Outcome.COMPLETED, "")
    logged = completed or limiter.allow((record.peer.rpartition(":")[0], record.reason))
    if not logged and not _sinks:
        return  # a flood of refusals costs no formatting
    fields = record.fields()
    if logged:
        log.log(
            logging.INFO if completed else logging.WARNING, "association", extra={"fields": fields}
        )
    if _sinks:
        _feed(lambda sink: sink.association(record, fields))


def flush_suppressed() -> None:
    for (source, reason), count in limiter.flush():
        event(
            "suppressed",
            logging.WARNING,
            source=source,
            reason=reason,
            count=count,
            msg=f"{count} more refusals like this from {source} in the last {limiter.interval:g}s",
        )


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """A log line that is not an association (start, stop, listening, warnings); those named in
    AUDITED_EVENTS also go to the sinks (the audit file)."""
    line = {"ts": _now(), "event": name, **fields}
    log.log(level, name, extra={"fields": line})
    if name in AUDITED_EVENTS and _sinks:
        audited = {**line, "level": logging.getLevelName(level).lower()}
        _feed(lambda sink: sink.event(audited))
