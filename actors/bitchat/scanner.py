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

Config (msgpack-able, for a process child): ``report_to`` (bus name), ``adapter``
(default ``hci0``), ``me`` (our peer id, hex: our own advertisements are
ignored), ``min_interval`` (default 1.0 s). Log event: ``bitchat_scanning`` (adapter).
A failure to start scanning (no BlueZ, no adapter) crashes the actor, for its
supervisor to see and restart within its intensity.
"""

from __future__ import annotations

import time
from typing import Any

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from villagemesh.actors.bitchat.ble import SERVICE_UUID
from villagemesh.actors.bitchat.messages import PeerSeen
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.errors import ConfigError

__all__ = ["ScannerActor"]


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

    async def io_shutdown(self) -> None:
        scanner = getattr(self, "scanner", None)
        if scanner is not None:
            await scanner.stop()

    def _seen(self, device: BLEDevice, advertisement: AdvertisementData) -> None:
        peer = advertisement.service_data.get(SERVICE_UUID)
        if peer is not None and len(peer) == 8 and bytes(peer) != self.me:
            self.post(PeerSeen(bytes(peer), device.address, advertisement.rssi))

    def on_loop_message(self, message: Any) -> None:
        if not isinstance(message, PeerSeen):
            raise TypeError(f"the bitchat scanner got an unexpected {type(message).__name__} from its loop")
        now = time.monotonic()
        if now - self.last.get(message.peer_id, -self.min_interval) < self.min_interval:
            return
        self.last[message.peer_id] = now
        self.tell_or_log(self.report_to, message)
