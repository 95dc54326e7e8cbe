"""The transfer actor: moves large files between nodes as chunks through the retrier, verified and resumable.

::

    Node.send_file ──ask SendFile──► transfer: store the row (commit) ─► Offer ──Deliver──► retrier ─► peer
    peer's retrier ──Incoming(kind villagemesh.transfer or villagemesh.transfer.chunk)──► peer's transfer:
        Offer   ─► judge(limits, free disk) ─► Refuse (nothing written) | store the row (commit) ─► Accept(resume)
        Chunk…  ─► pwrite into data_dir/transfers/<id>.part ─► chunks rows (one commit per turn) ─► ChunkAck
                   ─► the whole digest fed as the prefix grows; every chunk in: fsync ─► os.replace ─► Complete | Failed
        then Handled(ids) ──► retrier (only after the commit: the inbox marks, and the acks of chunks)
    transfer (sender) on Accept / ChunkAck: the window's next chunks read from the file (pread) ─► Deliver(BULK)

Every transfer message is one envelope handed to the retrier: offers and answers
reliable ones of kind :data:`~villagemesh.protocols.transfer.TRANSFER_KIND` (stored
in the outbox, NORMAL priority); chunks (BULK) and chunk acks of kind
:data:`~villagemesh.protocols.transfer.CHUNK_KIND`, which the retriers hold in
memory only, retry and fail over along the mode's transport order like any
message, and ack only once this actor answered ``Handled`` (committed). The
stride scheduler keeps an application's small messages ahead of a transfer's
chunks. A restarted retrier tells this actor (``RetrierStarted``), which offers
again each transfer mid-window. At most ``window`` chunks are unacknowledged
(:class:`~villagemesh.protocols.transfer.Sender`), and a chunk is acknowledged
only once committed, so a slow receiver slows the sender and memory stays a
window of chunks on each side (chunks are read from the file when they are due,
never the whole file).

Resuming: both ends' rows are in ``transfers.sqlite3`` (:mod:`.store`). A
restarted sender offers again and goes on from the receiver's resume point; a
restarted receiver rebuilds its machine from the committed chunks and the
retrier re-dispatches what it had accepted but the actor had not committed. A
sender that sees no ack for ``stall_s`` offers again (the answer rewinds it to
the receiver's committed prefix).

Config: ``data_dir``, ``path`` (the SQLite file), ``node_id``, ``retrier`` (bus
name), ``table`` (:class:`.handles.TransferTable`), ``receivers``
(:class:`.handles.Receivers`), ``limits``
(:class:`~villagemesh.protocols.transfer.Limits`), ``received_dir``,
``chunk_size``, ``window``, ``stall_s``, ``ttl``, ``synchronous``.

Log events: ``transfer_offered`` (transfer_id, peer_id, size, kind),
``transfer_accepted`` (transfer_id, peer_id, size, resume_from),
``transfer_refused`` (transfer_id, peer_id, reason, detail),
``transfer_completed`` (transfer_id, peer_id, size, direction, path; incoming: chunks, and
chunks_written: the pwrites of this instance),
``transfer_failed`` (transfer_id, peer_id, reason, detail, direction),
``transfer_reoffered`` (transfer_id, acked), ``transfer_restored`` (transfer_id, direction, chunks:
acked or committed, at start), ``transfer_resumed`` (transfer_id, peer_id, resume_from: an offer
answered again), ``transfer_handler_failed``
(transfer_id, exc_type, exc_message), ``transfer_message_rejected`` (peer_id, reason).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from villagemesh.actors.core.base import Actor, ActorContext, Request
from villagemesh.actors.core.envelopes import decode, remember
from villagemesh.actors.core.ids import new_id
from villagemesh.actors.core.libc import libc_function
from villagemesh.actors.retrier.messages import Deliver, Handled, Incoming, RetrierStarted
from villagemesh.errors import BusError, ConfigError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.envelope import Message, Priority, encode_message
from villagemesh.protocols.transfer import (
    CHUNK_KIND,
    TRANSFER_KIND,
    Accept,
    Chunk,
    ChunkAck,
    ChunkVerdict,
    Complete,
    Failed,
    FailReason,
    Limits,
    Offer,
    Receiver,
    ReceiverState,
    Refuse,
    Sender,
    SenderState,
    WireMessage,
    judge,
)
from villagemesh.protocols.transfer import decode as decode_wire
from villagemesh.protocols.transfer import encode as encode_wire

from .handles import ReceivedFile, Receivers, TransferTable, error_of, hash_file
from .messages import CancelTransfer, GetTransfers, SendFile, SendReply, TransferRow, Transfers
from .state import DEFAULT_CHUNK_BYTES, DEFAULT_STALL_S, DEFAULT_WINDOW, Stall, WholeDigest, received_name
from .store import TransferStore

__all__ = ["TransferActor", "transfers"]

TRANSFER_TTL = 24 * 3600.0
"""Seconds a transfer message lives in the retrier (a stalled one is offered again long before)."""

CHUNK_HANDOFF_S = 1.0
"""Seconds a chunk waits for room in the retrier's mailbox (the bus's default send timeout)."""

BATCH_LIMIT = 256
"""Messages one turn takes at most: 256 chunks of 256 KiB are 64 MiB written per commit."""

_SENDER_END = {SenderState.DONE: "done", SenderState.REFUSED: "refused", SenderState.FAILED: "failed"}


_Answer = Accept | Refuse | ChunkAck | Complete | Failed
"""What a receiver says to a sender."""


class _Tick:
    """Timer: look for stalled senders."""


class _Out:
    """An outgoing transfer in memory: the machine, the file, the stall watch."""

    def __init__(self, sender: Sender, peer_id: str, path: str, spooled: bool) -> None:
        self.sender = sender
        self.peer_id = peer_id
        self.path = path
        self.spooled = spooled
        self.stall = Stall()
        self.fd: int | None = None


class _In:
    """An incoming transfer in memory: the machine, where its bytes go, the open partial file."""

    def __init__(self, receiver: Receiver, peer_id: str, partial: str, final: str) -> None:
        self.receiver = receiver
        self.peer_id = peer_id
        self.partial = partial
        self.final = final
        self.fd: int | None = None
        self.whole = WholeDigest(receiver.offer.algorithm)
        """The whole file's digest over the committed prefix, fed as the prefix grows (not persisted)."""
        self.writes = 0
        """Chunks written into the partial file by this instance (a chunk written twice counts twice)."""


class TransferActor(Actor):
    """Sends and receives large transfers (see the module docstring)."""

    batch_limit = BATCH_LIMIT

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        cfg = dict(ctx.config)
        for key in ("data_dir", "path", "node_id"):
            if not isinstance(cfg.get(key), str) or not cfg[key]:
                raise ConfigError(f"the transfer actor needs config[{key!r}] (a non-empty str), got {cfg.get(key)!r}")
        self.data_dir = Path(cfg["data_dir"])
        self.path: str = cfg["path"]
        self.node_id: str = cfg["node_id"]
        self.retrier: str = cfg.get("retrier", "retrier")
        self.table: TransferTable = cfg.get("table") or TransferTable()
        self.receivers: Receivers = cfg.get("receivers") or Receivers()
        self.limits: Limits = cfg.get("limits") or Limits()
        self.received_dir = Path(cfg.get("received_dir") or self.data_dir / "received")
        self.partial_dir = self.data_dir / "transfers"
        self.chunk_size = int(cfg.get("chunk_size", DEFAULT_CHUNK_BYTES))
        self.window = int(cfg.get("window", DEFAULT_WINDOW))
        self.stall_s = float(cfg.get("stall_s", DEFAULT_STALL_S))
        self.ttl = float(cfg.get("ttl", TRANSFER_TTL))
        self.synchronous = str(cfg.get("synchronous", "NORMAL"))
        if self.window < 1 or not self.stall_s > 0 or not self.ttl > 0:
            raise ConfigError(f"transfer window {self.window}, stall_s {self.stall_s}, ttl {self.ttl}: must be > 0")

    # -- lifecycle -----------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.received_dir.mkdir(parents=True, exist_ok=True)
        self.store = TransferStore(self.path, synchronous=self.synchronous)
        self.outs: dict[bytes, _Out] = {}
        self.ins: dict[bytes, _In] = {}
        self.ended_out: dict[bytes, TransferRow] = {}
        for row in self.store.outgoing():
            tid = row.offer.transfer_id
            if row.state in ("done", "refused", "failed"):
                self.ended_out[tid] = self._row_out(row.offer, row.peer_id, row.acked, row.state, row.detail)
                continue
            out = _Out(Sender(row.offer, self.window, acked=row.acked), row.peer_id, row.path, row.spooled)
            self.outs[tid] = out
            self._send(out.peer_id, out.sender.reoffer())
        verifying: list[_In] = []
        for irow in self.store.incoming():
            receiver = Receiver(irow.offer, irow.committed)
            if irow.state == "done":
                receiver.state = ReceiverState.DONE
            elif irow.state == "failed":
                receiver.fail(FailReason.STORAGE, irow.detail)
                receiver.verdict = _failed_of(irow.offer.transfer_id, irow.detail)
            entry = self.ins[irow.offer.transfer_id] = _In(receiver, irow.peer_id, irow.partial, irow.final)
            if receiver.verifying:
                verifying.append(entry)
        for out in self.outs.values():
            self.ctx.log.emit(
                "transfer_restored",
                transfer_id=out.sender.offer.transfer_id.hex(),
                direction="out",
                chunks=out.sender.acked,
            )
        for entry in self.ins.values():
            if entry.receiver.state in (ReceiverState.RECEIVING, ReceiverState.VERIFYING):
                committed = entry.receiver.prefix + len(entry.receiver.beyond)
                self.ctx.log.emit(
                    "transfer_restored",
                    transfer_id=entry.receiver.offer.transfer_id.hex(),
                    direction="in",
                    chunks=committed,
                )
        for entry in verifying:  # killed between the last commit and the move: verify again
            self._verify(entry)
        self.schedule(self.stall_s, _Tick())

    def on_stop(self) -> None:
        for out in self.outs.values():
            _close(out)
        for entry in self.ins.values():
            _close(entry)
        self.store.close()

    # -- messages --------------------------------------------------------------------------------------

    def handle_batch(self, batch: list[Request]) -> None:
        """Every Incoming waiting as one turn: chunks written, one commit, then acks and Handled."""
        incoming = [r.msg for r in batch if isinstance(r.msg, Incoming)]
        if incoming:
            self._incoming(incoming)
        for request in batch:
            if isinstance(request.msg, Incoming):
                continue
            answer = self.handle(request.msg)
            if request.token is not None:
                request.token.reply(answer)

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Incoming):
            self._incoming([msg])
            return None
        if isinstance(msg, SendFile):
            return self._send_file(msg)
        if isinstance(msg, CancelTransfer):
            out = self.outs.get(msg.transfer_id)
            if out is not None and not out.sender.ended:
                self._send(out.peer_id, out.sender.cancel(msg.detail[:1000]))
                self._end_out(out)
            return None
        if isinstance(msg, GetTransfers):
            return Transfers(tuple(self._rows()))
        if isinstance(msg, RetrierStarted):
            self._chunks_lost()
            return None
        if isinstance(msg, _Tick):
            self._tick()
            self.schedule(self.stall_s, _Tick())
            return None
        raise TypeError(f"transfer actor got an unexpected {type(msg).__name__}")

    # -- sending ---------------------------------------------------------------------------------------

    def _send_file(self, msg: SendFile) -> SendReply:
        try:
            offer = Offer(msg.transfer_id, msg.size, self.chunk_size, msg.digest, msg.kind, msg.name, msg.algorithm)
        except ProtocolError as exc:
            return SendReply(msg.transfer_id, str(exc))
        if msg.transfer_id in self.outs or msg.transfer_id in self.ended_out:
            return SendReply(msg.transfer_id, f"transfer {msg.transfer_id.hex()} exists")
        self.store.add_outgoing(offer, msg.peer_id, msg.path, msg.spooled)
        out = self.outs[msg.transfer_id] = _Out(Sender(offer, self.window), msg.peer_id, msg.path, msg.spooled)
        self._send(out.peer_id, offer)
        self.ctx.log.emit(
            "transfer_offered",
            transfer_id=offer.transfer_id.hex(),
            peer_id=msg.peer_id,
            size=offer.size,
            kind=offer.kind,
        )
        return SendReply(msg.transfer_id, None)

    def _answered(
        self, peer: str, message: Accept | Refuse | ChunkAck | Complete | Failed, touched: set[bytes]
    ) -> None:
        out = self.outs.get(message.transfer_id)
        if out is None or out.peer_id != peer:
            if isinstance(message, Accept) and message.transfer_id not in self.ended_out:
                detail = "no such transfer at the sender"
                self._send(peer, Failed(message.transfer_id, FailReason.UNKNOWN_TRANSFER, detail))
            return
        out.sender.receive(message)
        touched.add(message.transfer_id)

    def _pump(self, touched: set[bytes]) -> None:
        """Send the window's next chunks of every transfer touched; record acks and ends (one commit)."""
        updates = []
        for tid in touched:
            out = self.outs.get(tid)
            if out is None:
                continue
            sender = out.sender
            offer = sender.offer
            self.table.progress(tid, min(offer.size, sender.acked * offer.chunk_size))
            if sender.ended:
                self._end_out(out)
                continue
            for index in sender.next_chunks():
                try:
                    data = self._read(out, index)
                except OSError as exc:
                    self._send(out.peer_id, sender.cancel(f"reading {out.path}: {exc.strerror or exc}"))
                    self._end_out(out)
                    break
                self._send(out.peer_id, Chunk.of(tid, index, data))
            else:
                updates.append((tid, sender.acked, sender.state.value, ""))
        self.store.set_outgoing(updates)

    def _read(self, out: _Out, index: int) -> bytes:
        offer = out.sender.offer
        if out.fd is None:
            out.fd = os.open(out.path, os.O_RDONLY)
        length = offer.chunk_length(index)
        data = os.pread(out.fd, length, index * offer.chunk_size)
        if len(data) != length:
            raise OSError(f"chunk {index}: {len(data)} of {length} bytes (the file shrank)")
        return data

    def _end_out(self, out: _Out) -> None:
        sender = out.sender
        tid = sender.offer.transfer_id
        state = _SENDER_END[sender.state]
        verdict = sender.verdict
        reason = verdict.reason.name.lower() if verdict is not None else ""
        detail = verdict.detail if verdict is not None else ""
        self.store.set_outgoing([(tid, sender.acked, state, f"{reason}: {detail}" if reason else "")])
        self.outs.pop(tid, None)
        self.ended_out[tid] = self._row_out(sender.offer, out.peer_id, sender.acked, state, detail)
        _close(out)
        self._release()
        if out.spooled:
            Path(out.path).unlink(missing_ok=True)
        if state == "done":
            self.ctx.log.emit(
                "transfer_completed",
                transfer_id=tid.hex(),
                peer_id=out.peer_id,
                size=sender.offer.size,
                direction="out",
                path=out.path,
            )
            self.table.end(tid, state, None)
            return
        event = "transfer_refused" if state == "refused" else "transfer_failed"
        self.ctx.log.emit(
            event,
            level="warning",
            transfer_id=tid.hex(),
            peer_id=out.peer_id,
            reason=reason,
            detail=detail,
            direction="out",
        )
        self.table.end(tid, state, error_of(tid.hex(), out.peer_id, state, reason, detail))

    def _release(self) -> None:
        """A transfer ended: once no other is live, give the heap's free memory back (:func:`_trim`).
        Not while transfers run: trimming every 8 MiB (as before) made every hop's next chunk buffer
        fresh memory, and faulting it in cost ~0.4 CPU-s per side per 256 MiB (docs/benchmarks.md);
        without, peak RSS growth moving 1 GiB is ~42 MiB a side, under the 64 MiB the issue allows."""
        live = (ReceiverState.RECEIVING, ReceiverState.VERIFYING)
        if not self.outs and not any(entry.receiver.state in live for entry in self.ins.values()):
            _trim()

    def _chunks_lost(self) -> None:
        """The retrier restarted, losing the chunks it held: offer again each transfer mid-window (one
        offered already, as at this actor's own start, waits for its answer)."""
        for out in self.outs.values():
            if out.sender.state is SenderState.SENDING:
                self._reoffer(out)

    def _tick(self) -> None:
        for out in self.outs.values():
            if out.stall.tick(out.sender.acked):
                self._reoffer(out)

    def _reoffer(self, out: _Out) -> None:
        self._send(out.peer_id, out.sender.reoffer())
        self.ctx.log.emit("transfer_reoffered", transfer_id=out.sender.offer.transfer_id.hex(), acked=out.sender.acked)

    # -- receiving -------------------------------------------------------------------------------------

    def _incoming(self, batch: list[Incoming]) -> None:
        touched: set[bytes] = set()
        written: dict[bytes, dict[int, bytes]] = {}
        for item in batch:
            try:
                envelope = decode(item.envelope)
                message = decode_wire(envelope.payload)
            except ProtocolError as exc:
                self.ctx.log.emit("transfer_message_rejected", level="warning", peer_id="?", reason=str(exc))
                continue
            peer = envelope.sender
            try:
                if isinstance(message, Offer):
                    self._offered(peer, message)
                elif isinstance(message, Chunk):
                    self._chunk(peer, message, written)
                elif isinstance(message, Failed) and message.transfer_id in self.ins:
                    entry = self.ins[message.transfer_id]
                    if entry.peer_id == peer and entry.receiver.state is not ReceiverState.DONE:
                        entry.receiver.cancelled(message)
                        self._drop_partial(entry, message)
                else:
                    self._answered(peer, message, touched)
            except ProtocolError as exc:
                self.ctx.log.emit("transfer_message_rejected", level="warning", peer_id=peer, reason=str(exc))
        self.store.commit_chunks((tid, i) for tid, indexes in written.items() for i in indexes)
        for tid, chunks in written.items():
            entry = self.ins[tid]
            self._send(entry.peer_id, entry.receiver.committed(list(chunks)))
        self._pump(touched)
        for item in batch:
            self.tell(self.retrier, Handled(item.message_id))
        # The acks leave before the whole digest takes this turn's chunks: the sender refills its
        # window while this thread hashes (hashing lets go of the GIL).
        self.sender.flush()
        for tid, chunks in written.items():
            entry = self.ins[tid]
            if entry.receiver.verifying:
                self._verify(entry, chunks)
            else:
                self._hash_prefix(entry, chunks)

    def _offered(self, peer: str, offer: Offer) -> None:
        entry = self.ins.get(offer.transfer_id)
        if entry is not None:
            if entry.peer_id != peer:
                raise RemoteProtocolError(f"transfer {offer.transfer_id.hex()} offered by {peer}, not {entry.peer_id}")
            answer = entry.receiver.answer(offer)
            if isinstance(answer, Accept):
                self.ctx.log.emit(
                    "transfer_resumed",
                    transfer_id=offer.transfer_id.hex(),
                    peer_id=peer,
                    resume_from=answer.resume_from,
                )
            self._send(peer, answer)
            return
        tid = offer.transfer_id.hex()
        refusal = judge(offer, self.limits, shutil.disk_usage(self.partial_dir).free)
        if refusal is not None:
            self._send(peer, refusal)
            self.ctx.log.emit(
                "transfer_refused",
                level="warning",
                transfer_id=tid,
                peer_id=peer,
                reason=refusal.reason.name.lower(),
                detail=refusal.detail,
                direction="in",
            )
            return
        partial = str(self.partial_dir / f"{tid}.part")
        final = str(self.received_dir / received_name(offer.name, offer.transfer_id, self._name_taken))
        self.store.add_incoming(offer, peer, partial, final)
        entry = self.ins[offer.transfer_id] = _In(Receiver(offer), peer, partial, final)
        entry.fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ctx.log.emit("transfer_accepted", transfer_id=tid, peer_id=peer, size=offer.size, resume_from=0)
        self._send(peer, entry.receiver.answer(offer))
        if entry.receiver.verifying:  # an empty file: nothing to wait for
            self._verify(entry)

    def _name_taken(self, name: str) -> bool:
        path = str(self.received_dir / name)
        return os.path.lexists(path) or any(e.final == path for e in self.ins.values())

    def _chunk(self, peer: str, chunk: Chunk, written: dict[bytes, dict[int, bytes]]) -> None:
        entry = self.ins.get(chunk.transfer_id)
        if entry is None or entry.peer_id != peer:
            return  # an offer refused, or a late copy after a restart that forgot nothing: nothing to do
        verdict = entry.receiver.chunk(chunk)
        if verdict is not ChunkVerdict.WRITE or chunk.index in written.get(chunk.transfer_id, ()):
            return
        if entry.fd is None:
            entry.fd = os.open(entry.partial, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(entry.fd, chunk.data, chunk.index * entry.receiver.offer.chunk_size)
        entry.writes += 1
        written.setdefault(chunk.transfer_id, {})[chunk.index] = chunk.data

    def _hash_prefix(self, entry: _In, chunks: dict[int, bytes]) -> None:
        """Feed the whole digest the committed prefix's chunks it has not seen: from ``chunks`` (this
        turn's, in memory) or read back from the partial file (chunks that came out of order in an
        earlier turn; after a restart, the prefix committed before it). Hashing as the prefix grows
        keeps the verification at the end from hashing the whole file again."""
        offer = entry.receiver.offer
        for index in entry.whole.due(entry.receiver.prefix):
            data = chunks.get(index)
            if data is None:
                if entry.fd is None:
                    entry.fd = os.open(entry.partial, os.O_RDWR | os.O_CREAT, 0o600)
                length = offer.chunk_length(index)
                data = os.pread(entry.fd, length, index * offer.chunk_size)
                if len(data) != length:
                    raise OSError(f"chunk {index}: {len(data)} of {length} bytes in {entry.partial}")
            entry.whole.feed(index, data)

    def _verify(self, entry: _In, chunks: dict[int, bytes] | None = None) -> None:
        """Every chunk is committed: finish the whole digest (the chunks it has not seen, from ``chunks``
        or the file), sync the file, move it into place (or delete it), tell the sender."""
        offer = entry.receiver.offer
        source = entry.partial if os.path.exists(entry.partial) else entry.final
        try:
            if source == entry.partial:
                self._hash_prefix(entry, chunks or {})
                if entry.fd is None:
                    entry.fd = os.open(entry.partial, os.O_RDWR | os.O_CREAT, 0o600)
                os.fsync(entry.fd)
                digest = entry.whole.digest()
            else:  # killed between the move and its commit: hash what was moved
                _, digest = hash_file(source, offer.algorithm)
        except OSError as exc:
            failed = entry.receiver.fail(FailReason.STORAGE, f"reading {source}: {exc.strerror or exc}")
            self._drop_partial(entry, failed)
            self._send(entry.peer_id, failed)
            return
        answer = entry.receiver.verified(digest)
        if isinstance(answer, Failed):
            if source == entry.final:  # the moved file is the unverified one: it goes too
                Path(entry.final).unlink(missing_ok=True)
            self._drop_partial(entry, answer)
            self._send(entry.peer_id, answer)
            return
        _close(entry)
        if source == entry.partial:
            os.replace(entry.partial, entry.final)
        self.store.commit_chunks((), [(offer.transfer_id, "done", "")])
        self._send(entry.peer_id, answer)
        self._release()
        self.ctx.log.emit(
            "transfer_completed",
            transfer_id=offer.transfer_id.hex(),
            peer_id=entry.peer_id,
            size=offer.size,
            direction="in",
            path=entry.final,
            chunks=offer.chunks,
            chunks_written=entry.writes,
        )
        self._deliver(entry)

    def _drop_partial(self, entry: _In, failed: Failed) -> None:
        _close(entry)
        Path(entry.partial).unlink(missing_ok=True)
        reason = failed.reason.name.lower()
        self.store.commit_chunks((), [(failed.transfer_id, "failed", f"{reason}: {failed.detail}")])
        self._release()
        tid = failed.transfer_id.hex()
        self.ctx.log.emit(
            "transfer_failed",
            level="warning",
            transfer_id=tid,
            peer_id=entry.peer_id,
            reason=reason,
            detail=failed.detail,
            direction="in",
        )
        error = error_of(tid, entry.peer_id, "failed", reason, failed.detail)
        for handler in self.receivers.failures():
            self._call(handler, error, None, tid)

    def _deliver(self, entry: _In) -> None:
        offer = entry.receiver.offer
        received = ReceivedFile(
            offer.transfer_id.hex(),
            entry.peer_id,
            offer.kind,
            offer.name,
            offer.size,
            offer.digest,
            Path(entry.final),
            offer.algorithm.label,
        )
        for handler, loop in self.receivers.of(offer.kind):
            self._call(handler, received, loop, received.transfer_id)

    def _call(self, handler: Any, arg: object, loop: asyncio.AbstractEventLoop | None, tid: str) -> None:
        """Run an application's handler: a coroutine function on its loop, anything else here."""
        try:
            if loop is not None and asyncio.iscoroutinefunction(handler):
                asyncio.run_coroutine_threadsafe(handler(arg), loop)
            else:
                handler(arg)
        except Exception as exc:  # noqa: BLE001 - the application's handler must not crash the actor: logged
            self.ctx.log.emit(
                "transfer_handler_failed",
                level="error",
                transfer_id=tid,
                exc_type=type(exc).__name__,
                exc_message=str(exc),
            )

    # -- out -------------------------------------------------------------------------------------------

    def _send(self, peer: str, message: WireMessage) -> None:
        """One transfer message to ``peer``, as a reliable envelope handed to the retrier."""
        envelope = Message(
            id=new_id(),
            kind=CHUNK_KIND if isinstance(message, Chunk | ChunkAck) else TRANSFER_KIND,
            sender=self.node_id,
            recipient=peer,
            priority=Priority.BULK if isinstance(message, Chunk) else Priority.NORMAL,
            created_at=time.time(),
            ttl=self.ttl,
            correlation_id=None,
            payload=encode_wire(message),
        )
        raw = encode_message(envelope)
        if not isinstance(message, Chunk):
            # (A chunk is not kept decoded: 256 KiB envelopes would fill the node's envelope cache,
            # pushing out the small messages it is for and doubling a window's memory.)
            remember(raw, envelope)
        try:
            # A chunk goes at once, not at the end of the turn: the retrier hands it on while this
            # thread reads and hashes the next one (hashing lets go of the GIL), instead of the whole
            # window going as one frame after the last chunk is made (store and forward at every hop).
            self.tell(self.retrier, Deliver(raw), timeout=CHUNK_HANDOFF_S if isinstance(message, Chunk) else None)
        except BusError as exc:
            # The retrier is restarting: a stalled transfer is offered again, and the answer resumes it.
            self.ctx.log.emit("transfer_message_rejected", level="warning", peer_id=peer, reason=str(exc))

    def _rows(self) -> list[TransferRow]:
        rows = [
            self._row_out(o.sender.offer, o.peer_id, o.sender.acked, o.sender.state.value, "")
            for o in self.outs.values()
        ]
        rows.extend(self.ended_out.values())
        for entry in self.ins.values():
            receiver, offer = entry.receiver, entry.receiver.offer
            done = min(offer.size, (receiver.prefix + len(receiver.beyond)) * offer.chunk_size)
            if receiver.state is ReceiverState.DONE:
                done = offer.size
            detail = receiver.verdict.detail if receiver.verdict is not None else ""
            rows.append(
                TransferRow(
                    offer.transfer_id.hex(),
                    entry.peer_id,
                    "in",
                    offer.name,
                    offer.kind,
                    offer.size,
                    done,
                    receiver.state.value,
                    detail,
                )
            )
        return rows

    @staticmethod
    def _row_out(offer: Offer, peer: str, acked: int, state: str, detail: str) -> TransferRow:
        done = offer.size if state == "done" else min(offer.size, acked * offer.chunk_size)
        return TransferRow(
            offer.transfer_id.hex(), peer, "out", offer.name, offer.kind, offer.size, done, state, detail
        )


_MALLOC_TRIM = libc_function("malloc_trim")
"""glibc's ``malloc_trim``, or None (another C library: nothing to trim)."""


def _trim() -> None:
    """Give the heap's free memory back to the system (every thread's arena). Each chunk is copied at
    every hop, by several threads, so several malloc arenas each keep freed chunk-sized blocks (glibc
    raises its mmap and trim thresholds after the first large frees): they are reused while transfers
    run, and handed back once none does."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _close(entry: _Out | _In) -> None:
    if entry.fd is not None:
        os.close(entry.fd)
        entry.fd = None


def _failed_of(transfer_id: bytes, detail: str) -> Failed:
    reason, _, text = detail.partition(": ")
    try:
        return Failed(transfer_id, FailReason[reason.upper()], text[:1000])
    except KeyError:
        return Failed(transfer_id, FailReason.STORAGE, detail[:1000])


def transfers(client: Any, *, name: str = "transfer", timeout: float = 5.0) -> Transfers:
    """Every transfer the node's transfer actor knows (the client function of :class:`GetTransfers`)."""
    reply = client.ask(name, GetTransfers(), timeout=timeout)
    if not isinstance(reply, Transfers):
        raise BusError(f"transfer actor {name!r} answered GetTransfers with {reply!r}")
    return reply
