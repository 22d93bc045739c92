"""Windows per key: the first few of a repeating thing go through per interval, the rest counted.

Why this exists: three things can repeat without bound and must cost a bounded amount. Refusals
from one source (a scanner refusing itself a thousand times a second): a few log lines, then one
`suppressed` line per interval (`RateLimiter`, `audit.limiter`). Security Alerts to the syslog
collector: one alert, then one summary alert per interval (`syslogsink.AlertLimiter`). A failing
condition's log line (a full queue, a failing disk): one line per interval (`Throttle`). All three
are the same windowed counter, `Windows`; they differ in how many go through (`burst`), in whether
a report opens the next window (`reopen`), and in what they hand back.

What it must never do: read the wall clock (a monotonic `clock` is passed in, so tests drive it);
wait, log or do any I/O (the callers log or send what it says); keep a key whose window is over and
held nothing back past the next `release`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Window(Generic[V]):
    start: float
    seen: int = 0  # let through and held back in this window
    held: int = 0  # held back
    last: V | None = None  # the last one held back


class Windows(Generic[K, V]):
    """Per key, a window of `interval` seconds from the first occurrence: the first `burst` are let
    through (`allow` is true), the rest held back and counted, the last one kept.

    A window that is over starts afresh at the next occurrence, unless it held something back: that
    waits for `release`, which hands back (key, count, last held) for every window that is over and
    held something back (every window at all with `everything`), and forgets the windows that held
    nothing. With `reopen` a report opens the key's next window at once, as if `burst` had gone
    through: a steady flood then costs one report per interval and nothing more. Without, the key is
    forgotten and its next occurrence is let through."""

    def __init__(
        self,
        burst: int,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        reopen: bool = False,
    ) -> None:
        self.burst, self.interval, self.clock, self.reopen = burst, interval, clock, reopen
        self._windows: dict[K, _Window[V]] = {}

    def allow(self, key: K, item: V | None = None) -> bool:
        """Whether this occurrence goes through; if not, it is counted (and `item` kept)."""
        now = self.clock()
        window = self._windows.get(key)
        if window is None or (not window.held and now - window.start >= self.interval):
            window = self._windows[key] = _Window(now)
        window.seen += 1
        if window.seen <= self.burst:
            return True
        window.held += 1
        window.last = item
        return False

    def release(self, *, everything: bool = False) -> list[tuple[K, int, V | None]]:
        """(key, count held back, last held back) of every window that is over (or of every
        window, with `everything`) and held something back."""
        now = self.clock()
        out: list[tuple[K, int, V | None]] = []
        for key, window in list(self._windows.items()):
            if not everything and now - window.start < self.interval:
                continue
            if window.held:
                out.append((key, window.held, window.last))
                if self.reopen:
                    self._windows[key] = _Window(now, seen=self.burst)
                    continue
            del self._windows[key]
        return out


class RateLimiter(Windows[tuple[str, str], None]):
    """At most `burst` lines per key and `interval`; the rest are counted and reported once per
    interval, so a scanner refusing itself a thousand times a second costs one line a second."""

    def __init__(
        self, burst: int = 5, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(burst, interval, clock)

    def flush(self) -> list[tuple[tuple[str, str], int]]:
        """(key, count) for every key whose interval is over with lines held back."""
        return [(key, count) for key, count, _ in self.release()]


class Throttle(Windows[None, None]):
    """One log line per `interval` seconds for a condition that repeats (a full queue, a failing
    disk): the counts travel in the next line."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(1, interval, clock)

    def due(self) -> bool:
        self.release()  # an interval that is over ends, what it held back or not
        return self.allow(None)
