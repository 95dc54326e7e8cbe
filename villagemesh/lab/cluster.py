"""A lab of villagemesh nodes: one node process per network-namespace host, driven over JSON lines.

::

    with Cluster(10, base_dir, lan=True) as lab:     # 10 namespaces, 10 node processes
        lab.wait_converged()                          # every node knows every other
        lab.partition([1, 2, 3])                      # 1-3 | 4-10
        lab[1].send(lab[5].node_id, 100)
        lab.heal()
        lab.kill9(5); lab.boot(5)                     # same data dir, same address, same id
        lab.check_exactly_once()                      # every message stored was handled once, in order

Each host runs :mod:`villagemesh.lab.agent` (the node made through the public API) inside its
namespace with ``ip netns exec``; its data dir is ``base_dir/hI/node``, its application's files
``base_dir/hI/app``, its event log (structlog JSON) ``base_dir/hI/node/events.jsonl``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from villagemesh.errors import LabError
from villagemesh.lab.agent import unsent_lines
from villagemesh.lab.air import jam, unjam
from villagemesh.lab.netns import NetLab

__all__ = ["FAST", "PORT", "Cluster", "LabHost"]

PORT = 7700
"""Every host's node listens on this port (each host has an address of its own)."""

FAST: dict[str, Any] = {
    "discovery_interval": 0.5,
    "discovery_timeout": 0.5,
    "discovery_fast_start": 0.1,
    "ack_timeout": 1.0,
    "max_attempts": 1000,
    "backoff_base": 0.05,
    "backoff_max": 0.5,
    "unknown_peer_timeout": 120.0,
    "human_log": False,
}
"""Node settings for the lab: quick discovery rounds and retries, and enough attempts (minutes)
that a peer behind a partition or rebooting is waited for, never given up on."""

REPLY_TIMEOUT = 30.0
"""Seconds a command waits for its reply: reached only when a host hangs."""


class LabHost:
    """Host ``i`` of a :class:`Cluster` and its node process."""

    def __init__(self, cluster: Cluster, i: int) -> None:
        self.cluster = cluster
        self.i = i
        self.name = f"h{i}"
        self.dir = cluster.base / self.name
        self.data_dir = self.dir / "node"
        self.app_dir = self.dir / "app"
        self.address = f"{cluster.net.addr(i)}:{PORT}"
        self.node_id: str | None = None
        self.listening_at: float | None = None
        """Wall time (``time.time()``) at which the node's last boot said it serves."""
        self.proc: subprocess.Popen[str] | None = None
        self.boots = 0
        self.work = cluster.work
        """Seconds of application work per message received (a slow receiver: a kill lands mid-stream)."""
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._next = 0
        self._lock = threading.Lock()
        self._stderr: IO[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "events.jsonl"

    # -- the process ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node process; :meth:`wait_listening` waits for it to serve."""
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"{self.name} is already running (pid {self.proc.pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = {**FAST, **self.cluster.settings}
        settings["bootstrap"] = list(self.cluster.bootstrap_for(self.i))
        argv = [
            sys.executable, "-m", "villagemesh.lab.agent",
            "--data-dir", str(self.data_dir), "--name", self.name,
            "--host", self.cluster.net.addr(self.i), "--port", str(PORT),
            "--record", str(self.app_dir), "--work", str(self.work), "--settings", json.dumps(settings),
        ]  # fmt: skip
        self._stderr = open(self.dir / "stderr.log", "a", encoding="utf-8")  # noqa: SIM115 - closed at reap
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = self.cluster.net.popen(
            self.i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env
        )
        self.boots += 1
        self._replies.clear()
        self._events = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name=f"lab-{self.name}", daemon=True)
        self._reader.start()

    def wait_listening(self, timeout: float = 60.0) -> str:
        """The node id, once the node serves."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise LabError(f"{self.name} did not listen within {timeout} s; stderr: {self.stderr_tail()}") from None
            if event.get("event") == "listen":
                if self.node_id is not None and event["node_id"] != self.node_id:
                    raise LabError(f"{self.name} came back as {event['node_id']}, was {self.node_id}")
                self.node_id = event["node_id"]
                return self.node_id
            if event.get("event") in ("failed", "exited"):
                raise LabError(f"{self.name} {event['event']} while starting; stderr: {self.stderr_tail()}")

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing): the protocol lines are JSON
            if msg.get("event") == "listen":
                self.listening_at = time.time()
            box = self._replies.get(msg["id"]) if "id" in msg else None
            (box if box is not None else self._events).put(msg)
        self._events.put({"event": "exited"})
        for box in list(self._replies.values()):
            box.put({"ok": False, "error": "the node process exited"})

    def stderr_tail(self, lines: int = 15) -> str:
        path = self.dir / "stderr.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """``kill -9`` the node process (the kernel closes its sockets: peers see RST)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its process group: anything it started dies too
        self._reap()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the node cleanly (SIGTERM), or kill it after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(30)
        if self._reader is not None:
            self._reader.join(10)  # it reads to the end of the output, then ends
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.proc = None

    # -- commands -------------------------------------------------------------------------------

    def call(self, op: str, timeout: float = REPLY_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send one command, wait for its reply; LabError if it failed or the node died."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise LabError(f"{self.name} is not running ({op})")
        with self._lock:
            self._next += 1
            ident = self._next
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[ident] = box
            try:
                proc.stdin.write(json.dumps({"id": ident, "op": op, **fields}) + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise LabError(f"{self.name} is gone ({op}): {exc}") from exc
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            raise LabError(f"{self.name} did not answer {op} within {timeout} s") from None
        finally:
            self._replies.pop(ident, None)
        if not reply.get("ok"):
            raise LabError(f"{self.name} {op} failed: {reply.get('error')}")
        return reply

    def send(self, to: str, count: int, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """``count`` numbered messages to node ``to``, stored durably when this returns."""
        return self.call("send", timeout=timeout, to=to, count=count)

    def peers(self) -> list[str]:
        return list(self.call("peers")["peers"])

    def status(self) -> dict[str, Any]:
        return dict(self.call("status")["status"])

    def lan_counters(self) -> dict[str, dict[str, int]]:
        """The LAN discovery actor's counters: ``beacon``, ``responder`` and ``exchange``."""
        reply = self.call("lan")
        return {part: dict(reply[part]) for part in ("beacon", "responder", "exchange")}

    def crash(self, actor: str, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """``Node.crash(actor)``, then wait until the node's log has that crash; its ``child_crashed`` event."""
        before = len(self.injected_crashes(actor))
        self.call("crash", actor=actor)
        deadline = time.monotonic() + timeout
        while True:
            crashes = self.injected_crashes(actor)
            if len(crashes) > before:
                return crashes[before]
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: the crash of {actor} is not in its log within {timeout} s")
            time.sleep(0.02)

    def injected_crashes(self, actor: str) -> list[dict[str, Any]]:
        """The ``child_crashed`` events of ``actor`` that ``Node.crash`` caused (``CrashInjected``), every boot."""
        return [
            e
            for e in self.events()
            if e["event"] == "child_crashed" and e.get("child_id") == actor and e.get("exc_type") == "CrashInjected"
        ]

    def received(self) -> dict[str, Any]:
        return self.call("received")

    # -- the files (readable while the node runs or after it died) ------------------------------

    def lines(self, name: str) -> list[str]:
        path = self.app_dir / name
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def events(self) -> list[dict[str, Any]]:
        """The node's event log (structlog JSON lines, every boot), complete lines only."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        out = []
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by kill -9 (and a later boot's line after it)
        return out


class Cluster:
    """``n`` lab hosts, each with a node process. Always torn down by ``with`` (or :meth:`down`).

    ``lan=True`` turns on the nodes' multicast beacons; ``bootstrap`` says whom each host
    probes: ``"first"`` (host 1, default: the rest is peer exchange), ``"none"`` or ``"all"``.
    ``work``: seconds each host's application spends on a message. ``switch="tap"``: the
    user-space switch (delay and loss, see :meth:`NetLab.set_link`), ``seed`` its random draws.
    ``bitchat=True`` gives every host a BitChat radio on one shared air (:mod:`villagemesh.lab.air`:
    all in range, a cut cable leaves the radio on; :meth:`jam` puts a host's radio out of range).
    Other keyword arguments are node settings (:class:`~villagemesh.node.NodeConfig` fields).
    """

    def __init__(
        self,
        n: int,
        base: Path,
        *,
        lan: bool = False,
        bootstrap: str = "first",
        switch: str = "bridge",
        seed: int | None = None,
        work: float = 0.0,
        bitchat: bool = False,
        **settings: Any,
    ) -> None:
        if bootstrap not in ("first", "none", "all"):
            raise LabError(f"bootstrap must be 'first', 'none' or 'all', got {bootstrap!r}")
        self.net = NetLab(n, switch=switch, seed=seed)
        self.base = Path(base)
        self.bootstrap = bootstrap
        self.work = work
        self.settings = {"lan": lan, **settings}
        self._radio_ids: dict[int, bytes] = {}
        self.air: Path | None = None
        """The hosts' shared radio medium (``bitchat=True``: :mod:`villagemesh.lab.air`), else None."""
        if bitchat:
            self.air = self.base / "air"
            self.settings["bitchat_air"] = str(self.air)
        self.hosts = {i: LabHost(self, i) for i in self.net.hosts}

    def __getitem__(self, i: int) -> LabHost:
        return self.hosts[i]

    def __iter__(self) -> Any:
        return iter(self.hosts.values())

    def bootstrap_for(self, i: int) -> Iterable[str]:
        if self.bootstrap == "none":
            return []
        if self.bootstrap == "all":
            return [h.address for h in self if h.i != i]
        return [] if i == 1 else [self.hosts[1].address]

    # -- lifecycle ------------------------------------------------------------------------------

    def up(self, start: bool = True) -> Cluster:
        self.net.up()
        try:
            if start:
                self.start(self.hosts)
        except BaseException:
            self.down()
            raise
        return self

    def start(self, hosts: Iterable[int]) -> None:
        """Start the node processes of ``hosts`` and wait until each serves."""
        chosen = list(hosts)
        for i in chosen:
            self.hosts[i].start()
        for i in chosen:
            self.hosts[i].wait_listening()

    def down(self) -> None:
        for host in self:
            if host.proc is not None:
                host.kill9()
        self.net.down()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- faults ---------------------------------------------------------------------------------

    def cut(self, *hosts: int) -> None:
        """Unplug the cables of ``hosts``, all in one step."""
        self.net.cut(*hosts)

    def restore(self, *hosts: int) -> None:
        """Plug the cables of ``hosts`` back in, all in one step."""
        self.net.restore(*hosts)

    def jam(self, i: int) -> None:
        """Host ``i``'s radio out of everyone's range (``bitchat=True``; the host must be up, to name its radio)."""
        air = self._need_air()
        peer = self._radio_ids.get(i)
        if peer is None:
            peer = self._radio_ids[i] = bytes.fromhex(self[i].status()["bitchat"]["peer_id"])
        jam(air, peer)

    def unjam(self, i: int) -> None:
        """Host ``i``'s radio back in range (up or down: its radio's id is the one :meth:`jam` learnt)."""
        air = self._need_air()
        peer = self._radio_ids.get(i)
        if peer is not None:
            unjam(air, peer)

    def unjam_all(self) -> None:
        """Every radio back in range."""
        for i in self._radio_ids:
            self.unjam(i)

    def _need_air(self) -> Path:
        if self.air is None:
            raise LabError("the hosts have no radio: make the Cluster with bitchat=True")
        return self.air

    def partition(self, *groups: Iterable[int]) -> None:
        self.net.partition(*groups)

    def heal(self) -> None:
        self.net.heal()

    def kill9(self, i: int) -> None:
        self.hosts[i].kill9()

    def boot(self, i: int) -> str:
        """Start host ``i``'s node again on its data dir; its node id (the same as before)."""
        self.hosts[i].start()
        return self.hosts[i].wait_listening()

    def power_cycle(self, i: int) -> str:
        """Host ``i`` loses power (cable out, kill -9, namespace gone) and boots again."""
        self.net.power_off(i)
        self.hosts[i].kill9()
        self.net.power_on(i)
        return self.boot(i)

    # -- waiting and checking -------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``predicate()`` held; LabError naming ``what`` after ``timeout``."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise LabError(f"{what}: not within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - start

    def converged(self, hosts: Iterable[int] | None = None) -> bool:
        """Every host of ``hosts`` (default all) knows every other one of them."""
        chosen = [self.hosts[i] for i in (hosts if hosts is not None else self.hosts)]
        ids = {h.node_id for h in chosen}
        return all(ids - {h.node_id} <= set(h.peers()) for h in chosen)

    def wait_converged(self, timeout: float = 60.0, hosts: Iterable[int] | None = None) -> float:
        chosen = list(hosts) if hosts is not None else None
        return self.wait_until(lambda: self.converged(chosen), timeout, "discovery convergence")

    def expected(self) -> dict[int, dict[str, tuple[set[int], set[int]]]]:
        """Per receiving host, per sender name: (seqs surely stored, seqs maybe stored).

        Read from every sender's ``sent`` and ``intent`` files: a batch with a ``sent`` line was
        stored; one with only an intent line was cut short by a kill (maybe stored, in part).
        """
        by_id = {h.node_id: h.i for h in self}
        out: dict[int, dict[str, tuple[set[int], set[int]]]] = {i: {} for i in self.hosts}
        for host in self:
            for file, slot in (("sent", 0), ("intent", 1)):
                for line in host.lines(file):
                    to, first, last = line.split()
                    sure, maybe = out[by_id[to]].setdefault(host.name, (set(), set()))
                    (sure if slot == 0 else maybe).update(range(int(first), int(last) + 1))
        return out

    def unsent(self) -> dict[str, list[str]]:
        """Per host, the batches it meant to send and has not recorded as stored (``intent`` lines with no
        ``sent`` line): a running agent sends such a batch again at its start, so none should stay."""
        out: dict[str, list[str]] = {}
        for host in self:
            batches = sorted(unsent_lines(host.lines("intent"), host.lines("sent")))
            if batches:
                out[host.name] = batches
        return out

    def delivery_report(self) -> dict[str, Any]:
        """What is missing, duplicated or out of order, per receiving host (empty lists: all well)."""
        missing: dict[str, list[str]] = {}
        duplicated: dict[str, list[str]] = {}
        unexpected: dict[str, list[str]] = {}
        disorder: dict[str, list[str]] = {}
        for i, senders in self.expected().items():
            host = self.hosts[i]
            counts = Counter(host.lines("received"))
            dups = sorted(p for p, n in counts.items() if n > 1)
            if dups:
                duplicated[host.name] = dups
            got: dict[str, set[int]] = {}
            for payload in counts:
                sender, seq = payload.rsplit(":", 1)
                got.setdefault(sender, set()).add(int(seq))
            for sender, seqs in got.items():
                sure, maybe = senders.get(sender, (set(), set()))
                extra = seqs - sure - maybe
                if extra:
                    unexpected.setdefault(host.name, []).extend(f"{sender}:{s}" for s in sorted(extra)[:10])
            for sender, (sure, _) in senders.items():
                lost = sure - got.get(sender, set())
                if lost:
                    missing.setdefault(host.name, []).extend(f"{sender}:{s}" for s in sorted(lost)[:10])
            ordered: dict[str, list[int]] = {}
            for line in host.lines("ordered"):
                sender, seq = line.rsplit(":", 1)
                ordered.setdefault(sender, []).append(int(seq))
            for sender, (sure, _) in senders.items():
                released = ordered.get(sender, [])
                if released != list(range(len(released))) or (sure and len(released) <= max(sure)):
                    disorder.setdefault(host.name, []).append(f"{sender}: released {len(released)}")
        return {"missing": missing, "duplicated": duplicated, "unexpected": unexpected, "disorder": disorder}

    def all_delivered(self) -> bool:
        """Every message surely stored has been handled (duplicates or not: see :meth:`delivery_report`)."""
        return not self.delivery_report()["missing"]

    def wait_delivered(self, timeout: float = 60.0) -> float:
        try:
            return self.wait_until(self.all_delivered, timeout, "delivery of every stored message")
        except LabError as exc:
            raise LabError(f"{exc}; {self.delivery_report()}") from None

    def check_exactly_once(self) -> None:
        """LabError unless every stored message was handled exactly once and released in order."""
        report = self.delivery_report()
        if any(report.values()):
            raise LabError(f"delivery is not exactly once and in order: {report}")
