"""The transfer actor's whole protocol on the bus.

From the node API::

    SendFile(transfer_id, peer_id, path, size, digest, kind, name, spooled, algorithm)
                               ask [SendReply]: offer the file at ``path`` to ``peer_id`` (stored first)
    CancelTransfer(transfer_id, detail)   tell: end an outgoing transfer here (the receiver is told)
    GetTransfers()             ask [Transfers]: every transfer this node knows, with its progress

From the retrier (its :class:`~villagemesh.actors.retrier.messages.Incoming`): every envelope of
kind :data:`~villagemesh.protocols.transfer.TRANSFER_KIND`; the actor answers ``Handled`` once
what the envelope said is committed in ``transfers.sqlite3``.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.protocols.transfer import DigestAlgorithm

__all__ = ["CancelTransfer", "GetTransfers", "SendFile", "SendReply", "TransferRow", "Transfers"]


@codec.message("transfer.SendFile")
@dataclass(frozen=True, slots=True)
class SendFile:
    """Ask: offer ``size`` bytes at ``path`` (hashing to ``digest`` by ``algorithm``) to ``peer_id`` as
    ``kind``/``name``.

    ``spooled``: the file is the node's own copy of a stream (deleted once the transfer ends)."""

    transfer_id: bytes
    peer_id: str
    path: str
    size: int
    digest: bytes
    kind: str
    name: str
    spooled: bool = False
    algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256


@codec.message("transfer.SendReply")
@dataclass(frozen=True, slots=True)
class SendReply:
    """The transfer is stored and offered (``error`` None), or why not."""

    transfer_id: bytes
    error: str | None


@codec.message("transfer.Cancel")
@dataclass(frozen=True, slots=True)
class CancelTransfer:
    """End the outgoing transfer ``transfer_id`` here; the receiver is told (``Failed(CANCELLED)``)."""

    transfer_id: bytes
    detail: str


@codec.message("transfer.GetTransfers")
@dataclass(frozen=True, slots=True)
class GetTransfers:
    """Ask: every transfer known (the status endpoint and ``villagemesh send`` read it)."""


@codec.message("transfer.Row")
@dataclass(frozen=True, slots=True)
class TransferRow:
    """One transfer as the status endpoint shows it (``direction``: out or in; ``state``: the machine's)."""

    transfer_id: str
    peer_id: str
    direction: str
    name: str
    kind: str
    size: int
    done: int
    state: str
    detail: str


@codec.message("transfer.Transfers")
@dataclass(frozen=True, slots=True)
class Transfers:
    """Every transfer known, outgoing then incoming."""

    rows: tuple[TransferRow, ...]
