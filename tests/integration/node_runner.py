"""One villagemesh node in its own process, for the tests that ``kill -9`` a node.

::

    python tests/integration/node_runner.py --data-dir D --name N --port P
        [--bootstrap host:port ...] [--send-to NODE_ID --count N --prefix TEXT [--asend]]
        [--record FILE [--work SECONDS]]
        [--send-file PATH --send-to NODE_ID] [--transfers] [--stall SECONDS]

Prints, one line each, flushed:

* ``LISTEN <node_id> <host:port>`` once the node is started;
* ``SENT <n>`` after ``--count`` messages to ``--send-to`` were accepted by ``Node.send``
  (stored durably in the outbox: a kill afterwards must not lose them); with ``--asend``, by
  ``asyncio.gather`` over as many ``AsyncNode.send`` (which return once stored too);
* ``IDLE`` each time the retrier goes from busy to idle: nothing pending, nothing unhandled
  (so a restarted sender says when every restored message was acknowledged).

``--record FILE``: every handled payload is appended to FILE as one line by a
subscriber registered *before* ``start()`` (so messages re-dispatched at start-up
from the inbox reach it too), with an unbuffered ``os.write`` so a ``kill -9``
loses no line that was written. The subscriber is the documented exactly-once
application: for a message dispatched with ``redelivered`` set (the node died
while it was being handled) it first looks whether its line is already there,
and appends the payload to ``FILE.redelivered`` too, so a test sees every
redelivery. ``--work``: seconds of simulated application work per message
before the line is written (so a kill lands mid-stream).

Transfers: ``--send-file PATH`` offers the file to ``--send-to`` (``OFFERED <transfer id>`` once
stored; a restarted sender goes on by itself, so a restart passes no ``--send-file``).
``--transfers`` prints ``XFER <direction> <state> <bytes done>`` for each transfer whenever it
changes, and ``RECEIVED <path>`` for each verified file (a handler registered before ``start()``).
``--stall``: the node's ``transfer_stall_s``.
Runs until SIGTERM/SIGINT, then stops the node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nodes import make_node

from villagemesh.errors import AskTimeout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", nargs="*", default=[])
    parser.add_argument("--send-to")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--prefix", default="m")
    parser.add_argument("--asend", action="store_true")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--work", type=float, default=0.0)
    parser.add_argument("--mode", default="hybrid")
    parser.add_argument("--send-file", type=Path)
    parser.add_argument("--transfers", action="store_true")
    parser.add_argument("--stall", type=float, default=10.0)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    node = make_node(
        args.data_dir, args.name, bootstrap=args.bootstrap, port=args.port, mode=args.mode, transfer_stall_s=args.stall
    )
    if args.transfers:
        node.on_transfer(lambda received: print(f"RECEIVED {received.path}", flush=True))
    if args.record is not None:
        record_path: Path = args.record
        fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        redelivered_fd = os.open(f"{record_path}.redelivered", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

        def record(message: Any) -> None:
            if args.work:
                time.sleep(args.work)  # the application's work on the message
            if message.redelivered:
                os.write(redelivered_fd, message.payload + b"\n")
                if message.payload in record_path.read_bytes().splitlines():
                    return  # done before the node died, but not yet marked handled then
            os.write(fd, message.payload + b"\n")

        node.subscribe("*", record)
    node.start()
    print(f"LISTEN {node.node_id} {node.acceptor_address}", flush=True)
    try:
        if args.send_to and args.count and args.asend:

            async def send_all() -> None:
                payloads = [f"{args.prefix}{i}".encode() for i in range(args.count)]
                await asyncio.gather(*(node.aio.send(args.send_to, p) for p in payloads))

            asyncio.run(send_all())
            print(f"SENT {args.count}", flush=True)
        elif args.send_to and args.count:
            for i in range(args.count):
                node.send(args.send_to, f"{args.prefix}{i}".encode())
            print(f"SENT {args.count}", flush=True)
        if args.send_to and args.send_file:
            print(f"OFFERED {node.send_file(args.send_to, args.send_file).transfer_id}", flush=True)
        busy = True
        shown: set[tuple[str, str, int]] = set()
        while not stop.wait(0.1):
            try:
                if args.transfers:
                    for row in node.transfers():
                        line = (row["direction"], row["state"], row["done"])
                        if line not in shown:
                            shown.add(line)
                            print(f"XFER {' '.join(map(str, line))}", flush=True)
                retrier = node.network_status()["retrier"]
            except AskTimeout as exc:  # a loaded machine: the node goes on, and so does the report
                print(f"SLOW {exc}", flush=True)
                continue
            idle = retrier["pending"] == 0 and retrier["unhandled"] == 0
            if idle and busy:
                print("IDLE", flush=True)
            busy = not idle
    finally:
        node.stop()


if __name__ == "__main__":
    main()
