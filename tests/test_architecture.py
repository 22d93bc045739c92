"""The shape of the package, checked: floors whose imports point down only, no import cycle
(imports under TYPE_CHECKING and inside functions count too), no module over 500 lines, and no
module-level mutable state where a proxy's identity used to live."""

from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import dicom_tls_proxy

PACKAGE = Path(dicom_tls_proxy.__file__).resolve().parent
NAME = "dicom_tls_proxy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its text."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and t != NAME}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and graph[f"{NAME}.cli"], "the walk found the package"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


IMMUTABLE = (str, bytes, int, float, bool, tuple, frozenset, type(None))


def test_audit_keeps_no_module_level_mutable_state() -> None:
    """Sinks, the refusal limiter and the worker number belong to an `Audit` that is passed in;
    the stdlib logger `log` is logging's own registry entry, configured by `setup_logging`."""
    module = importlib.import_module(f"{NAME}.ops.audit")
    tree = ast.parse((PACKAGE / "ops" / "audit.py").read_text())
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    assert {"AUDITED_EVENTS", "log"} <= assigned
    mutable = {
        name: type(getattr(module, name)).__name__
        for name in assigned
        if not isinstance(getattr(module, name), IMMUTABLE)
        and not (name == "log" and isinstance(getattr(module, name), logging.Logger))
    }
    assert mutable == {}


# Lowest first. A module may import its own package and the packages below it; the top-level
# modules (the CLI, the demo, the composition root, the supervisor) may import anything.
FLOORS = ["protocol", "security", "config", "transport", "store", "ops", "engine"]


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in FLOORS:
        return FLOORS.index(parts[1])
    return None


def test_imports_point_down_only() -> None:
    upward = []
    for module, targets in import_graph().items():
        here = _floor(module)
        dev = module.startswith(f"{NAME}.dev.")
        for target in targets:
            there = _floor(target)
            if dev and not target.startswith(f"{NAME}.dev"):
                upward.append(f"{module} -> {target} (dev imports nothing of the product)")
            elif target.startswith(f"{NAME}.dev") and here is not None:
                upward.append(f"{module} -> {target} (the product never imports dev)")
            elif here is not None and (there is None or there > here):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_module_over_500_lines() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert long == {}
