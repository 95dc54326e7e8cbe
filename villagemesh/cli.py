"""The ``villagemesh`` command: run a node, run the demo, list peers, send a message.

    villagemesh node  --data-dir DIR [--port P] [--bootstrap HOST:PORT ...] [--mode hybrid] [--lan]
                      [--accept-loss] [--new-identity]
    villagemesh doctor DATA_DIR
    villagemesh demo  [--nodes 5] [--messages 20] [--data-dir DIR]
    villagemesh peers --data-dir DIR
    villagemesh send  --to PEER_ID --via HOST:PORT [--data-dir DIR] TEXT
    villagemesh send  --to PEER_ID --via HOST:PORT [--data-dir DIR] --file PATH [--kind KIND]
    villagemesh dashboard [--log FILE ...] [--node HOST:PORT ...] [--port P]
    villagemesh top       [--log FILE ...] [--node HOST:PORT ...] [--once]

``node`` prints ``LISTEN <node_id> <host:port>`` once it serves, then runs until
SIGINT or SIGTERM (exit 0). If it cannot start, or fails later (its root
supervisor gives up), it exits 2 with the cause on stderr. ``doctor`` checks a
data dir as ``node`` would before it starts (the stores against the manifest,
the key) and starts nothing: exit 0 when all is well, 1 with one line per
problem otherwise. ``peers`` reads a node's registry file (the node may be
running). ``send`` runs a short-lived node of its own, finds the peer through
``--via`` and waits for the delivery; with ``--file`` it sends the file as a
transfer (chunked, verified by the receiver, resumable) and draws a progress
bar on stderr (bytes done of total, rate) until the receiver has verified it.
``node`` prints ``RECEIVED FILE <kind> from <peer>: <path>`` for each file it receives.
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
    node.add_argument(
        "--accept-loss", action="store_true", help="start even if a store is inconsistent (each loss is logged)"
    )
    node.add_argument("--new-identity", action="store_true", help="make a new key if node.key is missing or unreadable")
    node.add_argument("--dashboard", action="store_true", help="also serve the dashboard at /villagemesh/dashboard")
    node.set_defaults(run=_run_node)

    doctor = sub.add_parser("doctor", help="check a data dir's stores and key without starting a node")
    doctor.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    doctor.set_defaults(run=_run_doctor)

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
    send.add_argument("--kind", default=None, help="the message's kind (DATA), or the file's (file)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds (with --file: without progress)")
    send.add_argument("--file", type=Path, metavar="PATH", help="send this file as a transfer, with a progress bar")
    send.add_argument("text", nargs="?")
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
        accept_loss=args.accept_loss,
        new_identity=args.new_identity,
        dashboard=args.dashboard,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Every kind is handled (printed), so senders see "delivered", not "unhandled".
    node.subscribe("*", lambda m: print(f"RECEIVED {m.kind} from {m.sender}: {len(m.payload)} bytes", flush=True))
    node.on_transfer(lambda f: print(f"RECEIVED FILE {f.kind} from {f.peer_id}: {f.path}", flush=True))
    with node:
        node.on_failure(lambda _: stop.set())
        print(f"LISTEN {node.node_id} {node.acceptor_address}", flush=True)
        stop.wait()
    if node.failure is not None:
        raise node.failure
    return 0


# -- doctor ----------------------------------------------------------------------------------------


def _run_doctor(args: argparse.Namespace) -> int:
    from villagemesh.datadir import diagnose

    problems = diagnose(args.data_dir)
    if not problems:
        print(f"{args.data_dir}: ok (the stores agree with the manifest; the key is readable)")
        return 0
    print(f"{args.data_dir}: {len(problems)} problem(s); a node would refuse to start:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


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

    if (args.text is None) == (args.file is None):
        print("villagemesh send: give either TEXT or --file PATH", file=sys.stderr)
        return 2
    node = create_network("direct", data_dir=args.data_dir, bootstrap=(args.via,), discovery_interval=0.5)
    with node:
        print(f"sending as {node.node_id} via {args.via} …", flush=True)
        deadline = time.monotonic() + args.timeout
        while not any(p.peer_id == args.to for p in node.peers()):
            if time.monotonic() > deadline:
                print(f"peer {args.to} was not found through {args.via} within {args.timeout} s", file=sys.stderr)
                return 1
            threading.Event().wait(0.1)
        if args.file is not None:
            return _send_file(node, args)
        handle = node.send(args.to, args.text.encode(), kind=args.kind or "DATA")
        status = handle.wait(max(0.1, deadline - time.monotonic()))
    if status.delivered:
        print(f"delivered {status.message_id} to {args.to} after {status.attempts} attempt(s)")
        return 0
    print(
        f"not delivered: {status.state.value} after {status.attempts} attempt(s): {status.last_error}",
        file=sys.stderr,
    )
    return 1


def _send_file(node: Any, args: argparse.Namespace) -> int:
    """Send ``args.file`` and draw its progress until it ends (or no byte moved for ``args.timeout`` s)."""
    handle = node.send_file(args.to, args.file, kind=args.kind or "file")
    bar = ProgressBar(sys.stderr, args.file.name, handle.total)
    last, moved_at = -1, time.monotonic()
    while True:
        try:
            final = handle.wait(0.2)
        except TimeoutError:
            progress = handle.progress
            if progress.done != last:
                last, moved_at = progress.done, time.monotonic()
            elif time.monotonic() - moved_at > args.timeout:
                bar.end(f"stalled: no progress for {args.timeout} s (the transfer resumes when sent again)")
                return 1
            bar.draw(progress.done, progress.rate)
            continue
        except VillageMeshError as exc:
            bar.end(f"failed: {type(exc).__name__}: {exc}")
            return 1
        bar.draw(final.done, final.rate)
        bar.end(f"verified by {args.to}")
        return 0


class ProgressBar:
    """One line redrawn in place: ``name [#####.....]  45.0 %  12.0/26.7 MiB  8.1 MiB/s``."""

    WIDTH = 30

    def __init__(self, out: Any, name: str, total: int) -> None:
        self.out = out
        self.name = name
        self.total = total

    def line(self, done: int, rate: float) -> str:
        share = 1.0 if self.total == 0 else done / self.total
        filled = int(share * self.WIDTH)
        mib = 1024 * 1024
        return (
            f"{self.name} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {100 * share:5.1f} %  "
            f"{done / mib:.1f}/{self.total / mib:.1f} MiB  {rate / mib:.1f} MiB/s"
        )

    def draw(self, done: int, rate: float) -> None:
        self.out.write("\r" + self.line(done, rate))
        self.out.flush()

    def end(self, text: str) -> None:
        self.out.write(f"\n{text}\n")
        self.out.flush()


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
