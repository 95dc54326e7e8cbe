"""A node's data dir: its files, and what must hold between them before a node starts on it.

::

    data_dir/
    ├── node.key            the node's keys (its id is derived from them)
    ├── messages.sqlite3    the retrier's outbox and inbox; the app gateway's dispatch marks
    ├── peers.sqlite3       the registry's peers
    ├── transfers.sqlite3   the transfer actor's outgoing and incoming transfers (and transfers/, received/)
    ├── manifest.json       the node id, each store's identity and generation
    ├── events.jsonl        the event log
    └── node.lock           one running node per data dir

:func:`identity` decides the node's keys (a missing or unreadable key while the
stores have history is an ``IdentityError``), :func:`prepare` checks every
store against the manifest (:mod:`villagemesh.actors.core.integrity`), creates
what is new, checkpoints and writes the manifest; :func:`diagnose` reports the
same read-only (``villagemesh doctor``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from villagemesh.actors.betanet.store import SCHEMA_VERSION as BETANET_VERSION
from villagemesh.actors.betanet.store import ReplayStore
from villagemesh.actors.core.integrity import (
    MANIFEST_FILE,
    Manifest,
    StoreSpec,
    advance,
    describe,
    inspect,
    open_for_checkpoints,
    set_aside,
)
from villagemesh.actors.core.ledger import SCHEMA_VERSION as MESSAGES_VERSION
from villagemesh.actors.core.ledger import prepare as prepare_messages
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.registry.store import SCHEMA_VERSION as PEERS_VERSION
from villagemesh.actors.registry.store import PeerStore
from villagemesh.actors.transfer.store import SCHEMA_VERSION as TRANSFERS_VERSION
from villagemesh.actors.transfer.store import TransferStore
from villagemesh.errors import ConfigError, IdentityError, StorageError

__all__ = [
    "BETANET_FILE",
    "KEY_FILE",
    "MESSAGES_FILE",
    "PEERS_FILE",
    "TRANSFERS_FILE",
    "checkpoint_stores",
    "close_all",
    "diagnose",
    "identity",
    "prepare",
    "read_identity",
    "store_specs",
]

MESSAGES_FILE = "messages.sqlite3"
"""The retrier's outbox and inbox in ``data_dir``; the app gateway commits its dispatch marks there too."""

PEERS_FILE = "peers.sqlite3"
"""The registry's peers in ``data_dir``."""

KEY_FILE = "node.key"
"""The node's keys in ``data_dir`` (its id is derived from them)."""

TRANSFERS_FILE = "transfers.sqlite3"
"""The transfer actor's outgoing and incoming transfers in ``data_dir`` (what a resume starts from)."""

BETANET_FILE = "betanet.sqlite3"
"""A BetaNet mixnode's replay tags in ``data_dir``."""

Event = tuple[str, dict[str, Any]]
"""An event to log once the node's log exists: its name and fields (``level`` among them)."""


def identity(data: Path, *, new_identity: bool) -> tuple[Any, Event | None]:
    """The node's keys, and the ``identity_created`` event when they are new.

    Loaded when ``node.key`` is there and belongs to the data dir; made when the
    data dir is new. A key that is missing or unreadable while the stores have
    history, or another node's key, is an IdentityError: a new key would be a new
    node id, and the queued messages and known peers would belong to an identity
    nobody has any more. ``new_identity`` makes one anyway (an unreadable key is
    moved aside to ``node.key.unreadable-<UTC time>``).
    """

    path = data / KEY_FILE
    keys, problem, history = read_identity(data)
    if problem is not None and not new_identity:
        raise IdentityError(f"{problem} (start with new_identity=True / --new-identity to make a new one)")
    if keys is not None:
        return keys, None
    reason = "new data dir"
    if os.path.lexists(path):
        aside = path.with_name(f"{KEY_FILE}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, aside)
        reason = f"{problem}; told to make a new identity (the old key file is now {aside.name})"
    elif history:
        reason = f"{problem}; told to make a new identity"
    keys = NodeKeys.load_or_create(path)
    level = "info" if reason == "new data dir" else "warning"
    return keys, ("identity_created", {"level": level, "node_id": keys.node_id, "reason": reason})


def prepare(
    data: Path, node_id: str, *, accept_loss: bool, betanet: bool = False, synchronous: str = "NORMAL"
) -> tuple[list[Event], list[Any]]:
    """Check every store against the manifest, create what is new, checkpoint, write the manifest.

    Returns the ``store_loss_accepted`` events to log (with ``accept_loss``) and the
    checkpoint connections, still open (see :func:`checkpoint_stores`).

    Raises:
        StorageError: a store is inconsistent (and ``accept_loss`` is not set), naming
            every finding: the file, what is wrong, what starting anyway would lose.
    """

    specs = store_specs(betanet=betanet)
    manifest = Manifest.load(data)
    findings = inspect(data, specs, manifest)
    if findings and not accept_loss:
        raise StorageError(
            f"data dir {data} is inconsistent, refusing to start:\n{describe(findings)}\n"
            "(villagemesh doctor shows the same; start with accept_loss=True / --accept-loss to go on"
            " without what is lost)"
        )
    events: list[Event] = []
    for finding in findings:
        moved = set_aside(data, finding)
        fields = {"file": finding.file, "problem": finding.problem, "detail": finding.detail, "lost": finding.lost}
        events.append(("store_loss_accepted", {"level": "warning", **fields, "moved": moved}))
    prepare_messages(data / MESSAGES_FILE, synchronous=synchronous)  # before two actors open it at once
    PeerStore(data / PEERS_FILE).close()
    TransferStore(data / TRANSFERS_FILE, synchronous=synchronous).close()
    if betanet:
        ReplayStore(data / BETANET_FILE).close()
    if manifest is None:
        manifest = Manifest(node_id)
    manifest.node_id = node_id
    return events, checkpoint_stores(data, manifest, specs)


def checkpoint_stores(data: Path, manifest: Manifest | None, specs: tuple[StoreSpec, ...]) -> list[Any]:
    """Checkpoint every store of ``specs`` and save the manifest (``manifest`` None: the one on disk).

    Returns the connections, still open: the caller closes them once the actors have
    opened theirs. Closing the last connection of a file checkpoints it, which would
    move the new generation out of the log into the database file, and a log deleted
    later would go unnoticed.
    """
    if manifest is None:
        manifest = Manifest.load(data)
        if manifest is None:
            raise StorageError(f"{data}: the manifest is gone")
    conns = []
    try:
        for spec in specs:
            conn = open_for_checkpoints(data / spec.file)
            conns.append(conn)
            if advance(data, manifest, spec, conn) is None:
                raise StorageError(f"{data / spec.file}: its log is in use by another process; cannot checkpoint")
    except BaseException:
        close_all(conns)
        raise
    return conns


def close_all(conns: list[Any]) -> None:
    for conn in conns:
        conn.close()


def read_identity(data: Path) -> tuple[Any, str | None, list[str]]:
    """``(keys or None, the problem with the identity or None, the stores' history)`` of a data dir.

    The problem: the key is missing or unreadable while the data dir has history, or
    it is another node's than the manifest's. Nothing is changed.
    """

    path = data / KEY_FILE
    manifest = Manifest.load(data)
    history = [f for f in (MESSAGES_FILE, PEERS_FILE) if (data / f).exists() and (data / f).stat().st_size > 0]
    if manifest is not None:
        history.insert(0, f"{MANIFEST_FILE} of node {manifest.node_id}")
    has = f"the data dir has history ({', '.join(history)}) that a new identity would orphan"
    if not os.path.lexists(path):
        return None, (f"key file {path} is missing, but {has}" if history else None), history
    try:
        keys = NodeKeys.load(path)
    except ConfigError as exc:
        return None, (f"{exc}, and {has}" if history else str(exc)), history
    if manifest is not None and manifest.node_id != keys.node_id:
        problem = f"key file {path} is node {keys.node_id}, but the data dir belongs to node {manifest.node_id}"
        return keys, problem, history
    return keys, None, history


def diagnose(data_dir: str | os.PathLike[str]) -> list[str]:
    """What would stop a node from starting on ``data_dir``, one line each (``villagemesh doctor``).

    The same checks as :meth:`Node.start` (every store against the manifest, the
    key), read-only: nothing is created, moved or started.
    """

    if not isinstance(data_dir, str | os.PathLike) or not os.fspath(data_dir):
        raise ConfigError(f"data_dir must be a path (str or os.PathLike), got {data_dir!r}")
    data = Path(data_dir)
    if not data.is_dir():
        return [f"{data}: not a directory"]
    try:
        manifest = Manifest.load(data)
    except StorageError as exc:
        return [str(exc)]
    betanet = (data / BETANET_FILE).exists() or (manifest is not None and BETANET_FILE in manifest.stores)
    problems = [str(finding) for finding in inspect(data, store_specs(betanet=betanet), manifest)]
    _, problem, _ = read_identity(data)
    if problem is not None:
        problems.append(problem)
    return problems


def store_specs(*, betanet: bool = False) -> tuple[StoreSpec, ...]:
    """The data dir's SQLite stores, as the integrity check and the keeper see them (a BetaNet
    mixnode's replay tags too: a lost or rolled-back tag store would let old packets be replayed)."""

    return (
        StoreSpec(
            MESSAGES_FILE,
            MESSAGES_VERSION,
            ("outbox", "inbox"),
            (
                ("queued outbox message(s)", "SELECT count(*) FROM outbox"),
                ("unhandled inbox message(s)", "SELECT count(*) FROM inbox WHERE handled = 0"),
                ("inbox dedup record(s)", "SELECT count(*) FROM inbox"),
            ),
        ),
        StoreSpec(PEERS_FILE, PEERS_VERSION, ("peers",), (("known peer(s)", "SELECT count(*) FROM peers"),)),
        StoreSpec(
            TRANSFERS_FILE,
            TRANSFERS_VERSION,
            ("outgoing", "incoming", "chunks"),
            (
                ("unfinished outgoing transfer(s)", "SELECT count(*) FROM outgoing WHERE state NOT IN"
                 " ('done', 'refused', 'failed')"),
                ("unfinished incoming transfer(s)", "SELECT count(*) FROM incoming WHERE state = 'receiving'"),
            ),
            migrates_from=(1,),
        ),
        *(
            [StoreSpec(BETANET_FILE, BETANET_VERSION, ("tags",), (("replay tag(s)", "SELECT count(*) FROM tags"),))]
            if betanet
            else []
        ),
    )
