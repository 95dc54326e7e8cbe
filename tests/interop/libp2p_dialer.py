"""A minimal asyncio libp2p dialer made of villagemesh's sans-I/O layers, for the interop tests.

It is the path the LibP2P transport actor will drive, written out plainly:
TCP → multistream-select ``/noise`` → libp2p Noise (the dialled peer id checked) →
multistream-select ``/yamux/1.0.0`` → yamux → per stream, multistream-select and the
stream's protocol. Inbound streams the peer opens (py-libp2p identifies us at once)
are reset: this dialer serves nothing.
"""

from __future__ import annotations

import asyncio
import os

from nacl.signing import SigningKey

from villagemesh.protocols.libp2p import yamux
from villagemesh.protocols.libp2p.multistream import Agreed, Negotiation, NoProtocol
from villagemesh.protocols.libp2p.noise import Authenticated, NoiseSession
from villagemesh.protocols.libp2p.noise import Data as NoiseData
from villagemesh.protocols.libp2p.peerid import PeerId

READ = 65536


class Dialer:
    """One upgraded connection to a libp2p peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.identity = SigningKey.generate()
        self.noise: NoiseSession | None = None
        self.mux = yamux.Session(client=True)
        self.inbox: dict[int, bytearray] = {}
        self.remote: PeerId | None = None

    @classmethod
    async def connect(cls, host: str, port: int, expected: PeerId, timeout: float = 10.0) -> Dialer:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        dialer = cls(reader, writer)
        await asyncio.wait_for(dialer._upgrade(expected), timeout)
        return dialer

    async def _raw(self) -> bytes:
        data = await self.reader.read(READ)
        if not data:
            raise ConnectionError("the peer closed the connection")
        return data

    async def _upgrade(self, expected: PeerId) -> None:
        security = Negotiation.dialer(["/noise"])
        self.writer.write(security.data_to_send())
        while security.agreed is None:
            events = security.receive_data(await self._raw())
            if any(isinstance(e, NoProtocol) for e in events):
                raise ConnectionError("the peer speaks no /noise")
            self.writer.write(security.data_to_send())
        self.noise = NoiseSession.initiator(os.urandom(32), self.identity, expected_peer=expected)
        self.writer.write(self.noise.data_to_send())
        pending = security.rest
        while self.noise.remote is None:
            events = self.noise.receive_data(pending or await self._raw())
            pending = b""
            self.writer.write(self.noise.data_to_send())
            if any(isinstance(e, Authenticated) for e in events):
                self.remote = self.noise.remote.peer_id if self.noise.remote else None
        muxer = Negotiation.dialer(["/yamux/1.0.0"])
        self._secure(muxer.data_to_send())
        plain = b""
        while muxer.agreed is None:
            plain = b"".join(e.data for e in self.noise.receive_data(await self._raw()) if isinstance(e, NoiseData))
            muxer.receive_data(plain)
        self._on_mux(self.mux.receive_data(muxer.rest))

    def _secure(self, data: bytes) -> None:
        assert self.noise is not None
        if data:
            self.noise.send(data)
            self.writer.write(self.noise.data_to_send())

    def _on_mux(self, events: list[yamux.Event]) -> None:
        for event in events:
            if isinstance(event, yamux.StreamOpened):
                self.mux.reset(event.stream)  # an inbound stream (identify): we serve nothing
            elif isinstance(event, yamux.Data):
                self.inbox.setdefault(event.stream, bytearray()).extend(event.data)
                self.mux.consumed(event.stream, len(event.data))
        self._secure(self.mux.data_to_send())

    async def _pump(self) -> None:
        assert self.noise is not None
        for event in self.noise.receive_data(await self._raw()):
            if isinstance(event, NoiseData):
                self._on_mux(self.mux.receive_data(event.data))

    async def open(self, protocol: str) -> tuple[int, bytes]:
        """A new stream speaking ``protocol``; with whatever came after the agreement."""
        stream = self.mux.open_stream()
        negotiation = Negotiation.dialer([protocol])
        self.mux.send(stream, negotiation.data_to_send())
        self._secure(self.mux.data_to_send())
        while True:
            data = bytes(self.inbox.pop(stream, b""))
            events = negotiation.receive_data(data) if data else []
            if any(isinstance(e, Agreed) for e in events):
                return stream, negotiation.rest
            if any(isinstance(e, NoProtocol) for e in events):
                raise ConnectionError(f"the peer does not speak {protocol}")
            out = negotiation.data_to_send()
            if out:
                self.write(stream, out)
            await self._pump()

    async def read(self, stream: int, size: int, already: bytes = b"") -> bytes:
        """Exactly ``size`` bytes from ``stream``."""
        data = bytearray(already)
        while len(data) < size:
            data += self.inbox.pop(stream, b"")
            if len(data) < size:
                await self._pump()
        return bytes(data)

    def write(self, stream: int, data: bytes) -> None:
        self.mux.send(stream, data)
        self._secure(self.mux.data_to_send())

    def close(self) -> None:
        self.writer.close()
