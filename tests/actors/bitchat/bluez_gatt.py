"""A fake bluetoothd for bleak: dbusmock's ``bluez5`` template plus LE devices with a GATT database.

Loaded into python-dbusmock on a private system bus (``SpawnedMock.spawn_with_template``).
The stock template has adapters and devices but types a device's
``ManufacturerData``/``ServiceData`` as arrays (bleak's scanner then fails
inside its message handler), never sets ``ServicesResolved`` on ``Connect`` (so
``BleakClient.connect`` waits until its timeout) and has no GATT objects. This
template adds, on ``/`` under ``org.bluez.Mock``:

- ``AddLeDevice(adapter, address, uuids, service_data_uuid, service_data)``: a Device1 with
  bleak's property types, advertising ``uuids`` and one service-data entry (BitChat's
  Android clients put their 8-byte peer id there);
- ``AddGattCharacteristic(device, service_uuid, char_uuid, flags, mtu)``: one service
  (``service0010``) and one characteristic (``char0011``) with ``ReadValue``,
  ``WriteValue`` (refuses a write longer than MTU - 3, as a link would; logs the rest),
  ``StartNotify``/``StopNotify``;
- ``AdvertiseDevice(device, rssi)``: a fresh advertisement (a PropertiesChanged of RSSI,
  which is what bleak's scanner reports while discovering);
- ``Notify(char, value)``: the peripheral notifies ``value`` (a PropertiesChanged of Value);
- ``GetWrites(char)``: every value written so far;
- ``DropConnection(device)``: link loss (Connected and ServicesResolved go false).

``Device1.Connect`` behaves as bluetoothd's does for bleak: Connected, then ServicesResolved.

**The virtual radio**: several adapters on this one fake bluetoothd, each a node
(a BitChat radio on ``hci0``, another on ``hci1``), joined by links the test sets:

- ``AddGattManager(adapter)``: the adapter takes ``GattManager1.RegisterApplication``
  (the mock reads the application's objects back with ``GetManagedObjects``,
  asynchronously, as bluetoothd does) and a sender-aware
  ``LEAdvertisingManager1.RegisterAdvertisement`` (it reads the advertisement with
  ``GetAll(LEAdvertisement1)``);
- ``SetLink(hciA, hciB, up)``: the two nodes come into range (up) or go out of it
  (down: the link is lost on both sides and the devices are removed);
- a node in range that advertises appears as a Device1 (its ServiceUUIDs and
  ServiceData) under every adapter in range, re-reported every 100 ms while that
  adapter is discovering (a GLib timeout through ctypes: dbusmock runs a bare GLib
  loop, without PyGObject), as bluetoothd reports each advertisement it hears;
- ``Connect`` on such a device makes one LE link, which carries GATT both ways:
  each side's device gets the other node's GATT database mirrored as proxy
  GattService1/GattCharacteristic1 objects (MTU 517);
- a proxy's ``WriteValue`` goes to the application's ``WriteValue`` with
  ``{"device": <the central as the server sees it>, "mtu": 517, "link": "LE", "type"}``;
- the application's ``PropertiesChanged(Value)`` goes out as a notification on
  every connected, notifying proxy of that characteristic;
- ``Disconnect`` on either side ends the link for both.

Every call from the mock to an application is asynchronous (``call_async``): the
application may be waiting on the mock in a blocking call of its own.
"""

# dbusmock loads a template by path and reads these names from it.

from __future__ import annotations

import ctypes
import logging
from typing import Any

import dbus
from dbusmock import mockobject
from dbusmock.templates import bluez5
from dbusmock.templates.bluez5 import *  # noqa: F403 - the stock template's methods, as dbusmock collects them

BUS_NAME = bluez5.BUS_NAME
MAIN_OBJ = bluez5.MAIN_OBJ
SYSTEM_BUS = True
IS_OBJECT_MANAGER = True

MOCK = "org.bluez.Mock"
DEVICE = "org.bluez.Device1"
SERVICE = "org.bluez.GattService1"
CHARACTERISTIC = "org.bluez.GattCharacteristic1"
PROPS = dbus.PROPERTIES_IFACE


def load(mock: object, parameters: dict) -> None:
    bluez5.load(mock, parameters)
    _start_ticking()


def _changed(obj: object, iface: str, props: dict) -> None:
    obj.props[iface].update(props)  # type: ignore[attr-defined]
    obj.EmitSignal(PROPS, "PropertiesChanged", "sa{sv}as", [iface, props, []])  # type: ignore[attr-defined]


def _connect(device: object) -> None:
    if device.props[DEVICE]["Connected"]:  # type: ignore[attr-defined]
        raise dbus.exceptions.DBusException("Already Connected", name="org.bluez.Error.AlreadyConnected")
    _changed(device, DEVICE, {"Connected": dbus.Boolean(True)})
    _changed(device, DEVICE, {"ServicesResolved": dbus.Boolean(True)})


def _disconnect(device: object) -> None:
    _changed(device, DEVICE, {"ServicesResolved": dbus.Boolean(False)})
    _changed(device, DEVICE, {"Connected": dbus.Boolean(False)})


@dbus.service.method(MOCK, in_signature="ssassay", out_signature="s")
def AddLeDevice(self, adapter, address, uuids, data_uuid, data):
    path = f"/org/bluez/{adapter}/dev_" + address.replace(":", "_").upper()
    props = {
        "Address": dbus.String(address),
        "AddressType": dbus.String("random"),
        "Alias": dbus.String(address),
        "Adapter": dbus.ObjectPath(f"/org/bluez/{adapter}"),
        "UUIDs": dbus.Array(uuids, signature="s"),
        "RSSI": dbus.Int16(-60),
        "Paired": dbus.Boolean(False),
        "Connected": dbus.Boolean(False),
        "ServicesResolved": dbus.Boolean(False),
        "ManufacturerData": dbus.Dictionary({}, signature="qv"),
        "ServiceData": dbus.Dictionary({data_uuid: dbus.Array(data, signature="y")}, signature="sv"),
    }
    self.AddObject(
        path,
        DEVICE,
        props,
        [
            ("Connect", "", "", lambda device: _connect(device)),
            ("Disconnect", "", "", lambda device: _disconnect(device)),
        ],
    )
    self.EmitSignal("org.freedesktop.DBus.ObjectManager", "InterfacesAdded", "oa{sa{sv}}", [path, {DEVICE: props}])
    return path


def _write(char, value, options):
    limit = int(char.props[CHARACTERISTIC]["MTU"]) - 3
    if len(value) > limit:
        raise dbus.exceptions.DBusException("Invalid Length", name="org.bluez.Error.InvalidArguments")
    device = mockobject.objects[str(char.device)]
    if not device.props[DEVICE]["Connected"]:
        raise dbus.exceptions.DBusException("Not connected", name="org.bluez.Error.Failed")
    char.writes.append(bytes(value))


def _char_methods(write: Any) -> list[tuple[str, str, str, Any]]:
    """A characteristic's methods; ``write`` takes (char, value, options)."""
    return [
        ("ReadValue", "a{sv}", "ay", "ret = self.props['org.bluez.GattCharacteristic1']['Value']"),
        ("WriteValue", "aya{sv}", "", write),
        ("StartNotify", "", "", lambda c: _changed(c, CHARACTERISTIC, {"Notifying": dbus.Boolean(True)})),
        ("StopNotify", "", "", lambda c: _changed(c, CHARACTERISTIC, {"Notifying": dbus.Boolean(False)})),
    ]


@dbus.service.method(MOCK, in_signature="ossasq", out_signature="o")
def AddGattCharacteristic(self, device, service_uuid, char_uuid, flags, mtu):
    service = f"{device}/service0010"
    char = f"{service}/char0011"
    service_props = {
        "UUID": dbus.String(service_uuid),
        "Device": dbus.ObjectPath(device),
        "Primary": dbus.Boolean(True),
    }
    self.AddObject(service, SERVICE, service_props, [])
    char_props = {
        "UUID": dbus.String(char_uuid),
        "Service": dbus.ObjectPath(service),
        "Flags": dbus.Array(flags, signature="s"),
        "MTU": dbus.UInt16(mtu),
        "Notifying": dbus.Boolean(False),
        "Value": dbus.Array([], signature="y"),
    }
    self.AddObject(char, CHARACTERISTIC, char_props, _char_methods(_write))
    obj = mockobject.objects[char]
    obj.writes = []
    obj.device = device
    added = "oa{sa{sv}}"
    self.EmitSignal("org.freedesktop.DBus.ObjectManager", "InterfacesAdded", added, [service, {SERVICE: service_props}])
    self.EmitSignal(
        "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", added, [char, {CHARACTERISTIC: char_props}]
    )
    return char


@dbus.service.method(MOCK, in_signature="on", out_signature="")
def AdvertiseDevice(self, device, rssi):
    _changed(mockobject.objects[str(device)], DEVICE, {"RSSI": dbus.Int16(rssi)})


@dbus.service.method(MOCK, in_signature="oay", out_signature="")
def Notify(self, char, value):
    _changed(mockobject.objects[str(char)], CHARACTERISTIC, {"Value": dbus.Array(value, signature="y")})


@dbus.service.method(MOCK, in_signature="o", out_signature="aay")
def GetWrites(self, char):
    return [dbus.ByteArray(w) for w in mockobject.objects[str(char)].writes]


@dbus.service.method(MOCK, in_signature="o", out_signature="")
def DropConnection(self, device):
    _disconnect(mockobject.objects[str(device)])


@dbus.service.method(MOCK, in_signature="s", out_signature="as")
def GetApplications(self, adapter):
    return mockobject.objects[f"/org/bluez/{adapter}"].apps


# ------------------------------------------------------------------------------------------ the virtual radio

ADAPTER = "org.bluez.Adapter1"
MANAGER = "org.freedesktop.DBus.ObjectManager"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
LINK_MTU = 517
"""What BlueZ negotiates between two Linux hosts (the ATT maximum, 512, plus the 5-byte header)."""
REPORT_MS = 100
"""How often a discovering adapter reports each advertiser in range again."""
RSSI = -50


class _Node:
    """What the mock knows of the application behind one adapter."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.app: tuple[str, str] | None = None  # (sender, path) of the registered GATT application
        self.gatt: dict[str, dict[str, dict[str, Any]]] = {}  # its objects, as GetManagedObjects gave them
        self.adv: tuple[str, str] | None = None  # (sender, path) of the registered advertisement
        self.advertised: dict[str, Any] = {}  # its LEAdvertisement1 properties


_nodes: dict[str, _Node] = {}
_in_range: set[frozenset[str]] = set()
_connected: set[frozenset[str]] = set()
_watching: list[Any] = []  # the signal matches (made once, with the first node)
_ticking: list[Any] = []  # the GLib callback (kept alive)


def _root() -> Any:
    return mockobject.objects["/"]


def _conn() -> Any:
    return _root().connection


def _address(adapter: str) -> str:
    return str(mockobject.objects[f"/org/bluez/{adapter}"].props[ADAPTER]["Address"])


def _device_path(local: str, remote: str) -> str:
    """The Device1 under ``local`` that stands for node ``remote``."""
    return f"/org/bluez/{local}/dev_" + _address(remote).replace(":", "_")


def _failed(what: str) -> Any:
    return lambda error: logging.getLogger("bluez_gatt").warning("%s failed: %s", what, error)


def _with_sender(adapter: Any, interface: str, name: str, in_sig: str, func: Any) -> None:
    """Add a method whose implementation learns the caller's unique name (dbusmock's own cannot)."""
    adapter.AddMethod(interface, name, in_sig, "", "")  # introspection and the call log

    def call(self: Any, *args: Any, **keywords: Any) -> None:
        self.log(f"{name} {args}")
        func(self, str(keywords["sender"]), *args)

    method = dbus.service.method(interface, out_signature="")(call)
    method.__name__ = name
    method._dbus_in_signature = in_sig
    method._dbus_args = [f"arg{i}" for i in range(1, len(dbus.Signature(in_sig)) + 1)]
    method._dbus_sender_keyword = "sender"
    adapter.methods[interface][name] = (in_sig, "", func, method)


def _node(adapter: Any) -> _Node:
    name = str(adapter.path).rsplit("/", 1)[-1]
    return _nodes.setdefault(name, _Node(name))


def _register_application(adapter, sender, path, options):
    node = _node(adapter)
    adapter.apps.append(str(path))
    node.app = (sender, str(path))

    def read(objects: Any) -> None:
        node.gatt = {str(p): {str(i): dict(props) for i, props in ifaces.items()} for p, ifaces in objects.items()}

    _conn().call_async(sender, path, MANAGER, "GetManagedObjects", "", (), read, _failed("GetManagedObjects"))


def _unregister_application(adapter, sender, path):
    node = _node(adapter)
    if str(path) in adapter.apps:
        adapter.apps.remove(str(path))
    node.app, node.gatt = None, {}


def _register_advertisement(adapter, sender, path, options):
    bluez5.RegisterAdvertisement(adapter, path, options)  # the stock bookkeeping (ActiveInstances)
    node = _node(adapter)
    node.adv = (sender, str(path))

    def read(props: Any) -> None:
        node.advertised = dict(props)
        _report()

    _conn().call_async(sender, path, PROPS, "GetAll", "s", (ADVERTISEMENT,), read, _failed("GetAll"))


def _unregister_advertisement(adapter, sender, path):
    bluez5.UnregisterAdvertisement(adapter, path)
    node = _node(adapter)
    node.adv, node.advertised = None, {}


def _name_lost(name, old, new):
    """An application's connection closed: BlueZ drops its GATT server and advertisement."""
    if new:
        return
    for node in _nodes.values():
        if node.app is not None and node.app[0] == name:
            node.app, node.gatt = None, {}
        if node.adv is not None and node.adv[0] == name:
            node.adv, node.advertised = None, {}


@dbus.service.method(MOCK, in_signature="s", out_signature="")
def AddGattManager(self, adapter):
    """Give ``adapter`` a GattManager1 and a sender-aware LEAdvertisingManager1: it becomes a node of the radio."""
    obj = mockobject.objects[f"/org/bluez/{adapter}"]
    obj.apps = []
    _nodes.setdefault(adapter, _Node(adapter))
    _with_sender(obj, "org.bluez.GattManager1", "RegisterApplication", "oa{sv}", _register_application)
    _with_sender(obj, "org.bluez.GattManager1", "UnregisterApplication", "o", _unregister_application)
    _with_sender(obj, bluez5.LE_ADVERTISING_MANAGER_IFACE, "RegisterAdvertisement", "oa{sv}", _register_advertisement)
    _with_sender(obj, bluez5.LE_ADVERTISING_MANAGER_IFACE, "UnregisterAdvertisement", "o", _unregister_advertisement)
    if not _watching:
        conn = _conn()
        _watching.append(
            conn.add_signal_receiver(
                _app_changed, "PropertiesChanged", PROPS, sender_keyword="sender", path_keyword="path"
            )
        )
        _watching.append(
            conn.add_signal_receiver(_name_lost, "NameOwnerChanged", "org.freedesktop.DBus", "org.freedesktop.DBus")
        )


@dbus.service.method(MOCK, in_signature="ssb", out_signature="")
def SetLink(self, a, b, up):
    """Nodes ``a`` and ``b`` come into range of each other (``up``) or go out of it."""
    pair = frozenset((str(a), str(b)))
    if up:
        _in_range.add(pair)
        _report()
        return
    _in_range.discard(pair)
    _link_lost(str(a), str(b))
    for local, remote in ((str(a), str(b)), (str(b), str(a))):
        path = _device_path(local, remote)
        if path in mockobject.objects:
            _root().EmitSignal(MANAGER, "InterfacesRemoved", "oas", [dbus.ObjectPath(path), [DEVICE]])
            _root().RemoveObject(path)


def _device(local: str, remote: str) -> Any:
    """The Device1 under ``local`` for ``remote`` (made on first sight: an advertisement or an incoming link)."""
    path = _device_path(local, remote)
    advertised = _nodes[remote].advertised
    uuids = dbus.Array([str(u) for u in advertised.get("ServiceUUIDs", [])], signature="s")
    data = dbus.Dictionary(
        {str(k): dbus.Array(bytes(v), signature="y") for k, v in advertised.get("ServiceData", {}).items()},
        signature="sv",
    )
    if path in mockobject.objects:
        device = mockobject.objects[path]
        if list(device.props[DEVICE]["UUIDs"]) != list(uuids):
            _changed(device, DEVICE, {"UUIDs": uuids, "ServiceData": data})
        return device
    address = _address(remote)
    props = {
        "Address": dbus.String(address),
        "AddressType": dbus.String("public"),
        "Alias": dbus.String(address),
        "Adapter": dbus.ObjectPath(f"/org/bluez/{local}"),
        "UUIDs": uuids,
        "RSSI": dbus.Int16(RSSI),
        "Paired": dbus.Boolean(False),
        "Connected": dbus.Boolean(False),
        "ServicesResolved": dbus.Boolean(False),
        "ManufacturerData": dbus.Dictionary({}, signature="qv"),
        "ServiceData": data,
    }
    _root().AddObject(
        path,
        DEVICE,
        props,
        [
            ("Connect", "", "", lambda device: _link_connect(local, remote)),
            ("Disconnect", "", "", lambda device: _link_lost(local, remote)),
        ],
    )
    device = mockobject.objects[path]
    device.proxies = []
    _root().EmitSignal(MANAGER, "InterfacesAdded", "oa{sa{sv}}", [path, {DEVICE: props}])
    return device


def _report() -> None:
    """Each discovering adapter hears every advertiser in range once more."""
    for pair in list(_in_range):
        a, b = sorted(pair)
        for local, remote in ((a, b), (b, a)):
            adapter = mockobject.objects[f"/org/bluez/{local}"]
            if _nodes[remote].adv is None or not _nodes[remote].advertised:
                continue
            device = _device(local, remote)
            if adapter.props[ADAPTER]["Discovering"]:
                _changed(device, DEVICE, {"RSSI": dbus.Int16(RSSI)})


def _start_ticking() -> None:
    glib = ctypes.CDLL("libglib-2.0.so.0")

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    def tick(_: Any) -> int:
        try:
            _report()
        except Exception:
            logging.getLogger("bluez_gatt").exception("the virtual radio's report failed")
        return 1  # G_SOURCE_CONTINUE

    _ticking.append(tick)
    glib.g_timeout_add(ctypes.c_uint(REPORT_MS), tick, None)


def _link_connect(local: str, remote: str) -> None:
    pair = frozenset((local, remote))
    if pair not in _in_range:
        raise dbus.exceptions.DBusException("Software caused connection abort", name="org.bluez.Error.Failed")
    if pair in _connected:
        return  # the peer connected to us first: one LE link carries both ways
    _connected.add(pair)
    sides = [(local, remote), (remote, local)]
    for a, b in sides:
        _changed(_device(a, b), DEVICE, {"Connected": dbus.Boolean(True)})
    for a, b in sides:
        _mirror(a, b)
        _changed(_device(a, b), DEVICE, {"ServicesResolved": dbus.Boolean(True)})


def _mirror(local: str, remote: str) -> None:
    """``remote``'s GATT database as proxies under ``local``'s device for it."""
    device = _device(local, remote)
    server = _nodes[remote]
    if server.app is None:
        return
    sender = server.app[0]
    services = sorted(p for p, ifaces in server.gatt.items() if SERVICE in ifaces)
    for i, service in enumerate(services):
        handle = 0x10 + 0x10 * i
        proxy_service = f"{device.path}/service{handle:04x}"
        uuid = server.gatt[service][SERVICE]["UUID"]
        service_props = {
            "UUID": dbus.String(uuid),
            "Device": dbus.ObjectPath(device.path),
            "Primary": dbus.Boolean(True),
        }
        _root().AddObject(proxy_service, SERVICE, service_props, [])
        _root().EmitSignal(MANAGER, "InterfacesAdded", "oa{sa{sv}}", [proxy_service, {SERVICE: service_props}])
        device.proxies.append(proxy_service)
        chars = sorted(
            p for p, ifaces in server.gatt.items() if str(ifaces.get(CHARACTERISTIC, {}).get("Service")) == service
        )
        for j, char in enumerate(chars):
            proxy_char = f"{proxy_service}/char{handle + 1 + j:04x}"
            served = server.gatt[char][CHARACTERISTIC]
            char_props = {
                "UUID": dbus.String(served["UUID"]),
                "Service": dbus.ObjectPath(proxy_service),
                "Flags": dbus.Array([str(f) for f in served["Flags"]], signature="s"),
                "MTU": dbus.UInt16(LINK_MTU),
                "Notifying": dbus.Boolean(False),
                "Value": dbus.Array([], signature="y"),
            }
            _root().AddObject(proxy_char, CHARACTERISTIC, char_props, _char_methods(_proxy_write))
            proxy = mockobject.objects[proxy_char]
            proxy.target = (sender, char)
            proxy.central, proxy.server, proxy.device = local, remote, device
            _root().EmitSignal(MANAGER, "InterfacesAdded", "oa{sa{sv}}", [proxy_char, {CHARACTERISTIC: char_props}])
            device.proxies.append(proxy_char)


def _proxy_write(char, value, options):
    if not char.device.props[DEVICE]["Connected"]:
        raise dbus.exceptions.DBusException("Not connected", name="org.bluez.Error.Failed")
    if len(value) > LINK_MTU - 3:
        raise dbus.exceptions.DBusException("Invalid Length", name="org.bluez.Error.InvalidArguments")
    sender, path = char.target
    forwarded = {
        "device": dbus.ObjectPath(_device_path(char.server, char.central)),
        "mtu": dbus.UInt16(LINK_MTU),
        "link": dbus.String("LE"),
        "type": dbus.String(str(options.get("type", "request"))),
    }
    args = (dbus.ByteArray(bytes(value)), dbus.Dictionary(forwarded, signature="sv"))
    _conn().call_async(sender, path, CHARACTERISTIC, "WriteValue", "aya{sv}", args, lambda: None, _failed("WriteValue"))


def _app_changed(interface, changed, invalidated, sender=None, path=None):
    """An application set its characteristic's value: a notification to every central subscribed to it."""
    if str(interface) != CHARACTERISTIC or "Value" not in changed:
        return
    for obj in list(mockobject.objects.values()):
        if getattr(obj, "target", None) != (str(sender), str(path)):
            continue
        if obj.props[CHARACTERISTIC]["Notifying"] and obj.device.props[DEVICE]["Connected"]:
            _changed(obj, CHARACTERISTIC, {"Value": dbus.Array(bytes(changed["Value"]), signature="y")})


def _link_lost(a: str, b: str) -> None:
    """The LE link between ``a`` and ``b`` ends, for both sides (their GATT proxies go with it)."""
    pair = frozenset((a, b))
    if pair not in _connected:
        return
    _connected.discard(pair)
    for local, remote in ((a, b), (b, a)):
        device = mockobject.objects.get(_device_path(local, remote))
        if device is None:
            continue
        for path in reversed(device.proxies):
            iface = CHARACTERISTIC if "/char" in path else SERVICE
            _root().EmitSignal(MANAGER, "InterfacesRemoved", "oas", [dbus.ObjectPath(path), [iface]])
            _root().RemoveObject(path)
        device.proxies = []
        _changed(device, DEVICE, {"ServicesResolved": dbus.Boolean(False)})
        _changed(device, DEVICE, {"Connected": dbus.Boolean(False)})
