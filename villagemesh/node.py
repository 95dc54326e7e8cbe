"""The node: a supervised tree of actors on one bus, and the API to embed it.

::

    root (one_for_one)
    ├── registry      peers, capabilities, trust          (SQLite: data_dir/peers.sqlite3)
    ├── retrier       outbox, acks, retries, failover      (SQLite: data_dir/messages.sqlite3)
    ├── app           subscribers and delivery handles
    ├── transports    (one_for_one)
    │   └── websocket aiohttp server and client
    ├── acceptor      one TCP port, sniffed and handed off
    ├── lan           beacons, discovery responder, bootstrap probes
    └── sweeper       discovery rounds

:func:`create_network` makes a :class:`Node`; ``start()`` builds the runtime
(one zmq Context, the timer thread, the event log) and launches the root
supervisor; ``stop()`` stops the tree in reverse order. Everything a restart
must keep lives in ``data_dir``: the key file (so the node id is stable), the
peers, the outbox and the inbox.

The API is thread-safe (each calling thread gets its own bus sender) and has
asyncio variants; handles can be awaited.

Sending, and what each call gives (every message is stored durably, committed
in the outbox, before its call returns; its handle ends delivered or failed):

- ``send``: one message, one ask of the retrier; the call returns once that
  message is committed. Sends from several threads at once share commits (the
  retrier takes every waiting ``Deliver`` as one turn, one transaction), but
  one thread calling ``send`` in a loop waits for one commit per message.
- ``send_many``: many messages, one ask per :data:`SEND_MANY_CHUNK` (256), one commit
  each; returns once all are committed. The fast way from one thread.
- ``asend``: awaitable; the ``asend`` calls waiting at once on one event loop go to
  the retrier together, from one thread of the node's (as ``send_many``): one
  awaits its own message's commit, ``asyncio.gather`` over many pipelines them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from villagemesh.actors.app.actor import AppActor
from villagemesh.actors.app.state import DeliveryHandle, HandleTable, InboundMessage, Subscribers
from villagemesh.actors.core.base import ExitReport, Scheduler
from villagemesh.actors.core.bus import Bus
from villagemesh.actors.core.ledger import prepare as prepare_messages
from villagemesh.actors.lan.actor import parse_host_port
from villagemesh.actors.retrier.modes import NetworkMode
from villagemesh.errors import ConfigError, SupervisionError, VillageMeshError
from villagemesh.protocols.discovery import Capabilities
from villagemesh.protocols.envelope import ID_BYTES, Message, Priority, encode_message
from villagemesh.supervision.log import EventLog
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Environment, Supervisor, which_children

__all__ = ["NetworkMode", "Node", "NodeConfig", "PeerInfo", "create_network", "free_port", "local_capabilities"]

ASK_TIMEOUT = 5.0
"""Seconds the node API waits for one of its own actors to answer."""

MESSAGES_FILE = "messages.sqlite3"
"""The retrier's outbox and inbox in ``data_dir``; the app gateway commits its dispatch marks there too."""

DEFAULT_TTL = 24 * 3600.0
"""A message's lifetime unless the sender says otherwise (the replaced system's 24 h)."""

SEND_MANY_CHUNK = 256
"""Envelopes one ask of the retrier carries at most (``send_many``, gathered ``asend`` calls): one commit
each. Small enough that the retrier sends one chunk while the next is being stored (1,024 left the
pipeline idle between stages), large enough that a commit is shared by hundreds."""

SYNCHRONOUS_MODES = ("NORMAL", "FULL")
"""SQLite durability of the message files: NORMAL survives a killed process (a commit is a write
to the WAL, no fsync); FULL survives power loss too (an fsync per commit)."""


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
    start_timeout: float = 30.0
    """Seconds ``start()`` waits for the acceptor to listen."""
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
    capabilities: Capabilities | None = None
    betanet: bool | None = None
    """Run the BetaNet mixnode relay (and announce its address): None means on in the anonymous mode only."""
    betanet_delay_ms: float = 0.0
    """Mean per-hop delay this node chooses for its anonymous packets (exponential; 0: none)."""
    betanet_cover_rate: float = 0.0
    """Loop and drop cover packets per second, each (Poisson; 0: none)."""
    human_log: bool | None = False
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "mode", NetworkMode.parse(self.mode))
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be an int in 0..65535, got {self.port!r}")
        bootstrap = tuple(self.bootstrap)
        for entry in bootstrap:
            parse_host_port(entry)
        object.__setattr__(self, "bootstrap", bootstrap)
        if not isinstance(self.discovery_fast_start, int | float) or not 0 <= self.discovery_fast_start:
            raise ConfigError(f"discovery_fast_start must be a number >= 0, got {self.discovery_fast_start!r}")
        positive = (
            "discovery_interval",
            "discovery_timeout",
            "peer_max_age",
            "ack_timeout",
            "backoff_base",
            "lan_rate_per_s",
            "lan_burst",
            "start_timeout",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_connections_per_source", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise ConfigError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {self.synchronous!r}")
        if self.betanet is not None and not isinstance(self.betanet, bool):
            raise ConfigError(f"betanet must be True, False or None, got {self.betanet!r}")
        for name in ("betanet_delay_ms", "betanet_cover_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"node name must be non-empty without '/', got {self.name!r}")


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


class Node:
    """One villagemesh node. Make it with :func:`create_network`; start it, use it, stop it."""

    def __init__(self, config: NodeConfig) -> None:
        from villagemesh.actors.core.secure.keys import NodeKeys

        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys = NodeKeys.load_or_create(config.data_dir / "node.key")
        self.node_id: str = self.keys.node_id
        self.name = config.name or f"node-{self.node_id[:8]}"
        self.port = config.port or free_port(host=config.host)
        self.subscribers = Subscribers()
        self.handles = HandleTable()
        self._lock = threading.Lock()
        self._started = False
        self._failed: ExitReport | None = None
        self._env: Environment | None = None
        self._root: Supervisor | None = None
        self._launcher: Any = None
        self._lock_file: Any = None
        self._sends: concurrent.futures.ThreadPoolExecutor | None = None
        self._async_sends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncSends] = (
            weakref.WeakKeyDictionary()
        )

    # -- addresses ---------------------------------------------------------------------------

    @property
    def runs_betanet(self) -> bool:
        """Whether this node is a BetaNet mixnode (:attr:`NodeConfig.betanet`)."""
        return self.config.betanet if self.config.betanet is not None else self.config.mode is NetworkMode.ANONYMOUS

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
    def acceptor_address(self) -> str:
        """``host:port`` of the acceptor (what other nodes put in ``bootstrap``)."""
        return f"{self.config.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The node's JSON-lines event log."""
        return self.config.log_path or self.config.data_dir / "events.jsonl"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Node:
        """Start every actor; returns once the acceptor listens. Idempotent."""
        with self._lock:
            if self._started:
                return self
            self._lock_data_dir()
            try:
                # before two actors open it at once
                prepare_messages(self.config.data_dir / MESSAGES_FILE, synchronous=self.config.synchronous)
            except VillageMeshError:
                self._unlock_data_dir()
                raise
            bus = Bus(self.name)
            log = EventLog(self.name, self.log_path, human=self.config.human_log)
            env = Environment(bus=bus, log=log, scheduler=Scheduler(f"{self.name}-timers"))
            env.process_launcher = self._process_launcher
            self._env = env
            log.emit("node_starting", node_id=self.node_id, mode=self.config.mode.value, port=self.port)
            self._root = Supervisor.launch(self._tree(), env, watcher=self._root_ended)
            self._started = True
        try:
            self._wait_until_listening(self.config.start_timeout)
        except VillageMeshError:
            self.stop()
            raise
        log.emit("node_started", node_id=self.node_id, address=self.address)
        return self

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
        if self._sends is not None:
            self._sends.shutdown(wait=True)
            self._sends = None
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
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
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _root_ended(self, actor: Any, report: ExitReport) -> None:
        if report.crashed and self._env is not None:
            self._failed = report
            self._env.log.emit(
                "node_failed", level="error", node_id=self.node_id, exc_type=report.exc_type, reason=report.exc_message
            )

    def _process_launcher(self) -> Any:
        if self._launcher is None:
            from villagemesh.supervision.process import ProcessLauncher

            self._launcher = ProcessLauncher()
        return self._launcher

    def _tree(self) -> SupervisorSpec:
        from villagemesh.actors.acceptor.actor import AcceptorActor
        from villagemesh.actors.acceptor.state import AcceptorLimits
        from villagemesh.actors.lan.actor import LanActor
        from villagemesh.actors.lan.beacon import BeaconConfig
        from villagemesh.actors.lan.identity import Identity
        from villagemesh.actors.registry.actor import RegistryActor
        from villagemesh.actors.retrier.actor import RetrierActor
        from villagemesh.actors.sweeper.actor import SweeperActor
        from villagemesh.actors.websocket.actor import WebSocketActor

        cfg, data = self.config, self.config.data_dir
        betanet = self.runs_betanet
        capabilities = cfg.capabilities or local_capabilities(("websocket", "betanet") if betanet else ("websocket",))
        addresses = (self.address, self.betanet_address) if betanet else (self.address,)
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
                ChildSpec(
                    "websocket",
                    WebSocketActor,
                    config={"deliver_to": "retrier", "node_id": self.node_id, "keys": self.keys},
                ),
                *([self._betanet_spec()] if betanet else []),
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
                    "synchronous": cfg.synchronous,
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
                },
            ),
            transports,
            ChildSpec(
                "acceptor",
                AcceptorActor,
                config={
                    "host": cfg.host,
                    "port": self.port,
                    "routes": {"http": "websocket", "discovery": "lan", **({"secure": "betanet"} if betanet else {})},
                    "limits": AcceptorLimits(
                        max_per_source=cfg.max_connections_per_source,
                        max_total=max(cfg.max_connections, cfg.max_connections_per_source),
                    ),
                },
            ),
            ChildSpec(
                "lan",
                LanActor,
                config={
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
                    "transports": ["lan"],
                    "interval": cfg.discovery_interval,
                    "fast_start": cfg.discovery_fast_start,
                    "timeout": cfg.discovery_timeout,
                    "registry": "registry",
                },
            ),
        ]
        return SupervisorSpec("root", children, strategy="one_for_one", intensity=20, period=10)

    def _betanet_spec(self) -> ChildSpec:
        from villagemesh.actors.betanet.actor import BetanetActor

        cfg = self.config
        return ChildSpec(
            "betanet",
            BetanetActor,
            config={
                "keys": self.keys.to_bytes(),
                "host": cfg.host,
                "port": self.port,
                "replay_path": str(cfg.data_dir / "betanet.sqlite3"),
                "deliver_to": "retrier",
                "registry": "registry",
                "refresh_s": min(10.0, cfg.discovery_interval),
                "mean_delay_ms": cfg.betanet_delay_ms,
                "loop_rate": cfg.betanet_cover_rate,
                "drop_rate": cfg.betanet_cover_rate,
            },
        )

    def _wait_until_listening(self, timeout: float = 10.0) -> None:
        """Ask the acceptor where it listens: the ask waits in its mailbox until it has started."""
        from villagemesh.actors.acceptor.messages import GetAcceptorStatus

        assert self._env is not None
        # The root supervisor opens its children's mailboxes in its own on_start, which may not
        # have run yet on a busy machine: open it here (idempotent), so the ask waits in it.
        self._env.bus.open_mailbox("acceptor")
        status = self._env.bus.client().ask("acceptor", GetAcceptorStatus(), timeout=timeout)
        if self._failed is not None:
            raise SupervisionError(f"node {self.name} failed while starting: {self._failed.exc_message}")
        if status.port != self.port:
            raise SupervisionError(f"node {self.name}: acceptor listens on {status.port}, expected {self.port}")

    # -- the API -------------------------------------------------------------------------------

    def _client(self) -> Any:
        if not self._started or self._env is None:
            raise SupervisionError(f"node {self.name} is not running (call start())")
        return self._env.bus.client()

    def send(
        self,
        peer_id: str,
        payload: bytes,
        *,
        kind: str = "DATA",
        priority: Priority | str | int = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
    ) -> DeliveryHandle:
        """Send ``payload`` to ``peer_id`` reliably; the handle ends delivered or failed.

        The message is stored durably before this returns: a crash of the node
        afterwards does not lose it (it is resent after the restart).
        """
        from villagemesh.actors.retrier.messages import Deliver, DeliverReply

        message = self._message(peer_id, payload, kind, priority, ttl, correlation_id)
        handle = self.handles.new(message.id)
        reply = self._client().ask("retrier", Deliver(_encoded(message)), timeout=ASK_TIMEOUT)
        if not isinstance(reply, DeliverReply) or reply.error is not None:
            self.handles.resolve(message.id, False, 0, getattr(reply, "error", repr(reply)))
            raise ConfigError(f"message to {peer_id!r} refused: {getattr(reply, 'error', reply)}")
        return handle

    def send_many(
        self,
        messages: Iterable[tuple[str, bytes]],
        *,
        kind: str = "DATA",
        priority: Priority | str | int = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
    ) -> list[DeliveryHandle]:
        """Send every ``(peer_id, payload)`` reliably, in order; one handle each.

        Returns once every message is stored durably: one ask of the retrier and one
        commit per :data:`SEND_MANY_CHUNK` messages (what ``send`` in a loop pays per
        message). A message the retrier refuses gets a handle that has already failed,
        naming why; the others go on.
        """
        built = [self._message(peer, payload, kind, priority, ttl, None) for peer, payload in messages]
        handles = [self.handles.new(m.id) for m in built]
        for start in range(0, len(built), SEND_MANY_CHUNK):
            chunk = built[start : start + SEND_MANY_CHUNK]
            errors = self._deliver_envelopes([_encoded(m) for m in chunk])
            for message, error in zip(chunk, errors, strict=True):
                if error is not None:
                    self.handles.resolve(message.id, False, 0, error)
        return handles

    def _deliver_envelopes(self, envelopes: list[bytes]) -> list[str | None]:
        """One ask of the retrier for ``envelopes`` (from the calling thread); the error refusing each, or None."""
        from villagemesh.actors.retrier.actor import send_envelopes

        timeout = ASK_TIMEOUT * max(1, len(envelopes) // 256)  # a chunk of 16 KiB envelopes takes a while
        return list(send_envelopes(self._client(), envelopes, timeout=timeout).errors)

    def _message(
        self,
        peer_id: str,
        payload: bytes,
        kind: str,
        priority: Priority | str | int,
        ttl: float,
        correlation_id: bytes | None,
    ) -> Message:
        return Message(
            id=os.urandom(ID_BYTES),
            kind=kind,
            sender=self.node_id,
            recipient=peer_id,
            priority=_priority(priority),
            created_at=time.time(),
            ttl=float(ttl),
            correlation_id=correlation_id,
            payload=bytes(payload),
        )

    def broadcast(self, kind: str, payload: bytes, **kwargs: Any) -> list[DeliveryHandle]:
        """Send to every known peer (one reliable message each)."""
        return [self.send(p.peer_id, payload, kind=kind, **kwargs) for p in self.peers()]

    def subscribe(self, kind: str, handler: Callable[[InboundMessage], Any]) -> Callable[[], None]:
        """Call ``handler(message)`` for each message of ``kind`` ("*" for all); returns the unsubscribe.

        Each message is dispatched once; only if the node dies while handlers run
        is it dispatched again after the restart, with ``message.redelivered`` True
        (see :class:`~villagemesh.actors.app.state.InboundMessage`). Subscribe
        before ``start()`` to receive the messages a restart re-dispatches.
        """
        return self.subscribers.add(kind, handler)

    def peers(self) -> list[PeerInfo]:
        """Every known peer."""
        from villagemesh.actors.registry.messages import ListPeers

        reply = self._client().ask("registry", ListPeers(), timeout=ASK_TIMEOUT)
        return [_peer_info(p) for p in reply.peers]

    def get_suitable_evolution_peers(self, min_count: int = 1) -> list[PeerInfo]:
        """Every peer suitable for evolution, best first (no cap; may be fewer than ``min_count``)."""
        from villagemesh.actors.registry.messages import FindSuitablePeers

        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ConfigError(f"min_count must be an int >= 0, got {min_count!r}")
        reply = self._client().ask("registry", FindSuitablePeers(min_count), timeout=ASK_TIMEOUT)
        return [_peer_info(p) for p in reply.peers]

    def wait_for_peers(self, count: int, timeout: float) -> bool:
        """True once at least ``count`` peers are known (polls the registry; for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.peers()) >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            threading.Event().wait(0.05)

    def discover_now(self) -> None:
        """Start a discovery round now."""
        from villagemesh.actors.sweeper.messages import SweepNow

        self._client().tell("sweeper", SweepNow())

    def crash(self, actor_name: str) -> None:
        """Fault injection: make the actor named ``actor_name`` crash (its supervisor restarts it)."""
        from villagemesh.actors.core.base import InjectedCrash

        self._client().tell(actor_name, InjectedCrash(f"injected by Node.crash({actor_name!r})"))

    def network_status(self) -> dict[str, Any]:
        """The node at a glance: id, mode, peers, the retrier's counters, the actor tree (and the mixnode's)."""
        from villagemesh.actors.retrier.messages import GetRetrierStatus

        assert self._root is not None
        retrier = self._client().ask("retrier", GetRetrierStatus(), timeout=ASK_TIMEOUT)
        return {
            "node_id": self.node_id,
            "name": self.name,
            "mode": self.config.mode.value,
            "address": self.address,
            "transport_priority": list(_transport_order(self.config.mode)),
            "peers": len(self.peers()),
            "retrier": {k: getattr(retrier, k) for k in retrier.__dataclass_fields__},
            "actors": which_children(self._root.actor_ref, timeout=ASK_TIMEOUT),
            **({"betanet": self._betanet_status()} if self.runs_betanet else {}),
        }

    def _betanet_status(self) -> dict[str, Any]:
        from villagemesh.actors.betanet.actor import betanet_status

        status = betanet_status(self._client(), timeout=ASK_TIMEOUT)
        return {
            "address": status.address,
            "epoch": status.epoch,
            "mixnodes": status.mixnodes,
            "held": status.held,
            "counts": status.counts,
        }

    # -- asyncio ----------------------------------------------------------------------------------

    async def asend(
        self,
        peer_id: str,
        payload: bytes,
        *,
        kind: str = "DATA",
        priority: Priority | str | int = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
    ) -> DeliveryHandle:
        """:meth:`send` without blocking the event loop; returns once the message is stored durably.

        The ``asend`` calls waiting at once on this loop reach the retrier together, in
        one ask from one thread (``send_many``'s path): ``asyncio.gather`` over many
        of them pays one commit per batch, not one per message.
        """
        message = self._message(peer_id, payload, kind, priority, ttl, correlation_id)
        self._client()  # refuse at once when the node is not running
        handle = self.handles.new(message.id)
        loop = asyncio.get_running_loop()
        batcher = self._async_sends.get(loop)
        if batcher is None:
            batcher = self._async_sends[loop] = _AsyncSends(self, loop)
        error = await batcher.add(_encoded(message))
        if error is not None:
            self.handles.resolve(message.id, False, 0, error)
            raise ConfigError(f"message to {peer_id!r} refused: {error}")
        return handle

    def _sending_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one thread that hands gathered ``asend`` calls to the retrier."""
        if self._sends is None:
            self._sends = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-sends")
        return self._sends

    async def apeers(self) -> list[PeerInfo]:
        """:meth:`peers` without blocking the event loop."""
        return await asyncio.to_thread(self.peers)


class _AsyncSends:
    """The ``asend`` calls of one event loop: those waiting at once go to the retrier as one batch.

    Nagle without the delay: the first ``asend`` schedules a hand-over for the loop's
    next turn (``call_soon``, no timer), by which time every coroutine that was ready
    has added its envelope; while one batch is with the retrier, the next gathers.
    """

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop) -> None:
        self.node = node
        self.loop = loop
        self.pending: list[tuple[bytes, asyncio.Future[str | None]]] = []
        self.busy = False

    def add(self, envelope: bytes) -> asyncio.Future[str | None]:
        """Queue ``envelope``; the future resolves to None once it is stored, or to the error refusing it."""
        future: asyncio.Future[str | None] = self.loop.create_future()
        self.pending.append((envelope, future))
        if not self.busy:
            self.busy = True
            self.loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        batch, self.pending = self.pending[:SEND_MANY_CHUNK], self.pending[SEND_MANY_CHUNK:]
        envelopes = [envelope for envelope, _ in batch]
        work = self.loop.run_in_executor(self.node._sending_thread(), self.node._deliver_envelopes, envelopes)
        work.add_done_callback(lambda done: self._handed_over(batch, done))

    def _handed_over(self, batch: list[tuple[bytes, asyncio.Future[str | None]]], done: asyncio.Future[Any]) -> None:
        error = done.exception()
        for index, (_, future) in enumerate(batch):
            if future.done():
                continue  # its asend was cancelled
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[index])
        if self.pending:
            self._hand_over()
        else:
            self.busy = False


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
    return PeerInfo(rec.peer_id, rec.addresses, rec.capabilities, rec.last_seen, rec.trust, rec.latency_ms)


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
