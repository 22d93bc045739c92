"""The keys of a store-and-forward route (issue 14): `mode`, `spool`, `spool_max_bytes`,
`retry_interval`, `retry_max_interval`, `forward_batch`, `forward_timeout`, read and checked.

Why apart from `load`: they are one feature's keys with rules of their own (a spool folder is a
place PHI rests: nobody else may write it, and no two routes may share one), and `load` is the
table of every other key. Defaults are `schema.Route`'s, so a key left out means what the dataclass
says.

What it must never do: create or change the folder (the proxy does that at start, `store.spool`);
accept a spool that another user could write into.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from dicom_tls_proxy.config.reader import Reader, at_least, one_of, positive
from dicom_tls_proxy.config.schema import ROUTE_MODES, Route

KEYS = frozenset(
    {
        "mode",
        "spool",
        "spool_max_bytes",
        "retry_interval",
        "retry_max_interval",
        "forward_batch",
        "forward_timeout",
    }
)
_DEFAULTS: dict[str, Any] = {name: f.default for name, f in Route.__dataclass_fields__.items()}


def spool_problem(folder: Path) -> str | None:
    """Why `folder` cannot be a spool, or None; a folder not there yet is created at start, so
    its nearest existing parent is judged instead."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is not a folder"
    mode = existing.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        return (
            f"refused: {existing} is writable by other users (mode {stat.S_IMODE(mode):o}); "
            "a spool holds patient data: chmod 700"
        )
    return None


def read(r: Reader, d: dict[str, Any], key: str) -> dict[str, Any]:
    """The store-and-forward keys of route table `d` (at `key`), as Route keyword arguments."""
    mode = r.value(d, key, "mode", str, _DEFAULTS["mode"], one_of(*ROUTE_MODES))
    out: dict[str, Any] = {"mode": mode}
    if mode != "store-and-forward":
        for name in sorted(KEYS - {"mode"}):
            if name in d:
                r.error(f"{key}.{name}", 'only a route with mode = "store-and-forward" has it')
        return out
    if "spool" not in d:
        r.error(f"{key}.spool", 'missing: mode = "store-and-forward" needs a spool folder')
    text = r.value(d, key, "spool", str, "")
    if text:
        folder = Path(text).expanduser()
        folder = (folder if folder.is_absolute() else r.base / folder).absolute()
        problem = spool_problem(folder)
        if problem:
            r.error(f"{key}.spool", problem)
        out["spool"] = folder
    out["spool_max_bytes"] = r.value(d, key, "spool_max_bytes", int, 0, at_least(0))
    first = r.value(d, key, "retry_interval", float, _DEFAULTS["retry_interval"], positive)
    most = r.value(d, key, "retry_max_interval", float, _DEFAULTS["retry_max_interval"], positive)
    if most < first:
        r.error(f"{key}.retry_max_interval", f"must be at least retry_interval ({first})")
    out["retry_interval"], out["retry_max_interval"] = first, most
    out["forward_batch"] = r.value(d, key, "forward_batch", int, 100, at_least(1))
    out["forward_timeout"] = r.value(
        d, key, "forward_timeout", float, _DEFAULTS["forward_timeout"], positive
    )
    return out


def check_shared(r: Reader, routes: list[Route]) -> None:
    """No two routes may spool into the same folder (each forwarder owns its queue)."""
    seen: dict[Path, Route] = {}
    for route in routes:
        if route.spool is None:
            continue
        where = route.spool.resolve()
        if where in seen:
            r.error(
                f"{route.key_path}.spool",
                f"{route.spool} is already the spool of {seen[where].key_path}",
            )
        seen[where] = route
