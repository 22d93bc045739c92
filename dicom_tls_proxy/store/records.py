"""The facts a spool keeps and the two file operations everything in it is built on: what the
JSON beside an instance says (`Meta`), what a spool holds (`Usage`), why an instance is refused
(`Refused`), and writing a file whole or not at all (`write_json`), made durable (`fsync_folder`).

Why apart from `spool`: the spool (the folder) and `incoming` (one instance arriving) both need
them, and neither should import the other's internals.

What it must never do: import trio, log, or decide anything about an instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Refused(Exception):
    """The instance cannot be stored; `status` is the C-STORE-RSP status to answer (0xA700 out of
    resources, 0xC000 cannot understand), the message says why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class SpoolError(Exception):
    """The spool folder cannot be used (created, written); the message says why."""


@dataclass(frozen=True)
class Meta:
    """What the JSON beside an instance says."""

    id: str
    calling_ae: str
    called_ae: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    received: str  # ISO 8601 UTC
    size: int  # bytes of the data set
    data_offset: int  # where the data set starts in the .dcm file
    attempts: int = 0
    last_error: str = ""
    failed_reason: str = ""
    failed_at: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Meta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Usage:
    """A spool's contents, as `spool` and the metrics show them."""

    queued: int = 0
    queued_bytes: int = 0
    oldest: float | None = None  # POSIX time the oldest queued instance was received
    failed: int = 0
    failed_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.queued_bytes + self.failed_bytes

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        age = None if self.oldest is None else max(0.0, (now or time.time()) - self.oldest)
        return {
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "oldest_age_s": None if age is None else round(age, 1),
            "failed": self.failed,
            "failed_bytes": self.failed_bytes,
        }


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any], *, durable: bool, in_place: bool = False) -> None:
    """Write `path` whole or not at all (temporary name, rename; the temporary file removed if
    that fails); `in_place`: straight into a new `path`, for a file whose reader copes with it
    being cut short by a crash (the JSON of a new instance, which the file meta can replace)."""
    temporary = path if in_place else path.with_name(f"{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if in_place else os.O_TRUNC)
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            os.write(fd, json.dumps(data, sort_keys=True).encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if not in_place:
            os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
