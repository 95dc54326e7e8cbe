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
"""

# dbusmock loads a template by path and reads these names from it.

from __future__ import annotations

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
    self.AddObject(
        char,
        CHARACTERISTIC,
        char_props,
        [
            ("ReadValue", "a{sv}", "ay", "ret = self.props['org.bluez.GattCharacteristic1']['Value']"),
            ("WriteValue", "aya{sv}", "", _write),
            ("StartNotify", "", "", lambda c: _changed(c, CHARACTERISTIC, {"Notifying": dbus.Boolean(True)})),
            ("StopNotify", "", "", lambda c: _changed(c, CHARACTERISTIC, {"Notifying": dbus.Boolean(False)})),
        ],
    )
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


def _register_application(adapter, path, options):
    adapter.apps.append(str(path))


@dbus.service.method(MOCK, in_signature="s", out_signature="")
def AddGattManager(self, adapter):
    """Give ``adapter`` a GattManager1 that records the applications registered with it."""
    obj = mockobject.objects[f"/org/bluez/{adapter}"]
    obj.apps = []
    obj.AddMethods(
        "org.bluez.GattManager1",
        [("RegisterApplication", "oa{sv}", "", _register_application), ("UnregisterApplication", "o", "", "")],
    )


@dbus.service.method(MOCK, in_signature="s", out_signature="as")
def GetApplications(self, adapter):
    return mockobject.objects[f"/org/bluez/{adapter}"].apps
