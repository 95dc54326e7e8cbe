"""The real radio, central role: bleak on BlueZ's D-Bus API (scan, connect, write without response, notify).

:class:`BleCentral` is a :class:`~.radio.Radio` that runs its own asyncio loop on
its own thread (bleak is asyncio-only; the actor thread must never wait on the
radio)::

    BleakScanner(service_uuids=[BitChat service]) ──advertisement with service data = 8-byte peer id──▶
        BleakClient.connect ─▶ start_notify(BitChat characteristic) ─▶ LinkUp(peer)
    notification on the characteristic ──▶ Frame(peer, data)
    send(peer, data) ──▶ write_gatt_char(response=False), at most the link's max_write_without_response_size
    disconnected_callback (link loss, or the peer went away) ──▶ LinkDown(peer); the next advertisement reconnects

Peers are named by the 8-byte peer id Android BitChat clients put in their
scan response's service data (``BluetoothGattServerManager.kt``); an
advertisement without it is ignored (iOS clients advertise the bare service
UUID and are found once they announce over a link made by the *other* side's
central, to our GATT server: :class:`~.gatt.BlePeripheral`).

With ``scan=False`` the scanning is left to :class:`~.scanner.ScannerActor`, a
supervised child of its own (it may run in a process of its own), whose
``PeerSeen`` reports the ``bitchat`` actor passes to :meth:`BleCentral.seen`.

Both roles as one radio: :class:`~.gatt.BleRadio`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp, RadioEvent
from villagemesh.errors import ConnectError

__all__ = ["CHARACTERISTIC_UUID", "SERVICE_UUID", "BleCentral"]

SERVICE_UUID = "f47b5e2d-4a9e-4c5a-9b3f-8e1d2c3a4b5c"
"""BitChat's mainnet service (``BLEService.swift``; Android ``AppConstants.kt``)."""
CHARACTERISTIC_UUID = "a1b2c3d4-e5f6-4a5b-8c9d-0e1f2a3b4c5d"
"""BitChat's one characteristic: write without response one way, notify the other."""
DEFAULT_MTU = 512
"""The frame size before any link reports its own (BitChat's ``bleMaxMTU``)."""
CONNECT_TIMEOUT_S = 10.0
"""bleak's own default: a connect that takes longer has failed."""


class BleCentral:
    """BitChat links as a BLE central, through BlueZ.

    Args:
        me: our peer id (our own advertisements are ignored).
        adapter: the BlueZ adapter (``hci0``).
        scan: scan here (True), or leave it to a :class:`~.scanner.ScannerActor`
            child whose sightings come in through :meth:`seen` (False).
    """

    def __init__(self, me: bytes, adapter: str = "hci0", *, scan: bool = True) -> None:
        self.me = me
        self.adapter = adapter
        self.scan = scan
        self.failed_writes = 0
        self.failed_connects = 0
        self._handler: Callable[[RadioEvent], None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._links: dict[bytes, BleakClient] = {}
        self._sizes: dict[bytes, int] = {}
        self._connecting: set[bytes] = set()
        self._stopping: asyncio.Event | None = None
        self._scanner: BleakScanner | None = None

    @property
    def mtu(self) -> int:
        """The smallest write any link takes (the driver fragments to it)."""
        return min(self._sizes.values(), default=DEFAULT_MTU)

    def start(self, handler: Callable[[RadioEvent], None]) -> None:
        """Start scanning on the radio's own thread; events go to ``handler`` (from that thread)."""
        self._handler = handler
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"bitchat-ble-{self.adapter}")
        self._thread.start()
        ready.wait(CONNECT_TIMEOUT_S)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        if self.scan:
            self._scanner = BleakScanner(
                detection_callback=self._seen, service_uuids=[SERVICE_UUID], bluez={"adapter": self.adapter}
            )
        try:
            if self._scanner is not None:
                await self._scanner.start()
        finally:
            ready.set()
        await self._stopping.wait()
        if self._scanner is not None:
            await self._scanner.stop()
        for client in list(self._links.values()):
            await client.disconnect()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _seen(self, device: BLEDevice, advertisement: AdvertisementData) -> None:
        peer = advertisement.service_data.get(SERVICE_UUID)
        if peer is not None and len(peer) == 8:
            self._dial(bytes(peer), device)

    def seen(self, peer: bytes, address: str) -> None:
        """A scanner elsewhere heard ``peer`` at ``address``: connect unless linked (any thread)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dial, peer, address)

    def _dial(self, peer: bytes, device: BLEDevice | str) -> None:
        if peer == self.me or peer in self._links or peer in self._connecting:
            return
        self._connecting.add(peer)
        self._loop.create_task(self._connect(device, peer))

    async def _connect(self, device: BLEDevice | str, peer: bytes) -> None:
        def lost(_: BleakClient) -> None:
            if self._links.pop(peer, None) is not None:
                self._sizes.pop(peer, None)
                self._emit(LinkDown(peer))

        client = BleakClient(
            device, disconnected_callback=lost, timeout=CONNECT_TIMEOUT_S, bluez={"adapter": self.adapter}
        )
        try:
            await client.connect()
            await client.start_notify(CHARACTERISTIC_UUID, lambda _, data: self._emit(Frame(peer, bytes(data))))
            char = client.services.get_characteristic(CHARACTERISTIC_UUID)
            self._sizes[peer] = char.max_write_without_response_size if char is not None else 20
        except (TimeoutError, BleakError, OSError):
            self.failed_connects += 1
            return
        finally:
            self._connecting.discard(peer)
        self._links[peer] = client
        self._emit(LinkUp(peer))

    def _emit(self, event: RadioEvent) -> None:
        if self._handler is not None:
            self._handler(event)

    def send(self, peer: bytes, data: bytes) -> None:
        """Write one frame to ``peer`` (without response; the outcome is counted, not awaited).

        Raises:
            ConnectError: no link to ``peer``.
        """
        client = self._links.get(peer)
        if client is None:
            raise ConnectError(f"no BLE link to {peer.hex()}")
        future = asyncio.run_coroutine_threadsafe(
            client.write_gatt_char(CHARACTERISTIC_UUID, data, response=False), self._loop
        )
        future.add_done_callback(self._written)

    def _written(self, future: Any) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed_writes += 1

    def stop(self) -> None:
        """Stop scanning, disconnect every link, end the thread."""
        self._handler = None
        if self._thread is None:
            return
        if self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(CONNECT_TIMEOUT_S)
        self._thread = None
