"""A user program type-checks with ``mypy --strict`` against villagemesh installed editable and as a wheel.

The editable install reaches mypy through tools/typing_tree.py (setuptools' editable import hook is
invisible to type checkers); the wheel is built from this tree and installed into a fresh venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import readme_python_example

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

USER_PROGRAM = '''
from __future__ import annotations

import asyncio

from villagemesh import (
    AsyncNode, DeliveryHandle, DeliveryState, DeliveryStatus, InboundMessage, MessageId, NodeEvent,
    OutboxLimits, Priority, create_network,
)
from villagemesh.compat import MessagePriority, NetworkConfig, P2PNetwork
from villagemesh.errors import OutboxFull, RemoteError, RequestTimeout


def on_data(message: InboundMessage) -> bytes:
    return message.payload


async def orchestrate(node: AsyncNode, peer: str) -> int:
    handle: DeliveryHandle = await node.send(peer, b"x", kind="TASK", priority=Priority.HIGH, timeout=1.0)
    status: DeliveryStatus = await handle
    ident: MessageId = status.message_id
    assert ident == handle.message_id and status.state is DeliveryState.DELIVERED
    try:
        reply = await node.request(peer, b"?", timeout=2.0)
    except (RemoteError, RequestTimeout, OutboxFull):
        reply = None
    async for message in node.messages("TASK"):
        print(message.value, reply)
        break
    async for event in node.events():
        seen: NodeEvent = event
        print(seen.kind)
        break
    return len(await node.peers())


node = create_network("hybrid", data_dir="/tmp/x", outbox=OutboxLimits(per_peer_messages=10))
node.subscribe("TASK", on_data)
count: int = asyncio.run(orchestrate(node.aio, "0" * 32))
network: P2PNetwork = P2PNetwork(NetworkConfig("mesh", "/tmp/y"))
assert MessagePriority.CRITICAL is Priority.CRITICAL
'''

TYPO = '''
from villagemesh import create_network

create_network("hybrid", data_dir="/tmp/x").send("0" * 32, b"x", priorty="high")
'''


def mypy_strict(python: str, directory: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-executable", python, "--cache-dir", ".mypy", *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=directory,  # not the repository: only the installed package can be found
        env={**os.environ, "MYPYPATH": ""},
    )


def write_programs(directory: Path) -> list[str]:
    (directory / "example.py").write_text((ROOT / "docs" / "example.py").read_text())
    (directory / "user.py").write_text(USER_PROGRAM)
    (directory / "readme.py").write_text(readme_python_example())
    return ["example.py", "user.py", "readme.py"]


def check(python: str, directory: Path) -> None:
    files = write_programs(directory)
    out = mypy_strict(python, directory, *files)
    assert out.returncode == 0, out.stdout + out.stderr
    (directory / "typo.py").write_text(TYPO)
    typo = mypy_strict(python, directory, "typo.py")
    assert typo.returncode == 1 and 'Unexpected keyword argument "priorty"' in typo.stdout, typo.stdout


def test_a_user_program_passes_mypy_strict_against_the_editable_install(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "typing_tree.py")], check=True, capture_output=True)
    check(sys.executable, tmp_path)


def test_a_user_program_passes_mypy_strict_against_a_wheel(tmp_path: Path) -> None:
    dist, env = tmp_path / "dist", tmp_path / "venv"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("villagemesh-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = str(env / "bin" / "python")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    check(python, tmp_path)
