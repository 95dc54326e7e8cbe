"""The documents stay true: the README's first commands, the runnable example, the log contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from villagemesh.supervision.log import SUPERVISION_EVENTS

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_starts_with_the_two_commands():
    """The first code block of the README is exactly `make demo` and `make test`."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\w*\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test_and_nothing_else():
    """.ci/run calls make test."""
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[-1] == "exec make test"


def test_the_log_contract_document_lists_every_supervision_event_with_its_keys():
    """docs/supervision-log.md has one table row per reserved event, with exactly the keys the code checks."""
    doc = (ROOT / "docs" / "supervision-log.md").read_text()
    for event, keys in SUPERVISION_EVENTS.items():
        row = re.search(rf"^\| `{event}` \|[^|]*\|([^|]*)\|", doc, re.M)
        assert row is not None, event
        documented = set(re.findall(r"`(\w+)`", row.group(1)))
        assert documented == set(keys), event


@pytest.mark.slow
def test_the_embedding_example_runs():
    """docs/example.py runs to the end with both the thread and the asyncio variant delivering."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "example.py")], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "delivered after" in out.stdout and "carol got b'hello from asyncio'" in out.stdout
    assert "alice answered: b'hello'" in out.stdout and "raised ValueError" in out.stdout


def readme_python_example() -> str:
    """The README's first Python code block."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return block.group(1)


@pytest.mark.slow
def test_the_readmes_first_python_example_runs(tmp_path):
    """The README's first example runs as written: delivered, and the request answered."""
    script = tmp_path / "readme_example.py"
    script.write_text(readme_python_example())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "alice got b'hello'" in out.stdout and "DeliveryState.DELIVERED" in out.stdout
    assert out.stdout.rstrip().endswith("b'PING'")
