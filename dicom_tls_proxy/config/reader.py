"""Reading one TOML document into values, blaming every mistake on its key: `FILE: key.path: msg`.

Why this exists apart from the loader (`config`): how a value is read (type-checked, converted,
checked by a small rule such as `positive` or `one_of`, a path resolved against the config's
folder and refused when others could write it) is the same for every table, and the tables
themselves (`config`, `config_tls`) are long enough. `Reader` collects every problem instead of
stopping at the first, so one `check` shows them all, and records every file a path key named
(what a reload reads again and `watch = true` watches).

What it must never do: know which keys a table has or what they mean (the tables do), or stop at
the first problem. It looks at the files it resolves (existence, kind, permissions) and reads
none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from dicom_tls_proxy.security import certload

T = TypeVar("T")
S = TypeVar("S", bound=str)


class Reader:
    """Collects every problem instead of stopping at the first, so one `check` shows them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.files: list[Path] = []  # every file or folder read through path_value

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {message}")

    def table(self, data: Any, key: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.error(key, f"expected a table, got {_type_name(data)}")
            return {}
        return data

    def unknown(self, data: Mapping[str, Any], key: str, known: set[str]) -> None:
        for name in data:
            if name not in known:
                hint = ""
                if name == "password":
                    hint = " (passwords are never literal: use password_file or password_env)"
                self.error(_join(key, name), f"unknown key{hint}")

    def value(
        self,
        data: Mapping[str, Any],
        key: str,
        name: str,
        kind: type | tuple[type, ...],
        default: T,
        check: Callable[[Any], T] | None = None,
    ) -> T:
        """Read `name` from `data`, type-check it, then run `check` (which may convert)."""
        if name not in data:
            return default
        raw = data[name]
        full = _join(key, name)
        if isinstance(raw, bool) and kind in (int, float, (int, float)):
            self.error(full, f"expected a number, got {_type_name(raw)}")
            return default
        if kind is float and isinstance(raw, int):
            raw = float(raw)
        if not isinstance(raw, kind):
            self.error(full, f"expected {_kind_name(kind)}, got {_type_name(raw)}")
            return default
        if check is None:
            return cast(T, raw)
        try:
            return check(raw)
        except ValueError as exc:
            self.error(full, str(exc))
            return default

    def path_value(
        self, data: Mapping[str, Any], key: str, name: str, *, folder: bool = False
    ) -> Path | None:
        def resolve(text: str) -> Path:
            if not text:
                raise ValueError("must not be empty")
            p = Path(text).expanduser()
            p = p if p.is_absolute() else self.base / p
            if not p.exists():
                raise ValueError(f"{p} does not exist")
            if not folder and p.is_dir():
                raise ValueError(f"{p} is a folder, expected a file")
            # Every file a config names is a key, a password or a trust anchor.
            insecure = certload.insecure_file_reason(p)
            if insecure:
                raise ValueError(f"refused: {insecure}")
            self.files.append(p)
            return p

        found: Path | None = self.value(data, key, name, str, None, resolve)
        return found

    def new_file(self, text: str) -> Path:
        """A file the proxy writes (pid file, audit log): its folder must exist."""
        if not text:
            raise ValueError("must not be empty")
        p = Path(text).expanduser()
        p = p if p.is_absolute() else self.base / p
        if not p.parent.is_dir():
            raise ValueError(f"folder {p.parent} does not exist")
        if p.is_dir():
            raise ValueError(f"{p} is a folder, expected a file")
        return p

    def string_list(
        self, data: Mapping[str, Any], key: str, name: str, check: Callable[[str], T]
    ) -> tuple[T, ...]:
        raw = data.get(name, [])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            self.error(_join(key, name), f"expected a list of strings, got {_type_name(raw)}")
            return ()
        out: list[T] = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.error(f"{_join(key, name)}[{i}]", f"expected a string, got {_type_name(item)}")
                continue
            try:
                out.append(check(item))
            except ValueError as exc:
                self.error(f"{_join(key, name)}[{i}]", str(exc))
        return tuple(out)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_type_name(k()) for k in kinds)


def positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return value


def seconds_between(low: float, high: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value}")
        return value

    return check


def at_least(minimum: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return check


def between(low: int, high: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def one_of(*choices: S) -> Callable[[str], S]:
    """A check that the value is one of `choices`, typed as they are: a Literal's values give
    that Literal."""

    def check(value: str) -> S:
        for choice in choices:
            if value == choice:
                return choice
        raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")

    return check
