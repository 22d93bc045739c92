"""`watch = true`: reload when something changes in a folder the config names a file in.

Why folders and not files: Kubernetes (Secret and ConfigMap mounts), cert-manager and certbot never
rewrite a certificate in place. Kubernetes' atomic writer fills a new hidden folder
(`..2026_11_22_10_00_00.123`), points a new `..data` symlink at it and renames that over the old
one; the mounted `tls.crt` is itself a symlink `tls.crt -> ..data/tls.crt`. A watch on the inode of
`tls.crt` (inotify on a file, or remembering one stat) would keep looking at the old file forever.
So each look is a snapshot of whole folders, by path: every entry's name, its own `lstat`, where a
symlink points, and the `stat` of what it leads to (following links). A swap of `..data` changes
the target of `..data`, the entry list (a new hidden folder), and what `tls.crt` leads to.

Why polling: `os.scandir` of a handful of small folders once a second costs microseconds, needs no
thread, no dependency and no platform API, and sees through symlinks, bind mounts and network
filesystems alike. It runs in the event loop like the reload itself, which reads the same files
synchronously.

A same-size rewrite in place within one kernel clock tick keeps size and mtime, so the files the
config names (not every file in their folders) also carry a hash of their content (when small).

Debounce: a change is acted on once the snapshot has stayed the same for one more interval (a writer
may be half-way through), then the reload goes through the same function as SIGHUP. The snapshot
the reload was based on becomes the new baseline: a failed reload (a half-written key) is not
retried until something changes again, and a change made during the reload is seen next time.

Files the proxy writes itself (the audit file and its rotations, the pid file) are ignored, or a
config kept beside its audit file would reload after every association.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops.audit import event

DIGEST_LIMIT = 1 << 20  # a named file up to this size is hashed on every look; larger: stat only
SETTLE_LOOKS = 30  # a folder still changing after this many intervals is reloaded anyway
SHOWN = 20  # changed paths named in one log line


@dataclass(frozen=True, slots=True)
class Targets:
    """What to look at: the folders, the files in them the config names (hashed), and the files
    the proxy writes there itself (ignored, with every name that starts like them)."""

    folders: tuple[Path, ...]
    named: frozenset[Path]
    ignored: frozenset[Path]


@dataclass(frozen=True, slots=True)
class Entry:
    """One folder entry as seen at one moment. Equal entries mean nothing changed."""

    lstat: tuple[int, int, int, int, int, int]  # mode, dev, ino, size, mtime_ns, ctime_ns
    target: str | None  # where a symlink points, as written
    stat: tuple[int, int, int, int, int, int] | None  # the same after following; None: dangling
    digest: bytes | None = None  # content hash of a named regular file


@dataclass(frozen=True, slots=True)
class Folder:
    """One folder: its identity (dev, ino; following a symlink to it), and its entries. The
    folder's own mtime is left out: the entries show every change it would."""

    identity: tuple[int, int] | None  # None: the folder is missing or unreadable
    entries: dict[str, Entry]


Snapshot = dict[Path, Folder]


def targets_of(config: Config) -> Targets:
    """The folders of every file the config names (a folder named as such, a CA folder, is watched
    itself), as absolute paths."""
    folders: dict[Path, None] = {}
    named: set[Path] = set()
    for path in config.referenced_paths():
        path = Path(os.path.abspath(path))
        if path.is_dir():
            folders[path] = None
        else:
            folders[path.parent] = None
            named.add(path)
    written = (config.audit.file, config.proxy.pid_file)
    ignored = frozenset(Path(os.path.abspath(p)) for p in written if p is not None)
    return Targets(tuple(sorted(folders)), frozenset(named), ignored)


def _stat_tuple(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    if stat.S_ISDIR(st.st_mode):  # its times change with what is inside: not ours to watch
        return (st.st_mode, st.st_dev, st.st_ino, 0, 0, 0)
    return (st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(path: Path, st: os.stat_result | None) -> bytes | None:
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > DIGEST_LIMIT:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(DIGEST_LIMIT + 1), digest_size=16).digest()
    except OSError:
        return None


def _ignored(path: Path, ignored: frozenset[Path]) -> bool:
    return any(path.parent == p.parent and path.name.startswith(p.name) for p in ignored)


def snapshot_folder(folder: Path, named: frozenset[Path], ignored: frozenset[Path]) -> Folder:
    """One look at one folder; an entry that vanishes while being looked at is simply absent."""
    try:
        st = os.stat(folder)
        identity = (st.st_dev, st.st_ino)
        found = list(os.scandir(folder))
    except OSError:
        return Folder(None, {})
    entries: dict[str, Entry] = {}
    for item in found:
        path = folder / item.name
        if _ignored(path, ignored):
            continue
        try:
            own = item.stat(follow_symlinks=False)
            target = os.readlink(path) if stat.S_ISLNK(own.st_mode) else None
        except OSError:
            continue
        try:
            followed: os.stat_result | None = os.stat(path)
        except OSError:
            followed = None
        entries[item.name] = Entry(
            _stat_tuple(own),
            target,
            None if followed is None else _stat_tuple(followed),
            _digest(path, followed) if path in named else None,
        )
    return Folder(identity, entries)


def snapshot(targets: Targets) -> Snapshot:
    """One look at every folder of `targets`."""
    return {f: snapshot_folder(f, targets.named, targets.ignored) for f in targets.folders}


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs between two snapshots: paths of entries added, removed or changed, and of
    folders that appeared, vanished or were replaced. Empty when nothing changed. Pure."""
    out: list[str] = []
    for folder in sorted(before.keys() | after.keys()):
        old, new = before.get(folder), after.get(folder)
        if old is None or new is None or old.identity != new.identity:
            out.append(str(folder))
            continue
        for name in sorted(old.entries.keys() | new.entries.keys()):
            if old.entries.get(name) != new.entries.get(name):
                out.append(str(folder / name))
    return out


async def watch_folders(current: Callable[[], Config], reload: Callable[[], object]) -> None:
    """Look every `watch_interval` seconds while `current().proxy.watch` is on; on a change that
    has settled, log `event=watch-changed` and call `reload` (what SIGHUP calls). Follows
    reloads: `current()` is read on every turn, so the folders, the interval and `watch` itself
    may change with a reload."""
    targets: Targets | None = None
    baseline: Snapshot = {}
    while True:
        config = current()
        interval = config.proxy.watch_interval
        if not config.proxy.watch:
            targets = None
            await trio.sleep(interval)
            continue
        now = targets_of(config)
        if now != targets:  # the start, or a reload that names other files: a new baseline
            targets, baseline = now, snapshot(now)
            event("watching", folders=[str(f) for f in now.folders], interval=interval)
        await trio.sleep(interval)
        if not current().proxy.watch:
            continue
        seen = snapshot(targets)
        if seen == baseline:
            continue
        for _ in range(SETTLE_LOOKS):  # a writer may be half-way: wait for one quiet interval
            await trio.sleep(interval)
            again = snapshot(targets)
            if again == seen:
                break
            seen = again
        else:
            event(
                "watch-unsettled",
                logging.WARNING,
                msg=f"still changing after {SETTLE_LOOKS} looks; reloading anyway. Keep "
                "certificates in a folder of their own",
            )
        changed = changes(baseline, seen)
        baseline = seen
        if not changed:  # changed and changed back
            continue
        event(
            "watch-changed",
            changed=changed[:SHOWN],
            more=max(0, len(changed) - SHOWN),
            msg="reloading",
        )
        reload()
