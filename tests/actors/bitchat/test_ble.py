"""The BLE central radio: real bleak on a real (private) D-Bus system bus, against a fake bluetoothd.

python-dbusmock serves ``org.bluez`` from the project's own template (``bluez_gatt.py``
beside this file). What this shows: bleak's scanner finds a BitChat peer by the
service filter and its service data, connects, subscribes, writes without response
within the link's MTU, gets notifications, sees link loss and reconnects. What it
cannot show: RF behaviour and real bluetoothd quirks (see ../shared/research/ble.md).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbus
import dbusmock
import pytest
from dbusmock import SpawnedMock

from villagemesh.actors.bitchat.ble import CHARACTERISTIC_UUID, SERVICE_UUID, BleCentral
from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp
from villagemesh.errors import ConnectError

TEMPLATE = str(Path(__file__).with_name("bluez_gatt.py"))
PEER = bytes.fromhex("0102030405060708")
WAIT = 10.0


@pytest.fixture
def bluez(dbusmock_system: Any) -> Iterator[Any]:
    mock = SpawnedMock.spawn_with_template(TEMPLATE, bustype=dbusmock.BusType.SYSTEM)
    try:
        bus = dbus.SystemBus()
        root = dbus.Interface(
            bus.get_object("org.bluez", "/"), "org.bluez.Mock"
        )  # fresh proxy: after the template loaded
        root.AddAdapter("hci0", "villagemesh")
        yield root
    finally:
        mock.terminate()


def _peer(root: Any, mtu: int = 185) -> tuple[str, str]:
    device = root.AddLeDevice("hci0", "AA:BB:CC:DD:EE:01", [SERVICE_UUID], SERVICE_UUID, dbus.ByteArray(PEER))
    char = root.AddGattCharacteristic(
        device, SERVICE_UUID, CHARACTERISTIC_UUID, ["read", "write", "write-without-response", "notify"], mtu
    )
    return str(device), str(char)


def _next(events: queue.Queue[Any], kind: type, advertise: Any = None) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            if advertise is not None:
                advertise()  # bluetoothd reports a device again with each advertisement it hears
            continue
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {WAIT} s")


def test_the_central_finds_connects_writes_gets_notified_loses_and_regains_a_bitchat_peer(bluez: Any) -> None:
    device, char = _peer(bluez, mtu=185)
    events: queue.Queue[Any] = queue.Queue()
    radio = BleCentral(b"\xee" * 8)
    radio.start(events.put)
    try:
        advertise = lambda: bluez.AdvertiseDevice(device, -50)  # noqa: E731
        assert _next(events, LinkUp, advertise) == LinkUp(PEER)
        assert radio.mtu == 182  # MTU 185 - 3
        radio.send(PEER, b"hello over GATT")
        deadline = time.monotonic() + WAIT
        while not bluez.GetWrites(char) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [bytes(w) for w in bluez.GetWrites(char)] == [b"hello over GATT"]
        bluez.Notify(char, dbus.ByteArray(b"notified"))
        assert _next(events, Frame) == Frame(PEER, b"notified")
        bluez.DropConnection(device)
        assert _next(events, LinkDown) == LinkDown(PEER)
        with pytest.raises(ConnectError):
            radio.send(PEER, b"into the void")
        assert _next(events, LinkUp, advertise) == LinkUp(PEER)  # the next advertisement reconnects
    finally:
        radio.stop()
