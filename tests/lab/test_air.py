"""The lab's radio (``villagemesh.lab.air``): links between processes' radios over Unix datagram sockets."""

from __future__ import annotations

import queue
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import WAIT
from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.lab.air import MTU, SocketRadio, jam, unjam

A, B, C = b"\xaa" * 8, b"\xbb" * 8, b"\xcc" * 8


class Ear:
    """A radio's handler: its events, in order."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()

    def __call__(self, event: object) -> None:
        self.events.put(event)

    def next(self, kind: type) -> object:
        """The next event of ``kind`` (others before it are skipped)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            event = self.events.get(timeout=WAIT)
            if isinstance(event, kind):
                return event
        raise AssertionError(f"no {kind.__name__} within {WAIT} s")


@pytest.fixture
def air(tmp_path: Path):
    radios: list[SocketRadio] = []

    def make(me: bytes) -> tuple[SocketRadio, Ear]:
        radio, ear = SocketRadio(tmp_path, me), Ear()
        radio.start(ear)
        radios.append(radio)
        return radio, ear

    yield make
    for radio in radios:
        radio.stop()


def test_two_radios_link_up_and_carry_frames_both_ways_in_order(air) -> None:
    a, ear_a = air(A)
    b, ear_b = air(B)
    assert ear_a.next(LinkUp) == LinkUp(B) and ear_b.next(LinkUp) == LinkUp(A)
    for i in range(50):  # more than the kernel's 10-datagram queue: the writer waits for room
        a.send(B, b"frame %d" % i)
    assert [ear_b.next(Frame) for _ in range(50)] == [Frame(A, b"frame %d" % i) for i in range(50)]
    b.send(A, b"x" * MTU)
    assert ear_a.next(Frame) == Frame(B, b"x" * MTU)
    assert a.frames_sent == 50 and b.frames_heard == 50


def test_a_jammed_radio_loses_its_links_and_gets_them_back_when_unjammed(air, tmp_path: Path) -> None:
    a, ear_a = air(A)
    _, ear_b = air(B)
    assert ear_a.next(LinkUp) == LinkUp(B) and ear_b.next(LinkUp) == LinkUp(A)
    jam(tmp_path, B)
    assert ear_a.next(LinkDown) == LinkDown(B) and ear_b.next(LinkDown) == LinkDown(A)
    with pytest.raises(ConnectError, match="no radio link to " + B.hex()):
        a.send(B, b"unheard")
    unjam(tmp_path, B)
    assert ear_a.next(LinkUp) == LinkUp(B) and ear_b.next(LinkUp) == LinkUp(A)
    a.send(B, b"heard")
    assert ear_b.next(Frame) == Frame(A, b"heard")


def test_a_stopped_radio_goes_down_and_a_killed_ones_socket_file_links_nobody(air, tmp_path: Path) -> None:
    a, ear_a = air(A)
    b, _ = air(B)
    assert ear_a.next(LinkUp) == LinkUp(B)
    b.stop()
    assert ear_a.next(LinkDown) == LinkDown(B)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what a kill -9 leaves: a file nobody reads
    dead.bind(str(tmp_path / f"{C.hex()}.radio"))
    dead.close()
    time.sleep(0.5)  # several scans
    with pytest.raises(ConnectError):
        a.send(C, b"nobody")
    _, ear_c = air(C)  # booted again on the same path: the stale file is replaced
    assert ear_c.next(LinkUp) == LinkUp(A) and ear_a.next(LinkUp) == LinkUp(C)


def test_bad_peer_ids_and_oversized_frames_are_refused_by_name(air, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="8 bytes"):
        SocketRadio(tmp_path, b"short")
    a, ear_a = air(A)
    air(B)
    ear_a.next(LinkUp)
    with pytest.raises(ConfigError, match=f"exceeds the radio's MTU of {MTU}"):
        a.send(B, b"x" * (MTU + 1))
