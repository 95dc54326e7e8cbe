"""N hosts in network namespaces on one private L2 segment (iproute2 only).

Topology (nothing is made in the caller's namespace)::

    {P}-sw     namespace holding the bridge {P}-br0 and the switch ports {P}-v1..{P}-vN
    {P}-nsI    host I: eth0 = 10.77.0.(10+I)/16 with a fixed MAC, lo up, route 224.0.0.0/4 via eth0
               (without that route a multicast send fails with ENETUNREACH and a join with ENODEV)

The prefix ``P`` is ``vl<pid hex>x<n>``: unique per lab and per process, and it names the
process that owns the lab, so :func:`cleanup_leftovers` (run by every :meth:`NetLab.up`) removes
the namespaces of labs whose process is gone (a killed test run) and nothing else.

Faults, all at the switch so a host keeps its routes:

- :meth:`NetLab.cut` / :meth:`NetLab.restore`: unplug / plug a host's cable (the port goes
  down; the host sees NO-CARRIER, its sends vanish, TCP retransmits);
- :meth:`NetLab.partition` / :meth:`NetLab.heal`: disjoint groups, each on a bridge of its own
  (unicast, broadcast and multicast are all cut); unlisted hosts stay on ``br0``;
- :meth:`NetLab.power_off` / :meth:`NetLab.power_on`: unplug, SIGKILL everything in the host,
  delete its namespace (its kernel socket state dies), and build it again with the same MAC
  (else peers keep a stale ARP entry for 15-45 s).

Each host knows every other host's MAC from the start (permanent neighbour entries): the
kernel's ARP table is one for all namespaces, and its limit (``gc_thresh3``, 1024 entries)
made ARP fail between 50 hosts; permanent entries are not counted against it.

This kernel has no ``sch_netem``: delay, jitter and loss need the user-space switch
(:mod:`villagemesh.lab.tapswitch`, ``NetLab(..., switch="tap")``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from villagemesh.errors import LabError

__all__ = ["MAX_HOSTS", "NETNS_DIR", "NetLab", "can_make_namespaces", "cleanup_leftovers"]

MAX_HOSTS = 200
"""Hosts per lab at most: addresses 10.77.0.11 .. 10.77.0.210 (a bridge takes 1024 ports)."""

NETNS_DIR = Path("/run/netns")
"""Where ``ip netns`` keeps its namespace files."""

SUBNET = "10.77"
"""The lab's own /16: no address of it is used outside the lab's namespaces."""

_PREFIX = re.compile(r"^vl([0-9a-f]+)x[0-9a-z]-")
"""A lab's namespace name: ``vl<owner pid hex>x<lab number>-...``."""

_serial = itertools.count()


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)} could not run: {exc}") from exc
    if check and done.returncode:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _batch(lines: Iterable[str], ns: str | None = None) -> None:
    """Run ``ip`` commands in one process (``-n`` is not allowed per line, so one batch per namespace)."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    _run(argv, stdin="\n".join(lines) + "\n")


def _kill_namespace(name: str) -> None:
    """SIGKILL every process in namespace ``name``, then delete it (a process would keep it alive)."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces of labs whose owning process is gone; returns their names."""
    if not NETNS_DIR.is_dir():
        return []
    gone = []
    for entry in sorted(NETNS_DIR.iterdir()):
        match = _PREFIX.match(entry.name)
        if match and not _alive(int(match.group(1), 16)):
            _kill_namespace(entry.name)
            gone.append(entry.name)
    return gone


def can_make_namespaces() -> str | None:
    """None if this process can make network namespaces, else why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"vl{os.getpid():x}xp-probe"
    try:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` could not run: {exc}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    if done.returncode:
        return f"`ip netns add` failed (needs root or a user namespace): {done.stderr.strip()}"
    return None


class NetLab:
    """``n`` hosts on a private switch. ``with NetLab(5) as lab:`` builds and always removes it.

    ``switch="bridge"`` (default): a kernel bridge in a namespace of its own (fast; cut,
    partition, power off). ``switch="tap"``: each host's eth0 is a TAP held by a
    :class:`~villagemesh.lab.tapswitch.TapSwitch` in this process, which adds per-link delay,
    jitter and loss (and does cut and partition itself; no power off).
    """

    def __init__(self, n: int, *, switch: str = "bridge", seed: int | None = None) -> None:
        if not isinstance(n, int) or not 1 <= n <= MAX_HOSTS:
            raise LabError(f"a lab has 1..{MAX_HOSTS} hosts, got {n!r}")
        if switch not in ("bridge", "tap"):
            raise LabError(f"switch must be 'bridge' or 'tap', got {switch!r}")
        self.n = n
        self.kind = switch
        self.prefix = f"vl{os.getpid():x}x{'0123456789abcdefghijklmnopqrstuvwxyz'[next(_serial) % 36]}"
        self.sw = f"{self.prefix}-sw"
        self.br = f"{self.prefix}-br0"
        self.seed = seed
        self.tap: Any = None
        self._built = False

    # -- naming ----------------------------------------------------------------------------------

    @property
    def hosts(self) -> range:
        return range(1, self.n + 1)

    def ns(self, i: int) -> str:
        return f"{self.prefix}-ns{i}"

    def port(self, i: int) -> str:
        return f"{self.prefix}-v{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.0.{10 + i}"

    def mac(self, i: int) -> str:
        """Fixed per host: a rebooted host keeps its MAC, so its peers' ARP caches stay right."""
        return f"02:77:00:00:{i >> 8:02x}:{i & 255:02x}"

    def _host_lines(self, i: int) -> list[str]:
        return [
            "link set lo up",
            f"addr add {self.addr(i)}/16 brd {SUBNET}.255.255 dev eth0",
            "link set eth0 up",
            "route add 224.0.0.0/4 dev eth0",
            # Every other host's MAC, permanent: the kernel's ARP table is shared by all namespaces
            # and refuses new entries beyond gc_thresh3 (1024) in all: with 50 hosts (2,450 pairs)
            # a third of the connects failed ("neighbor table overflow!"). Permanent entries do not
            # count against that limit, and the MACs are fixed anyway.
            *(
                f"neigh replace {self.addr(j)} lladdr {self.mac(j)} dev eth0 nud permanent"
                for j in self.hosts
                if j != i
            ),
        ]

    def _veth(self, i: int) -> str:
        return (
            f"link add {self.port(i)} netns {self.sw} type veth peer name eth0 address {self.mac(i)} netns {self.ns(i)}"
        )

    # -- build / remove --------------------------------------------------------------------------

    def up(self) -> NetLab:
        cleanup_leftovers()
        try:
            if self.kind == "bridge":
                _batch([f"netns add {self.sw}", *(f"netns add {self.ns(i)}" for i in self.hosts)])
                _batch([self._veth(i) for i in self.hosts])
                _batch(
                    [
                        "link set lo up",
                        f"link add {self.br} type bridge mcast_snooping 0 stp_state 0",  # no querier: flood
                        f"link set {self.br} up",
                        *(f"link set {self.port(i)} master {self.br} up" for i in self.hosts),
                    ],
                    ns=self.sw,
                )
                for i in self.hosts:
                    _batch(self._host_lines(i), ns=self.ns(i))
            else:
                from villagemesh.lab.tapswitch import TapSwitch

                _batch([f"netns add {self.ns(i)}" for i in self.hosts])
                self.tap = TapSwitch({i: self.ns(i) for i in self.hosts}, self.prefix, seed=self.seed)
                self.tap.start(lambda i: [f"link set dev eth0 address {self.mac(i)}", *self._host_lines(i)])
            self._built = True
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process in the lab and delete its namespaces (idempotent)."""
        if self.tap is not None:
            self.tap.stop()
            self.tap = None
        for i in self.hosts:
            _kill_namespace(self.ns(i))
        if self.kind == "bridge":
            _kill_namespace(self.sw)
        self._built = False

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- running things --------------------------------------------------------------------------

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``i``."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("start_new_session", True)  # its own process group: a terminal's ^C is ours
        return subprocess.Popen(self.cmd(i, argv), **kw)

    def pids(self, i: int) -> list[int]:
        return [int(p) for p in _run(["ip", "netns", "pids", self.ns(i)], check=False).stdout.split()]

    # -- faults ----------------------------------------------------------------------------------

    def cut(self, *hosts: int) -> None:
        """Unplug the cables of ``hosts`` at the switch, all in one step (they keep their routes;
        sends vanish)."""
        if self.tap is not None:
            self.tap.isolate(*hosts)
            return
        _batch([f"link set {self.port(i)} down" for i in hosts], ns=self.sw)

    def restore(self, *hosts: int) -> None:
        """Plug the cables of ``hosts`` back in, all in one step (one ``ip -batch``: 50 hosts are
        plugged within milliseconds of each other, not one ``ip`` process apart)."""
        if self.tap is not None:
            self.tap.rejoin(*hosts)
            return
        _batch([f"link set {self.port(i)} up" for i in hosts], ns=self.sw)

    def partition(self, *groups: Iterable[int]) -> None:
        """Split the hosts into disjoint ``groups`` (unlisted hosts form one more group)."""
        members = [list(g) for g in groups]
        flat = [i for g in members for i in g]
        if len(flat) != len(set(flat)) or not set(flat) <= set(self.hosts):
            raise LabError(f"partition groups must be disjoint hosts of 1..{self.n}, got {members}")
        self.heal()
        if self.tap is not None:
            self.tap.partition(*members)
            return
        for g, hosts in enumerate(members, 1):
            br = f"{self.prefix}-br{g}"
            _batch(
                [f"link add {br} type bridge mcast_snooping 0 stp_state 0", f"link set {br} up"]
                + [f"link set {self.port(i)} master {br}" for i in hosts],
                ns=self.sw,
            )

    def heal(self) -> None:
        """Undo :meth:`partition`: every host on one switch again."""
        if self.tap is not None:
            self.tap.heal()
            return
        out = _run(["ip", "-n", self.sw, "-o", "link", "show", "type", "bridge"]).stdout
        bridges = [line.split(":")[1].strip() for line in out.splitlines()]
        extra = [b for b in bridges if b != self.br]
        _batch(
            [f"link set {self.port(i)} master {self.br}" for i in self.hosts] + [f"link del {b}" for b in extra],
            ns=self.sw,
        )

    def set_link(self, a: int, b: int, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0) -> None:
        """Delay (s), jitter (s) and loss (0..1) both ways between ``a`` and ``b``: the tap switch only."""
        if self.tap is None:
            raise LabError("delay and loss need NetLab(switch='tap'): this kernel has no netem")
        self.tap.set_link(a, b, delay=delay, jitter=jitter, loss=loss)

    def power_off(self, i: int) -> None:
        """Host ``i`` loses power: cable out first (no FIN/RST escapes), SIGKILL, namespace gone."""
        if self.tap is not None:
            raise LabError("power_off needs the bridge switch (a TAP dies with its namespace)")
        self.cut(i)
        _kill_namespace(self.ns(i))

    def power_on(self, i: int) -> None:
        """Host ``i`` boots: a fresh namespace with the same name, address and MAC, plugged in."""
        _run(["ip", "netns", "add", self.ns(i)])
        _run(["ip", "-n", self.sw, "link", "del", self.port(i)], check=False)
        _batch([self._veth(i)])
        _batch(self._host_lines(i), ns=self.ns(i))
        _batch([f"link set {self.port(i)} master {self.br} up"], ns=self.sw)
