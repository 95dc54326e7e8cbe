"""The node: a supervised tree of actors on one bus, and the API to embed it.

::

    root (one_for_one)
    ├── registry      peers, capabilities, trust          (SQLite: data_dir/peers.sqlite3)
    ├── retrier       outbox, acks, retries, failover      (SQLite: data_dir/messages.sqlite3)
    ├── app           subscribers and delivery handles
    ├── transfer      large files: chunked, verified, resumable (SQLite: data_dir/transfers.sqlite3)
    ├── keeper        checkpoints the stores, keeps data_dir/manifest.json
    ├── transports    (one_for_one)
    │   ├── libp2p    a libp2p peer (Noise, yamux) on the acceptor's port
    │   └── websocket aiohttp server and client
    ├── acceptor      one TCP port, sniffed and handed off
    ├── lan           beacons, discovery responder, bootstrap probes
    └── sweeper       discovery rounds

:func:`create_network` makes a :class:`Node`; ``start()`` builds the runtime
(one zmq Context, the timer thread, the event log) and launches the root
supervisor; ``stop()`` stops the tree in reverse order. Everything a restart
must keep lives in ``data_dir``: the key file (so the node id is stable), the
peers, the outbox and the inbox, and the manifest that vouches for them.

``start()`` tells the truth: it returns only when every actor is up and the
acceptor listens, and otherwise raises with the root cause. Before anything
starts, the data dir is checked (:mod:`villagemesh.actors.core.integrity`): a
store that is corrupt, empty, missing, replaced or rolled back is a
``StorageError`` unless ``accept_loss`` says to go on, and a key that is
missing or unreadable while the stores have history an ``IdentityError``
unless ``new_identity`` says to make one. A crash before the tree is up fails
the start (``NodeStartFailed``, naming the first crash); if the root supervisor
gives up later, every call raises ``NodeFailed`` at once, with the cause.

The API is thread-safe (each calling thread gets its own bus sender) and has
asyncio variants; handles can be awaited.

Sending, and what each call gives (the retrier takes every message waiting in
its mailbox as one turn and stores them in one commit):

- ``send``: one message, one ask of the retrier; returns once that message is
  committed. Sends from several threads at once share commits, but one thread
  calling ``send`` in a loop waits for one commit (and one ask) per message.
- ``send_many``: many messages, one ask per :data:`SEND_MANY_CHUNK` (256), one
  commit each; returns once all are committed. The fast way from one thread.
- ``asend`` (:mod:`villagemesh.aio`): the ``asend`` calls of one event-loop turn
  reach the retrier together, told rather than asked, and share its commit; each
  returns once that commit is done, and no thread blocks meanwhile.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import ipaddress
import math
import os
import platform
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pykka

from villagemesh import datadir
from villagemesh.actors.app.actor import OUTCOME_TIMEOUT, AppActor
from villagemesh.actors.app.payload import PayloadCodec, payload_codec
from villagemesh.actors.app.state import (
    Bridge,
    DeliveryHandle,
    DeliveryState,
    DeliveryStatus,
    GatewayCounters,
    HandleTable,
    InboundMessage,
    MessageId,
    OutboxLimits,
    Subscribers,
    message_id_of,
)
from villagemesh.actors.core.base import ExitReport, Scheduler
from villagemesh.actors.core.bus import Bus
from villagemesh.actors.core.ids import new_ids
from villagemesh.actors.lan.actor import parse_host_port
from villagemesh.actors.retrier.modes import NetworkMode
from villagemesh.actors.retrier.state import DEFAULT_ROUTE_TIMEOUT
from villagemesh.actors.transfer.handles import (
    Progress,
    ReceivedFile,
    Receivers,
    TransferHandle,
    TransferTable,
    hash_file,
)
from villagemesh.actors.transfer.state import DEFAULT_WINDOW, digest_for_cpu
from villagemesh.datadir import MESSAGES_FILE, diagnose
from villagemesh.errors import (
    ActorCrashed,
    AskTimeout,
    BusError,
    ConfigError,
    ConnectError,
    MailboxFull,
    NodeFailed,
    NodeStartFailed,
    NoSuchActor,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    StorageError,
    SupervisionError,
    TransferError,
    VillageMeshError,
)
from villagemesh.protocols.discovery import Capabilities
from villagemesh.protocols.envelope import ID_BYTES, MAX_PAYLOAD_BYTES, Message, Priority, encode_message, sibling
from villagemesh.protocols.transfer import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, DigestAlgorithm, Limits, whole_digest

if TYPE_CHECKING:
    from villagemesh.aio import AsyncNode
from villagemesh.supervision.log import EventLog
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Environment, Supervisor, which_children

__all__ = [
    "DeliveryHandle",
    "DeliveryState",
    "DeliveryStatus",
    "InboundMessage",
    "MessageId",
    "NetworkMode",
    "Node",
    "NodeConfig",
    "NodeEvent",
    "OutboxLimits",
    "PeerInfo",
    "Priority",
    "Progress",
    "ReceivedFile",
    "TransferHandle",
    "TransferLimits",
    "create_network",
    "diagnose",
    "free_port",
    "local_capabilities",
    "message_id_for",
]

ASK_TIMEOUT = 5.0
"""Seconds the node API waits for one of its own actors to answer."""


DEFAULT_TTL = 24 * 3600.0
"""A message's lifetime unless the sender says otherwise (the replaced system's 24 h)."""

SEND_MANY_CHUNK = 256
"""Envelopes one ask of the retrier carries at most (``send_many``): one commit each. Small enough
that the retrier sends one chunk while the next is being stored (1,024 left the pipeline idle
between stages), large enough that a commit is shared by hundreds."""

HAND_OVER_PAUSE_S = 0.05
"""Seconds ``send`` waits before asking the retrier again when an ask's outcome is unknown (the retrier
crashed or did not answer in time): the same envelopes, so the second ask cannot store a message twice."""

SYNCHRONOUS_MODES = ("NORMAL", "FULL")
"""SQLite durability of the message files: NORMAL survives a killed process (a commit is a write
to the WAL, no fsync); FULL survives power loss too (an fsync per commit)."""

DEFAULT_SEND_TIMEOUT = 5.0
"""Seconds ``send`` blocks for room in a full outbox before OutboxFull."""

TRANSPORT_DOWN_TIMEOUT = 0.5
"""Seconds the supervisor's thread waits for room in the retrier's mailbox to report a dead transport."""

TransferLimits = Limits
"""What a node accepts as a receiver of transfers (max size, kinds, disk space to leave free)."""

FILE_KIND = "file"
"""The kind ``send_file`` and ``send_stream`` offer unless told otherwise."""

REQUEST_KIND = "REQUEST"
"""The kind ``request`` sends unless told otherwise."""

NODE_ID = re.compile(r"[0-9a-f]{32}")
"""A node id: 32 lower-case hex characters (16 bytes of the identity key's hash)."""

PriorityLike: TypeAlias = Priority | str | int
"""A priority: the enum, its name (any case) or its number."""

Handler: TypeAlias = Callable[[InboundMessage], object] | Callable[[InboundMessage], Awaitable[object]]
"""A subscriber: a plain function (runs on the gateway's thread) or an ``async def`` (on the subscribing loop)."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node is made of; validated when made (``ConfigError`` names the value)."""

    data_dir: Path
    mode: NetworkMode = NetworkMode.HYBRID
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[str, ...] = ()
    lan: bool = False
    lan_group: str = "239.255.42.99"
    lan_port: int = 42424
    lan_rate_per_s: float = 2.0
    """Beacons accepted per second from one source address (a lab with many nodes on
    one host raises it: they all share one address)."""
    lan_burst: float = 8.0
    max_connections_per_source: int = 64
    """Open connections the acceptor allows one source address (many local nodes: raise it)."""
    max_connections: int = 1024
    """Open connections of the node at once, all sources and all protocols together, counted
    from their accept until they close (whichever actor serves them)."""
    handshake_timeout: float = 10.0
    """Seconds a connection has, once routed, for its first complete message (an HTTP request's
    headers, a discovery frame): a client sending half a header is dropped after this."""
    start_timeout: float = 30.0
    """Seconds ``start()`` waits for every actor to be up (a crash on the way fails it at once)."""
    discovery_interval: float = 2.0
    discovery_timeout: float = 1.5
    discovery_fast_start: float = 0.25
    """The first gap between discovery rounds, doubling up to ``discovery_interval`` (0: no fast start)."""
    peer_max_age: float = 300.0
    ack_timeout: float = 10.0
    synchronous: str = "NORMAL"
    """Durability of the outbox and inbox commits: one of :data:`SYNCHRONOUS_MODES`."""
    max_attempts: int = 8
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    checkpoint_interval: float = 1.0
    """Seconds between the keeper's checkpoints of a store whose log grew: what a lost or cut
    write-ahead log can cost at most (see :mod:`villagemesh.actors.core.integrity`)."""
    accept_loss: bool = False
    """Start even though the data dir's stores are inconsistent (each loss is logged)."""
    new_identity: bool = False
    """Make a new key when ``node.key`` is missing or unreadable although the stores have history."""
    capabilities: Capabilities | None = None
    status_endpoint: bool = True
    """Serve ``GET /villagemesh/status`` (read-only JSON; what it reveals: :mod:`villagemesh.dashboard.status`)."""
    dashboard: bool = False
    """Serve the supervision dashboard at ``/villagemesh/dashboard`` on the node's port."""
    libp2p: bool = True
    """Run the libp2p transport (a libp2p peer on the node's port; its identity is the node key) and
    announce its multiaddr ``/ip4/<host>/tcp/<port>/p2p/<peer id>``; needs ``host`` to be an IP address."""
    libp2p_bootstrap: tuple[str, ...] = ()
    """Multiaddrs ``/ip4/…/tcp/…/p2p/…`` of Kademlia peers (any libp2p DHT) to find other nodes through:
    each discovery round provides the well-known key (:data:`villagemesh.actors.libp2p.kad.PROVIDER_KEY`)
    and looks up its providers."""
    betanet: bool | None = None
    """Run the BetaNet mixnode relay (and announce its address): None means on in the anonymous mode only."""
    betanet_delay_ms: float = 0.0
    """Mean per-hop delay this node chooses for its anonymous packets (exponential; 0: none)."""
    betanet_cover_rate: float = 0.0
    """Loop and drop cover packets per second, each (Poisson; 0: none)."""
    betanet_isolation: str = "thread"
    """``process`` runs the relay in a process of its own (a native crash or ``kill -9`` takes only it)."""
    bitchat_radio: Callable[[bytes], Any] | None = None
    """The BitChat mesh transport's radio: a callable given the node's BitChat peer id that returns a
    :class:`villagemesh.actors.bitchat.radio.Radio` (``MemoryAir(live=True).radio`` in tests). With one, the
    ``bitchat`` transport runs under ``transports`` and the mesh mode tries it first; without, it is not started."""
    bitchat_scanner: str | None = None
    """Run the BLE scanner as a child of its own under ``transports`` (``"thread"`` or ``"process"``: in a
    process of its own, so a kill -9 or a native crash takes only it); its sightings make a
    ``BleCentral(me, scan=False)`` radio connect. None: no scanner child (a radio that scans itself)."""
    human_log: bool | None = False
    log_path: Path | None = None
    codec: str | PayloadCodec = "bytes"
    """How payloads are encoded: "bytes" (default), "json", "msgpack", or an object with
    ``encode(value) -> bytes`` and ``decode(bytes)`` (see :mod:`villagemesh.actors.app.payload`)."""
    outbox: OutboxLimits = field(default_factory=OutboxLimits)
    """Bounds on unfinished sends, per peer and in all, in messages and bytes."""
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    """Seconds ``send`` waits for room in a full outbox before raising OutboxFull."""
    unknown_peer_timeout: float = DEFAULT_ROUTE_TIMEOUT
    """Seconds a message to a peer with no known route waits for discovery before it fails."""
    outcome_timeout: float = OUTCOME_TIMEOUT
    """Seconds after the ack a handle waits for the recipient's outcome report (then UNCONFIRMED)."""
    freeze_gc: bool = True
    """Once started, move every object then alive into the collector's permanent generation
    (:func:`gc.freeze`), so a full collection later scans only what came after: without it a
    full collection of the runtime's ~56,000 start-up objects holds the interpreter lock for
    ~25 ms, which an asyncio program sees as a stalled event loop. Process-wide: objects alive
    at that moment are never collected as cyclic garbage afterwards (False: leave the collector alone)."""
    transfer_limits: Limits = field(default_factory=Limits)
    """What this node takes as a receiver: at most ``max_bytes``, only ``kinds`` (None: any), leaving
    ``reserve_bytes`` of disk free; an offer over a limit is refused before any byte is written."""
    transfer_window: int = DEFAULT_WINDOW
    """Chunks of one transfer unacknowledged at once (the flow-control window; memory grows with it)."""
    transfer_chunk_size: int | None = None
    """Bytes per chunk (None: chosen by the mode's transports, 256 KiB over WebSocket)."""
    transfer_stall_s: float = 10.0
    """Seconds without an ack before a sender offers again (the receiver's answer resumes it)."""
    transfer_digest: str | None = None
    """The whole-file digest this node announces when it sends: "sha256" (what ``sha256sum`` prints and
    model hubs publish), "blake2b-256", or None: the faster on this CPU (SHA-256 where it has SHA
    instructions, else BLAKE2b). A receiver verifies either, whichever the offer names."""
    received_dir: Path | None = None
    """Where received files are moved once verified (None: ``data_dir/received``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", _path("data_dir", self.data_dir))
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ConfigError(f"data_dir {str(self.data_dir)!r} exists and is not a directory")
        object.__setattr__(self, "mode", NetworkMode.parse(self.mode))
        if self.log_path is not None:
            object.__setattr__(self, "log_path", _path("log_path", self.log_path))
            if self.log_path.is_dir():
                raise ConfigError(f"log_path {str(self.log_path)!r} is a directory")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            raise ConfigError(f"node name must be a non-empty str without '/', got {self.name!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty str, got {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be an int in 0..65535, got {self.port!r}")
        if not _is_int(self.lan_port) or not 0 < self.lan_port < 65536:
            raise ConfigError(f"lan_port must be an int in 1..65535, got {self.lan_port!r}")
        if not isinstance(self.lan_group, str) or not self.lan_group:
            raise ConfigError(f"lan_group must be a multicast address as a str, got {self.lan_group!r}")
        if isinstance(self.bootstrap, str | bytes):
            raise ConfigError(f"bootstrap must be a sequence of 'host:port' strings, got {self.bootstrap!r}")
        try:
            bootstrap = tuple(self.bootstrap)
        except TypeError:
            raise ConfigError(f"bootstrap must be a sequence of 'host:port' strings, got {self.bootstrap!r}") from None
        for entry in bootstrap:
            if not isinstance(entry, str):
                raise ConfigError(f"bootstrap entries must be 'host:port' strings, got {entry!r}")
            parse_host_port(entry)
        object.__setattr__(self, "bootstrap", bootstrap)
        if isinstance(self.libp2p_bootstrap, str | bytes):
            raise ConfigError(f"libp2p_bootstrap must be a sequence of multiaddrs, got {self.libp2p_bootstrap!r}")
        object.__setattr__(self, "libp2p_bootstrap", tuple(self.libp2p_bootstrap))
        from villagemesh.actors.libp2p.state import target_of

        for entry in self.libp2p_bootstrap:
            try:
                target_of(entry)
            except ConnectError as exc:
                raise ConfigError(f"libp2p_bootstrap entry {entry!r}: {exc}") from None
        for name in ("lan", "accept_loss", "new_identity", "freeze_gc", "libp2p"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.human_log is not None and not isinstance(self.human_log, bool):
            raise ConfigError(f"human_log must be True, False or None, got {self.human_log!r}")
        if not _is_number(self.discovery_fast_start) or not 0 <= self.discovery_fast_start:
            raise ConfigError(f"discovery_fast_start must be a number >= 0, got {self.discovery_fast_start!r}")
        positive = (
            "discovery_interval",
            "discovery_timeout",
            "peer_max_age",
            "ack_timeout",
            "backoff_base",
            "backoff_max",
            "lan_rate_per_s",
            "lan_burst",
            "start_timeout",
            "checkpoint_interval",
            "handshake_timeout",
            "send_timeout",
            "unknown_peer_timeout",
            "outcome_timeout",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("max_connections_per_source", "max_connections", "max_attempts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.capabilities is not None and not isinstance(self.capabilities, Capabilities):
            raise ConfigError(f"capabilities must be a Capabilities or None, got {type(self.capabilities).__name__}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {type(self.extra).__name__}")
        for name in ("status_endpoint", "dashboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.betanet_isolation not in ("thread", "process"):
            raise ConfigError(f"betanet_isolation must be 'thread' or 'process', got {self.betanet_isolation!r}")
        if self.bitchat_scanner not in (None, "thread", "process"):
            raise ConfigError(f"bitchat_scanner must be None, 'thread' or 'process', got {self.bitchat_scanner!r}")
        if self.bitchat_scanner is not None and self.bitchat_radio is None:
            raise ConfigError("bitchat_scanner needs bitchat_radio (the radio its sightings are for)")
        if self.betanet is not None and not isinstance(self.betanet, bool):
            raise ConfigError(f"betanet must be True, False or None, got {self.betanet!r}")
        for name in ("betanet_delay_ms", "betanet_cover_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise ConfigError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {self.synchronous!r}")
        if self.libp2p:
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ConfigError(
                    f"libp2p needs host to be an IP address, got {self.host!r} (or libp2p=False)"
                ) from None
        object.__setattr__(self, "codec", payload_codec(self.codec))
        if not isinstance(self.outbox, OutboxLimits):
            raise ConfigError(f"outbox must be an OutboxLimits, got {self.outbox!r}")
        if not isinstance(self.transfer_limits, Limits):
            raise ConfigError(f"transfer_limits must be a TransferLimits, got {self.transfer_limits!r}")
        if not _is_int(self.transfer_window) or self.transfer_window < 1:
            raise ConfigError(f"transfer_window must be an int >= 1, got {self.transfer_window!r}")
        chunk = self.transfer_chunk_size
        if chunk is not None and (not _is_int(chunk) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES):
            bounds = f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
            raise ConfigError(f"transfer_chunk_size must be None or in {bounds}, got {chunk!r}")
        if self.transfer_digest is not None:
            try:
                DigestAlgorithm.of(self.transfer_digest)
            except ProtocolError as exc:
                raise ConfigError(f"transfer_digest: {exc}") from None
        if not _is_number(self.transfer_stall_s) or not self.transfer_stall_s > 0:
            raise ConfigError(f"transfer_stall_s must be a positive finite number, got {self.transfer_stall_s!r}")
        if self.received_dir is not None:
            object.__setattr__(self, "received_dir", _path("received_dir", self.received_dir))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _path(name: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    return Path(value)


def local_capabilities(transports: Sequence[str] = ("websocket",)) -> Capabilities:
    """This machine's capabilities, measured (cores, memory) and classified by the seed system's rules."""
    cores = os.cpu_count() or 1
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        ram_mb = 0
    gb = ram_mb / 1024
    if gb >= 16 and cores >= 8:
        tier = "premium"
    elif gb >= 8 and cores >= 4:
        tier = "high"
    elif gb >= 4 and cores >= 2:
        tier = "medium"
    else:
        tier = "low"
    try:
        load = min(1.0, os.getloadavg()[0] / cores)
    except OSError:
        load = 0.0
    capacity = max(0.1, min(1.0, 1.0 - 0.5 * load))
    return Capabilities(
        cpu_cores=cores,
        ram_mb=int(ram_mb),
        battery_percent=None,
        network_type="ethernet",
        device_type="desktop",
        performance_tier=tier,
        evolution_capacity=round(capacity, 3),
        available_for_evolution=load < 0.95,
        transports=tuple(transports),
    )


_PORTS_GIVEN: set[tuple[int, int]] = set()
_PORTS_LOCK = threading.Lock()


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (TCP, or UDP with ``kind=SOCK_DGRAM``).

    A node's port is fixed before it starts (so seeds and a restarted acceptor
    agree on it). It is drawn *below* the kernel's ephemeral range: a port from that
    range could be taken, before the acceptor binds it, as the local port of some
    outbound connection (seen with 50 nodes in one process). One process never hands
    out the same port twice (two nodes drawing it would fight over it).
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        with _PORTS_LOCK:
            if (kind, port) in _PORTS_GIVEN:
                continue
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue  # taken: draw another
            _PORTS_GIVEN.add((kind, port))
            return port
    raise ConfigError(f"no free port found on {host} below {low}; give the node a port")


@dataclass(frozen=True)
class PeerInfo:
    """A known peer, as the node API returns it."""

    peer_id: str
    addresses: tuple[tuple[str, tuple[str, ...]], ...]
    capabilities: Capabilities | None
    last_seen: float
    trust: float
    latency_ms: float | None
    name: str | None = None
    """The peer's node name, from its signed announce (None: it sent none)."""


class Node:
    """One villagemesh node. Make it with :func:`create_network`; start it, use it, stop it."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_dir {str(config.data_dir)!r} cannot be made: {exc.strerror}") from exc
        self._notes: list[tuple[str, dict[str, Any]]] = []
        """Events found before the log exists (a new identity), emitted when it starts."""
        self.keys = self._identity()
        self.node_id: str = self.keys.node_id
        self.name = config.name or f"node-{self.node_id[:8]}"
        self.port = config.port or free_port(host=config.host)
        self.codec: PayloadCodec = payload_codec(config.codec)
        self.subscribers = Subscribers()
        self.handles = HandleTable(config.outbox)
        self.hand_overs_retried = 0
        """Asks of the retrier made again because the first one's outcome was unknown (:meth:`send`)."""
        self.bridge = Bridge()
        self._outlets: weakref.WeakSet[Any] = weakref.WeakSet()
        """The asyncio faces' outlets (:class:`villagemesh.aio._Outlet`) handing sends to the retrier
        (added from loops' threads, read from supervisors': under ``_outlets_lock``)."""
        self._outlets_lock = threading.Lock()
        self.gateway_counters = GatewayCounters()
        self.transfer_table = TransferTable()
        self.transfer_receivers = Receivers()
        self.transfer_digest: DigestAlgorithm = (
            DigestAlgorithm.of(config.transfer_digest) if config.transfer_digest is not None else _cpu_digest()
        )
        """The whole digest this node's transfers announce (:attr:`NodeConfig.transfer_digest`)."""
        self._listeners: list[Callable[[NodeEvent], None]] = []
        self._peers_changed = threading.Condition()
        self._peer_events = 0
        """peer_discovered events so far (waiters compare it)."""
        self._aio: AsyncNode | None = None
        self._lock = threading.Lock()
        self._started = False
        self._health = _Health()
        self._failure: NodeFailed | None = None
        self._failure_listeners: list[Callable[[NodeFailed], None]] = []
        self._env: Environment | None = None
        self._root: Supervisor | None = None
        self._launcher: Any = None
        self._lock_file: Any = None
        self._connections: Any = None
        self._held: list[Any] = []
        """The start's checkpoint connections, open until the actors have opened theirs."""

    def _identity(self) -> Any:
        """The node's keys (see :func:`villagemesh.datadir.identity`); a new identity is logged at start."""
        keys, note = datadir.identity(self.config.data_dir, new_identity=self.config.new_identity)
        if note is not None:
            self._notes.append(note)
        return keys

    # -- addresses ---------------------------------------------------------------------------

    @property
    def runs_betanet(self) -> bool:
        """Whether this node is a BetaNet mixnode (:attr:`NodeConfig.betanet`)."""
        return self.config.betanet if self.config.betanet is not None else self.config.mode is NetworkMode.ANONYMOUS

    @property
    def runs_bitchat(self) -> bool:
        """Whether this node runs the BitChat mesh transport (it has a :attr:`NodeConfig.bitchat_radio`)."""
        return self.config.bitchat_radio is not None

    @property
    def betanet_address(self) -> str:
        """``betanet://host:port/<mix key>``: where mixes reach this node, and its mix key."""
        from villagemesh.actors.betanet.state import format_address, mix_secret
        from villagemesh.protocols.sphinx.crypto import x25519_base

        return format_address(self.config.host, self.port, x25519_base(mix_secret(self.keys.static_key)))

    @property
    def address(self) -> str:
        """The WebSocket address peers reach this node at."""
        return f"ws://{self.config.host}:{self.port}"

    @property
    def libp2p_address(self) -> str:
        """``/ip4/<host>/tcp/<port>/p2p/<peer id>``: where libp2p peers reach this node (its node key's peer id)."""
        from villagemesh.actors.libp2p.state import listen_multiaddr
        from villagemesh.protocols.libp2p.peerid import PeerId

        return listen_multiaddr(self.config.host, self.port, PeerId.from_ed25519(self.keys.identity))

    @property
    def acceptor_address(self) -> str:
        """``host:port`` of the acceptor (what other nodes put in ``bootstrap``)."""
        return f"{self.config.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The node's JSON-lines event log."""
        return self.config.log_path or self.config.data_dir / "events.jsonl"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Node:
        """Start every actor; returns once each one is up and the acceptor listens. Idempotent.

        Raises:
            StorageError: a store of the data dir is corrupt or inconsistent with the
                manifest (empty, missing, replaced, rolled back); nothing was started.
            NodeStartFailed: an actor crashed before the tree was up (the first crash is
                named: the child, its exception), or the tree was not up within
                ``start_timeout``. Everything started is stopped again.
        """
        with self._lock:
            if self._started:
                if self._failure is not None:
                    raise _again(self._failure)  # failed, not stopped: start() must not say all is well
                return self
            self._lock_data_dir()
            try:
                losses = self._check_data_dir()
            except VillageMeshError:
                self._unlock_data_dir()
                raise
            bus = Bus(self.name)
            log = EventLog(self.name, self.log_path, human=self.config.human_log)
            env = Environment(bus=bus, log=log, scheduler=Scheduler(f"{self.name}-timers"))
            env.process_launcher = self._process_launcher
            log.add_sink(self._on_log_event)
            self._env = env
            self._health = _Health()
            self._failure = None
            log.add_sink(self._health)
            for event, fields in [*self._notes, *losses]:
                log.emit(event, **fields)
            self._notes = []
            log.emit("node_starting", node_id=self.node_id, mode=self.config.mode.value, port=self.port)
            self._root = Supervisor.launch(self._tree(), env, watcher=self._root_ended)
            self._started = True
        try:
            self._wait_until_up(self.config.start_timeout)
        except VillageMeshError:
            self.stop()
            raise
        finally:
            held, self._held = self._held, []
            datadir.close_all(held)  # the actors' own connections are open now
        log.emit("node_started", node_id=self.node_id, address=self.address)
        if self.config.freeze_gc:
            gc.collect()  # the start-up's garbage is freed, not frozen
            gc.freeze()
            log.emit("gc_frozen", node_id=self.node_id, objects=gc.get_freeze_count())
        return self

    def _check_data_dir(self) -> list[tuple[str, dict[str, Any]]]:
        """:func:`villagemesh.datadir.prepare`: the events to log; its connections held until the tree is up."""
        events, self._held = datadir.prepare(
            self.config.data_dir,
            self.node_id,
            accept_loss=self.config.accept_loss,
            betanet=self.runs_betanet,
            synchronous=self.config.synchronous,
        )
        return events

    def stop(self) -> None:
        """Stop every actor (reverse start order), then the bus, timers and log. Idempotent."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            root, env = self._root, self._env
        assert root is not None and env is not None
        try:
            root.actor_ref.stop(block=True, timeout=30)
        except (pykka.ActorDeadError, pykka.Timeout):
            pass  # already ended (escalated), or stuck: the bus is closed below either way
        root.finished.wait(30)
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        try:
            # The manifest records what the stores hold now; the connections are the last (a clean
            # stop leaves no log behind, and the database files carry the manifest's generation).
            specs = datadir.store_specs(betanet=self.runs_betanet)
            datadir.close_all(datadir.checkpoint_stores(self.config.data_dir, None, specs))
        except StorageError as exc:
            env.log.emit("checkpoint_deferred", level="warning", store="*", reason=str(exc))
        env.log.emit("node_stopped", node_id=self.node_id)
        env.scheduler.close()
        env.bus.close()
        env.log.close()
        self._unlock_data_dir()

    def _lock_data_dir(self) -> None:
        """One node per data dir: two would share an outbox and deliver twice."""
        path = self.config.data_dir / "node.lock"
        handle = open(path, "a+")  # noqa: SIM115 - held open while the node runs, closed in _unlock_data_dir
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"data dir {self.config.data_dir} is in use by a running node (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def _unlock_data_dir(self) -> None:
        handle, self._lock_file = self._lock_file, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Node:
        await self.aio.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aio.stop()

    @property
    def aio(self) -> AsyncNode:
        """This node's asyncio face (:class:`villagemesh.aio.AsyncNode`): every call a coroutine."""
        if self._aio is None:
            from villagemesh.aio import AsyncNode

            self._aio = AsyncNode(self)
        return self._aio

    # -- health --------------------------------------------------------------------------------

    @property
    def failure(self) -> NodeFailed | None:
        """The :class:`NodeFailed` every call raises once the root supervisor gave up, else None."""
        return self._failure

    def on_failure(self, callback: Callable[[NodeFailed], None]) -> None:
        """Call ``callback(error)`` once if the node fails (at once if it already has).

        It runs in the thread that noticed (a supervisor's): it must be quick.
        """
        with self._lock:
            failure = self._failure
            if failure is None:
                self._failure_listeners.append(callback)
        if failure is not None:
            callback(failure)

    def _root_ended(self, actor: Any, report: ExitReport) -> None:
        if not report.crashed or self._env is None:
            return
        child, exc_type, detail = self._health.cause(report)
        failure = NodeFailed(self.name, child, exc_type, detail)
        with self._lock:
            self._failure = failure
            listeners, self._failure_listeners = self._failure_listeners, []
        self._env.log.emit(
            "node_failed", level="error", node_id=self.node_id, child_id=child, exc_type=exc_type, reason=detail
        )
        self._health.wake()
        for callback in listeners:
            callback(failure)

    def _process_launcher(self) -> Any:
        if self._launcher is None:
            from villagemesh.supervision.process import ProcessLauncher

            self._launcher = ProcessLauncher()
        return self._launcher

    def _tree(self) -> SupervisorSpec:
        from villagemesh.actors.acceptor.actor import AcceptorActor
        from villagemesh.actors.acceptor.state import SNIFF_TIMEOUT_S, AcceptorLimits
        from villagemesh.actors.core.handoff import ConnectionLimiter
        from villagemesh.actors.keeper.actor import KeeperActor
        from villagemesh.actors.lan.actor import LanActor
        from villagemesh.actors.lan.beacon import BeaconConfig
        from villagemesh.actors.lan.identity import Identity
        from villagemesh.actors.registry.actor import RegistryActor
        from villagemesh.actors.retrier.actor import RetrierActor
        from villagemesh.actors.sweeper.actor import SweeperActor
        from villagemesh.actors.transfer.actor import TransferActor
        from villagemesh.actors.transfer.state import chunk_size_for
        from villagemesh.actors.websocket.actor import WebSocketActor
        from villagemesh.dashboard.server import install as http_routes

        cfg, data = self.config, self.config.data_dir
        limits = AcceptorLimits(
            sniff_timeout_s=min(SNIFF_TIMEOUT_S, cfg.handshake_timeout),
            max_per_source=min(cfg.max_connections_per_source, cfg.max_connections),
            max_total=cfg.max_connections,
        )
        # One count of the node's connections, from accept to close, whichever loop holds them.
        self._connections = ConnectionLimiter(limits.max_per_source, limits.max_total)
        betanet = self.runs_betanet
        bitchat = cfg.bitchat_radio is not None
        running = (
            *(("libp2p",) if cfg.libp2p else ()),
            "websocket",
            *(("betanet",) if betanet else ()),
            *(("bitchat",) if bitchat else ()),
        )
        capabilities = cfg.capabilities or local_capabilities(running)
        if capabilities.node_name is None:
            capabilities = replace(capabilities, node_name=self.name)  # peers see it in the signed announce
        addresses = (
            (self.address,)
            + ((self.libp2p_address,) if cfg.libp2p else ())
            + ((self.betanet_address,) if betanet else ())
        )
        identity = Identity(
            signing_key=self.keys.signing_key, addresses=addresses, capabilities=capabilities, port=self.port
        )
        retry = {
            "max_attempts": cfg.max_attempts,
            "backoff_base": cfg.backoff_base,
            "backoff_max": max(cfg.backoff_max, cfg.backoff_base),
            "ack_timeout": cfg.ack_timeout,
        }
        transports = SupervisorSpec(
            "transports",
            [
                *([self._libp2p_spec(identity)] if cfg.libp2p else []),
                ChildSpec(
                    "websocket",
                    WebSocketActor,
                    config={
                        "deliver_to": "retrier",
                        "node_id": self.node_id,
                        "keys": self.keys,
                        "handshake_deadline_s": cfg.handshake_timeout,
                        "http": http_routes(self),
                    },
                ),
                *([self._betanet_spec()] if betanet else []),
                *([self._bitchat_spec(capabilities)] if bitchat else []),
                *([self._scanner_spec()] if cfg.bitchat_scanner is not None else []),
            ],
            intensity=10,
            period=10,
        )
        children: list[ChildSpec | SupervisorSpec] = [
            ChildSpec(
                "registry",
                RegistryActor,
                config={"path": str(data / "peers.sqlite3"), "routes_to": "retrier", "max_age": cfg.peer_max_age},
            ),
            ChildSpec(
                "retrier",
                RetrierActor,
                config={
                    "path": str(data / MESSAGES_FILE),
                    "node_id": self.node_id,
                    "mode": cfg.mode.value,
                    "deliver_to": "app",
                    "report_to": "app",
                    "registry": "registry",
                    "transfer_to": "transfer",
                    "route_timeout": cfg.unknown_peer_timeout,
                    "synchronous": cfg.synchronous,
                    "bridge": self.bridge,
                    **retry,
                },
            ),
            ChildSpec(
                "app",
                AppActor,
                config={
                    "subscribers": self.subscribers,
                    "handles": self.handles,
                    "inbox": str(data / MESSAGES_FILE),
                    "synchronous": cfg.synchronous,
                    "node_id": self.node_id,
                    "outcomes_to": "retrier",
                    "await_outcomes": True,
                    "outcome_timeout": cfg.outcome_timeout,
                    "codec": self.codec,
                    "bridge": self.bridge,
                    "counters": self.gateway_counters,
                    "tree": self._actors,
                },
            ),
            ChildSpec(
                "transfer",
                TransferActor,
                config={
                    "data_dir": str(data),
                    "path": str(data / datadir.TRANSFERS_FILE),
                    "node_id": self.node_id,
                    "retrier": "retrier",
                    "table": self.transfer_table,
                    "receivers": self.transfer_receivers,
                    "limits": cfg.transfer_limits,
                    "received_dir": str(cfg.received_dir or data / "received"),
                    "chunk_size": cfg.transfer_chunk_size or chunk_size_for(("websocket",)),
                    "window": cfg.transfer_window,
                    "stall_s": cfg.transfer_stall_s,
                    "synchronous": cfg.synchronous,
                },
            ),
            ChildSpec(
                "keeper",
                KeeperActor,
                config={
                    "data_dir": str(data),
                    "stores": datadir.store_specs(betanet=betanet),
                    "interval": cfg.checkpoint_interval,
                },
            ),
            transports,
            ChildSpec(
                "acceptor",
                AcceptorActor,
                config={
                    "host": cfg.host,
                    "port": self.port,
                    "routes": {
                        "http": "websocket",
                        "discovery": "lan",
                        **({"libp2p": "libp2p"} if cfg.libp2p else {}),
                        **({"secure": "betanet"} if betanet else {}),
                    },
                    "limits": limits,
                    "connections": self._connections,
                },
            ),
            ChildSpec(
                "lan",
                LanActor,
                config={
                    "handshake_deadline_s": cfg.handshake_timeout,
                    "identity": identity,
                    "peers_to": "registry",
                    "bootstrap": cfg.bootstrap,
                    "beacons": cfg.lan,
                    "beacon": BeaconConfig(
                        group=cfg.lan_group, port=cfg.lan_port, rate_per_s=cfg.lan_rate_per_s, burst=cfg.lan_burst
                    ),
                },
            ),
            ChildSpec(
                "sweeper",
                SweeperActor,
                config={
                    "transports": ["lan", *(["libp2p"] if cfg.libp2p else []), *(["bitchat"] if bitchat else [])],
                    "interval": cfg.discovery_interval,
                    "fast_start": cfg.discovery_fast_start,
                    "timeout": cfg.discovery_timeout,
                    "registry": "registry",
                },
            ),
        ]
        return SupervisorSpec("root", children, strategy="one_for_one", intensity=20, period=10)

    def _libp2p_spec(self, identity: Any) -> ChildSpec:
        from villagemesh.actors.libp2p.actor import Libp2pActor
        from villagemesh.actors.libp2p.state import Libp2pLimits, listen_multiaddr

        cfg = self.config
        return ChildSpec(
            "libp2p",
            Libp2pActor,
            config={
                "keys": self.keys,
                "deliver_to": "retrier",
                "listen": listen_multiaddr(cfg.host, self.port),
                "handshake_deadline_s": cfg.handshake_timeout,
                "limits": Libp2pLimits(handshake_timeout_s=cfg.handshake_timeout),
                "identity": identity,
                "bootstrap": cfg.libp2p_bootstrap,
            },
        )

    def _bitchat_spec(self, capabilities: Capabilities) -> ChildSpec:
        from villagemesh.actors.bitchat.actor import BitchatActor

        return ChildSpec(
            "bitchat",
            BitchatActor,
            config={
                "keys": self.keys,
                "radio": self.config.bitchat_radio,
                "deliver_to": "retrier",
                "nickname": self.name,
                "capabilities": capabilities,
            },
        )

    def _scanner_spec(self) -> ChildSpec:
        from villagemesh.actors.bitchat.scanner import ScannerActor
        from villagemesh.protocols.bitchat import peer_id

        return ChildSpec(
            "bitchat-scanner",
            ScannerActor,
            isolation=self.config.bitchat_scanner or "thread",
            config={"report_to": "bitchat", "me": peer_id(self.keys.static_public).hex()},
        )

    def _betanet_spec(self) -> ChildSpec:
        from villagemesh.actors.betanet.actor import BetanetActor

        cfg = self.config
        return ChildSpec(
            "betanet",
            BetanetActor,
            isolation=cfg.betanet_isolation,
            config={
                "keys": self.keys.to_bytes(),
                "host": cfg.host,
                "port": self.port,
                "replay_path": str(cfg.data_dir / datadir.BETANET_FILE),
                "deliver_to": "retrier",
                "registry": "registry",
                "refresh_s": min(10.0, cfg.discovery_interval),
                "mean_delay_ms": cfg.betanet_delay_ms,
                "loop_rate": cfg.betanet_cover_rate,
                "drop_rate": cfg.betanet_cover_rate,
            },
        )

    def _wait_until_up(self, timeout: float) -> None:
        """Wait until every actor of the tree has started and the acceptor listens on our port.

        As in OTP, a crash before the tree is up fails the start: the first crash is the
        root cause (a port in use, a store that cannot be opened), and waiting for
        restarts to give up would only hide it behind an escalation.
        """
        from villagemesh.actors.acceptor.messages import GetAcceptorStatus

        assert self._env is not None and self._root is not None
        deadline = time.monotonic() + timeout
        waiting: list[str] = ["root"]
        while True:
            crash = self._health.first_crash
            if crash is not None:
                raise NodeStartFailed(self.name, *crash)
            if self._failure is not None:
                raise NodeStartFailed(self.name, self._failure.child, self._failure.exc_type, self._failure.detail)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeStartFailed(self.name, None, None, f"not up within {timeout} s (waiting for {waiting})")
            try:
                rows = which_children(self._root.actor_ref, timeout=min(remaining, ASK_TIMEOUT))
            except (pykka.ActorDeadError, pykka.Timeout):
                rows = None  # the root is ending or busy: its report (or the deadline) decides
            if rows is not None:
                waiting = _not_ready(rows)
                if not waiting:
                    break
            self._health.wait(min(0.05, max(0.0, remaining)))
        status = self._env.bus.client().ask("acceptor", GetAcceptorStatus(), timeout=max(0.1, remaining))
        if status.port != self.port:
            raise SupervisionError(f"node {self.name}: acceptor listens on {status.port}, expected {self.port}")

    # -- the API -------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._failure is not None:
            raise _again(self._failure)
        if not self._started or self._env is None:
            raise SupervisionError(f"node {self.name} is not running (call start())")
        return self._env.bus.client()

    def envelope(
        self,
        peer_id: str,
        payload: object,
        *,
        kind: str = "DATA",
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
        message_id: MessageId | bytes | None = None,
    ) -> Message:
        """The envelope :meth:`send` would send (validated; ``payload`` encoded by the node's codec).

        ``message_id``: the caller's own id for it (:func:`message_id_for`, or 16 bytes); None: a random one.

        Raises:
            ConfigError: a malformed or own peer id, a payload the codec refuses, a bad kind,
                priority, ttl, correlation id or message id (the message names the value).
        """
        return self._envelopes(
            [(peer_id, payload)], kind=kind, priority=priority, ttl=ttl, correlation_id=correlation_id, ids=[message_id]
        )[0]

    def _envelopes(
        self,
        pairs: Sequence[tuple[str, object]],
        *,
        kind: str,
        priority: PriorityLike,
        ttl: float,
        correlation_id: bytes | None,
        ids: Sequence[MessageId | bytes | None],
    ) -> list[Message]:
        """:meth:`envelope` for every ``(peer_id, payload)``, with ``ids[i]`` as the ``message_id`` of the
        i-th: the shared arguments checked once, each distinct peer once, the new ids made at once
        (:mod:`~villagemesh.actors.core.ids`: time-ordered), one ``created_at`` for all."""
        if not isinstance(kind, str) or not kind or kind.startswith("villagemesh."):
            raise ConfigError(f"kind must be a non-empty str not starting 'villagemesh.', got {kind!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ConfigError(f"ttl must be seconds > 0, got {ttl!r}")
        if correlation_id is not None and (not isinstance(correlation_id, bytes) or len(correlation_id) != ID_BYTES):
            raise ConfigError(f"correlation_id must be {ID_BYTES} bytes or None, got {correlation_id!r}")
        chosen, seconds, own, encode = _priority(priority), float(ttl), self.node_id, self.codec.encode
        fresh = iter(new_ids(ids.count(None)))
        peers: set[str] = set()
        now = time.time()
        built: list[Message] = []
        for (peer_id, payload), message_id in zip(pairs, ids, strict=True):
            if type(peer_id) is not str or peer_id not in peers:  # (an unhashable one is refused by the check)
                peers.add(check_peer_id(peer_id, own))
            data = encode(payload)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ConfigError(f"codec {self.codec!r} encoded {payload!r:.60} to {type(data).__name__}, not bytes")
            data = bytes(data)
            if len(data) > MAX_PAYLOAD_BYTES:
                raise ConfigError(f"payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
            raw_id = next(fresh) if message_id is None else _raw_id(message_id)
            if built:  # kind, sender, priority, times and correlation as the first's, checked there
                built.append(sibling(built[0], raw_id, peer_id, data))
                continue
            built.append(
                Message(
                    id=raw_id,
                    kind=kind,
                    sender=own,
                    recipient=peer_id,
                    priority=chosen,
                    created_at=now,
                    ttl=seconds,
                    correlation_id=correlation_id,
                    payload=data,
                )
            )
        return built

    def send(
        self,
        peer_id: str,
        payload: object,
        *,
        kind: str = "DATA",
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
        timeout: float | None = None,
        message_id: MessageId | bytes | None = None,
    ) -> DeliveryHandle:
        """Send ``payload`` to ``peer_id`` reliably; the handle ends when its recipient's handlers did.

        The message is stored durably before this returns: a crash of the node
        afterwards does not lose it (it is resent after the restart). A full
        outbox blocks this call up to ``timeout`` seconds (default
        ``NodeConfig.send_timeout``). If the retrier crashes or is slow while
        storing it, the same envelope is handed over again (every
        :data:`HAND_OVER_PAUSE_S`) until it is stored or ``timeout`` has passed.

        ``message_id`` (:func:`message_id_for` of a key of the application's,
        or 16 bytes) makes the send idempotent: sending again with an id
        that is still pending stores nothing new and returns the pending
        message's handle; a copy of a message that has already reached its
        recipient is dropped there as a duplicate (the recipient's inbox keeps
        ids for the message's TTL), so its handlers never run twice. That is
        how a caller that does not know whether a send was stored (its
        process was killed during ``send``, or ``send`` raised
        :class:`~villagemesh.errors.BusError`) makes sure: it sends again with
        the same id and payload. The new handle of such a copy ends
        UNCONFIRMED after ``NodeConfig.outcome_timeout`` (the recipient acks it
        but runs no handler to report on), and holds its room in the send
        window until then.

        Raises:
            ConfigError: at once, for a malformed id, this node's own id, or a bad value.
            OutboxFull: the outbox stayed full for ``timeout`` seconds.
            BusError: the retrier did not take the message within ``timeout`` (the outcome is
                unknown: the message may be stored; send it again with the same ``message_id``).
        """
        from villagemesh.actors.retrier.messages import Deliver, DeliverReply

        message = self.envelope(
            peer_id,
            payload,
            kind=kind,
            priority=priority,
            ttl=ttl,
            correlation_id=correlation_id,
            message_id=message_id,
        )
        client = self._client()
        wait = self.config.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        handle = self.handles.new(message.id, peer_id, len(message.payload), timeout=wait)
        request = Deliver(_encoded(message))
        try:
            reply = self._hand_over(deadline, lambda: client.ask("retrier", request, timeout=ASK_TIMEOUT))
        except BusError as exc:
            self.handles.resolve(message.id, False, 0, _unknown_outcome(message.id, exc))
            raise
        if not isinstance(reply, DeliverReply) or reply.error is not None:
            error = getattr(reply, "error", repr(reply))
            self.handles.resolve(message.id, False, 0, f"refused: {error}")
            raise ConfigError(f"message to {peer_id!r} refused: {error}")
        return handle

    def send_many(
        self,
        messages: Iterable[tuple[str, object]],
        *,
        kind: str = "DATA",
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        message_ids: Sequence[MessageId | bytes] | None = None,
    ) -> list[DeliveryHandle]:
        """Send every ``(peer_id, payload)`` reliably, in order; one handle each.

        Returns once every message is stored durably: one ask of the retrier and one
        commit per :data:`SEND_MANY_CHUNK` messages (what ``send`` in a loop pays per
        message). Every message is validated before any is sent; a full outbox blocks as
        for ``send``, message by message. A message the retrier refuses gets a handle
        that has already failed, naming why; the others go on. ``message_ids``: one id
        per message, as ``send``'s ``message_id`` (the idempotent resend); a retrier
        that crashes while storing a chunk is handed the same chunk again, as by ``send``.

        Raises:
            ConfigError: at once, for a malformed id, this node's own id, or a bad value (nothing sent).
            OutboxFull: the outbox stayed full for ``timeout`` seconds (the messages before it were sent).
        """
        pairs = list(messages)
        if message_ids is not None and len(message_ids) != len(pairs):
            raise ConfigError(f"{len(message_ids)} message_ids given for {len(pairs)} messages")
        ids: Sequence[MessageId | bytes | None] = [None] * len(pairs) if message_ids is None else message_ids
        built = self._envelopes(pairs, kind=kind, priority=priority, ttl=ttl, correlation_id=None, ids=ids)
        client = self._client()
        wait = self.config.send_timeout if timeout is None else timeout
        handles: list[DeliveryHandle] = []
        for start in range(0, len(built), SEND_MANY_CHUNK):
            chunk = built[start : start + SEND_MANY_CHUNK]
            handles.extend(self.handles.new(m.id, m.recipient or "", len(m.payload), timeout=wait) for m in chunk)
            errors = self._deliver_envelopes(client, [_encoded(m) for m in chunk], time.monotonic() + wait)
            for message, error in zip(chunk, errors, strict=True):
                if error is not None:
                    self.handles.resolve(message.id, False, 0, error)
        return handles

    def _hand_over(self, deadline: float, ask: Callable[[], Any]) -> Any:
        """``ask()`` of the retrier, asked again while its outcome is unknown and ``deadline`` not passed.

        Unknown: the retrier crashed during the ask (it may have committed first), did not
        answer in time, was not registered (restarting) or its mailbox was full. Asking
        again is safe because it carries the same envelopes: an id already pending is not
        stored twice. A node that has failed is not asked again.
        """
        retried = 0
        while True:
            try:
                reply = ask()
            except (ActorCrashed, AskTimeout, NoSuchActor, MailboxFull) as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self._failure is not None:
                    raise
                if not retried and self._env is not None:
                    self._env.log.emit("send_retried", level="info", reason=f"{type(exc).__name__}: {exc}")
                retried += 1
                time.sleep(min(HAND_OVER_PAUSE_S, left))
                continue
            if retried:
                self.hand_overs_retried += retried
            return reply

    def _deliver_envelopes(self, client: Any, envelopes: list[bytes], deadline: float) -> list[str | None]:
        """The error refusing each of ``envelopes`` (None: stored), the retrier asked as :meth:`_hand_over` says."""
        from villagemesh.actors.retrier.actor import send_envelopes

        try:
            reply = self._hand_over(deadline, lambda: send_envelopes(client, envelopes, timeout=ASK_TIMEOUT))
        except BusError as exc:
            return [_unknown_outcome(None, exc)] * len(envelopes)
        return [None if error is None else f"refused: {error}" for error in reply.errors]

    def request(
        self,
        peer_id: str,
        payload: object,
        *,
        timeout: float,
        kind: str = REQUEST_KIND,
        priority: PriorityLike = Priority.NORMAL,
    ) -> Any:
        """Send ``payload`` and return the reply: the value the peer's handler returned, decoded.

        The request is a reliable message whose TTL is ``timeout``; the reply
        rides on its outcome report. A reply arriving after ``timeout`` is
        dropped and counted (``network_status()["late_replies"]``).

        Raises:
            RequestTimeout: no reply within ``timeout`` seconds (names the peer and the message id).
            RemoteError: the peer's handler raised (its exception's type and message).
            Unhandled: the peer has no handler for ``kind``.
            DeliveryFailed: the request never reached a handler.
        """
        deadline = time.monotonic() + timeout
        handle = self.send(peer_id, payload, kind=kind, priority=priority, ttl=timeout, timeout=timeout)
        status = handle.wait(max(0.0, deadline - time.monotonic()))
        return self._reply_of(handle, status, timeout)

    def _reply_of(self, handle: DeliveryHandle, status: DeliveryStatus, timeout: float) -> Any:
        if status.state is DeliveryState.PENDING:
            self.handles.abandon(handle.raw_id)
            raise RequestTimeout(handle.peer_id, handle.message_id, timeout)
        error = status.exception()
        if error is not None:
            raise error
        if status.remote_type is not None:  # handled, but the reply could not travel
            raise RemoteError(status.message_id, status.attempts, status.remote_type, status.last_error or "")
        return None if status.reply is None else self.codec.decode(status.reply)

    def broadcast(
        self,
        kind: str,
        payload: object,
        *,
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
    ) -> list[DeliveryHandle]:
        """Send to every known peer (one reliable message each)."""
        return [
            self.send(p.peer_id, payload, kind=kind, priority=priority, ttl=ttl, timeout=timeout) for p in self.peers()
        ]

    def subscribe(self, kind: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for each message of ``kind`` ("*" for all); returns the unsubscribe.

        A plain handler runs on the node's app gateway thread (keep it short; it
        delays every later message); an ``async def`` handler runs on the event
        loop this is called from. A handler answers a request by returning a
        value. See docs/embedding.md for statuses and what a failing handler reports.

        Each message is dispatched once; only if the node dies while handlers run
        is it dispatched again after the restart, with ``message.redelivered`` True
        (see :class:`~villagemesh.actors.app.state.InboundMessage`). Subscribe
        before ``start()`` to receive the messages a restart re-dispatches.
        """
        if self._failure is not None:
            raise _again(self._failure)
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"kind must be a non-empty str ('*' for every kind), got {kind!r}")
        if not callable(handler):
            raise ConfigError(f"handler must be callable, got {type(handler).__name__}")
        return self.subscribers.add(kind, handler)

    def peers(self) -> list[PeerInfo]:
        """Every known peer."""
        from villagemesh.actors.registry.messages import ListPeers

        reply = self._client().ask("registry", ListPeers(), timeout=ASK_TIMEOUT)
        return [_peer_info(p) for p in reply.peers]

    def get_suitable_evolution_peers(self, min_count: int = 1) -> list[PeerInfo]:
        """Every peer suitable for evolution, best first (no cap; may be fewer than ``min_count``)."""
        from villagemesh.actors.registry.messages import FindSuitablePeers

        check_min_count(min_count)
        reply = self._client().ask("registry", FindSuitablePeers(min_count), timeout=ASK_TIMEOUT)
        return [_peer_info(p) for p in reply.peers]

    def wait_for_peers(self, count: int, timeout: float) -> bool:
        """True once at least ``count`` peers are known; woken by each ``peer_discovered`` event."""
        if not _is_int(count) or count < 0:
            raise ConfigError(f"count must be an int >= 0, got {count!r}")
        if not _is_number(timeout) or timeout < 0:
            raise ConfigError(f"timeout must be a finite number >= 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            with self._peers_changed:
                seen = self._peer_events
            if len(self.peers()) >= count:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._peers_changed:
                if self._peer_events == seen:
                    self._peers_changed.wait(min(left, 1.0))

    def discover_now(self) -> None:
        """Start a discovery round now."""
        from villagemesh.actors.sweeper.messages import SweepNow

        self._client().tell("sweeper", SweepNow())

    def crash(self, actor_name: str) -> None:
        """Fault injection: make the actor named ``actor_name`` crash (its supervisor restarts it)."""
        from villagemesh.actors.core.base import InjectedCrash

        if not isinstance(actor_name, str) or not actor_name:
            raise ConfigError(f"actor_name must be a non-empty str, got {actor_name!r}")
        self._client().tell(actor_name, InjectedCrash(f"injected by Node.crash({actor_name!r})"))

    def network_status(self) -> dict[str, Any]:
        """The node at a glance: id, mode, peers, the retrier's counters, the outbox, the actor tree
        (and the mixnode's, and the BitChat mesh's: its peer id, radio, links, verified peers and counters)."""
        from villagemesh.actors.betanet.actor import betanet_status
        from villagemesh.actors.bitchat.messages import GetBitchatStatus
        from villagemesh.actors.retrier.messages import GetRetrierStatus

        client = self._client()
        retrier = client.ask("retrier", GetRetrierStatus(), timeout=ASK_TIMEOUT)
        mix = betanet_status(client, timeout=ASK_TIMEOUT) if self.runs_betanet else None
        mesh = client.ask("bitchat", GetBitchatStatus(), timeout=ASK_TIMEOUT) if self.runs_bitchat else None
        return self._status(len(self.peers()), retrier, self._actors(), mix, mesh)

    def _actors(self) -> list[dict[str, Any]]:
        assert self._root is not None
        try:
            return which_children(self._root.actor_ref, timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            self._health.wait_for(lambda: self._failure is not None, ASK_TIMEOUT)  # the root's report is on its way
            if self._failure is not None:
                raise _again(self._failure) from exc
            raise SupervisionError(f"node {self.name}: the root supervisor did not answer ({exc})") from exc

    def _status(
        self, peers: int, retrier: Any, actors: list[dict[str, Any]], mix: Any = None, mesh: Any = None
    ) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "mode": self.config.mode.value,
            "address": self.address,
            "transport_priority": list(_transport_order(self.config.mode)),
            "peers": peers,
            "retrier": {k: getattr(retrier, k) for k in retrier.__dataclass_fields__},
            "outbox": {"messages": self.handles.pending_messages, "bytes": self.handles.pending_bytes},
            "late_replies": self.handles.late,
            "app": asdict(self.gateway_counters),
            "actors": actors,
            **({"betanet": _betanet_fields(mix)} if mix is not None else {}),
            **({"bitchat": asdict(mesh)} if mesh is not None else {}),
        }

    # -- events ------------------------------------------------------------------------------------

    def on_event(self, listener: Callable[[NodeEvent], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each :class:`NodeEvent`; returns the unsubscribe.

        It runs in the thread that logged the event (an actor's): keep it short and
        never block in it. An exception it raises is logged (``event_listener_failed``)
        and does not reach the actor. ``AsyncNode.events()`` is the asyncio form.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _on_log_event(self, record: dict[str, Any]) -> None:
        """The log's sink: public events out, and a dead transport's in-flight sends failed at once."""
        name = record["event"]
        if name == "child_crashed" and record.get("child_id") in _TRANSPORTS:
            self._transport_down(record["child_id"])
        if name == "child_restarted" and record.get("child_id") == "retrier":
            with self._outlets_lock:
                outlets = list(self._outlets)
            for outlet in outlets:  # asyncio sends the crashed instance took unstored: again
                outlet.retrier_restarted()
        if name == "peer_discovered" and "peer_id" in record:
            with self._peers_changed:
                self._peer_events += 1
                self._peers_changed.notify_all()
        for event in NodeEvent.all_of(record):
            self._tell_listeners(event)

    def _tell_listeners(self, event: NodeEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - the application's listener must not kill the emitting actor
                assert self._env is not None
                self._env.log.emit(  # not a public event: no listener is called for it (no loop)
                    "event_listener_failed",
                    level="error",
                    listener=getattr(listener, "__qualname__", repr(listener)),
                    exc_type=type(exc).__name__,
                    exc_message=str(exc),
                )

    def _transport_down(self, transport: str) -> None:
        from villagemesh.actors.retrier.messages import TransportDown

        if not self._started or self._env is None:
            return  # stopping: nothing to fail over to
        try:
            # A short timeout: this runs in the supervisor's thread, which must not wait long.
            self._env.bus.client().tell("retrier", TransportDown(transport), timeout=TRANSPORT_DOWN_TIMEOUT)
        except BusError as exc:
            self._env.log.emit("transport_down_unreported", level="warning", transport=transport, reason=str(exc))

    # -- large transfers -------------------------------------------------------------------------

    def send_file(
        self, peer_id: str, path: str | os.PathLike[str], *, kind: str = FILE_KIND, name: str | None = None
    ) -> TransferHandle:
        """Send the file at ``path`` to ``peer_id`` as a transfer: chunked, verified, resumable.

        The file is hashed (:attr:`transfer_digest`) here, in the calling thread, and offered with
        its size, ``kind`` and ``name`` (default: the file's name); the receiver judges
        the offer against its limits before any byte is written. Chunks are read from the
        file as the window allows, so the file must stay as it is until the handle ends
        (a changed file ends in DigestMismatch). The transfer outlives restarts of either
        node (it goes on from the last chunk both committed).

        Raises:
            ConfigError: a malformed or own peer id, a path that is not a readable file, a bad kind.
        """
        check_peer_id(peer_id, self.node_id)
        source = Path(os.fspath(path))
        try:
            size, digest = hash_file(source, self.transfer_digest)
        except OSError as exc:
            raise ConfigError(f"cannot send {str(source)!r}: {exc.strerror or exc}") from exc
        return self._offer(peer_id, str(source.resolve()), size, digest, kind, source.name if name is None else name)

    def send_stream(
        self,
        peer_id: str,
        source: Iterable[bytes],
        *,
        size: int | None = None,
        kind: str = FILE_KIND,
        name: str = "stream",
    ) -> TransferHandle:
        """Send the bytes ``source`` yields to ``peer_id`` as a transfer (:meth:`send_file`'s guarantees).

        The stream is spooled to a file in the data dir first (hashing as it goes), which
        is what makes it resumable and its digest known up front; the spool is deleted
        when the transfer ends. ``size``, if given, is checked against what the stream
        yielded. An async iterable goes to :meth:`AsyncNode.send_stream`.

        Raises:
            ConfigError: a malformed or own peer id, a stream that yields other than bytes,
                or a ``size`` other than the stream's.
        """
        check_peer_id(peer_id, self.node_id)
        spool = _Spool(self.config.data_dir, self.transfer_digest)
        try:
            for block in source:
                spool.write(block)
            spooled, digest = spool.close(size)
        except BaseException:
            spool.discard()
            raise
        return self._offer(peer_id, spooled, os.path.getsize(spooled), digest, kind, name, spooled=True)

    def _offer(
        self, peer_id: str, path: str, size: int, digest: bytes, kind: str, name: str, *, spooled: bool = False
    ) -> TransferHandle:
        from villagemesh.actors.transfer.messages import SendFile, SendReply

        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"kind must be a non-empty str, got {kind!r}")
        if not isinstance(name, str):
            raise ConfigError(f"name must be a str, got {name!r}")
        client = self._client()
        transfer_id = os.urandom(16)
        handle = self.transfer_table.new(transfer_id, peer_id, name, size)
        message = SendFile(transfer_id, peer_id, path, size, digest, kind, name, spooled, self.transfer_digest)
        reply = client.ask("transfer", message, timeout=ASK_TIMEOUT)
        if not isinstance(reply, SendReply) or reply.error is not None:
            error = getattr(reply, "error", repr(reply))
            self.transfer_table.end(transfer_id, "failed", None)
            if spooled:
                Path(path).unlink(missing_ok=True)
            raise ConfigError(f"transfer to {peer_id!r} refused here: {error}")
        return handle

    def on_transfer(self, handler: Callable[[ReceivedFile], object], kind: str = "*") -> Callable[[], None]:
        """Call ``handler(received)`` for each verified file another node sent (of ``kind``, "*": any).

        ``received.path`` is the file, moved into place atomically once its digest
        matched; ``received.stream()`` gives its bytes as an async stream. A plain
        handler runs on the transfer actor's thread (keep it short); an ``async def``
        handler runs on the loop this was called from. Returns the unsubscribe.
        """
        return self.transfer_receivers.add(kind, handler)

    def on_transfer_failed(self, handler: Callable[[TransferError], object]) -> Callable[[], None]:
        """Call ``handler(error)`` for each incoming transfer that ended without a verified file: a
        :class:`~villagemesh.errors.DigestMismatch` (the partial file is already deleted), or a
        :class:`~villagemesh.errors.TransferError` (cancelled by the sender, storage failed)."""
        return self.transfer_receivers.add_failure(handler)

    def transfers(self) -> list[dict[str, Any]]:
        """Every transfer this node knows (outgoing and incoming), with bytes done and its state."""
        from villagemesh.actors.transfer.actor import transfers

        return [asdict(row) for row in transfers(self._client(), timeout=ASK_TIMEOUT).rows]

    def cancel_transfer(self, handle: TransferHandle, detail: str = "cancelled by the sender") -> None:
        """End an outgoing transfer here; the receiver is told and deletes its partial file."""
        from villagemesh.actors.transfer.messages import CancelTransfer

        self._client().tell("transfer", CancelTransfer(handle.raw_id, detail))

    # -- asyncio (see villagemesh.aio: these are its coroutines) -----------------------------------

    async def asend(
        self,
        peer_id: str,
        payload: object,
        *,
        kind: str = "DATA",
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
        timeout: float | None = None,
    ) -> DeliveryHandle:
        """:meth:`AsyncNode.send <villagemesh.aio.AsyncNode.send>`."""
        return await self.aio.send(
            peer_id, payload, kind=kind, priority=priority, ttl=ttl, correlation_id=correlation_id, timeout=timeout
        )

    async def arequest(
        self,
        peer_id: str,
        payload: object,
        *,
        timeout: float,
        kind: str = REQUEST_KIND,
        priority: PriorityLike = Priority.NORMAL,
    ) -> Any:
        """:meth:`AsyncNode.request <villagemesh.aio.AsyncNode.request>`."""
        return await self.aio.request(peer_id, payload, timeout=timeout, kind=kind, priority=priority)

    async def apeers(self) -> list[PeerInfo]:
        """:meth:`AsyncNode.peers <villagemesh.aio.AsyncNode.peers>`."""
        return await self.aio.peers()


def _cpu_digest() -> DigestAlgorithm:
    """:func:`~villagemesh.actors.transfer.state.digest_for_cpu` for this machine (no ``/proc/cpuinfo``,
    as on macOS: BLAKE2b-256, the choice that is never slow)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except FileNotFoundError:
        cpuinfo = ""
    return digest_for_cpu(platform.machine(), cpuinfo)


class _Spool:
    """A stream written to ``data_dir/transfers/<random>.spool`` while it is hashed."""

    def __init__(self, data_dir: Path, algorithm: DigestAlgorithm) -> None:
        folder = data_dir / "transfers"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.urandom(8).hex()}.spool"
        self.handle = self.path.open("wb")
        self.digest = whole_digest(algorithm)
        self.size = 0

    def write(self, block: object) -> None:
        if not isinstance(block, bytes | bytearray | memoryview):
            raise ConfigError(f"a stream to send must yield bytes, got {type(block).__name__}")
        self.handle.write(block)
        self.digest.update(block)
        self.size += len(block)

    def close(self, size: int | None) -> tuple[str, bytes]:
        self.handle.close()
        if size is not None and size != self.size:
            raise ConfigError(f"the stream yielded {self.size} bytes, not the size={size} given")
        return str(self.path), self.digest.digest()

    def discard(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


def _betanet_fields(status: Any) -> dict[str, Any]:
    return {
        "address": status.address,
        "epoch": status.epoch,
        "mixnodes": status.mixnodes,
        "held": status.held,
        "counts": status.counts,
    }


_TRANSPORTS = frozenset({"libp2p", "bitchat", "betanet", "websocket"})
"""Bus names of transport actors (their death fails their in-flight sends at once)."""

_PUBLIC_EVENTS: Mapping[str, str] = {
    "peer_discovered": "peer_discovered",
    "peer_expired": "peer_lost",
    "peer_evicted": "peer_lost",
    "peer_forgotten": "peer_lost",
    "message_handled": "delivered",
    "delivery_failed": "failed",
    "message_unconfirmed": "failed",
    "child_crashed": "child_crashed",
    "child_restarted": "child_restarted",
}
"""Log event -> public event kind (``message_handled`` of another status than handled is ``failed``)."""


@dataclass(frozen=True)
class NodeEvent:
    """One event of the node, for orchestrators: ``kind`` and the log record's fields.

    Kinds: ``peer_discovered`` (peer_id, source, transports), ``peer_lost``
    (peer_id, why: expired, evicted or forgotten), ``delivered`` (message_id,
    peer_id), ``failed`` (message_id, and status/reason or
    attempts/last_error), ``child_crashed`` (child_id, exc_type,
    exc_message), ``child_restarted`` (child_id, restart_count).
    """

    kind: str
    fields: Mapping[str, Any]
    timestamp: str

    @classmethod
    def all_of(cls, record: Mapping[str, Any]) -> list[NodeEvent]:
        """The public events of a log record: one ``delivered`` per id of a ``messages_handled`` line
        (a batch report's), else :meth:`of`'s one event or none."""
        if record.get("event") == "messages_handled":
            stamp = str(record.get("timestamp", ""))
            peer, status = record.get("peer_id"), record.get("status")
            return [
                cls("delivered", {"message_id": mid, "peer_id": peer, "status": status}, stamp)
                for mid in record.get("message_ids", ())
            ]
        event = cls.of(record)
        return [] if event is None else [event]

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> NodeEvent | None:
        """The public event of a log record, or None for a record that is not one."""
        name = record.get("event", "")
        kind = _PUBLIC_EVENTS.get(name)
        if kind is None or (name == "peer_discovered" and "peer_id" not in record):
            return None  # (a beacon's sighting, before the registry has the peer, is not one)
        if name == "message_handled" and record.get("status") != "handled":
            kind = "failed"
        common = {"event", "level", "node", "timestamp", "traceback"}
        fields = {k: v for k, v in record.items() if k not in common}
        if kind == "peer_lost":
            fields["why"] = name.removeprefix("peer_")
        return cls(kind, fields, str(record.get("timestamp", "")))


def check_peer_id(peer_id: object, own_id: str | None = None) -> str:
    """``peer_id`` if it is a well-formed node id other than ``own_id``; else ConfigError naming it."""
    if not isinstance(peer_id, str) or NODE_ID.fullmatch(peer_id) is None:
        raise ConfigError(f"peer id must be 32 lower-case hex characters (a node id), got {peer_id!r}")
    if peer_id == own_id:
        raise ConfigError(f"peer id {peer_id!r} is this node's own id: a node does not send to itself")
    return peer_id


def check_min_count(min_count: object) -> int:
    """``min_count`` if it is an int >= 0; else ConfigError naming it."""
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ConfigError(f"min_count must be an int >= 0, got {min_count!r}")
    return min_count


def _again(failure: NodeFailed) -> NodeFailed:
    """A fresh copy to raise (one instance raised from many threads would share its traceback)."""
    return NodeFailed(failure.node, failure.child, failure.exc_type, failure.detail)


class _Health:
    """A log sink that remembers crashes, so the node can name a root cause; wakes whoever waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.first_crash: tuple[str, str | None, str] | None = None
        """``(child, exc_type, detail)`` of the first crash of a worker (not an escalation)."""
        self.last_crash: tuple[str, str | None, str] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "child_crashed" and event.get("exc_type") != "RestartIntensityExceeded":
            crash = (str(event.get("child_id")), event.get("exc_type"), str(event.get("exc_message")))
            with self._cond:
                if self.first_crash is None:
                    self.first_crash = crash
                self.last_crash = crash
                self._cond.notify_all()
        elif name in ("child_started", "child_crashed"):
            self.wake()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(predicate, timeout)

    def cause(self, report: ExitReport) -> tuple[str | None, str | None, str]:
        """What made the root fail: the last worker crash, else the root's own report."""
        if self.last_crash is not None:
            return self.last_crash
        return None, report.exc_type, str(report.exc_message)


def _not_ready(rows: list[dict[str, Any]], prefix: str = "") -> list[str]:
    """The children (``a/b`` for nested ones) not started yet, from ``which_children`` rows."""
    waiting = []
    for row in rows:
        if not row["ready"]:
            waiting.append(prefix + row["id"])
        elif row.get("kind") == "supervisor":
            children = row.get("children") or []
            if not children:
                waiting.append(prefix + row["id"] + "/*")
            waiting.extend(_not_ready(children, prefix + row["id"] + "/"))
    return waiting


def message_id_for(key: str | bytes) -> MessageId:
    """A message id that is a function of ``key`` (16 bytes of its BLAKE2b): the application's own name
    for a message, so that sending it again after an unknown outcome cannot send it twice
    (:meth:`Node.send`'s ``message_id``). Keys must be unique among the sender's messages within their TTL,
    e.g. ``f"{job}:{recipient}:{seq}"``."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes) or not key:
        raise ConfigError(f"a message id key must be a non-empty str or bytes, got {key!r}")
    return message_id_of(hashlib.blake2b(key, digest_size=ID_BYTES, person=b"villagemesh.id").digest())


def _raw_id(message_id: MessageId | str | bytes) -> bytes:
    """The 16 bytes of a message id given as :data:`MessageId` (32 hex characters) or as bytes."""
    wrong = f"message_id must be {2 * ID_BYTES} hex characters or {ID_BYTES} bytes, got {message_id!r}"
    if isinstance(message_id, bytes) and len(message_id) == ID_BYTES:
        return message_id
    if not isinstance(message_id, str) or len(message_id) != 2 * ID_BYTES:
        raise ConfigError(wrong)
    try:
        return bytes.fromhex(message_id)
    except ValueError as exc:
        raise ConfigError(wrong) from exc


def _unknown_outcome(message_id: bytes | None, exc: BaseException) -> str:
    """The end of a handle whose message the retrier may or may not have stored."""
    again = "the same message_id" if message_id is None else f"message_id {message_id.hex()}"
    return f"outcome unknown, the retrier did not answer ({type(exc).__name__}: {exc}); send again with {again}"


def _encoded(message: Message) -> bytes:
    """``message`` encoded, and remembered as that encoding's decoding (the retrier and the secure
    session read it back without decoding it again)."""
    from villagemesh.actors.core.envelopes import remember

    raw = encode_message(message)
    remember(raw, message)
    return raw


def _transport_order(mode: NetworkMode) -> tuple[str, ...]:
    from villagemesh.actors.retrier.modes import TRANSPORT_ORDER

    return tuple(str(t) for t in TRANSPORT_ORDER[mode])


def _priority(value: Priority | str | int) -> Priority:
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority[value.upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return Priority(value)
        except ValueError:
            pass
    names = ", ".join(p.name.lower() for p in Priority)
    raise ConfigError(f"priority must be one of {names}, got {value!r}")


def _peer_info(info: Any) -> PeerInfo:
    rec = info.record()
    name = None if rec.capabilities is None else rec.capabilities.node_name
    return PeerInfo(rec.peer_id, rec.addresses, rec.capabilities, rec.last_seen, rec.trust, rec.latency_ms, name)


def create_network(mode: NetworkMode | str = NetworkMode.HYBRID, **settings: Any) -> Node:
    """A node in ``mode`` (hybrid, mesh, anonymous, direct); ``settings`` are :class:`NodeConfig` fields.

    ``data_dir`` is required: the node's identity, peers and messages live there.
    """
    if "data_dir" not in settings:
        raise ConfigError("create_network needs data_dir= (where the node keeps its key, peers and messages)")
    known = set(NodeConfig.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown node settings {unknown}; known: {sorted(known)}")
    return Node(NodeConfig(mode=NetworkMode.parse(mode), **settings))
