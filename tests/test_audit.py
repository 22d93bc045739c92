"""The association record and its log lines: rate limiting, formats. Pure, no sockets."""

from __future__ import annotations

import json
import logging

from dicom_tls_proxy.ops.audit import AssociationRecord, make_formatter
from dicom_tls_proxy.ops.ratelimit import RateLimiter, Throttle
from dicom_tls_proxy.protocol.vocabulary import Outcome, Reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counted_then_reported_once() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=3, interval=1.0, clock=clock)
    key = ("10.0.0.9", "no-route")
    assert [limiter.allow(key) for _ in range(10)] == [True] * 3 + [False] * 7
    assert limiter.allow(("10.0.0.8", "no-route"))  # another source is not affected
    assert limiter.flush() == []  # the interval is not over yet
    clock.now = 1.0
    assert limiter.flush() == [(key, 7)]
    assert limiter.flush() == []
    assert limiter.allow(key)  # a new interval starts afresh


def test_quiet_source_is_never_limited() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=2, interval=1.0, clock=clock)
    for step in range(20):
        clock.now = step * 0.6
        assert limiter.allow(("10.0.0.1", "calling-ae-not-allowed"))
        limiter.flush()


def test_throttle_one_line_per_interval() -> None:
    clock = Clock()
    throttle = Throttle(60.0, clock=clock)
    assert throttle.due()
    clock.now = 30.0
    assert not throttle.due()  # held back, however often it is asked
    assert not throttle.due()
    clock.now = 60.0
    assert throttle.due()  # the interval from the last line is over
    clock.now = 200.0
    assert throttle.due()  # quiet for longer: due at once
    assert not throttle.due()


def test_record_fields_and_formats() -> None:
    record = AssociationRecord(listener="tls", peer="127.0.0.1:5000", calling_ae="A B")
    record.finish(Outcome.REJECTED, Reason.NO_ROUTE)
    record.finish(Outcome.ABORTED, Reason.CLIENT_CLOSED)  # the first cause wins
    fields = record.fields()
    assert fields["outcome"] == "rejected" and fields["reason"] == "no-route"
    log_record = logging.LogRecord("x", logging.WARNING, __file__, 1, "association", None, None)
    log_record.fields = fields  # type: ignore[attr-defined]
    as_json = json.loads(make_formatter("json", worker=1).format(log_record))
    assert (
        as_json["worker"] == 1 and as_json["calling_ae"] == "A B" and as_json["level"] == "warning"
    )
    text = make_formatter("text").format(log_record)
    assert 'calling_ae="A B"' in text and "reason=no-route" in text


def test_security_alert_is_in_json_lines_not_in_text_ones() -> None:
    """A refusal of identity carries its classification for machines (JSON log lines, and the
    audit file, which takes the same fields); a text line stays short: its reason says it."""
    record = AssociationRecord(listener="tls", peer="127.0.0.1:5000", calling_ae="INTRUDER")
    record.finish(Outcome.REJECTED, Reason.CALLING_AE_NOT_ALLOWED)
    log_record = logging.LogRecord("x", logging.WARNING, __file__, 1, "association", None, None)
    log_record.fields = record.fields()  # type: ignore[attr-defined]
    as_json = json.loads(make_formatter("json").format(log_record))
    assert as_json["security_alert"]["event_id"]["code"] == "110113"
    assert as_json["security_alert"]["outcome"] == {"code": 4, "meaning": "Minor failure"}
    text = make_formatter("text").format(log_record)
    assert "reason=calling-ae-not-allowed" in text and "security_alert" not in text
    assert "110113" not in text
