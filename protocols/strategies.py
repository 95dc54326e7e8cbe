"""Hypothesis strategies for every villagemesh wire message, exported for users.

Anyone writing a transport, an actor or a test against villagemesh's protocols
can draw valid values from here instead of hand-building them::

    from hypothesis import given
    from villagemesh.protocols import strategies as vst

    @given(vst.messages(), vst.chunkings(b"..."))
    def test_my_transport(message, chunks): ...

Every strategy draws only *valid* values (the constructors' validation never
fails on them), and each is deterministic given hypothesis's choices: signing
keys are drawn as 32-byte seeds, so shrinking and replay work.

hypothesis is a runtime dependency of villagemesh precisely so that this module
can be imported by users.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from nacl.signing import SigningKey

from .bitchat import Announcement, Fragment, Packet, sign
from .discovery import (
    MAX_FIELD_CHARS,
    MAX_PEER_LIST,
    MAX_TRANSPORTS,
    PERFORMANCE_TIERS,
    THERMAL_STATES,
    Announce,
    Capabilities,
    DiscoveryConnection,
    DiscoveryEvent,
    DiscoveryRequest,
    DiscoveryResponse,
    LegacyPeerDiscovery,
    PeerList,
    PeerListRequest,
    RelayedPeer,
    encode_discovery,
    node_id_from_public_key,
    peer_list,
    relay,
    sign_announce,
    sign_response,
)
from .envelope import ID_BYTES, MAX_NAME_BYTES, MAX_PAYLOAD_BYTES, Message, Priority
from .libp2p.peerid import Multiaddr, PeerId
from .noise import SecureChannel
from .sniff import HTTP_METHODS, MULTISTREAM_HEADER, Sniffed
from .sphinx.crypto import x25519_base
from .sphinx.packet import MAX_HOPS, MAX_MESSAGE, Hop
from .transfer import (
    DIGEST_BYTES,
    MAX_CHUNK_BYTES,
    MAX_TRANSFER_BYTES,
    MIN_CHUNK_BYTES,
    TRANSFER_ID_BYTES,
    Accept,
    Chunk,
    ChunkAck,
    Complete,
    DigestAlgorithm,
    Failed,
    FailReason,
    Offer,
    Refuse,
    RefuseReason,
    WireMessage,
)

__all__ = [
    "addresses",
    "announces",
    "bitchat_announcements",
    "bitchat_fragments",
    "bitchat_packets",
    "capabilities",
    "chunkings",
    "discovery_events",
    "discovery_requests",
    "discovery_responses",
    "legacy_peer_discoveries",
    "libp2p_multiaddrs",
    "libp2p_peer_ids",
    "messages",
    "node_ids",
    "openings",
    "peer_list_requests",
    "peer_lists",
    "relayed_peers",
    "signing_keys",
    "sphinx_messages",
    "sphinx_paths",
    "transfer_messages",
]

_SECONDS = st.floats(min_value=0.0, max_value=4e9, allow_nan=False, allow_infinity=False)


def _names(max_bytes: int) -> st.SearchStrategy[str]:
    """Non-empty text of at most ``max_bytes`` UTF-8 bytes (no lone surrogates)."""
    text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=max_bytes // 4)
    return text | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=max_bytes)


def messages(*, max_payload: int = 2048) -> st.SearchStrategy[Message]:
    """Valid :class:`~villagemesh.protocols.envelope.Message` values.

    Args:
        max_payload: the largest payload drawn (at most ``MAX_PAYLOAD_BYTES``;
            keep it small for fast tests).
    """
    if not 0 <= max_payload <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"max_payload must be within 0..{MAX_PAYLOAD_BYTES}, got {max_payload!r}")
    ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)
    return st.builds(
        Message,
        id=ids,
        kind=_names(MAX_NAME_BYTES),
        sender=_names(MAX_NAME_BYTES),
        recipient=st.none() | _names(MAX_NAME_BYTES),
        priority=st.sampled_from(Priority),
        created_at=st.floats(allow_nan=False, allow_infinity=False),
        ttl=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
        correlation_id=st.none() | ids,
        payload=st.binary(max_size=max_payload),
    )


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split into consecutive chunks at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def signing_keys() -> st.SearchStrategy[SigningKey]:
    """Ed25519 signing keys, drawn as 32-byte seeds (so hypothesis can shrink and replay them)."""
    return st.binary(min_size=32, max_size=32).map(SigningKey)


_ASCII_WORD = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=16)
_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_FIELD_CHARS // 8)


def node_ids() -> st.SearchStrategy[str]:
    """Node ids as villagemesh derives them (32 hex chars)."""
    return st.binary(min_size=32, max_size=32).map(node_id_from_public_key)


def addresses() -> st.SearchStrategy[str]:
    """``transport://host:port[/path]`` strings, including bracketed IPv6 hosts (a path carries e.g. a mix key)."""
    hosts = _ASCII_WORD | st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
    paths = st.just("") | st.text("abcdef0123456789/-_.", max_size=64).map(lambda p: "/" + p)
    return st.builds(
        "{}://{}:{}{}".format,
        st.sampled_from(["tcp", "libp2p", "websocket", "ws", "bitchat", "betanet", "udp"]),
        hosts,
        st.integers(0, 65535),
        paths,
    )


def capabilities() -> st.SearchStrategy[Capabilities]:
    """Valid :class:`~villagemesh.protocols.discovery.Capabilities`."""
    fraction = st.floats(0.0, 1.0) | st.sampled_from([0, 1])
    return st.builds(
        Capabilities,
        cpu_cores=st.integers(1, 256),
        ram_mb=st.integers(0, 2**20),
        battery_percent=st.none() | st.integers(0, 100) | st.floats(0.0, 100.0),
        network_type=st.sampled_from(["wifi", "ethernet", "cellular", "bluetooth"]) | _TEXT,
        device_type=st.sampled_from(["phone", "tablet", "laptop", "desktop"]) | _TEXT,
        performance_tier=st.sampled_from(PERFORMANCE_TIERS),
        evolution_capacity=fraction,
        available_for_evolution=st.booleans(),
        can_evolve=st.booleans(),
        current_evolution_load=fraction,
        thermal_state=st.sampled_from(THERMAL_STATES),
        transports=st.lists(_ASCII_WORD | _TEXT, max_size=MAX_TRANSPORTS).map(tuple),
        node_name=st.none() | _ASCII_WORD | _TEXT,
    )


_TIMESTAMPS = st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**53)
_ADDRESS_LISTS = st.lists(addresses(), max_size=4).map(tuple)


def discovery_requests() -> st.SearchStrategy[DiscoveryRequest]:
    """Valid unsigned :class:`~villagemesh.protocols.discovery.DiscoveryRequest` values."""
    return st.builds(
        DiscoveryRequest,
        node_id=node_ids() | _TEXT,
        addresses=_ADDRESS_LISTS,
        capabilities=capabilities(),
        timestamp=_TIMESTAMPS,
    )


def _signed(sign: Callable[..., Any], signing_key: SigningKey | None) -> st.SearchStrategy[Any]:
    keys = st.just(signing_key) if signing_key is not None else signing_keys()
    return st.builds(
        lambda key, addrs, caps, ts: sign(key, addresses=addrs, capabilities=caps, timestamp=ts),
        keys,
        _ADDRESS_LISTS,
        capabilities(),
        _TIMESTAMPS,
    )


def announces(*, signing_key: SigningKey | None = None) -> st.SearchStrategy[Announce]:
    """Validly signed :class:`~villagemesh.protocols.discovery.Announce` values.

    Args:
        signing_key: sign with this key (one node's announces); by default a key is drawn too.
    """
    return _signed(sign_announce, signing_key)


def discovery_responses(*, signing_key: SigningKey | None = None) -> st.SearchStrategy[DiscoveryResponse]:
    """Validly signed :class:`~villagemesh.protocols.discovery.DiscoveryResponse` values (see :func:`announces`)."""
    return _signed(sign_response, signing_key)


def legacy_peer_discoveries() -> st.SearchStrategy[LegacyPeerDiscovery]:
    """The replaced system's unsigned ``PEER_DISCOVERY`` messages (its eight capability fields)."""
    return st.builds(
        LegacyPeerDiscovery,
        sender_id=_TEXT,
        sender_port=st.integers(1, 65535),
        timestamp=_TIMESTAMPS,
        capabilities=capabilities().map(lambda c: dataclasses.replace(c, transports=())),
    )


_BOOKS = st.just("") | st.text("0123456789abcdef", min_size=1, max_size=16)
_VERSIONS = st.integers(0, 2**53)


def relayed_peers() -> st.SearchStrategy[RelayedPeer]:
    """Signed announces and responses as a relay passes them on (:func:`~villagemesh.protocols.discovery.relay`)."""
    return (announces() | discovery_responses()).map(lambda event: relay(encode_discovery(event)))


def peer_list_requests() -> st.SearchStrategy[PeerListRequest]:
    """Valid :class:`~villagemesh.protocols.discovery.PeerListRequest` values."""
    return st.builds(PeerListRequest, limit=st.integers(1, MAX_PEER_LIST), book=_BOOKS, since=_VERSIONS)


def peer_lists(*, max_size: int = 4) -> st.SearchStrategy[PeerList]:
    """Valid :class:`~villagemesh.protocols.discovery.PeerList` values (each fits one frame)."""
    return st.builds(
        lambda peers, book, version: peer_list(peers, book=book, version=version),
        st.lists(relayed_peers(), max_size=max_size),
        _BOOKS,
        _VERSIONS,
    )


def discovery_events(*, legacy: bool = False) -> st.SearchStrategy[DiscoveryEvent]:
    """Any discovery event (peer exchange included); ``legacy`` adds unsigned ``PEER_DISCOVERY`` messages."""
    events: st.SearchStrategy[DiscoveryEvent] = st.one_of(
        discovery_requests(), discovery_responses(), announces(), peer_list_requests(), peer_lists(max_size=2)
    )
    return events | legacy_peer_discoveries() if legacy else events


def _multistream_line(protocol: str) -> bytes:
    line = protocol.encode() + b"\n"
    return bytes([len(line)]) + line  # a one-byte uvarint: every protocol id here is < 128 bytes


def openings() -> st.SearchStrategy[tuple[Sniffed, bytes]]:
    """The real first bytes of each protocol the acceptor routes, paired with the verdict ``sniff`` must give.

    Discovery frames (signed, unsigned and legacy), a secure channel initiator's
    first output, a multistream-select header and proposal, an HTTP request
    line and a TLS handshake record header.
    """
    keys = st.binary(min_size=32, max_size=32)
    discovery = discovery_events(legacy=True).map(
        lambda event: (Sniffed.DISCOVERY_JSON, DiscoveryConnection(allow_unsigned_legacy=True).send(event))
    )
    secure = st.builds(
        lambda static, identity, ephemeral: (
            Sniffed.SECURE,
            SecureChannel.initiator(static, identity, ephemeral=ephemeral).data_to_send(),
        ),
        keys,
        signing_keys(),
        keys,
    )
    multistream = st.sampled_from(["/noise", "/yamux/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]).map(
        lambda protocol: (Sniffed.LIBP2P_MULTISTREAM, MULTISTREAM_HEADER + _multistream_line(protocol))
    )
    http = st.builds(
        lambda method, path: (Sniffed.HTTP, method + b" /" + path.encode() + b" HTTP/1.1\r\nHost: node\r\n\r\n"),
        st.sampled_from(HTTP_METHODS),
        st.text("abcdefghijklmnopqrstuvwxyz0123456789/-_.", max_size=30),
    )
    tls = st.builds(
        lambda minor, body: (Sniffed.TLS, bytes([0x16, 0x03, minor]) + len(body).to_bytes(2, "big") + body),
        st.integers(0, 4),
        st.binary(min_size=1, max_size=64),
    )
    return st.one_of(discovery, secure, multistream, http, tls)


@st.composite
def sphinx_paths(draw: st.DrawFn, *, min_hops: int = 1, max_hops: int = MAX_HOPS) -> tuple[list[bytes], list[Hop]]:
    """``(secrets, path)`` for :mod:`villagemesh.protocols.sphinx`: each hop's X25519 secret and its :class:`Hop`.

    Secrets are drawn as 32 bytes (shrinkable); ids are distinct.
    """
    size = draw(st.integers(min_hops, max_hops))
    secrets = draw(st.lists(st.binary(min_size=32, max_size=32), min_size=size, max_size=size))
    ids = draw(st.lists(st.binary(min_size=16, max_size=16), min_size=size, max_size=size, unique=True))
    return secrets, [Hop(node_id, x25519_base(secret)) for node_id, secret in zip(ids, secrets, strict=True)]


def sphinx_messages() -> st.SearchStrategy[bytes]:
    """Messages a Sphinx packet can carry (0 to :data:`~villagemesh.protocols.sphinx.MAX_MESSAGE` bytes)."""
    return st.binary(max_size=MAX_MESSAGE)


def libp2p_peer_ids() -> st.SearchStrategy[PeerId]:
    """libp2p peer ids: Ed25519 (inlined, ``12D3KooW…``) and sha256-hashed (``Qm…``)."""
    keys = st.binary(min_size=32, max_size=32)
    return keys.map(PeerId.from_ed25519) | st.binary(min_size=43, max_size=300).map(PeerId.from_public_key_proto)


def libp2p_multiaddrs() -> st.SearchStrategy[Multiaddr]:
    """``/ip4|ip6/…/tcp/…[/p2p/…]`` multiaddrs."""
    host = st.ip_addresses(v=4).map(lambda ip: ("ip4", str(ip))) | st.ip_addresses(v=6).map(lambda ip: ("ip6", str(ip)))
    port = st.integers(0, 65535).map(lambda n: ("tcp", str(n)))
    peer = st.none() | libp2p_peer_ids().map(lambda p: ("p2p", str(p)))
    return st.builds(lambda h, t, p: Multiaddr((h, t) if p is None else (h, t, p)), host, port, peer)


# ---------------------------------------------------------------------------- BitChat


def _peer_ids() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=8, max_size=8)


@st.composite
def bitchat_packets(draw: st.DrawFn, *, max_payload: int = 600, signed: bool | None = None) -> Packet:
    """Valid BitChat packets of either version; payloads sometimes compressible, routes only in v2.

    Args:
        max_payload: the largest payload drawn.
        signed: True: signed by a drawn key; False: unsigned; None: either (a
            drawn 64-byte signature that verifies under no key, or none).
    """
    version = draw(st.sampled_from((1, 2)))
    repetitive = st.binary(min_size=1, max_size=4).flatmap(
        lambda unit: st.integers(0, max_payload // len(unit)).map(lambda n: unit * n)
    )
    packet = Packet(
        type=draw(st.integers(0, 255)),
        sender_id=draw(_peer_ids()),
        timestamp=draw(st.integers(0, 2**64 - 1)),
        payload=draw(st.binary(max_size=max_payload) | repetitive),
        ttl=draw(st.integers(0, 255)),
        version=version,
        recipient_id=draw(st.none() | _peer_ids()),
        route=tuple(draw(st.lists(_peer_ids(), max_size=3 if version == 2 else 0))),
        rsr=draw(st.booleans()),
    )
    if signed:
        return sign(packet, draw(signing_keys()))
    if signed is None and draw(st.booleans()):
        return dataclasses.replace(packet, signature=draw(st.binary(min_size=64, max_size=64)))
    return packet


def bitchat_announcements() -> st.SearchStrategy[Announcement]:
    """Valid BitChat announce payloads, with and without the optional TLVs and with unknown extensions."""
    key = st.binary(min_size=32, max_size=32)
    return st.builds(
        Announcement,
        nickname=st.text(max_size=20),
        noise_public_key=key,
        signing_public_key=key,
        neighbours=st.none() | st.lists(_peer_ids(), max_size=10).map(tuple),
        capabilities=st.none() | st.binary(max_size=8),
        geohash=st.none() | st.text("0123456789bcdefghjkmnpqrstuvwxyz", max_size=12),
        extensions=st.lists(st.tuples(st.integers(7, 255), st.binary(max_size=20)), max_size=3).map(tuple),
    )


def bitchat_fragments() -> st.SearchStrategy[Fragment]:
    """Valid fragment payloads (index below total)."""
    return st.integers(1, 0xFFFF).flatmap(
        lambda total: st.builds(
            Fragment,
            fragment_id=_peer_ids(),
            index=st.integers(0, total - 1),
            total=st.just(total),
            original_type=st.integers(0, 255),
            data=st.binary(max_size=64),
        )
    )


def transfer_messages(*, max_chunk: int = 64) -> st.SearchStrategy[WireMessage]:
    """Valid transfer wire messages of every type (chunks of up to ``max_chunk`` bytes, their check right)."""
    ids = st.binary(min_size=TRANSFER_ID_BYTES, max_size=TRANSFER_ID_BYTES)
    digests = st.binary(min_size=DIGEST_BYTES, max_size=DIGEST_BYTES)
    texts = st.text(max_size=40)  # at most 160 UTF-8 bytes: within the 1,024 a text may have
    counts = st.integers(0, 2**32 - 1)
    return st.one_of(
        st.builds(
            Offer,
            ids,
            st.integers(0, MAX_TRANSFER_BYTES),
            st.integers(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
            digests,
            _names(255),
            texts,
            st.sampled_from(DigestAlgorithm),
        ),
        st.builds(Accept, ids, counts),
        st.builds(ChunkAck, ids, counts),
        st.builds(Refuse, ids, st.sampled_from(RefuseReason), texts),
        st.builds(Failed, ids, st.sampled_from(FailReason), texts),
        st.builds(Complete, ids, digests),
        st.builds(Chunk.of, ids, counts, st.binary(min_size=1, max_size=max(1, min(max_chunk, MAX_CHUNK_BYTES)))),
    )
