"""The layout rule: each folder imports only what its room allows (read from the code with ast, not grep).

    villagemesh/          the public face and the CLI: may import anything
    actors/core/          the kit: itself, villagemesh.protocols, villagemesh.errors
    actors/<name>/        one actor: the kit, villagemesh.protocols, villagemesh.errors,
                          villagemesh.supervision.spec, its own modules, other actors' messages
    supervision/          villagemesh.errors, itself, the kit
    protocols/            the standard library, nacl, hypothesis, villagemesh.errors, itself
    villagemesh/errors.py the root of everything: no villagemesh module

Only imports of ``villagemesh.*`` are judged by folder; ``protocols/`` is also held to
its short list of foreign packages (and ``tests/protocols/test_sans_io.py`` keeps its
stricter ban on I/O parts of the standard library). Every import statement counts,
wherever it is (inside a function, under ``TYPE_CHECKING``), and so does a literal
``importlib.import_module("...")``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "villagemesh": "villagemesh",
    "actors": "villagemesh.actors",
    "supervision": "villagemesh.supervision",
    "protocols": "villagemesh.protocols",
}
PROTOCOLS_FOREIGN = frozenset({"nacl", "hypothesis"})
"""The only packages outside the standard library that ``protocols/`` may import."""


@dataclass(frozen=True)
class Imported:
    line: int
    name: str


def module_name(path: Path, root: Path = ROOT) -> str:
    """The installed dotted name of a source file under one of the mapped folders."""
    rel = path.relative_to(root)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(".".join(parts).split("."))


def known_modules(root: Path = ROOT) -> frozenset[str]:
    """Every villagemesh module and package that exists in the tree."""
    return frozenset(module_name(p, root) for folder in FOLDERS for p in (root / folder).rglob("*.py"))


def imports(path: Path, name: str, known: frozenset[str]) -> list[Imported]:
    """Every module ``path`` (installed as ``name``) imports, relative imports resolved.

    ``from pkg import x`` counts as an import of ``pkg.x`` when that is a module, else of ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Imported] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(Imported(node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.append(Imported(node.lineno, candidate if candidate in known else module))
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Imported(node.lineno, node.args[0].value))
    return found


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(name: str) -> tuple[str, object]:
    """(the rule's name, a predicate over imported names) for the module installed as ``name``."""
    if name == "villagemesh.errors":
        return "errors imports no villagemesh module", lambda t: not _within(t, "villagemesh")
    if _within(name, "villagemesh.protocols"):
        return (
            "protocols/ imports only the standard library, nacl, hypothesis, villagemesh.errors and itself",
            lambda t: (
                t == "villagemesh.errors"
                or _within(t, "villagemesh.protocols")
                or (not _within(t, "villagemesh") and t.split(".")[0] in sys.stdlib_module_names | PROTOCOLS_FOREIGN)
            ),
        )
    if _within(name, "villagemesh.supervision"):
        return (
            "supervision/ imports only villagemesh.errors, villagemesh.supervision and villagemesh.actors.core",
            lambda t: not _within(t, "villagemesh")
            or t == "villagemesh.errors"
            or _within(t, "villagemesh.supervision")
            or _within(t, "villagemesh.actors.core"),
        )
    if _within(name, "villagemesh.actors.core"):
        return (
            "the kit (actors/core/) imports only itself, villagemesh.protocols and villagemesh.errors",
            lambda t: not _within(t, "villagemesh")
            or t == "villagemesh.errors"
            or _within(t, "villagemesh.protocols")
            or _within(t, "villagemesh.actors.core"),
        )
    if name == "villagemesh.actors":
        return "actors/__init__.py imports no villagemesh module", lambda t: not _within(t, "villagemesh")
    if _within(name, "villagemesh.actors"):
        own = ".".join(name.split(".")[:3])

        def allowed(t: str) -> bool:
            parts = t.split(".")
            return (
                not _within(t, "villagemesh")
                or t == "villagemesh.errors"
                or t == "villagemesh.supervision.spec"
                or _within(t, "villagemesh.protocols")
                or _within(t, "villagemesh.actors.core")
                or _within(t, own)
                or (len(parts) == 4 and parts[:2] == ["villagemesh", "actors"] and parts[3] == "messages")
            )

        return (
            f"an actor ({own.rpartition('.')[2]}) imports only the kit, villagemesh.protocols, villagemesh.errors,"
            " villagemesh.supervision.spec, its own modules and other actors' messages.py",
            allowed,
        )
    return "villagemesh/ (the public face) may import anything", lambda t: True


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: imports X: rule`` for each import in ``path`` that its folder's rule forbids."""
    known = known_modules(root)
    name = module_name(path, root)
    rule, allowed = rule_for(name)
    rel = path.relative_to(root)
    return [
        f"{rel}:{imp.line}: imports {imp.name}, but {rule}"
        for imp in imports(path, name, known)
        if not allowed(imp.name)  # type: ignore[operator]
    ]


SOURCES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_the_walk_finds_every_folder_and_the_kit() -> None:
    """The walk sees the kit, several actors and the other folders (a wrong path would make the rule vacuous)."""
    names = {module_name(p) for p in SOURCES}
    assert {
        "villagemesh.actors.core.base",
        "villagemesh.actors.core.bus",
        "villagemesh.actors.core.handoff",
        "villagemesh.actors.core.storage",
        "villagemesh.actors.core.secure.session",
        "villagemesh.actors.retrier.actor",
        "villagemesh.actors.websocket.transport",
        "villagemesh.supervision.supervisor",
        "villagemesh.protocols.envelope",
        "villagemesh.node",
    } <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_what_its_folder_allows(path: Path) -> None:
    """Each module keeps its folder's rule; a failure names the file, the line and the rule."""
    found = violations(path)
    assert found == [], "\n".join(found)


def test_every_actor_folder_has_messages_state_and_actor() -> None:
    """Every folder under actors/ except the kit is one actor laid out as messages.py, state.py, actor.py."""
    actors = [p for p in (ROOT / "actors").iterdir() if p.is_dir() and p.name not in ("core", "__pycache__")]
    assert actors, "no actor folders found"
    layout = {"messages.py", "state.py", "actor.py"}
    missing = {p.name: sorted(layout - {f.name for f in p.glob("*.py")}) for p in actors}
    assert {k: v for k, v in missing.items() if v} == {}


@pytest.mark.parametrize(
    ("where", "source", "broken"),
    [
        ("actors/lan/tcp.py", "from villagemesh.actors.acceptor.server import peer_label", True),
        ("actors/lan/tcp.py", "from villagemesh.actors.acceptor import server", True),
        ("actors/lan/tcp.py", "import villagemesh.actors.retrier.store", True),
        ("actors/lan/tcp.py", "from villagemesh.supervision.supervisor import Supervisor", True),
        ("actors/lan/tcp.py", "from villagemesh import node", True),
        ("actors/lan/tcp.py", "import importlib\nimportlib.import_module('villagemesh.actors.app.state')", True),
        ("actors/lan/tcp.py", "def f():\n    from villagemesh.actors.app.actor import AppActor", True),
        ("actors/lan/tcp.py", "from villagemesh.actors.sweeper.messages import Sighted", False),
        ("actors/lan/tcp.py", "from villagemesh.actors.sweeper import messages", False),
        ("actors/lan/tcp.py", "from .state import PeerBook", False),
        ("actors/lan/tcp.py", "from . import state", False),
        ("actors/lan/tcp.py", "from villagemesh.actors.core.handoff import peer_label", False),
        ("actors/lan/tcp.py", "from villagemesh.supervision.spec import ChildSpec", False),
        ("actors/lan/tcp.py", "import aiohttp", False),
        ("actors/core/bus.py", "from villagemesh.actors.retrier.messages import Incoming", True),
        ("actors/core/bus.py", "from villagemesh.supervision.spec import ChildSpec", True),
        ("actors/core/bus.py", "from ..lan import messages", True),
        ("actors/core/bus.py", "from .codec import message", False),
        ("supervision/log.py", "from villagemesh.actors.registry.messages import Sighted", True),
        ("supervision/log.py", "from villagemesh.actors.core.base import Actor", False),
        ("protocols/sniff.py", "import aiohttp", True),
        ("protocols/sniff.py", "from villagemesh.actors.core import codec", True),
        ("protocols/sniff.py", "from ..errors import ProtocolError", False),
        ("protocols/sniff.py", "import nacl.signing", False),
        ("protocols/sniff.py", "import hashlib", False),
        ("villagemesh/errors.py", "from villagemesh.protocols import sniff", True),
        ("villagemesh/cli.py", "from villagemesh.actors.retrier.store import Outbox", False),
    ],
)
def test_the_checker_catches_every_import_form(tmp_path: Path, where: str, source: str, broken: bool) -> None:
    """Plain, from-, relative, lazy and importlib imports are judged by the importing folder's rule."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    existing_modules = (
        "actors/acceptor/server.py",
        "actors/sweeper/messages.py",
        "actors/lan/state.py",
        "actors/core/codec.py",
    )
    for existing in existing_modules:
        (tmp_path / existing).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / existing).write_text("")
    module = tmp_path / where
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(source + "\n")
    found = violations(module, tmp_path)
    assert bool(found) is broken, found
    if broken:
        assert found[0].startswith(f"{where}:"), found
