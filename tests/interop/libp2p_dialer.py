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

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: SigningKey | None = None
    ) -> None:
        self.reader, self.writer = reader, writer
        self.identity = identity or SigningKey.generate()
        self.resets = 0
        """Streams the peer reset."""
        self.noise: NoiseSession | None = None
        self.mux = yamux.Session(client=True)
        self.inbox: dict[int, bytearray] = {}
        self.remote: PeerId | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, expected: PeerId, timeout: float = 30.0, identity: SigningKey | None = None
    ) -> Dialer:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        dialer = cls(reader, writer, identity)
        try:
            await asyncio.wait_for(dialer._upgrade(expected), timeout)
        except BaseException:
            await dialer.close()
            raise
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
            elif isinstance(event, yamux.StreamReset):
                self.resets += 1
        self._secure(self.mux.data_to_send())

    def write_raw_mux(self, frames: bytes) -> None:
        """Send yamux frames made by hand (what our own session would refuse to make), encrypted."""
        self._secure(frames)

    async def settle(self, quiet: float = 0.3) -> int:
        """Read and answer until the peer says nothing for ``quiet`` seconds; the resets seen so far."""
        while True:
            try:
                await asyncio.wait_for(self._pump(), quiet)
            except TimeoutError:
                return self.resets

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Whether the peer closes the connection within ``timeout`` (whatever it still sends is read)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(READ):
                    pass
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            pass  # reset by the peer: closed all the same
        return True

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

    async def close(self) -> None:
        """Close and wait until closed (a transport collected after its loop ended raises there)."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # the peer went first: closed all the same


class Listener:
    """A minimal asyncio libp2p listener of the same layers: serves ``/ipfs/ping/1.0.0`` and ``/ipfs/id/1.0.0``."""

    def __init__(self) -> None:
        self.identity = SigningKey.generate()
        self.static = os.urandom(32)
        self.peer_id = PeerId.from_ed25519(bytes(self.identity.verify_key))
        self.server: asyncio.Server | None = None
        self.address = ""
        self.pings = 0
        self.identified: list[PeerId] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.peer_id}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL, PING_PROTOCOL, Identify
        from villagemesh.protocols.libp2p.peerid import ED25519_KEY_PROTO_PREFIX, Multiaddr
        from villagemesh.protocols.libp2p.varint import frame

        async def raw() -> bytes:
            data = await reader.read(READ)
            if not data:
                raise ConnectionError("closed")
            return data

        try:
            security = Negotiation.listener(["/noise"])
            while security.agreed is None:
                security.receive_data(await raw())
                writer.write(security.data_to_send())
            noise = NoiseSession.responder(self.static, self.identity)
            pending = security.rest
            early: list[bytes] = []  # transport messages that came in the read with the handshake's last one
            while noise.remote is None:
                early += [bytes(e.data) for e in noise.receive_data(pending or await raw()) if isinstance(e, NoiseData)]
                pending = b""
                writer.write(noise.data_to_send())
            remote = noise.remote.peer_id

            def secure(data: bytes) -> None:
                if data:
                    noise.send(data)
                    writer.write(noise.data_to_send())

            muxer = Negotiation.listener(["/yamux/1.0.0"])
            for data in early:  # (dropping them stalled the dialer until its 10 s muxer timeout)
                muxer.receive_data(data)
            secure(muxer.data_to_send())
            while muxer.agreed is None:
                for event in noise.receive_data(await raw()):
                    if isinstance(event, NoiseData):
                        muxer.receive_data(event.data)
                secure(muxer.data_to_send())
            mux = yamux.Session(client=False)
            streams: dict[int, Negotiation | str] = {}
            me = Identify(
                ED25519_KEY_PROTO_PREFIX + bytes(self.identity.verify_key),
                (Multiaddr.parse(self.address.rsplit("/p2p/", 1)[0]),),
                (PING_PROTOCOL, IDENTIFY_PROTOCOL),
                None,
                "ipfs/0.1.0",
                "villagemesh-interop/0.1",
            )

            def on(events: list[yamux.Event]) -> None:
                for event in events:
                    if isinstance(event, yamux.StreamOpened):
                        streams[event.stream] = Negotiation.listener([PING_PROTOCOL, IDENTIFY_PROTOCOL])
                    elif isinstance(event, yamux.Data):
                        mux.consumed(event.stream, len(event.data))
                        self._on_data(mux, streams, event.stream, event.data, frame(me.encode()), remote)
                    elif isinstance(event, yamux.StreamClosed) and event.stream in mux.open_streams():
                        mux.close(event.stream)
                secure(mux.data_to_send())

            on(mux.receive_data(muxer.rest))
            while True:
                for event in noise.receive_data(await raw()):
                    if isinstance(event, NoiseData):
                        on(mux.receive_data(event.data))
        except (ConnectionError, OSError):
            pass  # the peer hung up: this connection is done
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass  # already gone

    def _on_data(self, mux: yamux.Session, streams: dict[int, Negotiation | str], stream: int, data: bytes,
                 identify: bytes, remote: PeerId) -> None:
        from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL

        state = streams.get(stream)
        if isinstance(state, Negotiation):
            state.receive_data(data)
            mux.send(stream, state.data_to_send())
            if state.agreed is None:
                return
            streams[stream], data = state.agreed, state.rest
            if state.agreed == IDENTIFY_PROTOCOL:
                mux.send(stream, identify)
                mux.close(stream)
                self.identified.append(remote)
                return
        if data and streams.get(stream) != IDENTIFY_PROTOCOL:
            mux.send(stream, data)  # ping: echo
            self.pings += len(data) // 32
