"""The keeper actor: bounds what a lost write-ahead log can cost, and lets the next start notice it.

Every ``interval`` seconds it checkpoints each store whose log grew
(:func:`~villagemesh.actors.core.integrity.advance`: the log is copied into the
database and emptied, the store's generation advanced, the manifest saved).
See :mod:`villagemesh.actors.core.integrity` for why, and for what stays undetectable.

Config (``ChildSpec.config``): ``data_dir``, ``stores`` (a tuple of
:class:`~villagemesh.actors.core.integrity.StoreSpec`), ``interval`` (seconds, default 1).
The node writes the manifest before it starts the tree; the keeper only advances it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from villagemesh.actors.core.base import Actor, ActorContext
from villagemesh.actors.core.integrity import Manifest, StoreSpec, advance, open_for_checkpoints
from villagemesh.actors.keeper.messages import CheckpointDue, Checkpointed, CheckpointNow
from villagemesh.actors.keeper.state import KeeperState, Signature
from villagemesh.errors import ConfigError, StorageError

__all__ = ["KeeperActor"]


class KeeperActor(Actor):
    """Checkpoints the stores of one data dir and advances its manifest."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.data_dir = Path(cfg["data_dir"])
        self.stores: tuple[StoreSpec, ...] = tuple(cfg.get("stores", ()))
        self.interval = float(cfg.get("interval", 1.0))
        if not self.interval > 0:
            raise ConfigError(f"keeper interval must be > 0 seconds, got {self.interval!r}")
        self.state = KeeperState()
        self._conns: dict[str, sqlite3.Connection] = {}

    def on_start(self) -> None:
        manifest = Manifest.load(self.data_dir)
        if manifest is None:
            raise StorageError(f"{self.data_dir}: no manifest to keep (the node writes it before it starts)")
        self.manifest = manifest
        for spec in self.stores:
            self._conns[spec.file] = open_for_checkpoints(self.data_dir / spec.file)
            self.state.checkpointed(spec.file, self._signature(spec))
        self.schedule(self.interval, CheckpointDue())

    def on_stop(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, CheckpointDue):
            self._checkpoint(force=False)
            self.schedule(self.interval, CheckpointDue())
            return None
        if isinstance(msg, CheckpointNow):
            return self._checkpoint(force=True)
        raise TypeError(f"keeper got an unexpected {type(msg).__name__}")

    def _checkpoint(self, *, force: bool) -> Checkpointed:
        due = set(self.state.due({spec.file: self._signature(spec) for spec in self.stores}))
        for spec in self.stores:
            if force or spec.file in due:
                record = advance(self.data_dir, self.manifest, spec, self._conns[spec.file])
                if record is None:
                    self.ctx.log.emit("checkpoint_deferred", level="warning", store=spec.file, reason="log busy")
                    continue
                self.state.checkpointed(spec.file, self._signature(spec))
        return Checkpointed({name: rec.generation for name, rec in self.manifest.stores.items()})

    def _signature(self, spec: StoreSpec) -> Signature:
        try:
            info = os.stat(self.data_dir / f"{spec.file}-wal")
        except FileNotFoundError:
            return None
        return (info.st_size, info.st_mtime_ns)
