"""The ``dashboard`` and ``top`` subcommands of the ``villagemesh`` command.

    villagemesh dashboard [--log FILE ...] [--node HOST:PORT ...] [--host H] [--port P]
    villagemesh top       [--log FILE ...] [--node HOST:PORT ...] [--once]

Both read the same sources: event logs (``--log``: a running node's, or one
copied from another machine) and nodes' status endpoints (``--node``: the
acceptor's ``host:port``). ``dashboard`` prints ``DASHBOARD <url>`` once it
serves, and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from villagemesh.errors import ConfigError

__all__ = ["add_commands"]


def add_commands(sub: Any) -> None:
    """Add ``dashboard`` and ``top`` to the ``villagemesh`` command's subparsers."""
    dashboard = sub.add_parser("dashboard", help="a live web page of nodes' supervision trees and figures")
    _sources(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8470, help="port of the page (default 8470; 0: any)")
    dashboard.set_defaults(run=_run_dashboard)

    top = sub.add_parser("top", help="the dashboard in the terminal")
    _sources(top)
    top.add_argument("--once", action="store_true", help="draw one frame and exit")
    top.add_argument("--interval", type=float, default=0.5, help="seconds between redraws (default 0.5)")
    top.set_defaults(run=_run_top)


def _sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", nargs="*", default=[], type=Path, metavar="FILE", help="event logs to follow")
    parser.add_argument("--node", nargs="*", default=[], metavar="HOST:PORT", help="nodes to ask for live figures")


def _make_sources(args: argparse.Namespace) -> Any:
    from villagemesh.dashboard.sources import Sources

    if not args.log and not args.node:
        raise ConfigError("give at least one --log FILE or --node HOST:PORT")
    return Sources(args.log, args.node)


def _run_dashboard(args: argparse.Namespace) -> int:
    from villagemesh.dashboard.server import run

    def on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    run(
        _make_sources(args),
        host=args.host,
        port=args.port,
        ready=lambda url: print(f"DASHBOARD {url}", flush=True),
        stop=on_signals,
    )
    return 0


def _run_top(args: argparse.Namespace) -> int:
    from villagemesh.dashboard.top import run

    if not args.interval > 0:
        raise ConfigError(f"--interval must be > 0 seconds, got {args.interval!r}")
    return run(_make_sources(args), once=args.once, interval=args.interval)
