"""The keeper's pure core: which stores need a checkpoint.

A store needs one when its write-ahead log changed since the keeper's last
checkpoint of it (something was committed since): its log's signature
(size and modification time) differs from the one seen right after that
checkpoint. An idle node checkpoints nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["KeeperState", "Signature"]

Signature = tuple[int, int] | None
"""``(size, mtime_ns)`` of a store's ``-wal``, or None when it has none."""


class KeeperState:
    """Remembers each store's log signature after its last checkpoint."""

    def __init__(self) -> None:
        self._after: dict[str, Signature] = {}

    def due(self, now: Mapping[str, Signature]) -> list[str]:
        """The stores (in ``now``'s order) whose log changed since their last checkpoint."""
        return [name for name, sig in now.items() if name not in self._after or self._after[name] != sig]

    def checkpointed(self, name: str, after: Signature) -> None:
        """``name`` was checkpointed; its log looked like ``after`` right then."""
        self._after[name] = after
