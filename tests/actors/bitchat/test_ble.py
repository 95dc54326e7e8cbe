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


# ---------------------------------------------------------------------------- the scanner as its own child


@pytest.fixture
def process_runtime(runtime: Any) -> Iterator[Any]:
    from villagemesh.supervision.process import ProcessLauncher

    launcher = ProcessLauncher(preload=("villagemesh.actors.bitchat.scanner",))
    runtime.process_launcher = lambda: launcher
    yield runtime
    import pykka

    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    launcher.close()


def _links(runtime: Any) -> tuple[str, ...]:
    from villagemesh.actors.bitchat.messages import BitchatStatus, GetBitchatStatus

    status = runtime.bus.client().ask("bitchat", GetBitchatStatus(), timeout=WAIT)
    assert isinstance(status, BitchatStatus)
    return status.links


def _until_linked(runtime: Any, advertise: Any, linked: bool = True) -> None:
    deadline = time.monotonic() + WAIT
    while (PEER.hex() in _links(runtime)) is not linked:
        assert time.monotonic() < deadline, f"link to {PEER.hex()} never {'up' if linked else 'down'}"
        advertise()
        time.sleep(0.05)


def test_killing_the_scanner_process_restarts_it_alone_and_links_carry_on(
    bluez: Any, process_runtime: Any, recorder: Any
) -> None:
    import os
    import signal

    from villagemesh.actors.bitchat.actor import BitchatActor
    from villagemesh.actors.bitchat.scanner import ScannerActor
    from villagemesh.actors.core.secure.keys import NodeKeys
    from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
    from villagemesh.supervision.supervisor import Supervisor

    device, _ = _peer(bluez)
    keys = NodeKeys.generate()
    spec = SupervisorSpec(
        "transports",
        [
            ChildSpec("bitchat", BitchatActor, config={"keys": keys, "radio": lambda me: BleCentral(me, scan=False)}),
            ChildSpec(
                "bitchat-scanner",
                ScannerActor,
                isolation="process",
                config={"report_to": "bitchat", "min_interval": 0.1},
            ),
        ],
        intensity=10,
        period=10,
    )
    Supervisor.launch(spec, process_runtime)
    advertise = lambda: bluez.AdvertiseDevice(device, -50)  # noqa: E731
    _until_linked(process_runtime, advertise)
    first = recorder.wait_for("child_started", child_id="bitchat-scanner")[0]
    assert first["isolation"] == "process" and first["pid"] != os.getpid()
    os.kill(first["pid"], signal.SIGKILL)
    crashed = recorder.wait_for("child_crashed", child_id="bitchat-scanner")[0]
    assert "SIGKILL" in crashed["exc_message"]
    recorder.wait_for("child_restarted", child_id="bitchat-scanner")
    assert PEER.hex() in _links(process_runtime)  # the link outlived the scanner
    assert not recorder.matching("child_crashed", child_id="bitchat")
    bluez.DropConnection(device)  # now only the new scanner can bring the peer back
    _until_linked(process_runtime, lambda: None, linked=False)
    _until_linked(process_runtime, advertise)
    second = recorder.wait_for("child_started", child_id="bitchat-scanner", count=2)[1]
    assert second["pid"] != first["pid"]


def test_a_dropped_dbus_connection_restarts_the_scanner_alone_and_links_carry_on(
    bluez: Any, runtime: Any, recorder: Any
) -> None:
    """The bus drops the scanner's connection (as a restarting dbus-daemon would): the scanner alone restarts."""
    import socket

    import pykka

    from villagemesh.actors.bitchat.actor import BitchatActor
    from villagemesh.actors.bitchat.scanner import ScannerActor
    from villagemesh.actors.core.secure.keys import NodeKeys
    from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
    from villagemesh.supervision.supervisor import Supervisor

    device, _ = _peer(bluez)
    spec = SupervisorSpec(
        "transports",
        [
            ChildSpec(
                "bitchat",
                BitchatActor,
                config={"keys": NodeKeys.generate(), "radio": lambda me: BleCentral(me, scan=False)},
            ),
            ChildSpec("bitchat-scanner", ScannerActor, config={"report_to": "bitchat", "min_interval": 0.1}),
        ],
        intensity=10,
        period=10,
    )
    Supervisor.launch(spec, runtime)
    advertise = lambda: bluez.AdvertiseDevice(device, -50)  # noqa: E731
    _until_linked(runtime, advertise)
    (scanner,) = [ref.proxy()._actor for ref in pykka.ActorRegistry.get_by_class(ScannerActor)]
    scanner.io_loop.call_soon(scanner.bus._sock.shutdown, socket.SHUT_RDWR)  # the peer end of the socket is gone
    recorder.wait_for("bitchat_dbus_lost", adapter="hci0")
    crashed = recorder.wait_for("child_crashed", child_id="bitchat-scanner")[0]
    assert crashed["exc_type"] == "TransportError" and "D-Bus connection" in crashed["exc_message"]
    recorder.wait_for("child_restarted", child_id="bitchat-scanner")
    recorder.wait_for("bitchat_scanning", adapter="hci0", count=2)
    assert PEER.hex() in _links(runtime)  # the bitchat actor and its link never noticed
    assert not recorder.matching("child_crashed", child_id="bitchat")
    assert not recorder.matching("child_restarted", child_id="bitchat")
    bluez.DropConnection(device)  # only the new scanner, on a new connection, can bring the peer back
    _until_linked(runtime, lambda: None, linked=False)
    _until_linked(runtime, advertise)


def test_a_mesh_node_with_the_ble_radio_and_a_scanner_child_links_to_a_bitchat_peer(bluez: Any, tmp_path: Path) -> None:
    from villagemesh import create_network
    from villagemesh.errors import ConfigError
    from villagemesh.protocols.bitchat import MessageType, decode

    with pytest.raises(ConfigError, match="bitchat_scanner"):
        create_network("mesh", data_dir=tmp_path / "bad", bitchat_scanner="thread")
    device, char = _peer(bluez)
    node = create_network(
        "mesh",
        data_dir=tmp_path / "n",
        lan=False,
        bitchat_radio=lambda me: BleCentral(me, scan=False),
        bitchat_scanner="thread",
    ).start()
    try:
        deadline = time.monotonic() + WAIT
        while not bluez.GetWrites(char):  # linked once the node announces itself on the new link
            assert time.monotonic() < deadline, "the node never linked to the peer"
            bluez.AdvertiseDevice(device, -50)
            time.sleep(0.05)
        first = decode(bytes(bluez.GetWrites(char)[0]))
        assert first.type in (MessageType.ANNOUNCE, MessageType.FRAGMENT, MessageType.VILLAGEMESH_ANNOUNCE)
        (transports,) = [c for c in node.network_status()["actors"] if c["id"] == "transports"]
        assert {c["id"] for c in transports["children"]} >= {"bitchat", "bitchat-scanner"}
    finally:
        node.stop()


def test_the_peripheral_registers_its_gatt_server_and_advertisement_and_takes_writes(bluez: Any) -> None:
    from villagemesh.actors.bitchat.gatt import APP_PATH, CHAR_PATH, BlePeripheral
    from villagemesh.protocols.bitchat import Packet, encode

    bluez.AddGattManager("hci0")
    events: queue.Queue[Any] = queue.Queue()
    me = b"\x0a" * 8
    radio = BlePeripheral(me)
    radio.start(events.put)
    try:
        assert list(bluez.GetApplications("hci0")) == [APP_PATH]
        bus = dbus.SystemBus()
        adapter = bus.get_object("org.bluez", "/org/bluez/hci0")
        assert (
            adapter.Get("org.bluez.LEAdvertisingManager1", "ActiveInstances", dbus_interface=dbus.PROPERTIES_IFACE) == 1
        )
        assert radio._bus is not None
        app = bus.get_object(radio._bus.unique_name, APP_PATH)
        objects = app.GetManagedObjects(dbus_interface="org.freedesktop.DBus.ObjectManager")
        assert objects[CHAR_PATH]["org.bluez.GattCharacteristic1"]["UUID"] == CHARACTERISTIC_UUID
        char = dbus.Interface(bus.get_object(radio._bus.unique_name, CHAR_PATH), "org.bluez.GattCharacteristic1")
        hello = encode(Packet(type=1, sender_id=PEER, timestamp=1, payload=b"announce"))
        device = dbus.ObjectPath("/org/bluez/hci0/dev_AA_BB_CC_DD_EE_02")
        char.WriteValue(dbus.ByteArray(b"not a packet"), {"device": device})  # a device not named yet: dropped
        char.WriteValue(dbus.ByteArray(hello), {"device": device, "type": "command"})
        char.WriteValue(dbus.ByteArray(b"second"), {"device": device, "type": "command"})
        assert _next(events, LinkUp) == LinkUp(PEER)
        assert _next(events, Frame) == Frame(PEER, hello)
        assert _next(events, Frame) == Frame(PEER, b"second")
        assert radio.refused == 1
        radio.send(PEER, b"notify back")
        deadline = time.monotonic() + WAIT
        while bytes(char.ReadValue({})) != b"notify back":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(ConnectError):
            radio.send(b"\x0b" * 8, b"to a stranger")
    finally:
        radio.stop()


def test_one_radio_holds_both_roles_and_sends_on_whichever_reaches_the_peer(bluez: Any) -> None:
    from villagemesh.actors.bitchat.gatt import CHAR_PATH, BleRadio
    from villagemesh.protocols.bitchat import Packet, encode

    bluez.AddGattManager("hci0")
    device, char = _peer(bluez)
    events: queue.Queue[Any] = queue.Queue()
    radio = BleRadio(b"\x0c" * 8)
    radio.start(events.put)
    try:
        assert _next(events, LinkUp, lambda: bluez.AdvertiseDevice(device, -50)) == LinkUp(PEER)  # as central
        other = b"\x0d" * 8
        bus = dbus.SystemBus()
        assert radio.peripheral._bus is not None
        served = dbus.Interface(
            bus.get_object(radio.peripheral._bus.unique_name, CHAR_PATH), "org.bluez.GattCharacteristic1"
        )
        served.WriteValue(
            dbus.ByteArray(encode(Packet(type=1, sender_id=other, timestamp=1, payload=b"hi"))),
            {"device": dbus.ObjectPath("/org/bluez/hci0/dev_AA_BB_CC_DD_EE_03")},
        )
        assert _next(events, LinkUp) == LinkUp(other)  # as peripheral
        radio.send(PEER, b"by write")
        radio.send(other, b"by notification")
        deadline = time.monotonic() + WAIT
        while not bluez.GetWrites(char) or bytes(served.ReadValue({})) != b"by notification":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [bytes(w) for w in bluez.GetWrites(char)] == [b"by write"]
        assert radio.mtu == 182
        with pytest.raises(ConnectError):
            radio.send(b"\x0e" * 8, b"nobody")
    finally:
        radio.stop()


# ------------------------------------------------------------------- two nodes on the fake bluetoothd's radio


@pytest.fixture
def air(dbusmock_system: Any) -> Iterator[Any]:
    """One fake bluetoothd with two adapters, hci0 and hci1: two nodes of its virtual radio, out of range."""
    mock = SpawnedMock.spawn_with_template(TEMPLATE, bustype=dbusmock.BusType.SYSTEM)
    try:
        root = dbus.Interface(dbus.SystemBus().get_object("org.bluez", "/"), "org.bluez.Mock")
        for adapter in ("hci0", "hci1"):
            root.AddAdapter(adapter, f"villagemesh-{adapter}")
            root.AddGattManager(adapter)
        yield root
    finally:
        mock.terminate()


def _packet(sender: bytes, text: bytes) -> bytes:
    from villagemesh.protocols.bitchat import MessageType, Packet, encode

    return encode(Packet(type=MessageType.MESSAGE, sender_id=sender, timestamp=1, payload=text))


def _until(condition: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT} s"
        time.sleep(0.02)


class _Heard:
    """A radio's events, kept: a wait looks for one event among all that came (in any order)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.log: list[Any] = []

    def wait(self, event: Any) -> None:
        """Until ``event`` came (then forget it: the next wait for it waits for another)."""
        deadline = time.monotonic() + WAIT
        while event not in self.log:
            assert time.monotonic() < deadline, f"no {event} within {WAIT} s; heard {self.log}"
            try:
                self.log.append(self.queue.get(timeout=0.05))
            except queue.Empty:
                continue
        self.log.remove(event)


@pytest.mark.parametrize("b_scans", [True, False], ids=["both-dial", "only-a-dials"])
def test_two_ble_radios_find_each_other_and_exchange_bitchat_packets_through_bleak_and_dbus(
    air: Any, b_scans: bool
) -> None:
    """Node A (hci0) and node B (hci1), each a real BleRadio: bleak central plus dbus-fast GATT server.

    Out of range, nothing; in range, each hears the other's advertisement by the
    BitChat service and connects (or, with ``only-a-dials``, A connects and B
    answers by notification over A's link); packets go both ways; the link is
    lost and comes back, and packets flow again.
    """
    from villagemesh.actors.bitchat.gatt import BleRadio

    a_id, b_id = b"\xaa" * 8, b"\xbb" * 8
    heard_a, heard_b = _Heard(), _Heard()
    a, b = BleRadio(a_id, "hci0"), BleRadio(b_id, "hci1", scan=b_scans)
    a.start(heard_a.queue.put)
    b.start(heard_b.queue.put)
    try:
        time.sleep(0.3)  # three report periods out of range: nobody is heard
        assert heard_a.queue.empty() and heard_b.queue.empty()
        for round_ in (1, 2):
            air.SetLink("hci0", "hci1", True)
            heard_a.wait(LinkUp(b_id))  # A's central connected to B
            hello = _packet(a_id, b"hello from a, round %d" % round_)
            a.send(b_id, hello)
            heard_b.wait(Frame(a_id, hello))  # through B's GATT server
            heard_b.wait(LinkUp(a_id))  # B's GATT server named A by its first packet
            if b_scans:  # and B's central heard A too, and rode the same LE link
                _until(lambda: a_id in b.central._links)
            else:
                assert not b.central._links
            answer = _packet(b_id, b"hello from b, round %d" % round_)
            b.send(a_id, answer)  # a write on B's central link, or else a notification on A's
            heard_a.wait(Frame(b_id, answer))
            assert a.central.mtu == 514  # the link's 517 - 3
            air.SetLink("hci0", "hci1", False)  # link loss
            heard_a.wait(LinkDown(b_id))
            if b_scans:
                heard_b.wait(LinkDown(a_id))
            with pytest.raises(ConnectError):
                a.central.send(b_id, hello)
    finally:
        a.stop()
        b.stop()


def test_two_bitchat_transport_actors_deliver_a_villagemesh_envelope_over_bleak_and_dbus(
    air: Any, runtime: Any
) -> None:
    """The transport actors of two nodes, each on a BleRadio of its own adapter: an envelope and its reply."""
    from tests.actors.bitchat.test_actor import node, wait_links
    from tests.actors.transport_contract import envelope, next_of
    from villagemesh.actors.bitchat.gatt import BleRadio
    from villagemesh.actors.core.secure.keys import NodeKeys
    from villagemesh.actors.core.transport import REPLY_ADDRESS, Received, Transmit, TransmitResult
    from villagemesh.protocols.envelope import decode_message, encode_message

    a, b = (
        node(runtime, lambda me, adapter=adapter: BleRadio(me, adapter), f"-{name}", NodeKeys.generate())
        for name, adapter in (("a", "hci0"), ("b", "hci1"))
    )
    client = runtime.bus.client()
    for round_ in (1, 2):
        air.SetLink("hci0", "hci1", True)
        wait_links(runtime, "bitchat-a", 1)
        wait_links(runtime, "bitchat-b", 1)
        msg = envelope(a.keys, b"over BLE, round %d" % round_)
        client.tell(a.actor, Transmit(msg.id, b.keys.node_id, b.address, encode_message(msg), a.sink))
        assert next_of(a.inbox, TransmitResult).ok
        received = next_of(b.inbox, Received)
        assert received.remote == a.keys.node_id and decode_message(received.envelope) == msg
        back = envelope(b.keys, b"and back")
        client.tell(b.actor, Transmit(back.id, a.keys.node_id, REPLY_ADDRESS, encode_message(back), b.sink))
        assert next_of(b.inbox, TransmitResult).ok
        assert decode_message(next_of(a.inbox, Received).envelope) == back
        air.SetLink("hci0", "hci1", False)
        _until(lambda: not _links_of(runtime, "bitchat-a") and not _links_of(runtime, "bitchat-b"))


def _links_of(runtime: Any, name: str) -> tuple[str, ...]:
    from tests.actors.bitchat.test_actor import status

    return status(runtime, name).links


# ---------------------------------------------------------------------------- the scanner inside a whole node


@pytest.mark.slow
def test_kill_9_of_a_nodes_scanner_restarts_it_alone_while_the_other_transports_keep_delivering(
    bluez: Any, tmp_path: Path
) -> None:
    """A mesh-mode node on the BLE radio with its scanner in a process of its own, sending to a peer over IP.

    The scanner is SIGKILLed while 200 messages are on their way to a node that has no radio (so they ride
    libp2p or websocket): every one arrives once, the node's supervision log records the scanner's crash and
    restart and no other restart, and the new scanner brings the BitChat peer back after its link drops.
    """
    import os
    import signal

    from tests.integration._nodes import PATIENCE, EventFile, Inbox, free_port, make_node, running, wait_until

    device, _ = _peer(bluez)
    port = free_port()
    receiver = make_node(tmp_path / "b", "b", mode="mesh", port=port)
    sender = make_node(
        tmp_path / "a",
        "a",
        mode="mesh",
        bootstrap=[f"127.0.0.1:{port}"],
        bitchat_radio=lambda me: BleCentral(me, scan=False),
        bitchat_scanner="process",
    )
    inbox = Inbox()
    receiver.subscribe("*", inbox)
    advertise = lambda: bluez.AdvertiseDevice(device, -50)  # noqa: E731

    def linked() -> bool:
        advertise()
        return PEER.hex() in sender.network_status()["bitchat"]["links"]

    with running([receiver, sender]):
        assert sender.wait_for_peers(1, PATIENCE), "the sender never learnt the receiver"
        assert wait_until(linked), "the BLE link to the BitChat peer never came up"
        log = EventFile(sender.log_path)
        [started] = log.wait_for("child_started", child_id="bitchat-scanner")
        assert started["isolation"] == "process" and started["pid"] != os.getpid()
        handles = [sender.send(receiver.node_id, f"s{i}".encode()) for i in range(100)]
        assert wait_until(lambda: len(inbox.distinct()) >= 10)
        os.kill(int(started["pid"]), signal.SIGKILL)
        handles += [sender.send(receiver.node_id, f"s{i}".encode()) for i in range(100, 200)]
        assert inbox.wait_for_distinct(200), f"only {len(inbox.distinct())} of 200 arrived"
        assert all(h.result(PATIENCE).delivered for h in handles)
        assert inbox.duplicates() == {}
        restarted = log.wait_for("child_started", count=2, child_id="bitchat-scanner")[-1]
        assert restarted["pid"] != started["pid"]
        bluez.DropConnection(device)  # only the new scanner can bring the peer back
        assert wait_until(linked), "the new scanner never brought the BitChat peer back"
    crashed = log.matching("child_crashed", child_id="bitchat-scanner")
    assert any(e["exc_type"] == "ChildProcessDied" and "SIGKILL" in e["exc_message"] for e in crashed), crashed
    others = [e["child_id"] for e in log.matching("child_restarted") if e["child_id"] != "bitchat-scanner"]
    assert others == [], f"actors other than the scanner restarted: {others}"
