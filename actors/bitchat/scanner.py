"""The BitChat scanner: a child of its own that listens for BitChat advertisements and reports them.

Scanning is the part of the BLE stack that runs all the time and talks to
BlueZ the most, so it is its own supervised actor (``ChildSpec("bitchat-scanner",
ScannerActor, isolation="process")`` may put it in a process of its own): if it
dies (``kill -9``, a dropped D-Bus connection, a native crash in the D-Bus
library) its supervisor starts a new one, and the ``bitchat`` actor and its open
links carry on. It tells ``report_to`` a :class:`~.messages.PeerSeen` for each
BitChat peer it hears (the 8-byte peer id in the advertisement's service data),
at most once per ``min_interval`` seconds per peer, and the radio
(:class:`~.ble.BleCentral` with ``scan=False``) connects to it.

bleak survives a dropped D-Bus connection by forgetting everything it knew and
scanning no more (its manager resets; nothing tells the scanner). So the scanner
watches bleak's connection to the bus: when it closes, the actor crashes with a
:class:`~villagemesh.errors.TransportError` (log ``bitchat_dbus_lost``), and the
new instance its supervisor starts connects afresh and scans again. (bleak has no
public handle on that connection: the watch reads its BlueZ manager's ``_bus``,
and a bleak without one fails the start loudly, as a ``ConfigError``.)

Config (msgpack-able, for a process child): ``report_to`` (bus name), ``adapter``
(default ``hci0``), ``me`` (our peer id, hex: our own advertisements are
ignored), ``min_interval`` (default 1.0 s). Log event: ``bitchat_scanning`` (adapter).
A failure to start scanning (no BlueZ, no adapter) crashes the actor, for its
supervisor to see and restart within its intensity.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bleak import BleakScanner
from bleak.backends.bluezdbus.manager import get_global_bluez_manager
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from villagemesh.actors.bitchat.ble import SERVICE_UUID
from villagemesh.actors.bitchat.messages import PeerSeen
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.errors import ConfigError, TransportError

__all__ = ["ScannerActor"]


class _DbusLost:
    """From the loop: bleak's D-Bus connection closed (``error``: why, if dbus-fast knew)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ScannerActor(LoopActor):
    """Scans for BitChat peers and reports them."""

    def on_start(self) -> None:
        cfg = self.ctx.config
        self.report_to = cfg.get("report_to")
        if not isinstance(self.report_to, str):
            raise ConfigError(f"the bitchat scanner needs config['report_to'] (a bus name), got {self.report_to!r}")
        self.adapter = str(cfg.get("adapter", "hci0"))
        self.me = bytes.fromhex(str(cfg.get("me", "")))
        self.min_interval = float(cfg.get("min_interval", 1.0))
        self.last: dict[bytes, float] = {}
        self.start_io()
        self.scanner: BleakScanner | None = None
        self.io_loop.call(self._start(), LOOP_CALL_TIMEOUT_S)
        self.ctx.log.emit("bitchat_scanning", adapter=self.adapter)

    async def _start(self) -> None:
        self.scanner = BleakScanner(
            detection_callback=self._seen, service_uuids=[SERVICE_UUID], bluez={"adapter": self.adapter}
        )
        await self.scanner.start()
        bus = getattr(await get_global_bluez_manager(), "_bus", None)
        if bus is None:
            raise ConfigError("this bleak's BlueZ manager has no _bus: the scanner cannot watch its D-Bus connection")
        self.bus = bus
        asyncio.get_running_loop().create_task(self._watch(bus))

    async def _watch(self, bus: Any) -> None:
        # dbus-fast ends the wait with None (closed by us) or with whatever broke the connection
        outcomes: list[BaseException | None] = await asyncio.gather(bus.wait_for_disconnect(), return_exceptions=True)
        self.post(_DbusLost(outcomes[0]))

    async def io_shutdown(self) -> None:
        scanner = getattr(self, "scanner", None)
        if scanner is not None:
            await scanner.stop()

    def _seen(self, device: BLEDevice, advertisement: AdvertisementData) -> None:
        peer = advertisement.service_data.get(SERVICE_UUID)
        if peer is not None and len(peer) == 8 and bytes(peer) != self.me:
            self.post(PeerSeen(bytes(peer), device.address, advertisement.rssi))

    def on_loop_message(self, message: Any) -> None:
        if isinstance(message, _DbusLost):
            self.ctx.log.emit("bitchat_dbus_lost", adapter=self.adapter, reason=repr(message.error))
            raise TransportError(f"the bitchat scanner lost its D-Bus connection on {self.adapter}: {message.error!r}")
        if not isinstance(message, PeerSeen):
            raise TypeError(f"the bitchat scanner got an unexpected {type(message).__name__} from its loop")
        now = time.monotonic()
        if now - self.last.get(message.peer_id, -self.min_interval) < self.min_interval:
            return
        self.last[message.peer_id] = now
        self.tell_or_log(self.report_to, message)
