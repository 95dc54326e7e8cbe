"""A user-space L2 switch over TAP devices: per-link delay, jitter, loss and cuts (this kernel has no netem).

Each host's ``eth0`` is a TAP device whose file descriptor this process holds; a thread with
an asyncio loop reads every frame and forwards it (learning MACs, flooding broadcast and
multicast) through a :class:`Link` per directed pair of hosts::

    host a eth0 ─▶ fd a ─▶ link (a, b): up? lose it? ─▶ call_later(delay ± jitter) ─▶ fd b ─▶ host b eth0

Jitter may reorder frames (as netem does). If this process dies the TAPs vanish with it.
The random draws come from one ``random.Random(seed)``: the loss pattern of a run replays
for the same frames in the same order. About 90 MB/s on this machine: plenty for protocol
tests, not for throughput benchmarks (use the kernel bridge there).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from villagemesh.errors import LabError

__all__ = ["Link", "TapSwitch"]

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
DRAIN = 64
"""Frames read from one TAP per wake-up at most (the others get their turn)."""
CONTROL_TIMEOUT = 5.0
"""Seconds a control call waits for the switch thread to apply it."""


@dataclass
class Link:
    """One direction between two hosts."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    up: bool = True


class TapSwitch:
    """The switch for ``hosts`` (host number -> namespace); TAP names start with ``prefix``."""

    def __init__(self, hosts: Mapping[int, str], prefix: str, *, seed: int | None = None) -> None:
        self.hosts = dict(hosts)
        self.prefix = prefix
        self.fds: dict[int, int] = {}
        self.macs: dict[bytes, int] = {}
        self.links = {(a, b): Link() for a in self.hosts for b in self.hosts if a != b}
        self.rng = random.Random(seed)
        self.stats = {"forwarded": 0, "lost": 0, "cut": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, host_lines: Callable[[int], list[str]]) -> None:
        """Make each host's TAP, move it into the host as ``eth0``, configure it, start switching."""
        from villagemesh.lab.netns import _batch

        for i, ns in self.hosts.items():
            name = f"{self.prefix}-t{i}"
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
            except OSError as exc:
                os.close(fd)
                raise LabError(f"TAP {name} could not be made: {exc}") from exc
            self.fds[i] = fd
            _batch([f"link set {name} netns {ns}"])
            _batch([f"link set {name} name eth0", *host_lines(i)], ns=ns)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"{self.prefix}-tapswitch", daemon=True)
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT):
            raise LabError("the tap switch's loop did not start")

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        for port, fd in self.fds.items():
            loop.add_reader(fd, self._on_frames, port)
        ready.set()
        try:
            loop.run_forever()
        finally:
            for fd in self.fds.values():
                loop.remove_reader(fd)
            loop.close()

    def stop(self) -> None:
        """Stop switching and close the TAPs (non-persistent TAPs are deleted when closed)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
            self._loop = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- the data path (the switch thread) -------------------------------------------------------

    def _on_frames(self, src: int) -> None:
        for _ in range(DRAIN):
            try:
                frame = os.read(self.fds[src], 65536)
            except (BlockingIOError, KeyError):
                return
            except OSError:
                return  # the host's namespace went away: nothing more to read
            if len(frame) < 14:
                continue
            self.macs[frame[6:12]] = src
            dst = None if frame[0] & 1 else self.macs.get(frame[0:6])  # group bit: flood
            for target in [dst] if dst is not None else [p for p in self.fds if p != src]:
                self._forward(src, target, frame)

    def _forward(self, src: int, dst: int, frame: bytes) -> None:
        link = self.links[(src, dst)]
        if not link.up:
            self.stats["cut"] += 1
            return
        if link.loss and self.rng.random() < link.loss:
            self.stats["lost"] += 1
            return
        self.stats["forwarded"] += 1
        delay = link.delay + (self.rng.uniform(-link.jitter, link.jitter) if link.jitter else 0.0)
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, self._write, dst, frame)
        else:
            self._write(dst, frame)

    def _write(self, dst: int, frame: bytes) -> None:
        fd = self.fds.get(dst)
        if fd is None:
            return
        try:
            os.write(fd, frame)
        except OSError:
            self.stats["cut"] += 1  # the host's eth0 is down or its queue full: a lost frame, as on a wire

    # -- control (any thread) --------------------------------------------------------------------

    def _apply(self, change: Callable[[], None]) -> None:
        if self._loop is None:
            raise LabError("the tap switch is not running")
        done = threading.Event()

        def run() -> None:
            change()
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(CONTROL_TIMEOUT):
            raise LabError("the tap switch did not apply a change")

    def set_link(self, a: int, b: int, *, delay: float, jitter: float, loss: float) -> None:
        def change() -> None:
            for key in ((a, b), (b, a)):
                link = self.links[key]
                link.delay, link.jitter, link.loss = delay, jitter, loss

        self._apply(change)

    def partition(self, *groups: Iterable[int]) -> None:
        where = {i: g for g, hosts in enumerate(groups) for i in hosts}

        def change() -> None:
            for (a, b), link in self.links.items():
                link.up = where.get(a, -1) == where.get(b, -1)

        self._apply(change)

    def isolate(self, *hosts: int) -> None:
        self._set_hosts(set(hosts), up=False)

    def rejoin(self, *hosts: int) -> None:
        self._set_hosts(set(hosts), up=True)

    def _set_hosts(self, hosts: set[int], *, up: bool) -> None:
        def change() -> None:
            for (a, b), link in self.links.items():
                if a in hosts or b in hosts:
                    link.up = up

        self._apply(change)

    def heal(self) -> None:
        def change() -> None:
            for link in self.links.values():
                link.up = True

        self._apply(change)
