"""What ``make demo`` shows: a local network that keeps delivering through a crash.

1. start N nodes on 127.0.0.1, each told the others' acceptor addresses;
2. wait until every node knows every other (discovery JSON over the one port);
3. every node sends ``messages`` messages to every other node, half of them
   before and half after one node's WebSocket transport is crashed on purpose;
4. wait until every message is acknowledged, and check each arrived exactly
   once; show that only the crashed actor restarted, and how fast;
5. print a summary and where each node's event log is.

Exit status 0 only if every message was delivered exactly once and the
crashed node kept serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from villagemesh.node import Node, create_network
from villagemesh.protocols.envelope import Message

__all__ = ["Demo"]


class Demo:
    """One run of the demo network."""

    def __init__(self, base: Path, *, nodes: int = 5, messages: int = 20, out: Callable[..., None] = print) -> None:
        self.base = Path(base)
        self.count = nodes
        self.messages = messages
        self.out = out
        self.nodes: list[Node] = []
        self.received: Counter[tuple[str, str, int]] = Counter()
        self._lock = threading.Lock()
        self._all_in = threading.Event()

    def run(self) -> int:
        out = self.out
        out(f"villagemesh demo: {self.count} nodes on 127.0.0.1, files under {self.base}")
        try:
            self._start()
            if not self._discover():
                return 1
            expected = self.count * (self.count - 1) * self.messages
            out(f"sending {self.messages} messages from every node to every other ({expected} in all)")
            handles = self._send(0, self.messages // 2)
            victim = self.nodes[self.count // 2]
            out(f"crashing the websocket transport of {victim.name} on purpose, with messages in flight …")
            victim.crash("websocket")
            handles += self._send(self.messages // 2, self.messages)
            ok = self._wait(handles, expected)
            self._report_crash(victim)
            self._summary(handles, expected)
            return 0 if ok else 1
        finally:
            for node in reversed(self.nodes):
                node.stop()
            out("all nodes stopped; event logs (JSON lines):")
            for node in self.nodes:
                out(f"  {node.name}: {node.log_path}")

    def _start(self) -> None:
        for i in range(self.count):
            node = create_network(
                "hybrid",
                name=f"node-{i + 1}",
                data_dir=self.base / f"node-{i + 1}",
                discovery_interval=0.5,
                discovery_timeout=1.0,
                ack_timeout=2.0,
                backoff_base=0.2,
                backoff_max=2.0,
            )
            self.nodes.append(node)
        addresses = [n.acceptor_address for n in self.nodes]
        for node in self.nodes:
            node.config = replace(node.config, bootstrap=tuple(a for a in addresses if a != node.acceptor_address))
            node.subscribe("DATA", self._on_message)
            node.start()
            self.out(f"started {node.name}  id {node.node_id[:12]}…  listening on {node.acceptor_address}")

    def _discover(self) -> bool:
        start = time.monotonic()
        want = self.count - 1
        for node in self.nodes:
            if not node.wait_for_peers(want, 20.0):
                self.out(f"{node.name} found only {len(node.peers())} of {want} peers in 20 s")
                return False
        self.out(f"discovery: every node knows its {want} peers after {time.monotonic() - start:.2f} s")
        return True

    def _send(self, first: int, last: int) -> list[Any]:
        handles = []
        for seq in range(first, last):
            for sender in self.nodes:
                for receiver in self.nodes:
                    if receiver is not sender:
                        payload = json.dumps([sender.node_id, seq]).encode()
                        handles.append(sender.send(receiver.node_id, payload))
        return handles

    def _on_message(self, message: Message) -> None:
        sender, seq = json.loads(message.payload)
        with self._lock:
            self.received[(sender, message.recipient or "", seq)] += 1
            if sum(self.received.values()) >= self.count * (self.count - 1) * self.messages:
                self._all_in.set()

    def _wait(self, handles: list[Any], expected: int) -> bool:
        deadline = time.monotonic() + 60
        delivered = 0
        for handle in handles:
            status = handle.wait(max(0.0, deadline - time.monotonic()))
            delivered += status.delivered
        self._all_in.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unique = len(self.received)
            duplicates = sum(c - 1 for c in self.received.values())
        self.out(
            f"delivery: {delivered}/{expected} acknowledged, {unique}/{expected} received, {duplicates} duplicates"
        )
        return delivered == expected == unique and duplicates == 0

    def _report_crash(self, victim: Node) -> None:
        events = [json.loads(line) for line in victim.log_path.read_text().splitlines()]
        crashed = [e for e in events if e["event"] == "child_crashed"]
        restarted = [e for e in events if e["event"] == "child_restarted"]
        for crash in crashed:
            back = next((r for r in restarted if r["child_id"] == crash["child_id"]), None)
            took = ""
            if back is not None:
                from datetime import datetime

                t0 = datetime.fromisoformat(crash["timestamp"].replace("Z", "+00:00"))
                t1 = datetime.fromisoformat(back["timestamp"].replace("Z", "+00:00"))
                took = f", back in {(t1 - t0).total_seconds() * 1000:.1f} ms"
            self.out(f"{victim.name}: {crash['child_id']} crashed ({crash['exc_type']}) and restarted alone{took}")
        others = {e["child_id"] for e in restarted} - {c["child_id"] for c in crashed}
        self.out("no other actor restarted" if not others else f"also restarted: {sorted(others)}")

    def _summary(self, handles: list[Any], expected: int) -> None:
        self.out("")
        self.out(f"{'node':8} {'peers':>5} {'sent':>5} {'delivered':>9} {'received':>8} {'restarts':>8}")
        with self._lock:
            got = Counter(recipient for (_, recipient, _) in self.received)
        for node in self.nodes:
            status = node.network_status()
            restarts = _restarts(status["actors"])
            retrier = status["retrier"]
            self.out(
                f"{node.name:8} {status['peers']:>5} {retrier['sent']:>5} {retrier['delivered']:>9} "
                f"{got[node.node_id]:>8} {restarts:>8}"
            )
        self.out("")


def _restarts(children: list[dict[str, Any]]) -> int:
    """Restarts in a which_children tree, nested supervisors included."""
    return sum(c["restart_count"] + _restarts(c.get("children", [])) for c in children)
