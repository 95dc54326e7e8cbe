"""One lab host's node process: a node made through the public API, driven by JSON lines.

::

    ip netns exec NS python -m villagemesh.lab.agent --data-dir D --name h3 --host 10.77.0.13 \\
        [--port P] [--record DIR] [--work SECONDS] [--settings JSON]

On stdout, one JSON object a line (flushed): ``{"event": "listen", "node_id", "address"}`` once the
node is up, ``{"event": "failed", "error"}`` if its root supervisor gives up, and one reply per
command, ``{"id": ..., "ok": true, ...}`` or ``{"id": ..., "ok": false, "error": ...}``.

Commands on stdin, one JSON object a line, each with an ``id``:

- ``{"op": "send", "to": NODE_ID, "count": N}``: N messages to that peer, numbered per recipient
  (``<name>:<seq>``, seq from 0, going on after a reboot), stored with ``send_many``; the reply
  comes once they are all stored durably (``first``, ``last``). Sends run in a thread of their
  own, in order, so other commands are answered meanwhile. Each message's id is
  ``message_id_for("<name>><to>:<seq>")``: a batch whose ``send`` a kill cut short is sent again
  with the same ids when the node comes back, before any new batch (see :class:`Ledger`).
- ``{"op": "peers"}``: the peer ids the node knows.
- ``{"op": "status"}``: ``Node.network_status()``.
- ``{"op": "lan"}``: the LAN discovery actor's counters (``beacon``, ``responder``, ``exchange``:
  beacons sent, verified, skipped, dropped; exchanges answered and pulled), to see where a
  discovery storm's work goes.
- ``{"op": "crash", "actor": NAME}``: ``Node.crash(NAME)`` (an ``InjectedCrash``; its supervisor restarts it).
- ``{"op": "received"}``: what the application got (see :class:`Ledger`).
- ``{"op": "quit"}``: stop the node and exit 0.

``--settings`` may name ``bitchat_air`` (a directory): the node's BitChat radio is then a
:class:`villagemesh.lab.air.SocketRadio` on that air, shared with the other hosts.

The application (``--record DIR``) is the documented exactly-once one: every handled payload
is appended to ``DIR/received`` with an unbuffered write (a ``kill -9`` loses no line that was
written), and a message dispatched with ``redelivered`` set (the node died while it was being
handled) is first looked up there. Per-sender order is the application's job too: messages of
one sender are released to ``DIR/ordered`` strictly by sequence number, the early ones held
back until the gap is filled. ``DIR/sent`` has one line per stored batch, ``DIR/intent`` one
line per batch about to be stored. A batch whose intent has no ``sent`` line was cut short by a
kill: nobody knows whether the node stored it, so the agent sends it again, with the same message
ids, as soon as the node is up (an id still pending is not stored twice; a message already handled
is dropped by its recipient as a duplicate); then it writes the ``sent`` line. So every intended
message is delivered, once.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "main", "unsent_lines"]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def unsent_lines(intent: list[str], sent: list[str]) -> list[str]:
    """The ``intent`` lines no ``sent`` line matches (each ``sent`` line matches one), in intent order."""
    done = Counter(sent)
    out = []
    for line in intent:
        if done[line]:
            done[line] -= 1
        else:
            out.append(line)
    return out


class Ledger:
    """The application's files in ``directory``: received, ordered, intent, sent, resent."""

    def __init__(self, directory: Path, work: float = 0.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.work = work
        self.lock = threading.Lock()
        self.seen: set[str] = set(_lines(directory / "received"))
        self.duplicates = 0
        self.redelivered = 0
        self.released: dict[str, int] = defaultdict(int)
        for line in _lines(directory / "ordered"):
            self.released[line.rsplit(":", 1)[0]] += 1
        self.held: dict[str, set[int]] = defaultdict(set)
        for payload in self.seen:
            sender, seq = payload.rsplit(":", 1)
            if int(seq) >= self.released[sender]:
                self.held[sender].add(int(seq))
        self._fds = {
            name: os.open(directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            for name in ("received", "ordered", "redelivered", "intent", "sent", "resent")
        }
        with self.lock:
            for sender in list(self.held):
                self._release(sender)  # what a kill left between the two files

    def handle(self, message: Any) -> None:
        """The subscriber: record once, release in order (after ``work`` seconds of the application's work)."""
        payload = message.payload.decode()
        if self.work:
            time.sleep(self.work)  # the application's work on the message, before its line is written
        with self.lock:
            if message.redelivered:
                self.redelivered += 1
                os.write(self._fds["redelivered"], message.payload + b"\n")
                if payload in self.seen:
                    return  # handled before the node died, but not yet marked handled then
            elif payload in self.seen:
                self.duplicates += 1  # a second delivery nobody announced: a bug the tests look for
            self.seen.add(payload)
            os.write(self._fds["received"], message.payload + b"\n")
            sender, seq = payload.rsplit(":", 1)
            self.held[sender].add(int(seq))
            self._release(sender)

    def _release(self, sender: str) -> None:
        held = self.held[sender]
        while self.released[sender] in held:
            held.discard(self.released[sender])
            os.write(self._fds["ordered"], f"{sender}:{self.released[sender]}\n".encode())
            self.released[sender] += 1

    def next_seq(self, recipient: str) -> int:
        """The first sequence number not yet used for ``recipient`` (intended counts as used)."""
        last = -1
        for line in _lines(self.dir / "intent"):
            to, _, end = line.split()
            if to == recipient:
                last = max(last, int(end))
        return last + 1

    def unsent(self) -> list[tuple[str, int, int]]:
        """The batches with an intent line and no ``sent`` line: ``(to, first, last)``, in intent order."""
        out = []
        for line in unsent_lines(_lines(self.dir / "intent"), _lines(self.dir / "sent")):
            to, first, last = line.split()
            out.append((to, int(first), int(last)))
        return out

    def note(self, file: str, line: str) -> None:
        os.write(self._fds[file], (line + "\n").encode())

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "received": len(self.seen),
                "duplicates": self.duplicates,
                "redelivered": self.redelivered,
                "released": dict(self.released),
                "held": {s: sorted(h) for s, h in self.held.items() if h},
            }


class Agent:
    """The node and its command loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        from villagemesh import create_network

        settings = json.loads(args.settings)
        mode = settings.pop("mode", "hybrid")
        air = settings.pop("bitchat_air", None)
        if air is not None:  # the lab's radio (villagemesh.lab.air): BitChat between the hosts
            from villagemesh.lab.air import SocketRadio

            settings["bitchat_radio"] = lambda me: SocketRadio(air, me)
        self.node = create_network(
            mode, data_dir=args.data_dir, name=args.name, host=args.host, port=args.port, **settings
        )
        self.ledger = Ledger(args.record or args.data_dir.parent / f"{args.name}.app", args.work)
        self.out_lock = threading.Lock()
        self.sends: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stop = threading.Event()

    def say(self, obj: dict[str, Any]) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(obj, default=str) + "\n")
            sys.stdout.flush()

    def run(self) -> int:
        self.node.subscribe("*", self.ledger.handle)  # before start: start-up redeliveries reach it
        self.node.on_failure(self._failed)
        self.node.start()
        sender = threading.Thread(target=self._sender, name="lab-sender", daemon=True)
        sender.start()
        self.say({"event": "listen", "node_id": self.node.node_id, "address": self.node.acceptor_address})
        reader = threading.Thread(target=self._reader, name="lab-reader", daemon=True)
        reader.start()
        self.stop.wait()
        self.sends.put(None)
        sender.join(10)
        self.node.stop()
        return 0

    def _failed(self, exc: Exception) -> None:
        self.say({"event": "failed", "error": str(exc)})
        self.stop.set()

    def _reader(self) -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            if command["op"] == "send":
                self.sends.put(command)
                continue
            self._answer(command)
            if command["op"] == "quit":
                return
        self.stop.set()  # stdin closed: the lab is gone

    def _answer(self, command: dict[str, Any]) -> None:
        op = command["op"]
        try:
            if op == "peers":
                result: dict[str, Any] = {"peers": sorted(p.peer_id for p in self.node.peers())}
            elif op == "status":
                result = {"status": self.node.network_status()}
            elif op == "lan":
                from villagemesh.actors.lan.actor import lan_status

                lan = lan_status(self.node._client())  # the node's own bus client: the agent is part of villagemesh
                result = {"beacon": lan.beacon, "responder": lan.responder, "exchange": lan.exchange}
            elif op == "crash":
                self.node.crash(command["actor"])
                result = {}
            elif op == "received":
                result = self.ledger.summary()
            elif op == "quit":
                self.stop.set()
                result = {}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001 - every failure is the command's answer, the agent goes on
            self.say({"id": command.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.say({"id": command.get("id"), "ok": True, **result})

    def _sender(self) -> None:
        for to, first, last in self.ledger.unsent():  # cut short by a kill: sent again, same ids
            try:
                self._store(to, first, last)
                self.ledger.note("resent", f"{to} {first} {last}")
            except Exception as exc:  # noqa: BLE001 - said on stdout; the batch keeps no sent line (Cluster.unsent)
                self.say({"event": "resend_failed", "to": to, "first": first, "error": f"{type(exc).__name__}: {exc}"})
        while (command := self.sends.get()) is not None:
            try:
                to, count = command["to"], int(command["count"])
                first = self.ledger.next_seq(to)
                last = first + count - 1
                self.ledger.note("intent", f"{to} {first} {last}")
                self._store(to, first, last)
            except Exception as exc:  # noqa: BLE001 - a failed send is the command's answer
                self.say({"id": command.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                continue
            self.say({"id": command.get("id"), "ok": True, "first": first, "last": last})

    def _store(self, to: str, first: int, last: int) -> None:
        """Messages ``first..last`` to ``to`` stored (ids from sender, recipient and seq), then the ``sent`` line."""
        from villagemesh.node import message_id_for

        name = self.node.name
        seqs = range(first, last + 1)
        self.node.send_many(
            [(to, f"{name}:{seq}".encode()) for seq in seqs],
            message_ids=[message_id_for(f"{name}>{to}:{seq}") for seq in seqs],
        )
        self.ledger.note("sent", f"{to} {first} {last}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--work", type=float, default=0.0, help="seconds of application work per message")
    parser.add_argument("--settings", default="{}", help="NodeConfig fields as a JSON object")
    args = parser.parse_args(argv)
    agent = Agent(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
