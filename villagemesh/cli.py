"""The ``villagemesh`` command: run a node, run the demo, list peers, send a message.

    villagemesh node  --data-dir DIR [--port P] [--bootstrap HOST:PORT ...] [--mode hybrid] [--lan]
    villagemesh demo  [--nodes 5] [--messages 20] [--data-dir DIR]
    villagemesh peers --data-dir DIR
    villagemesh send  --to PEER_ID --via HOST:PORT [--data-dir DIR] TEXT
    villagemesh dashboard [--log FILE ...] [--node HOST:PORT ...] [--port P]
    villagemesh top       [--log FILE ...] [--node HOST:PORT ...] [--once]

``node`` prints ``LISTEN <node_id> <host:port>`` once it serves, then runs until
SIGINT or SIGTERM. ``peers`` reads a node's registry file (the node may be
running). ``send`` runs a short-lived node of its own, finds the peer through
``--via`` and waits for the delivery.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from villagemesh.errors import VillageMeshError

DEFAULT_CLI_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "villagemesh" / "cli"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``villagemesh`` console command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except VillageMeshError as exc:
        print(f"villagemesh: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="villagemesh", description="An actor-model runtime for P2P nodes.")
    sub = parser.add_subparsers(required=True, metavar="command")

    node = sub.add_parser("node", help="run one node until interrupted")
    node.add_argument("--data-dir", required=True, type=Path, help="its key, peers, messages and log live here")
    node.add_argument("--name", help="a name for logs (default: node-<id prefix>)")
    node.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    node.add_argument("--port", type=int, default=0, help="the one TCP port for every protocol (0: any)")
    node.add_argument("--bootstrap", nargs="*", default=[], metavar="HOST:PORT", help="peers to probe every round")
    node.add_argument("--mode", default="hybrid", choices=["hybrid", "mesh", "anonymous", "direct"])
    node.add_argument("--lan", action="store_true", help="also send and hear signed UDP multicast beacons")
    node.add_argument("--log", type=Path, help="event log path (default DATA_DIR/events.jsonl)")
    node.add_argument("--quiet", action="store_true", help="do not print events on stderr")
    node.add_argument("--dashboard", action="store_true", help="also serve the dashboard at /villagemesh/dashboard")
    node.set_defaults(run=_run_node)

    demo = sub.add_parser("demo", help="5 local nodes, a crash on purpose, delivery goes on")
    demo.add_argument("--nodes", type=int, default=5)
    demo.add_argument("--messages", type=int, default=20, help="messages from every node to every other")
    demo.add_argument("--data-dir", type=Path, help="where the nodes keep their files (default: a temp dir)")
    demo.set_defaults(run=_run_demo)

    peers = sub.add_parser("peers", help="list the peers a node knows (reads its registry file)")
    peers.add_argument("--data-dir", required=True, type=Path)
    peers.set_defaults(run=_run_peers)

    send = sub.add_parser("send", help="send one message through a short-lived node and wait for delivery")
    send.add_argument("--to", required=True, metavar="PEER_ID")
    send.add_argument("--via", required=True, metavar="HOST:PORT", help="a node's acceptor (the peer or a neighbour)")
    send.add_argument("--data-dir", type=Path, default=DEFAULT_CLI_DIR)
    send.add_argument("--kind", default="DATA")
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("text")
    send.set_defaults(run=_run_send)

    from villagemesh.dashboard.cli import add_commands

    add_commands(sub)  # dashboard, top
    return parser


# -- node ------------------------------------------------------------------------------------------


def _run_node(args: argparse.Namespace) -> int:
    from villagemesh.node import create_network

    node = create_network(
        args.mode,
        data_dir=args.data_dir,
        name=args.name,
        host=args.host,
        port=args.port,
        bootstrap=tuple(args.bootstrap),
        lan=args.lan,
        log_path=args.log,
        human_log=None if not args.quiet else False,
        dashboard=args.dashboard,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Every kind is handled (printed), so senders see "delivered", not "unhandled".
    node.subscribe("*", lambda m: print(f"RECEIVED {m.kind} from {m.sender}: {len(m.payload)} bytes", flush=True))
    with node:
        print(f"LISTEN {node.node_id} {node.acceptor_address}", flush=True)
        stop.wait()
    return 0


# -- peers -----------------------------------------------------------------------------------------


def _run_peers(args: argparse.Namespace) -> int:
    from villagemesh.actors.registry.store import PeerStore

    path = args.data_dir / "peers.sqlite3"
    if not path.exists():
        print(f"no registry at {path} (has a node run with --data-dir {args.data_dir}?)", file=sys.stderr)
        return 1
    store = PeerStore(path)
    try:
        records = sorted(store.all(), key=lambda r: -r.last_seen)
    finally:
        store.close()
    now = time.time()
    print(f"{len(records)} peer(s) known to {args.data_dir}")
    print(f"{'peer id':34} {'seen':>8} {'trust':>5} {'rtt ms':>7}  addresses")
    for rec in records:
        addresses = ", ".join(a for _, addrs in rec.addresses for a in addrs)
        rtt = f"{rec.latency_ms:.1f}" if rec.latency_ms is not None else "-"
        print(f"{rec.peer_id:34} {_ago(now - rec.last_seen):>8} {rec.trust:5.2f} {rtt:>7}  {addresses}")
    return 0


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


# -- send ------------------------------------------------------------------------------------------


def _run_send(args: argparse.Namespace) -> int:
    from villagemesh.node import create_network

    node = create_network("direct", data_dir=args.data_dir, bootstrap=(args.via,), discovery_interval=0.5)
    with node:
        print(f"sending as {node.node_id} via {args.via} …", flush=True)
        deadline = time.monotonic() + args.timeout
        while not any(p.peer_id == args.to for p in node.peers()):
            if time.monotonic() > deadline:
                print(f"peer {args.to} was not found through {args.via} within {args.timeout} s", file=sys.stderr)
                return 1
            threading.Event().wait(0.1)
        handle = node.send(args.to, args.text.encode(), kind=args.kind)
        status = handle.wait(max(0.1, deadline - time.monotonic()))
    if status.delivered:
        print(f"delivered {status.message_id} to {args.to} after {status.attempts} attempt(s)")
        return 0
    print(
        f"not delivered: {status.state.value} after {status.attempts} attempt(s): {status.last_error}",
        file=sys.stderr,
    )
    return 1


# -- demo ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from villagemesh.demo import Demo

    base = args.data_dir or Path(tempfile.mkdtemp(prefix="villagemesh-demo-"))
    return Demo(base, nodes=args.nodes, messages=args.messages, out=_Printer()).run()


class _Printer:
    """Progress lines a person can read (and a log can keep)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str = "", **_: Any) -> None:
        stamp = f"[{time.monotonic() - self.start:6.2f}s]" if text else ""
        print(f"{stamp} {text}".rstrip(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
