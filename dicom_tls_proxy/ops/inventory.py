"""The peer certificate inventory: every certificate a peer presented and the proxy accepted.

Why this exists: an expiring modality certificate is the outage everyone sees coming and nobody
watches. The status page lists the certificates peers present (subject, issuer, SHA-256, notAfter,
first and last seen, how many associations), and `/metrics` gives each one's seconds to expiry
(`peer_certificate_expiry_seconds`), so an alert fires before a modality's certificate expires.
It is kept in a small JSON state file beside the audit file (else the pid file), written
atomically, so it survives a restart.

What it must never do: grow without bound (only certificates that passed verification are
entered, at most LIMIT, the most recently seen kept); hold anything but public facts of a
certificate (never a key, never the certificate's bytes); trust its state file (a missing,
half-written or foreign one reads as empty or as the entries that make sense); block the event
loop on a write (`keep` writes from a thread, at most every SAVE_INTERVAL).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops.audit import event

LIMIT = 1000  # certificates kept: the most recently seen
SAVE_INTERVAL = 10.0  # seconds between two writes of a changed inventory
MAX_TEXT = 1024  # longest subject or issuer kept (a certificate's names can be long; a page not)
MAX_LABEL = 64  # longest `cn` label value
FIELDS = ("sha256", "subject", "issuer", "not_after", "first_seen", "last_seen", "associations")
_TEXT_FIELDS = ("sha256", "subject", "issuer", "not_after", "first_seen", "last_seen")


def state_path(config: Config, worker: int | None, folder: Path | None = None) -> Path | None:
    """Where the inventory of this process is kept: beside `[audit] file`, else beside
    `pid_file` (`NAME.peers.json`, `NAME.peers-N.json` for worker N); a worker without either
    keeps it in the supervisor's `folder`, a single process without either keeps none."""
    base = config.audit.file or config.proxy.pid_file
    if base is not None:
        suffix = ".peers.json" if worker is None else f".peers-{worker}.json"
        return base.with_name(base.name + suffix)
    if worker is not None and folder is not None:
        return folder / f"peers-{worker}.json"
    return None


def parse_state(text: str) -> list[dict[str, Any]]:
    """The entries of a state file that make sense, at most LIMIT, most recently seen first;
    anything else in it is left out (never an exception)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return []
    items = data.get("peer_certificates") if isinstance(data, dict) else data
    return clean(items if isinstance(items, list) else [])


def clean(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Well-formed entries only (one per SHA-256), most recently seen first, at most LIMIT."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        if not all(isinstance(item.get(k), str) for k in _TEXT_FIELDS):
            continue
        count = item.get("associations")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            continue
        entry = {k: item[k][:MAX_TEXT] for k in _TEXT_FIELDS}
        entry["associations"] = count
        if "cn" in item and isinstance(item["cn"], str):
            entry["cn"] = item["cn"][:MAX_TEXT]
        if entry["sha256"] and entry["sha256"] not in out:
            out[entry["sha256"]] = entry
    ordered = sorted(out.values(), key=lambda e: e["last_seen"], reverse=True)
    return ordered[:LIMIT]


def merge(inventories: Iterable[Iterable[Any]]) -> list[dict[str, Any]]:
    """Several processes' inventories as one (`workers = N`): per SHA-256 the first first_seen,
    the last last_seen, the associations summed; the LIMIT most recently seen."""
    out: dict[str, dict[str, Any]] = {}
    for inventory in inventories:
        for entry in clean(inventory):
            known = out.get(entry["sha256"])
            if known is None:
                out[entry["sha256"]] = dict(entry)
                continue
            known["first_seen"] = min(known["first_seen"], entry["first_seen"])
            if entry["last_seen"] > known["last_seen"]:
                known["last_seen"] = entry["last_seen"]
            known["associations"] += entry["associations"]
    return clean(out.values())


class PeerInventory:
    """This process's inventory, most recently seen last (a dict keeps insertion order), and
    the file it is kept in (None: in memory only)."""

    def __init__(self, path: Path | None, limit: int = LIMIT) -> None:
        self.path = path
        self.limit = limit
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        self.saved_at = 0.0

    def load(self) -> None:
        """Read the state file; a missing one is an empty inventory, an unreadable one too (one
        warning line: it is rewritten at the next save)."""
        if self.path is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            event("peer-inventory-unreadable", logging.WARNING, path=str(self.path), msg=str(exc))
            return
        for entry in reversed(parse_state(text)[: self.limit]):
            self.entries[entry["sha256"]] = entry

    def seen(self, described: Mapping[str, str], now: str) -> None:
        """A verified certificate (`policy.describe`) was presented in an association at `now`."""
        sha256 = described.get("sha256", "")
        if not sha256:
            return
        entry = self.entries.pop(sha256, None)
        if entry is None:
            entry = {
                "sha256": sha256,
                "subject": described.get("subject", "")[:MAX_TEXT],
                "cn": described.get("cn", "")[:MAX_TEXT],
                "issuer": described.get("issuer", "")[:MAX_TEXT],
                "not_after": described.get("not_after", ""),
                "first_seen": now,
                "last_seen": now,
                "associations": 0,
            }
        entry["last_seen"] = now
        entry["associations"] += 1
        self.entries[sha256] = entry  # to the end: the most recently seen
        while len(self.entries) > self.limit:
            del self.entries[next(iter(self.entries))]
        self.dirty = True

    def as_json(self) -> list[dict[str, Any]]:
        """Most recently seen first."""
        return [dict(e) for e in reversed(self.entries.values())]

    def save(self) -> None:
        """Write the state file now (from the event loop: at the stop only)."""
        if self.path is not None and self.dirty:
            self.dirty = False
            _write(self.path, self._text())

    def _text(self) -> str:
        return json.dumps({"peer_certificates": self.as_json()}, indent=0)

    async def keep(self) -> None:
        """Every SAVE_INTERVAL, write the state file if the inventory changed; in a thread, so
        a slow disk never holds up the associations. A failed write is one warning line."""
        failed = False
        while True:
            await trio.sleep(SAVE_INTERVAL)
            if self.path is None or not self.dirty:
                continue
            self.dirty = False
            try:
                await trio.to_thread.run_sync(_write, self.path, self._text())
                failed = False
            except OSError as exc:
                self.dirty = True
                if not failed:
                    path = str(self.path)
                    event("peer-inventory-failed", logging.WARNING, path=path, msg=str(exc))
                failed = True


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)  # a reader (or the next start) never sees half a file


def seconds_left(text: str, now: float | None = None) -> float | None:
    """Seconds from `now` to an ISO 8601 time (negative: past); None when it cannot be read."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp() - (time.time() if now is None else now)


class PeerExpiry(Collector):
    """`peer_certificate_expiry_seconds{sha256, cn}` for each certificate of the inventory
    (`entries` gives them); negative once expired."""

    def __init__(self, prefix: str, entries: Callable[[], list[dict[str, Any]]]) -> None:
        self.name = f"{prefix}_peer_certificate_expiry_seconds"
        self.entries = entries

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            self.name,
            "Seconds until notAfter of each certificate a peer presented and the proxy accepted "
            f"(at most the {LIMIT} most recently seen)",
            labels=["sha256", "cn"],
        )
        now = time.time()
        for entry in self.entries():
            left = seconds_left(entry.get("not_after", ""), now)
            if left is not None:
                gauge.add_metric([entry["sha256"], str(entry.get("cn", ""))[:MAX_LABEL]], left)
        yield gauge
