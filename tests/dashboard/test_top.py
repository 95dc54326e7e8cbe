"""``villagemesh top`` under a pseudo-terminal: what it draws, and that it follows the log live."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.dashboard.test_view import T0, stamp
from villagemesh.cli import main

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
DRAW_WAIT = 30.0


def lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def boot_log(path: Path, now: float) -> None:
    path.write_text(
        lines(
            {"event": "supervisor_started", "node": "alice", "timestamp": stamp(now), "level": "info",
             "supervisor": "root", "parent": None, "strategy": "one_for_one", "intensity": 3, "period_s": 5},
            {"event": "child_started", "node": "alice", "timestamp": stamp(now), "level": "info",
             "supervisor": "root", "child_id": "websocket", "instance": "a" * 12, "isolation": "thread",
             "restart_count": 0, "pid": None},
            {"event": "child_started", "node": "alice", "timestamp": stamp(now), "level": "info",
             "supervisor": "root", "child_id": "ble", "instance": "b" * 12, "isolation": "process",
             "restart_count": 0, "pid": 4242},
        )
    )  # fmt: skip


class Screen:
    """A child process on a pseudo-terminal of 160 x 60, and the text it has drawn so far."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 160, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "60"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def wait_for(self, needle: str) -> str:
        deadline = time.monotonic() + DRAW_WAIT
        while needle not in self.text():
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                pytest.fail(f"top never drew {needle!r}; it drew:\n{self.text()[-3000:]}")
            if not self._read(min(left, 0.5)):
                break
        return self.text()

    def _read(self, timeout: float) -> bool:
        """Add what the child drew within ``timeout``; False once its side is closed (it is exiting)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:
                return False
        return True

    def close(self) -> int:
        """Interrupt the child and read what it still draws until it exits (a full terminal would block it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + DRAW_WAIT
        try:
            while self.proc.poll() is None and time.monotonic() < deadline and self._read(0.1):
                pass
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        finally:
            os.close(self.master)


@pytest.mark.slow
def test_top_draws_the_tree_and_then_a_crash_appended_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    boot_log(log, time.time())
    screen = Screen([sys.executable, "-m", "villagemesh.cli", "top", "--log", str(log), "--interval", "0.1"])
    try:
        drawn = screen.wait_for("websocket")
        assert "supervision tree" in drawn and "root/" in drawn and "pid 4242" in drawn
        assert "running" in drawn and "0/3" in drawn
        with open(log, "a") as out:
            out.write(
                lines(
                    {"event": "child_crashed", "node": "alice", "timestamp": stamp(time.time()), "level": "error",
                     "supervisor": "root", "child_id": "websocket", "instance": "a" * 12,
                     "exc_type": "CrashInjected", "exc_message": "on purpose", "traceback": "Traceback ..."},
                )
            )  # fmt: skip
        drawn = screen.wait_for("CrashInjected: on purpose")
        assert "restarting" in drawn
    finally:
        assert screen.close() == 0


def test_top_once_prints_one_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "events.jsonl"
    boot_log(log, T0)
    assert main(["top", "--once", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "websocket" in out and "timeline" in out and "msg/s" in out


def test_top_and_dashboard_need_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once"]) == 2
    assert "--log FILE or --node HOST:PORT" in capsys.readouterr().err
    assert main(["top", "--once", "--node", "nowhere"]) == 2
