"""The real radio, peripheral role: a GATT server and an LE advertisement of our own, on dbus-fast.

bleak has no peripheral role, so this module speaks BlueZ's D-Bus API itself
(``org.bluez.GattManager1.RegisterApplication`` and
``org.bluez.LEAdvertisingManager1.RegisterAdvertisement``, see
``org.bluez.GattCharacteristic(5)``). It exports, on the system bus::

    /org/villagemesh/bitchat                 org.freedesktop.DBus.ObjectManager (what BlueZ reads back)
    /org/villagemesh/bitchat/service0        org.bluez.GattService1 (BitChat's service)
    /org/villagemesh/bitchat/service0/char0  org.bluez.GattCharacteristic1 (read, write, write w/o response, notify)
    /org/villagemesh/bitchat/advertisement0  org.bluez.LEAdvertisement1 (the service UUID; service data: our peer id)

A central's write arrives as ``WriteValue(value, {"device": <its device path>, ...})``.
A link is named by a peer id, and BlueZ tells the device path only; the first
frame a device writes that decodes as a BitChat packet names it (BitChat sends
its announce first on a new link), then ``LinkUp(peer)`` and the frames follow.
``send(peer, data)`` notifies: it sets the characteristic's value and emits
PropertiesChanged, which BlueZ delivers to the subscribed centrals. When BlueZ
reports that device disconnected (``Device1.Connected`` false, or the device
removed), ``LinkDown(peer)``; the device's next first packet names it again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Annotated

from dbus_fast import BusType, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

from villagemesh.actors.bitchat.ble import CHARACTERISTIC_UUID, SERVICE_UUID
from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp, RadioEvent
from villagemesh.errors import ConnectError, RemoteProtocolError
from villagemesh.protocols.bitchat import decode

__all__ = ["APP_PATH", "BlePeripheral", "BleRadio"]

APP_PATH = "/org/villagemesh/bitchat"
SERVICE_PATH = f"{APP_PATH}/service0"
CHAR_PATH = f"{SERVICE_PATH}/char0"
ADV_PATH = f"{APP_PATH}/advertisement0"
FLAGS = ["read", "write", "write-without-response", "notify"]
"""BitChat's characteristic properties (as iOS and Android set them)."""
CALL_TIMEOUT_S = 10.0
"""Registering with BlueZ takes milliseconds; 10 s means it is not there."""

Bytes = Annotated[bytes, DBusSignature("ay")]
Str = Annotated[str, DBusSignature("s")]
Strs = Annotated[list[str], DBusSignature("as")]
Path = Annotated[str, DBusSignature("o")]
Bool = Annotated[bool, DBusSignature("b")]
Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
NoReply = Annotated[None, DBusSignature("")]
"""A method that returns nothing (dbus-fast's compiled parser takes a bare ``-> None`` for no signature at all)."""
Managed = Annotated[dict[str, dict[str, dict[str, Variant]]], DBusSignature("a{oa{sa{sv}}}")]


class _Characteristic(ServiceInterface):
    def __init__(self, written: Callable[[str, bytes], None]) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._written = written
        self._value = b""
        self._notifying = False

    @method()
    def ReadValue(self, options: Options) -> Bytes:
        return self._value

    @method()
    def WriteValue(self, value: Bytes, options: Options) -> NoReply:
        device = options.get("device")
        self._written(str(device.value) if device is not None else "", bytes(value))

    @method()
    def StartNotify(self) -> NoReply:
        self._notifying = True

    @method()
    def StopNotify(self) -> NoReply:
        self._notifying = False

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:
        return CHARACTERISTIC_UUID

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> Path:
        return SERVICE_PATH

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> Strs:
        return FLAGS

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> Bytes:
        return self._value

    def notify(self, data: bytes) -> None:
        self._value = data
        self.emit_properties_changed({"Value": data})


class _Service(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.bluez.GattService1")

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:
        return SERVICE_UUID

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> Bool:
        return True


class _Advertisement(ServiceInterface):
    def __init__(self, me: bytes) -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self._me = me

    @method()
    def Release(self) -> NoReply:
        """BlueZ dropped the advertisement."""

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> Str:
        return "peripheral"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> Strs:
        return [SERVICE_UUID]

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> Options:
        return {SERVICE_UUID: Variant("ay", self._me)}


class _Root(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.freedesktop.DBus.ObjectManager")

    @method()
    def GetManagedObjects(self) -> Managed:
        return {
            SERVICE_PATH: {
                "org.bluez.GattService1": {"UUID": Variant("s", SERVICE_UUID), "Primary": Variant("b", True)}
            },
            CHAR_PATH: {
                "org.bluez.GattCharacteristic1": {
                    "UUID": Variant("s", CHARACTERISTIC_UUID),
                    "Service": Variant("o", SERVICE_PATH),
                    "Flags": Variant("as", FLAGS),
                }
            },
        }


class BlePeripheral:
    """BitChat links as a BLE peripheral: our GATT server and advertisement, registered with BlueZ.

    Args:
        me: our peer id (advertised as service data).
        adapter: the BlueZ adapter (``hci0``).
    """

    mtu = 512
    """BlueZ negotiates per central; BitChat's ``bleMaxMTU``."""

    def __init__(self, me: bytes, adapter: str = "hci0") -> None:
        self.me = me
        self.adapter = adapter
        self.refused = 0
        """Frames from a device not yet named that did not decode."""
        self._handler: Callable[[RadioEvent], None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._char: _Characteristic | None = None
        self._peers: dict[str, bytes] = {}
        self._bus: MessageBus | None = None
        self._error: BaseException | None = None

    def start(self, handler: Callable[[RadioEvent], None]) -> None:
        """Export the GATT application and advertisement and register both with BlueZ.

        Raises:
            ConnectError: BlueZ refused (no adapter, no GATT manager) or did not answer.
        """
        self._handler = handler
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"bitchat-gatt-{self.adapter}")
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._register(), self._loop)
        try:
            future.result(CALL_TIMEOUT_S)
        except Exception as exc:
            self.stop()
            raise ConnectError(f"BlueZ on {self.adapter} refused the BitChat GATT server: {exc}") from exc

    async def _register(self) -> None:
        bus = self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self._char = _Characteristic(self._written)
        bus.export(APP_PATH, _Root())
        bus.export(SERVICE_PATH, _Service())
        bus.export(CHAR_PATH, self._char)
        bus.export(ADV_PATH, _Advertisement(self.me))
        bus.add_message_handler(self._bluez_signal)
        for member in ("PropertiesChanged", "InterfacesRemoved"):
            await self._call(
                bus,
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[f"type='signal',sender='org.bluez',member='{member}'"],
                ),
            )
        adapter = f"/org/bluez/{self.adapter}"
        for interface, member, path in (
            ("org.bluez.GattManager1", "RegisterApplication", APP_PATH),
            ("org.bluez.LEAdvertisingManager1", "RegisterAdvertisement", ADV_PATH),
        ):
            await self._call(
                bus,
                Message(
                    destination="org.bluez",
                    path=adapter,
                    interface=interface,
                    member=member,
                    signature="oa{sv}",
                    body=[path, {}],
                ),
            )

    @staticmethod
    async def _call(bus: MessageBus, message: Message) -> None:
        reply = await bus.call(message)
        if reply is None or reply.error_name:
            raise ConnectError(
                f"{message.interface}.{message.member}: {None if reply is None else reply.error_name}"
                f" {reply and reply.body}"
            )

    def _bluez_signal(self, message: Message) -> None:
        """A device that wrote to us disconnected (or is gone): its link is down."""
        if message.member == "PropertiesChanged" and message.path in self._peers:
            interface, changed = message.body[0], message.body[1]
            connected = changed.get("Connected")
            if interface == "org.bluez.Device1" and connected is not None and not connected.value:
                self._emit(LinkDown(self._peers.pop(message.path)))
        elif message.member == "InterfacesRemoved" and message.body and message.body[0] in self._peers:
            self._emit(LinkDown(self._peers.pop(message.body[0])))

    def _written(self, device: str, data: bytes) -> None:
        peer = self._peers.get(device)
        if peer is None:
            try:
                peer = decode(data).sender_id
            except RemoteProtocolError:
                self.refused += 1
                return
            self._peers[device] = peer
            self._emit(LinkUp(peer))
        self._emit(Frame(peer, data))

    def _emit(self, event: RadioEvent) -> None:
        if self._handler is not None:
            self._handler(event)

    def send(self, peer: bytes, data: bytes) -> None:
        """Notify ``data`` to the subscribed centrals.

        Raises:
            ConnectError: ``peer`` never wrote to us.
        """
        if peer not in self._peers.values() or self._char is None:
            raise ConnectError(f"no central {peer.hex()} on our GATT server")
        char = self._char
        self._loop.call_soon_threadsafe(char.notify, data)

    def stop(self) -> None:
        """Unexport, disconnect from the bus, end the thread."""
        self._handler = None
        if self._thread is None:
            return
        if self._bus is not None:
            bus = self._bus
            self._loop.call_soon_threadsafe(bus.disconnect)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        self._thread = None
        self._loop.close()


class BleRadio:
    """Both BLE roles as one radio, as every BitChat device runs them: dials as a central, serves as a peripheral.

    A link is whichever role reached the peer; if both did, frames go out as
    writes on the central link (the peripheral's notifications reach every
    subscribed central, not one). The roles' link events are merged: ``LinkUp``
    when the first role reaches a peer, ``LinkDown`` when the last one loses it
    (two BitChat devices in range usually both dial, and ride one LE link both
    ways). Args as :class:`~.ble.BleCentral`.
    """

    def __init__(self, me: bytes, adapter: str = "hci0", *, scan: bool = True) -> None:
        from villagemesh.actors.bitchat.ble import BleCentral

        self.central = BleCentral(me, adapter, scan=scan)
        self.peripheral = BlePeripheral(me, adapter)
        self._reached: dict[str, set[bytes]] = {"central": set(), "peripheral": set()}
        self._lock = threading.Lock()

    @property
    def mtu(self) -> int:
        """The smaller of the two roles' frame sizes."""
        return min(self.central.mtu, self.peripheral.mtu)

    def start(self, handler: Callable[[RadioEvent], None]) -> None:
        """Start both roles (the peripheral first: a refusal by BlueZ is raised before any scanning)."""
        self.peripheral.start(self._role("peripheral", handler))
        self.central.start(self._role("central", handler))

    def _role(self, role: str, handler: Callable[[RadioEvent], None]) -> Callable[[RadioEvent], None]:
        def handle(event: RadioEvent) -> None:
            if isinstance(event, Frame):
                handler(event)
                return
            with self._lock:
                before = any(event.peer in reached for reached in self._reached.values())
                if isinstance(event, LinkUp):
                    self._reached[role].add(event.peer)
                else:
                    self._reached[role].discard(event.peer)
                after = any(event.peer in reached for reached in self._reached.values())
                if before != after:
                    handler(event)  # under the lock: the two roles' threads cannot reorder a peer's ups and downs

        return handle

    def seen(self, peer: bytes, address: str) -> None:
        """A scanner's sighting, for the central role."""
        self.central.seen(peer, address)

    def send(self, peer: bytes, data: bytes) -> None:
        """On the central link to ``peer`` if there is one, else by notification.

        Raises:
            ConnectError: neither role reaches ``peer``.
        """
        try:
            self.central.send(peer, data)
        except ConnectError:
            self.peripheral.send(peer, data)

    def stop(self) -> None:
        """Stop both roles."""
        self.central.stop()
        self.peripheral.stop()
