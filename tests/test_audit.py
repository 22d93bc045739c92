"""The association record and its log lines: rate limiting, formats. Pure, no sockets."""

from __future__ import annotations

import json
import logging

from dicom_tls_proxy.audit import AssociationRecord, RateLimiter, make_formatter
from dicom_tls_proxy.vocabulary import Outcome, Reason


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
