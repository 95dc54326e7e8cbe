"""Discovery v1: who is out there, where, and what can it do. Signed, length-prefixed JSON.

Wire format (compatible with the system villagemesh replaces)::

    +---------------------------+----------------------------------------+
    | length: 4 bytes, BE       | UTF-8 JSON object, ``length`` bytes    |
    +---------------------------+----------------------------------------+

Every villagemesh message is a JSON object with ``"protocol_version": "1.0"``
and a ``"type"``:

===================== ========= ==================================================
type                  signed    fields besides type and protocol_version
===================== ========= ==================================================
``DISCOVERY_REQUEST`` no        node_id, addresses, capabilities, timestamp
``DISCOVERY_RESPONSE`` yes      the same + public_key, signature (hex)
``ANNOUNCE``          yes       the same + public_key, signature (hex)
``PEER_DISCOVERY``    no        legacy: sender_id, sender_port, timestamp, capabilities
``PEER_LIST_REQUEST`` no        limit (1..``MAX_PEER_LIST``), book, since (a cursor)
``PEER_LIST``         per entry peers: ``[node_id, timestamp, "<signed JSON>"]`` of *other*
                                nodes; book, version (the cursor to ask from next)
===================== ========= ==================================================

Signatures. A response or announce carries the sender's Ed25519 public key and
a signature over ``SIGNATURE_DOMAIN + canonical_json(every other field)``
(sorted keys, no whitespace, UTF-8, no NaN). Its ``node_id`` must equal
:func:`node_id_from_public_key` of that key, so a node id cannot be claimed by
anyone but the key's holder: a registry that trusts only verified announces
cannot be fed spoofed peers. Decoding *always* verifies (a body verified once
is remembered, by its exact bytes, so the check is not repeated); an event that comes
out of :class:`DiscoveryConnection` or :func:`decode_discovery` as an
:class:`Announce` or :class:`DiscoveryResponse` is authentic. Freshness (how
old a ``timestamp`` may be) needs a clock and is the registry's call.

Requests are unsigned: they only ask "who is there?" and the answer is signed.

Peer exchange. ``PEER_LIST_REQUEST`` asks "whom do you know?"; the answer,
``PEER_LIST``, passes on up to ``limit`` signed announces or responses the
answering node received from others (so a node seeded with three addresses
learns the rest of the network from them). Each entry is a JSON array
``[node_id, timestamp, body]``: the node id and timestamp the entry claims, so
a receiver skips at no cost what it already knows, and the signed message
itself as a JSON *string*, carried opaquely (relaying never re-encodes what
someone else signed, and a list of strings costs one parse, not one per entry).
Lists are deltas. A node's peer *book* has an id (random per book, so a
restarted node is a new book) and a version that grows with every change; a
list says which book and version it brings the asker to, and the next request
names them (``book``, ``since``) to get only what changed after (an unknown
book, or ``since`` 0, gets everything). A list holds the oldest changes first,
so a delta cut at ``limit`` continues where it stopped. Without deltas every
exchange would carry every known peer again, nearly all of it already known.

The list is *not* a signed statement of the relaying node, and its entries are
*not* verified on decoding: each is a :class:`RelayedPeer`, whose ``body``
:func:`decode_discovery` turns into a verified :class:`Announce` or
:class:`DiscoveryResponse` (compare its node id and timestamp with the claims). A
:class:`RelayedPeer` is a distinct type, so no code can mistake one for a
verified peer. A relay can replay an old announce but not alter one; how old
one may be is the registry's call, as for any announce.

Legacy. The replaced system's unsigned ``PEER_DISCOVERY`` (seed-system.md)
decodes to :class:`LegacyPeerDiscovery` only when the connection is built with
``allow_unsigned_legacy=True``; otherwise it is a :class:`RemoteProtocolError`.
It is a distinct type so no code can mistake it for a verified peer.

Strictness. Unknown or duplicate keys, wrong types (``true`` is not a number),
NaN/Infinity and non-UTF-8 are :class:`RemoteProtocolError`; so every accepted
message has one meaning, and the signed bytes are recomputed from it.

Limits: ``MAX_DISCOVERY_FRAME`` (64 KiB) bounds a frame, checked on the length
prefix; ``MAX_ADDRESSES`` and ``MAX_TRANSPORTS`` (16) and ``MAX_FIELD_CHARS``
(255) bound the lists and strings inside so one peer cannot bloat a registry;
``MAX_PEER_LIST`` (64) bounds a peer list, and the frame bound its bytes
(:func:`peer_list` takes as many entries as fit).

The connection is symmetric and stateless: either side may send any event at
any time (a client sends a request and reads a response; a node may announce
unprompted). UDP users take :func:`encode_discovery` / :func:`decode_discovery`
(one JSON body per datagram, no length prefix).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .framing import NEED_DATA, FramedConnection, NeedData
from .libp2p.peerid import Multiaddr
from .sniff import DISCOVERY_MAX_LENGTH

__all__ = [
    "LIST_OVERHEAD",
    "MAX_ADDRESSES",
    "MAX_DISCOVERY_FRAME",
    "MAX_FIELD_CHARS",
    "MAX_PEER_LIST",
    "MAX_TRANSPORTS",
    "NEED_DATA",
    "PERFORMANCE_TIERS",
    "PROTOCOL_VERSION",
    "SIGNATURE_DOMAIN",
    "THERMAL_STATES",
    "Announce",
    "Capabilities",
    "DiscoveryConnection",
    "DiscoveryEvent",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "LegacyPeerDiscovery",
    "PeerList",
    "PeerListRequest",
    "RelayedPeer",
    "decode_discovery",
    "encode_discovery",
    "entry_size",
    "node_id_from_public_key",
    "peer_list",
    "relay",
    "sign_announce",
    "sign_response",
    "verify",
]

PROTOCOL_VERSION = "1.0"
"""The ``protocol_version`` every discovery message carries (the replaced system's value)."""

MAX_DISCOVERY_FRAME = DISCOVERY_MAX_LENGTH
"""64 KiB per frame: a full announce is under 4 KiB; the sniffer uses the same bound."""

MAX_ADDRESSES = 16
"""Addresses per peer: one per transport and interface is far below this."""

MAX_TRANSPORTS = 16
"""Transport names per peer: villagemesh knows four."""

MAX_FIELD_CHARS = 255
"""Longest node id, address, or capability string: ids are 32 hex chars, addresses short URLs."""

SIGNATURE_DOMAIN = b"villagemesh-discovery-v1:"
"""Prefixed to the signed bytes so a discovery signature is never valid in another protocol."""

MAX_PEER_LIST = 64
"""Relayed announces per PEER_LIST: a LAN's worth of peers in one exchange; bigger networks take more rounds."""

PERFORMANCE_TIERS = ("low", "medium", "high", "premium")
"""The replaced system's performance tiers."""

THERMAL_STATES = ("normal", "warm", "hot", "throttling")
"""The replaced system's thermal states."""

NODE_ID_BYTES = 16
"""A node id is the first 16 bytes of SHA-256(public key), hex: forging one needs a 2**128 preimage."""

_MAX_CORES = 2**16  # sanity bounds: far beyond any device, small enough for any JSON parser
_MAX_RAM_MB = 2**40

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_LEN4 = struct.Struct(">I")


def node_id_from_public_key(public_key: bytes) -> str:
    """The node id bound to an Ed25519 public key: hex of the first 16 bytes of its SHA-256."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise LocalProtocolError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {public_key!r}")
    return hashlib.sha256(public_key).digest()[:NODE_ID_BYTES].hex()


# ---------------------------------------------------------------------------- values


_MAX_JSON_INT = 2**53  # integers beyond this do not survive a round trip through most JSON parsers


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_JSON_INT


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise LocalProtocolError(f"{name} must be a non-empty str of at most {MAX_FIELD_CHARS} chars, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{name} {value!r} is not encodable as UTF-8") from exc


def _check_fraction(name: str, value: object) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:  # type: ignore[operator]
        raise LocalProtocolError(f"{name} must be a number within 0..1, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int within {low}..{high}, got {value!r}")


@dataclass(frozen=True)
class Capabilities:
    """What a peer says it can do; the replaced system's field names.

    ``trust_score``, ``latency_ms`` and ``bandwidth_kbps`` of the replaced
    system are *not* here: they are the observer's measurements and judgement
    of a peer (the registry keeps them), not something a peer may claim.

    Raises:
        LocalProtocolError: a field is out of range (the message names it).
    """

    cpu_cores: int
    ram_mb: int
    battery_percent: float | None
    """None means mains power."""
    network_type: str
    """e.g. wifi, ethernet, cellular, bluetooth."""
    device_type: str
    """e.g. phone, tablet, laptop, desktop."""
    performance_tier: str
    """One of :data:`PERFORMANCE_TIERS`."""
    evolution_capacity: float
    """0..1."""
    available_for_evolution: bool
    can_evolve: bool = True
    current_evolution_load: float = 0.0
    """0..1."""
    thermal_state: str = "normal"
    """One of :data:`THERMAL_STATES`."""
    transports: tuple[str, ...] = ()
    """Transport names the peer listens on, e.g. ("libp2p", "websocket")."""
    node_name: str | None = None
    """The node's human name (``create_network(name=...)``), so orchestrators can tell agents apart."""

    def __post_init__(self) -> None:
        _check_int("cpu_cores", self.cpu_cores, 1, _MAX_CORES)
        _check_int("ram_mb", self.ram_mb, 0, _MAX_RAM_MB)
        if self.battery_percent is not None and (
            not _is_number(self.battery_percent) or not 0 <= self.battery_percent <= 100
        ):
            raise LocalProtocolError(f"battery_percent must be None or within 0..100, got {self.battery_percent!r}")
        _check_text("network_type", self.network_type)
        _check_text("device_type", self.device_type)
        if self.performance_tier not in PERFORMANCE_TIERS:
            raise LocalProtocolError(
                f"performance_tier must be one of {PERFORMANCE_TIERS}, got {self.performance_tier!r}"
            )
        _check_fraction("evolution_capacity", self.evolution_capacity)
        for name in ("available_for_evolution", "can_evolve"):
            if not isinstance(getattr(self, name), bool):
                raise LocalProtocolError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_fraction("current_evolution_load", self.current_evolution_load)
        if self.thermal_state not in THERMAL_STATES:
            raise LocalProtocolError(f"thermal_state must be one of {THERMAL_STATES}, got {self.thermal_state!r}")
        if not isinstance(self.transports, tuple) or len(self.transports) > MAX_TRANSPORTS:
            raise LocalProtocolError(f"transports must be a tuple of at most {MAX_TRANSPORTS}, got {self.transports!r}")
        for name in self.transports:
            _check_text("transport name", name)
        if self.node_name is not None:
            _check_text("node_name", self.node_name)

    def to_json(self) -> dict[str, Any]:
        """The JSON object form (transports as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["transports"] = list(self.transports)
        return out

    @classmethod
    def from_json(cls, obj: object, *, legacy: bool = False) -> Capabilities:
        """Parse the JSON object form; ``legacy`` tolerates the replaced system's extra keys.

        Raises:
            RemoteProtocolError: unknown keys, missing keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"capabilities must be a JSON object, got {obj!r}")
        if not legacy and set(obj) - known:
            raise RemoteProtocolError(f"capabilities has unknown keys {sorted(set(obj) - known)}")
        args = {k: v for k, v in obj.items() if k in known}
        if "transports" in args:
            args["transports"] = tuple(args["transports"]) if isinstance(args["transports"], list) else None
        try:
            return cls(**args)
        except TypeError as exc:
            raise RemoteProtocolError(f"capabilities missing keys: {exc}") from exc
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"peer sent invalid capabilities: {exc}") from exc


def _check_addresses(addresses: object) -> None:
    if not isinstance(addresses, tuple) or len(addresses) > MAX_ADDRESSES:
        raise LocalProtocolError(f"addresses must be a tuple of at most {MAX_ADDRESSES}, got {addresses!r}")
    for address in addresses:
        _check_text("address", address)
        if address.startswith("/"):  # a libp2p multiaddr: /ip4/…/tcp/…/p2p/…
            try:
                Multiaddr.parse(address)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"address {address!r} is not a multiaddr we read: {exc}") from exc
            continue
        scheme, sep, rest = address.partition("://")
        where, _, path = rest.partition("/")
        host, colon, port = where.rpartition(":")
        valid = (
            sep
            and scheme.isascii()
            and scheme[:1].isalpha()
            and all(c.isalnum() or c in "+-." for c in scheme)
            and colon
            and host
            and not any(c.isspace() or c == "/" for c in host)
            and port.isascii()
            and port.isdigit()
            and int(port) <= 65535
            and all(c.isascii() and c.isprintable() and not c.isspace() for c in path)
        )
        if not valid:
            raise LocalProtocolError(
                f"address must look like 'transport://host:port[/path]' or a /multiaddr, got {address!r}"
            )


@dataclass(frozen=True)
class _Peer:
    TYPE: ClassVar[str]

    node_id: str
    addresses: tuple[str, ...]
    capabilities: Capabilities
    timestamp: float
    """The sender's clock, seconds."""

    def __post_init__(self) -> None:
        _check_text("node_id", self.node_id)
        _check_addresses(self.addresses)
        if not isinstance(self.capabilities, Capabilities):
            raise LocalProtocolError(f"capabilities must be Capabilities, got {self.capabilities!r}")
        if not _is_number(self.timestamp):
            raise LocalProtocolError(f"timestamp must be a finite number, got {self.timestamp!r}")


@dataclass(frozen=True)
class DiscoveryRequest(_Peer):
    """ "Who is there?": the asker's own node id, addresses and capabilities (unsigned)."""

    TYPE: ClassVar[str] = "DISCOVERY_REQUEST"


@dataclass(frozen=True)
class _SignedPeer(_Peer):
    public_key: bytes = field(kw_only=True)
    """The sender's Ed25519 public key (32 bytes)."""
    signature: bytes = field(kw_only=True)
    """Ed25519 signature (64 bytes) over SIGNATURE_DOMAIN + the canonical JSON of every other field."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, size in (("public_key", PUBLIC_KEY_BYTES), ("signature", SIGNATURE_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise LocalProtocolError(f"{name} must be {size} bytes, got {value!r}")


@dataclass(frozen=True)
class DiscoveryResponse(_SignedPeer):
    """The answer to a request: the responder's own details, signed. Build it with :func:`sign_response`."""

    TYPE: ClassVar[str] = "DISCOVERY_RESPONSE"


@dataclass(frozen=True)
class Announce(_SignedPeer):
    """An unprompted "I am here", signed. Build it with :func:`sign_announce`."""

    TYPE: ClassVar[str] = "ANNOUNCE"


@dataclass(frozen=True)
class LegacyPeerDiscovery:
    """The replaced system's unsigned ``PEER_DISCOVERY`` message (accepted only when configured).

    Its host is the connection's remote address; only the port travels.
    """

    TYPE: ClassVar[str] = "PEER_DISCOVERY"

    sender_id: str
    sender_port: int
    timestamp: float
    capabilities: Capabilities

    def __post_init__(self) -> None:
        _check_text("sender_id", self.sender_id)
        _check_int("sender_port", self.sender_port, 1, 65535)
        if not _is_number(self.timestamp):
            raise LocalProtocolError(f"timestamp must be a finite number, got {self.timestamp!r}")
        if not isinstance(self.capabilities, Capabilities):
            raise LocalProtocolError(f"capabilities must be Capabilities, got {self.capabilities!r}")


@dataclass(frozen=True)
class PeerListRequest:
    """ "Whom do you know?": asks for a :class:`PeerList` of at most ``limit`` peers (unsigned),
    changed in book ``book`` after version ``since`` (``""`` and 0: everything)."""

    TYPE: ClassVar[str] = "PEER_LIST_REQUEST"

    limit: int
    book: str = ""
    since: int = 0

    def __post_init__(self) -> None:
        _check_int("limit", self.limit, 1, MAX_PEER_LIST)
        _check_cursor(self.book, self.since)


MAX_BOOK_ID_CHARS = 32
"""A book id is a short random token (hex)."""


def _check_cursor(book: object, version: object) -> None:
    if not isinstance(book, str) or len(book) > MAX_BOOK_ID_CHARS:
        raise LocalProtocolError(f"book must be a str of at most {MAX_BOOK_ID_CHARS} chars, got {book!r}")
    _check_int("version", version, 0, _MAX_JSON_INT)


_RELAYABLE = ("ANNOUNCE", "DISCOVERY_RESPONSE")


@dataclass(frozen=True)
class RelayedPeer:
    """Another node's signed announce or response as a relay passed it on: **not verified**.

    ``node_id`` and ``timestamp`` are what the entry claims (compare them with
    what you know before paying for a signature check); ``body`` is the signed
    message's JSON (UTF-8), which :func:`decode_discovery` verifies. Build one
    with :func:`relay`, or from a verified event and its body.
    """

    node_id: str
    timestamp: float
    body: bytes

    def __post_init__(self) -> None:
        _check_text("node_id", self.node_id)
        if not _is_number(self.timestamp):
            raise LocalProtocolError(f"timestamp must be a finite number, got {self.timestamp!r}")
        if not isinstance(self.body, bytes) or not self.body or len(self.body) > MAX_DISCOVERY_FRAME:
            raise LocalProtocolError(f"body must be non-empty bytes within MAX_DISCOVERY_FRAME, got {self.body[:40]!r}")


@dataclass(frozen=True)
class PeerList:
    """The answer to a :class:`PeerListRequest`: other nodes' signed announces, unverified until
    decoded, and the cursor (``book``, ``version``) to ask from next time."""

    TYPE: ClassVar[str] = "PEER_LIST"

    peers: tuple[RelayedPeer, ...]
    book: str = ""
    version: int = 0

    def __post_init__(self) -> None:
        _check_cursor(self.book, self.version)
        if not isinstance(self.peers, tuple) or len(self.peers) > MAX_PEER_LIST:
            raise LocalProtocolError(f"peers must be a tuple of at most {MAX_PEER_LIST}, got {self.peers!r}")
        for peer in self.peers:
            if not isinstance(peer, RelayedPeer):
                raise LocalProtocolError(f"peers must hold RelayedPeer values, got {peer!r}")


DiscoveryEvent: TypeAlias = (
    DiscoveryRequest | DiscoveryResponse | Announce | LegacyPeerDiscovery | PeerListRequest | PeerList
)
"""Everything :class:`DiscoveryConnection` sends or receives."""

# ---------------------------------------------------------------------------- signing


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _unsigned_json(type_: str, node_id: str, addresses: tuple[str, ...], caps: Capabilities, ts: float) -> dict:
    return {
        "type": type_,
        "protocol_version": PROTOCOL_VERSION,
        "node_id": node_id,
        "addresses": list(addresses),
        "capabilities": caps.to_json(),
        "timestamp": ts,
    }


def _signed_bytes(event: _SignedPeer) -> bytes:
    obj = _unsigned_json(event.TYPE, event.node_id, event.addresses, event.capabilities, event.timestamp)
    obj["public_key"] = event.public_key.hex()
    return SIGNATURE_DOMAIN + _canonical(obj)


def _sign(
    cls: type[_SignedPeer],
    signing_key: SigningKey,
    addresses: tuple[str, ...],
    capabilities: Capabilities,
    timestamp: float,
) -> Any:
    if not isinstance(signing_key, SigningKey):
        raise LocalProtocolError(f"signing_key must be a nacl.signing.SigningKey, got {signing_key!r}")
    public_key = bytes(signing_key.verify_key)
    draft = cls(
        node_id=node_id_from_public_key(public_key),
        addresses=addresses,
        capabilities=capabilities,
        timestamp=timestamp,
        public_key=public_key,
        signature=bytes(SIGNATURE_BYTES),
    )
    signature = signing_key.sign(_signed_bytes(draft)).signature
    return cls(
        node_id=draft.node_id,
        addresses=addresses,
        capabilities=capabilities,
        timestamp=timestamp,
        public_key=public_key,
        signature=signature,
    )


def sign_announce(
    signing_key: SigningKey, *, addresses: tuple[str, ...], capabilities: Capabilities, timestamp: float
) -> Announce:
    """A signed :class:`Announce` whose node id is derived from ``signing_key``."""
    announce: Announce = _sign(Announce, signing_key, addresses, capabilities, timestamp)
    return announce


def sign_response(
    signing_key: SigningKey, *, addresses: tuple[str, ...], capabilities: Capabilities, timestamp: float
) -> DiscoveryResponse:
    """A signed :class:`DiscoveryResponse` whose node id is derived from ``signing_key``."""
    response: DiscoveryResponse = _sign(DiscoveryResponse, signing_key, addresses, capabilities, timestamp)
    return response


def verify(event: Announce | DiscoveryResponse) -> None:
    """Check that ``event`` was signed by its public key and that its node id is that key's.

    Raises:
        RemoteProtocolError: bad or missing signature, or a node id not bound to the key.
    """
    if not isinstance(event, _SignedPeer):
        raise RemoteProtocolError(f"{type(event).__name__} carries no signature to verify")
    expected = node_id_from_public_key(event.public_key)
    if event.node_id != expected:
        raise RemoteProtocolError(f"node_id {event.node_id!r} does not belong to its public key (expected {expected})")
    try:
        VerifyKey(event.public_key).verify(_signed_bytes(event), event.signature)
    except (CryptoError, ValueError) as exc:
        raise RemoteProtocolError(f"bad signature on {event.TYPE} from {event.node_id}") from exc


# ---------------------------------------------------------------------------- codec


def encode_discovery(event: DiscoveryEvent) -> bytes:
    """The UTF-8 JSON body of ``event`` (no length prefix).

    Raises:
        LocalProtocolError: a signed event whose signature does not verify, or
            an encoding larger than ``MAX_DISCOVERY_FRAME``.
    """
    if isinstance(event, LegacyPeerDiscovery):
        obj: dict[str, Any] = {
            "type": event.TYPE,
            "sender_id": event.sender_id,
            "sender_port": event.sender_port,
            "timestamp": event.timestamp,
            "capabilities": event.capabilities.to_json(),
            "protocol_version": PROTOCOL_VERSION,
        }
    elif isinstance(event, PeerListRequest):
        obj = {
            "type": event.TYPE,
            "protocol_version": PROTOCOL_VERSION,
            "limit": event.limit,
            "book": event.book,
            "since": event.since,
        }
    elif isinstance(event, PeerList):
        peers = [[peer.node_id, peer.timestamp, _text(peer.body)] for peer in event.peers]
        obj = {
            "type": event.TYPE,
            "protocol_version": PROTOCOL_VERSION,
            "peers": peers,
            "book": event.book,
            "version": event.version,
        }
    elif isinstance(event, _Peer):
        obj = _unsigned_json(event.TYPE, event.node_id, event.addresses, event.capabilities, event.timestamp)
        if isinstance(event, _SignedPeer):
            try:
                verify(event)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"refusing to send an unverifiable {event.TYPE}: {exc}") from exc
            obj["public_key"] = event.public_key.hex()
            obj["signature"] = event.signature.hex()
    else:
        raise LocalProtocolError(f"not a discovery event: {event!r}")
    body = _canonical(obj)
    # A single announce is at most about 54 KiB (a test builds the largest); a peer list built
    # by hand can exceed the frame (peer_list() never does).
    if len(body) > MAX_DISCOVERY_FRAME:
        raise LocalProtocolError(f"discovery message of {len(body)} bytes exceeds MAX_DISCOVERY_FRAME")
    return body


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LocalProtocolError(f"a relayed body must be UTF-8 JSON, got {body[:40]!r}") from exc


def relay(body: bytes) -> RelayedPeer:
    """A :class:`RelayedPeer` of a signed announce or response body (as received or encoded).

    Only the shape is checked here, not the signature: relay what you verified.

    Raises:
        RemoteProtocolError: not a JSON ANNOUNCE or DISCOVERY_RESPONSE with a node id and timestamp.
    """
    obj = _parse_json(bytes(body))
    if obj.get("type") not in _RELAYABLE:
        raise RemoteProtocolError(f"only a signed ANNOUNCE or DISCOVERY_RESPONSE is relayed, got {obj.get('type')!r}")
    return _relayed(obj.get("node_id"), obj.get("timestamp"), bytes(body))


def _relayed(node_id: Any, timestamp: Any, body: bytes) -> RelayedPeer:
    try:
        return RelayedPeer(node_id, timestamp, body)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid peer list entry: {exc}") from exc


LIST_OVERHEAD = 192
"""Bytes of a PEER_LIST around its entries (type, version, book, cursor), generously."""


def entry_size(peer: RelayedPeer) -> int:
    """Bytes ``peer`` takes in an encoded PEER_LIST (its comma included)."""
    return len(_canonical([peer.node_id, peer.timestamp, _text(peer.body)])) + 1


def peer_list(peers: Iterable[RelayedPeer], limit: int = MAX_PEER_LIST, book: str = "", version: int = 0) -> PeerList:
    """A :class:`PeerList` (cursor ``book``, ``version``) of the first of ``peers`` that fit:
    at most ``limit`` (and ``MAX_PEER_LIST``) entries and ``MAX_DISCOVERY_FRAME`` bytes encoded.
    An entry that does not fit is skipped (a smaller later one may still fit)."""
    chosen: list[RelayedPeer] = []
    size = LIST_OVERHEAD
    for peer in peers:
        if len(chosen) >= min(limit, MAX_PEER_LIST):
            break
        entry = entry_size(peer)
        if size + entry > MAX_DISCOVERY_FRAME:
            continue
        chosen.append(peer)
        size += entry
    return PeerList(tuple(chosen), book, version)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise RemoteProtocolError(f"duplicate JSON keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return out


def _no_constants(name: str) -> Any:
    raise RemoteProtocolError(f"JSON constant {name} is not allowed")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"discovery body is not UTF-8: {body[:40]!r}") from exc
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"discovery body is not JSON: {body[:40]!r}") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"discovery body must be a JSON object, got {body[:40]!r}")
    return obj


_PEER_KEYS = {"type", "protocol_version", "node_id", "addresses", "capabilities", "timestamp"}
_SIGNED_KEYS = _PEER_KEYS | {"public_key", "signature"}
_LEGACY_KEYS = {"type", "protocol_version", "sender_id", "sender_port", "timestamp", "capabilities"}
_EXCHANGE_KEYS = {
    PeerListRequest.TYPE: {"type", "protocol_version", "limit", "book", "since"},
    PeerList.TYPE: {"type", "protocol_version", "peers", "book", "version"},
}
_TYPES: dict[str, tuple[type, set[str]]] = {
    DiscoveryRequest.TYPE: (DiscoveryRequest, _PEER_KEYS),
    DiscoveryResponse.TYPE: (DiscoveryResponse, _SIGNED_KEYS),
    Announce.TYPE: (Announce, _SIGNED_KEYS),
    LegacyPeerDiscovery.TYPE: (LegacyPeerDiscovery, _LEGACY_KEYS),
}


_HEX_DIGITS = frozenset("0123456789abcdef")


def _hex(obj: dict[str, Any], key: str) -> bytes:
    value = obj[key]
    if not isinstance(value, str) or len(value) % 2 or not _HEX_DIGITS.issuperset(value):
        raise RemoteProtocolError(f"{key} must be lower-case hex, got {value!r}")
    return bytes.fromhex(value)


DECODED_MEMORY = 512
"""Bodies of at most :data:`DECODED_MAX_BODY` bytes whose decoding is remembered (least recently
used forgotten first): within a node the same signed announce is verified by the actor that heard
it and again by the registry it passes it to, and a signature check is most of a decode."""

DECODED_MAX_BODY = 4096
"""Longer bodies (peer lists) are decoded afresh each time: they are rarely seen twice."""


def decode_discovery(body: bytes, *, allow_unsigned_legacy: bool = False) -> DiscoveryEvent:
    """Parse and, for signed types, verify one JSON body.

    The same bytes always decode to the same (immutable) event, so the last
    :data:`DECODED_MEMORY` short bodies decoded are remembered; a body that
    fails is not, and fails again on every call.

    Raises:
        RemoteProtocolError: not a valid discovery message, a bad signature, or
            a legacy message when ``allow_unsigned_legacy`` is False.
    """
    if len(body) > MAX_DISCOVERY_FRAME:
        raise RemoteProtocolError(f"discovery message of {len(body)} bytes exceeds MAX_DISCOVERY_FRAME")
    if len(body) <= DECODED_MAX_BODY:
        return _decode_remembered(bytes(body), allow_unsigned_legacy)
    return _decode(bytes(body), allow_unsigned_legacy)


@functools.lru_cache(maxsize=DECODED_MEMORY)
def _decode_remembered(body: bytes, allow_unsigned_legacy: bool) -> DiscoveryEvent:
    return _decode(body, allow_unsigned_legacy)


def _decode(body: bytes, allow_unsigned_legacy: bool) -> DiscoveryEvent:
    obj = _parse_json(body)
    type_ = obj.get("type")
    if not isinstance(type_, str) or (type_ not in _TYPES and type_ not in _EXCHANGE_KEYS):
        raise RemoteProtocolError(f"unknown discovery message type {type_!r}")
    if obj.get("protocol_version") != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported discovery protocol_version {obj.get('protocol_version')!r}")
    if type_ in _EXCHANGE_KEYS:
        return _decode_exchange(type_, obj)
    cls, keys = _TYPES[type_]
    legacy = cls is LegacyPeerDiscovery
    if legacy and not allow_unsigned_legacy:
        raise RemoteProtocolError("unsigned legacy PEER_DISCOVERY refused (allow_unsigned_legacy is off)")
    if set(obj) != keys and not (legacy and set(obj) >= keys):
        raise RemoteProtocolError(f"{type_} has keys {sorted(obj)}; expected {sorted(keys)}")
    args = {k: v for k, v in obj.items() if k in keys - {"type", "protocol_version"}}
    args["capabilities"] = Capabilities.from_json(obj["capabilities"], legacy=legacy)
    if "addresses" in args:
        args["addresses"] = tuple(args["addresses"]) if isinstance(args["addresses"], list) else None
    if "signature" in args:
        args["public_key"] = _hex(obj, "public_key")
        args["signature"] = _hex(obj, "signature")
    try:
        event = cls(**args)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"peer sent an invalid {type_}: {exc}") from exc
    if isinstance(event, DiscoveryResponse | Announce):
        verify(event)
    result: DiscoveryEvent = event
    return result


def _decode_exchange(type_: str, obj: dict[str, Any]) -> PeerListRequest | PeerList:
    if set(obj) != _EXCHANGE_KEYS[type_]:
        raise RemoteProtocolError(f"{type_} has keys {sorted(obj)}; expected {sorted(_EXCHANGE_KEYS[type_])}")
    if type_ == PeerListRequest.TYPE:
        try:
            return PeerListRequest(obj["limit"], obj["book"], obj["since"])
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"peer sent an invalid {type_}: {exc}") from exc
    peers = obj["peers"]
    if not isinstance(peers, list) or len(peers) > MAX_PEER_LIST:
        raise RemoteProtocolError(f"PEER_LIST peers must be a list of at most {MAX_PEER_LIST}, got {str(peers)[:40]}")
    entries = []
    for entry in peers:
        if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[2], str):
            raise RemoteProtocolError(f"a peer list entry is [node_id, timestamp, body text], got {str(entry)[:60]}")
        try:
            body = entry[2].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RemoteProtocolError(f"a peer list entry body is not UTF-8 text: {entry[2][:40]!r}") from exc
        entries.append(_relayed(entry[0], entry[1], body))
    try:
        return PeerList(tuple(entries), obj["book"], obj["version"])
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"peer sent an invalid {type_}: {exc}") from exc


class DiscoveryConnection(FramedConnection[DiscoveryEvent]):
    """Sans-I/O discovery over a stream: 4-byte big-endian length + JSON body.

    ``receive_data(bytes)`` then ``next_event()`` gives verified events or
    :data:`NEED_DATA`; ``send(event)`` gives the bytes to write. A length
    prefix over ``MAX_DISCOVERY_FRAME`` fails as soon as it arrives.

    Args:
        allow_unsigned_legacy: accept (and allow sending) the replaced
            system's unsigned ``PEER_DISCOVERY`` messages.
    """

    def __init__(self, *, allow_unsigned_legacy: bool = False) -> None:
        self.allow_unsigned_legacy = allow_unsigned_legacy
        self.last_body = b""
        """The JSON body of the event :meth:`next_event` returned last: pass a verified event on
        as it came (:func:`encode_discovery` would check its signature again)."""
        super().__init__(_LEN4, MAX_DISCOVERY_FRAME, "discovery", self._decode_body)

    def _decode_body(self, body: bytes) -> DiscoveryEvent:
        event = decode_discovery(body, allow_unsigned_legacy=self.allow_unsigned_legacy)
        self.last_body = bytes(body)
        return event

    def next_event(self) -> DiscoveryEvent | NeedData:
        """The next verified event, or :data:`NEED_DATA`; raises only :class:`RemoteProtocolError`."""
        return super().next_event()

    def send(self, event: DiscoveryEvent) -> bytes:
        """The framed bytes for ``event``.

        Raises:
            LocalProtocolError: an unverifiable signed event, an oversized
                one, or a legacy message while ``allow_unsigned_legacy`` is off.
        """
        if isinstance(event, LegacyPeerDiscovery) and not self.allow_unsigned_legacy:
            raise LocalProtocolError("sending unsigned legacy PEER_DISCOVERY needs allow_unsigned_legacy=True")
        body = encode_discovery(event)
        return _LEN4.pack(len(body)) + body
