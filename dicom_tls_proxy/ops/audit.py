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
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any, Protocol

from dicom_tls_proxy.ops import alerts
from dicom_tls_proxy.ops.ratelimit import RateLimiter
from dicom_tls_proxy.protocol.vocabulary import EXPLANATIONS, Outcome, Reason

log = logging.getLogger("dicom_tls_proxy")


@dataclass
class AssociationRecord:
    listener: str
    peer: str
    tls_version: str = ""
    cipher: str = ""
    encryption: str = ""
    mac: str = ""
    tls_group: str = ""  # the key exchange group (X25519MLKEM768: post-quantum hybrid)
    resumed: bool = False  # the client's TLS session was resumed (no certificate exchanged)
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
    # The accepted peer certificate's `policy.describe` (issuer, notAfter, CN...), for the status
    # page's inventory; not a log field (subject and SHA-256 are, above).
    peer_certificate: dict[str, str] = field(default_factory=dict, repr=False)

    def handshake_done(self) -> None:
        """Marks the end of the inbound TLS handshake, for the handshake-time histogram."""
        self.tls_established = time.monotonic()

    @property
    def completed(self) -> bool:
        """Ended well, or not ended yet; anything else is a refusal (the log's warning lines,
        the `refusals` counter, the status page's recent refusals)."""
        return self.outcome in (Outcome.COMPLETED, "")

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
    if f.name not in ("started", "tls_established", "peer_certificate")
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_QUOTED = frozenset(' "=\\')  # a text value with one of these is written as a JSON string
# Fields for machines only: a text line would show a nested object as noise; its `reason` says it.
_JSON_ONLY = frozenset({alerts.FIELD})


def _text_value(value: Any) -> str:
    if isinstance(value, bool):  # as JSON writes it
        return "true" if value else "false"
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


def setup_logging(fmt: str = "text", level: str = "info", *, worker: int | None = None) -> None:
    """The process's log: stderr, in `fmt`, from `level` up; a worker's lines carry its number."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, **({} if worker is None else {"worker": worker})))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


class Sink(Protocol):
    """Something fed every association and every audited event: the audit file, the metrics.
    Called synchronously from the connection's task, so it must never block or wait."""

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None: ...

    def event(self, fields: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """The proxy stops: make everything received durable (the syslog sink: let nothing
        more in; its writer task, which outlives the proxy's nursery, sends what is queued)."""


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
        # store-and-forward (issue 14): one line per instance, never its data
        "stored",
        "instance-forwarded",
        "failed",
    }
)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """A log line that is not an association (listening, warnings, a worker restarted). It goes
    to the log only; the events an auditor needs go through `Audit.event` instead."""
    log.log(level, name, extra={"fields": {"ts": _now(), "event": name, **fields}})


class Audit:
    """Where one proxy's association records and audited events go: the log, and the sinks (the
    audit file, the syslog collector, the metrics). The composition root makes one per proxy and
    hands it down, so nothing here is process-wide: a test or the demo composes a proxy of its own
    with its own logger and sinks. `worker` is this process's worker number with `workers = N`.
    """

    def __init__(
        self,
        *,
        worker: int | None = None,
        logger: logging.Logger = log,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.worker = worker
        self.log = logger
        self.limiter = limiter or RateLimiter()
        self.sinks: list[Sink] = []
        self._sink_errors = RateLimiter(burst=1, interval=60.0)

    @contextmanager
    def attached(self, *sinks: Sink | None) -> Iterator[None]:
        """Feed these sinks while the block runs; on the way out (stop, or a crash) close them,
        so the audit file is flushed and fsynced whatever ended the proxy."""
        present = [sink for sink in sinks if sink is not None]
        self.sinks.extend(present)
        try:
            yield
        finally:
            for sink in present:
                self.sinks.remove(sink)
                sink.close()

    def _feed(self, call: Callable[[Sink], None]) -> None:
        """Hand something to every sink. A sink's bug must not end the connection task that is
        reporting (it runs in a `finally`): it becomes one rate-limited error line."""
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception:
                if self._sink_errors.allow(("sink", type(sink).__name__)):
                    self.exception("sink failed", sink=str(sink))

    def emit(self, record: AssociationRecord) -> None:
        """The end of every association: one log line (info when it completed, warning
        otherwise; refusals rate-limited per source address and reason), and every sink gets the
        record, never rate-limited: the audit trail must hold every refusal, metrics must count
        them all."""
        completed = record.completed
        logged = completed or self.limiter.allow((record.peer.rpartition(":")[0], record.reason))
        if not logged and not self.sinks:
            return  # a flood of refusals costs no formatting
        fields = record.fields()
        if logged:
            level = logging.INFO if completed else logging.WARNING
            self.log.log(level, "association", extra={"fields": fields})
        if self.sinks:
            self._feed(lambda sink: sink.association(record, fields))

    def event(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        """A log line of this proxy's; those named in AUDITED_EVENTS also go to the sinks."""
        line = {"ts": _now(), "event": name, **fields}
        self.log.log(level, name, extra={"fields": line})
        if name in AUDITED_EVENTS and self.sinks:
            audited = {**line, "level": logging.getLevelName(level).lower()}
            self._feed(lambda sink: sink.event(audited))

    def exception(self, msg: str, **fields: Any) -> None:
        """An error line with the traceback of the exception being handled (`internal-error`)."""
        line = {"ts": _now(), "event": "internal-error", **fields}
        self.log.exception(msg, extra={"fields": line})

    def flush_suppressed(self) -> None:
        """One `suppressed` line per source and reason whose refusal lines were held back."""
        for (source, reason), count in self.limiter.flush():
            self.event(
                "suppressed",
                logging.WARNING,
                source=source,
                reason=reason,
                count=count,
                msg=f"{count} more refusals like this from {source} in the last "
                f"{self.limiter.interval:g}s",
            )
