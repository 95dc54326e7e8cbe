"""Where a dashboard's figures come from: event logs (followed) and nodes' status endpoints (polled).

One :class:`Sources` feeds one :class:`~.view.MeshView`; the web page and
``villagemesh top`` both use it, so they show the same thing. Every source
that fails says so in :attr:`Sources.errors` (shown on the page and in
``top``) instead of quietly showing stale figures.
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from villagemesh.dashboard.follow import LogFollower
from villagemesh.dashboard.status import STATUS_PATH
from villagemesh.dashboard.view import MeshView
from villagemesh.errors import ConfigError, ConnectError, VillageMeshError

__all__ = ["STATUS_TIMEOUT", "Sources", "parse_target"]

STATUS_TIMEOUT = 2.0
"""Seconds one status request may take."""


def parse_target(target: str) -> tuple[str, int]:
    """``HOST:PORT`` of a node's acceptor (ConfigError names a malformed one)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"a node is given as HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


class Sources:
    """Log files to follow, node endpoints to poll, and (inside a node) its own status."""

    def __init__(
        self,
        logs: Sequence[str | os.PathLike[str]] = (),
        nodes: Sequence[str] = (),
        *,
        local: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.followers = [LogFollower(path) for path in logs]
        self.targets = [(t, *parse_target(t)) for t in nodes]
        self.local = local
        self.errors: dict[str, str] = {}

    def poll_logs(self, view: MeshView, max_bytes: int = 1024 * 1024) -> list[dict[str, Any]]:
        """Fold every completed log line into ``view``; returns the new timeline entries."""
        entries: list[dict[str, Any]] = []
        for follower in self.followers:
            for record in follower.poll(max_bytes):
                entry = view.add(record)
                if entry is not None:
                    entries.append(entry)
            skipped = follower.bad_lines + follower.oversized
            if skipped:
                self.errors[follower.path] = f"{skipped} line(s) skipped (not JSON, or too long)"
        return entries

    def fetch_status(self, view: MeshView) -> None:
        """Ask every node for its status (blocking: run it off an event loop) and fold the answers in."""
        if self.local is not None:
            self._add(view, "local", self.local)
        for target, host, port in self.targets:
            self._add(view, target, functools.partial(_get_status, host, port))

    def _add(self, view: MeshView, source: str, fetch: Callable[[], dict[str, Any]]) -> None:
        try:
            status = fetch()
        except VillageMeshError as exc:
            self.errors[source] = f"{type(exc).__name__}: {exc}"
            return
        self.errors.pop(source, None)
        node = status.get("node")
        if isinstance(node, str):
            view.add_status(node, status, time.time())

    def close(self) -> None:
        for follower in self.followers:
            follower.close()


def _get_status(host: str, port: int) -> dict[str, Any]:
    url = f"http://{host}:{port}{STATUS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectError(f"{url}: {exc}") from exc
    try:
        status = json.loads(body)
    except ValueError as exc:
        raise ConnectError(f"{url}: not JSON ({exc})") from exc
    if not isinstance(status, dict):
        raise ConnectError(f"{url}: not a JSON object")
    return status
