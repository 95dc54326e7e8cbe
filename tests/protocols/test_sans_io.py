"""protocols/ stays sans-I/O: no module there imports sockets, threads, event loops, clocks or actors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"

BANNED = {
    "socket",
    "zmq",
    "pykka",
    "threading",
    "asyncio",
    "time",
    "select",
    "selectors",
    "subprocess",
    "multiprocessing",
    "villagemesh.actors",
    "villagemesh.supervision",
}


def _imported_modules(path: Path) -> list[str]:
    """Every module name an import statement in ``path`` names (relative imports resolved in villagemesh.protocols)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "villagemesh.protocols" if node.level == 1 else "villagemesh"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _banned(name: str) -> bool:
    return any(name == banned or name.startswith(banned + ".") for banned in BANNED)


MODULES = sorted(PROTOCOLS.rglob("*.py"))


def test_protocols_has_modules_to_check() -> None:
    """The walk finds the package (a wrong path would make the ban vacuous)."""
    expected = {"__init__.py", "sniff.py", "envelope.py", "discovery.py", "noise.py", "packet.py", "crypto.py"}
    assert {p.name for p in MODULES} >= expected


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PROTOCOLS)))
def test_module_imports_nothing_that_does_io(path: Path) -> None:
    """No import of socket, zmq, pykka, threading, asyncio, time, select(ors), subprocess, multiprocessing or actors."""
    offending = [name for name in _imported_modules(path) if _banned(name)]
    assert offending == [], f"{path.name} imports {offending}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import time", True),
        ("from time import monotonic", True),
        ("import asyncio.streams", True),
        ("from villagemesh.actors import bus", True),
        ("from villagemesh import actors", True),
        ("from .. import supervision", True),
        ("from .framing import NEED_DATA", False),
        ("import timeit", False),
        ("import hashlib", False),
    ],
)
def test_the_checker_catches_every_import_form(tmp_path: Path, source: str, expected: bool) -> None:
    """Plain, from- and relative imports of a banned module are all caught; look-alike names are not."""
    module = tmp_path / "m.py"
    module.write_text(source + "\n")
    assert any(_banned(name) for name in _imported_modules(module)) is expected
