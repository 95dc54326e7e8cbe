"""A seeded chaos run: steady load while actors crash, node processes die and links go down.

::

    python -m villagemesh.lab.chaos [--seed S] [--hosts 6] [--duration 60] [--dir DIR]

Prints the seed first: ``--seed S`` replays the same schedule of faults (which fault, where,
when, for how long: every choice comes from one ``random.Random(seed)``; the timing of the
nodes themselves is the machine's). Under load (every host sends a batch to a random other
host every :data:`LOAD_EVERY` seconds) it injects, one every :data:`FAULT_EVERY` seconds or so:

- ``crash``: ``Node.crash(actor)`` of a random leaf actor of a random running host; the run waits
  for that host's ``child_crashed`` (exc_type ``CrashInjected``) before going on;
- ``kill``: ``kill -9`` of a random host's node process, booted again on its data dir 0.5-2 s later;
- ``cut``: a random host's cable out for 0.5-3 s;
- ``partition``: the hosts split in two random groups for 1-3 s;
- ``jam``: a random host's radio out of range for 0.5-3 s (every host has a BitChat radio on the
  lab's air, :mod:`villagemesh.lab.air`, which a cut or a partition leaves on).

At the end every fault is undone, every host up, and the run waits until every message whose
``send`` returned has been handled; then it checks exactly once and in order
(:meth:`Cluster.check_exactly_once`), and that each host's supervision log (structlog JSON)
has one ``child_crashed`` and one ``child_restarted`` per injected crash of each actor, and one
start of the node per boot. Exit 0 if all holds, 1 otherwise (the report says what failed).

Faults land anywhere in the load, also in the middle of a host's ``send_many`` (one fault of a
host at a time, so that each crash is in its log before a kill can come): a crash of the retrier during
the ask is answered by the node handing the same envelopes over again, and a kill during it by
the agent, which sends the batch again with the same message ids when the host is booted
(:mod:`villagemesh.lab.agent`). So every message a host meant to send must arrive, and no batch may
be left unrecorded as stored at the end (:meth:`Cluster.unsent`). A ``send`` command a kill cut
short is not an error of the run; any other failed command is.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from villagemesh.errors import LabError
from villagemesh.lab.cluster import Cluster

__all__ = ["ACTORS", "ChaosReport", "main", "run"]

ACTORS = (
    "registry", "retrier", "app", "keeper", "libp2p", "bitchat", "websocket", "betanet", "acceptor", "lan", "sweeper",
)  # fmt: skip
"""The leaf actors of a lab node with BetaNet and BitChat on (the supervisors are not crashed: their children are)."""

LOAD_EVERY = 0.25
"""Seconds between two batches of one host."""
BATCH = 5
FAULT_EVERY = 0.7
"""Mean seconds between two faults (exponential gaps)."""
WEIGHTS = {"crash": 6, "kill": 1, "cut": 2, "partition": 1, "jam": 1}
ACCOUNT_TIMEOUT = 15.0
"""Seconds an injected crash has to show in the log."""


@dataclass
class ChaosReport:
    seed: int
    hosts: int
    duration: float
    faults: Counter[str] = field(default_factory=Counter)
    crashes: Counter[tuple[int, str]] = field(default_factory=Counter)
    boots: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    handled: int = 0
    redelivered: int = 0
    resent: int = 0
    """Batches a kill cut short in ``send``, sent again (same ids) when their host came back."""
    settle_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "hosts": self.hosts,
            "duration_s": self.duration,
            "faults": dict(self.faults),
            "crashes": sum(self.crashes.values()),
            "kills": sum(self.boots.values()),
            "sent": self.sent,
            "handled": self.handled,
            "redelivered": self.redelivered,
            "resent_batches": self.resent,
            "settle_s": round(self.settle_s, 2),
            "ok": self.ok,
            "problems": self.problems,
        }


class _Chaos:
    def __init__(self, lab: Cluster, rng: random.Random, report: ChaosReport, say: Callable[[str], None]) -> None:
        self.lab, self.rng, self.report, self.say = lab, rng, report, say
        self.locks = {i: threading.Lock() for i in lab.hosts}
        """One fault of a host at a time (a kill holds it until the host is booted again); the load takes none."""
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.pending: list[threading.Thread] = []
        """Kills waiting to reboot their host, cuts waiting to be restored."""
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.2f}s] {text}")

    # -- load -----------------------------------------------------------------------------------

    def load(self, i: int) -> None:
        rng = random.Random(self.report.seed * 1000 + i)  # its own stream: the fault schedule stays the seed's
        others = [j for j in self.lab.hosts if j != i]
        while not self.stop.wait(LOAD_EVERY):
            to = self.lab[rng.choice(others)]
            host = self.lab[i]
            boots = host.boots
            if not host.running or to.node_id is None:
                continue
            try:
                host.send(to.node_id, BATCH)
            except LabError as exc:
                if host.boots == boots and host.running:  # not cut short by a kill
                    self.errors.append(f"h{i} send: {exc}")

    # -- faults ---------------------------------------------------------------------------------

    def fault(self) -> None:
        kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        i = self.rng.choice(list(self.lab.hosts))
        self.report.faults[kind] += 1
        if kind == "crash":
            self.crash(i, self.rng.choice(ACTORS))
        elif kind == "kill":
            self._later(threading.Thread(target=self.kill, args=(i, self.rng.uniform(0.5, 2.0))))
        elif kind == "jam":
            if self._jam(i):
                self.log(f"jam h{i}")
                self._later(threading.Timer(self.rng.uniform(0.5, 3.0), self._unjam, args=(i,)))
        elif kind == "cut":
            self.lab.cut(i)
            self.log(f"cut h{i}")
            self._later(threading.Timer(self.rng.uniform(0.5, 3.0), self._restore, args=(i,)))
        else:
            hosts = list(self.lab.hosts)
            self.rng.shuffle(hosts)
            k = self.rng.randint(1, len(hosts) - 1)
            self.lab.partition(hosts[:k], hosts[k:])
            self.log(f"partition {sorted(hosts[:k])} | {sorted(hosts[k:])}")
            self.stop.wait(self.rng.uniform(1.0, 3.0))
            self.lab.heal()
            self.log("heal")

    def _later(self, thread: threading.Thread) -> None:
        self.pending = [t for t in self.pending if t.is_alive()]
        self.pending.append(thread)
        thread.start()

    def _jam(self, i: int) -> bool:
        """Jam host ``i``'s radio (the node names its radio: a host that is down is left be)."""
        with self.locks[i]:
            if not self.lab[i].running:
                return False
            try:
                self.lab.jam(i)
            except LabError as exc:
                self.errors.append(f"h{i} jam: {exc}")
                return False
            return True

    def _unjam(self, i: int) -> None:
        self.lab.unjam(i)
        self.log(f"unjam h{i}")

    def _restore(self, i: int) -> None:
        self.lab.restore(i)
        self.log(f"restore h{i}")

    def crash(self, i: int, actor: str) -> None:
        with self.locks[i]:  # not during a kill of the same host: each crash must show in its log
            host = self.lab[i]
            if not host.running:
                return
            try:
                host.crash(actor, timeout=ACCOUNT_TIMEOUT)
            except LabError as exc:
                self.errors.append(f"h{i} crash {actor}: {exc}")
            else:
                self.report.crashes[(i, actor)] += 1
                self.log(f"crash h{i} {actor}")

    def kill(self, i: int, down_for: float) -> None:
        with self.locks[i]:
            host = self.lab[i]
            if not host.running:
                return
            host.kill9()
            self.report.boots[i] += 1
            self.log(f"kill -9 h{i} (down {down_for:.1f} s)")
            time.sleep(down_for)
            try:
                self.lab.boot(i)
            except LabError as exc:
                self.errors.append(f"h{i} reboot: {exc}")
                return
            self.log(f"booted h{i}")


def run(
    seed: int, hosts: int, duration: float, base: Path, say: Callable[[str], None] = print, **settings: Any
) -> ChaosReport:
    """One chaos run of ``duration`` seconds on ``hosts`` hosts under ``base``; the report says what held."""
    report = ChaosReport(seed, hosts, duration)
    say(f"chaos seed {seed} ({hosts} hosts, {duration:.0f} s; replay with --seed {seed})")
    rng = random.Random(seed)
    with Cluster(hosts, base, lan=True, bootstrap="first", betanet=True, bitchat=True, **settings) as lab:
        lab.wait_converged(timeout=60)
        chaos = _Chaos(lab, rng, report, say)
        loaders = [threading.Thread(target=chaos.load, args=(i,), name=f"chaos-load-h{i}") for i in lab.hosts]
        for t in loaders:
            t.start()
        end = time.monotonic() + duration
        try:
            while time.monotonic() < end:
                chaos.stop.wait(min(rng.expovariate(1 / FAULT_EVERY), max(0.0, end - time.monotonic())))
                if time.monotonic() < end:
                    chaos.fault()
        finally:
            chaos.stop.set()
            for t in loaders + chaos.pending:
                t.join(60)
        lab.heal()
        lab.unjam_all()
        for i in lab.hosts:
            lab.restore(i)
            with chaos.locks[i]:
                if not lab[i].running:
                    lab.boot(i)
        chaos.log("every fault undone; waiting for every message")
        try:
            report.settle_s = lab.wait_until(lambda: not lab.unsent(), 60, "every cut-short batch sent again")
            report.settle_s += lab.wait_delivered(timeout=180)
        except LabError as exc:
            report.problems.append(str(exc))
        report.problems.extend(chaos.errors)
        check(lab, report)
    return report


def check(lab: Cluster, report: ChaosReport) -> None:
    """Exactly once and in order, and the log accounts for every crash and every boot."""
    delivery = lab.delivery_report()
    if any(delivery.values()):
        report.problems.append(f"delivery: {delivery}")
    unsent = lab.unsent()
    if unsent:
        report.problems.append(f"batches meant to be sent and never recorded as stored: {unsent}")
    expected = lab.expected()
    report.sent = sum(len(sure) for per in expected.values() for sure, _ in per.values())
    for host in lab:
        report.handled += len(host.lines("received"))
        report.redelivered += len(host.lines("redelivered"))
        report.resent += len(host.lines("resent"))
        events = host.events()
        for actor in ACTORS:
            injected = report.crashes[(host.i, actor)]
            crashed = len(host.injected_crashes(actor))
            restarted = [e for e in events if e["event"] == "child_restarted" and e.get("child_id") == actor]
            if crashed != injected:
                report.problems.append(f"{host.name}: {injected} crash(es) of {actor} injected, {crashed} logged")
            if injected and len(restarted) < injected:
                report.problems.append(f"{host.name}: {injected} crash(es) of {actor}, {len(restarted)} restart(s)")
        starts = sum(1 for e in events if e["event"] == "node_started")
        if starts != 1 + report.boots[host.i]:
            report.problems.append(f"{host.name}: {1 + report.boots[host.i]} boots, {starts} node_started logged")
        escalated = [e for e in events if e["event"] in ("restart_intensity_exceeded", "supervisor_escalated")]
        if escalated:
            report.problems.append(f"{host.name}: {len(escalated)} escalation(s): {escalated[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a new random seed)")
    parser.add_argument("--hosts", type=int, default=6)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the hosts keep their files (default: temp)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    base = args.dir or Path(tempfile.mkdtemp(prefix="villagemesh-chaos-"))
    report = run(seed, args.hosts, args.duration, base, say=lambda s: print(s, flush=True))
    print(json.dumps({"chaos": report.summary(), "dir": str(base)}), flush=True)
    if not report.ok:
        print(f"chaos seed {seed} FAILED: replay with --seed {seed}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
