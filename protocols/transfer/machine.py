"""The two ends of a large transfer as state machines: :class:`Sender` and :class:`Receiver`.

No I/O: the caller reads the file, writes the partial file, commits, hashes and
moves messages; these objects say what may happen next and what to answer.

Rules (each a test):

1. *Offer first, nothing written before the answer.* The receiver judges an
   offer against its :class:`Limits` and the free space it was told
   (:func:`judge`) before it has a byte: a refusal names the limit.
2. *Window.* The sender has at most ``window`` chunks sent and not yet
   acknowledged: chunk ``i`` goes only once ``i < acked + window``. The
   receiver acknowledges a chunk only after the caller has committed it, so a
   slow receiver slows the sender, and neither side holds more than a window.
3. *Resume from what both committed.* The receiver's ``committed`` count (chunks
   ``0 .. committed-1`` durable) is the resume point: an offer of a transfer it
   already knows (the sender restarted, or stalled and asked again) is answered
   with ``Accept(resume_from=committed)``, and the sender starts over from there.
   Chunks past the count that were committed out of order are kept (a resent
   copy of one is a duplicate).
4. *Per-chunk integrity, whole-file verification.* A chunk whose length is
   not the offer's or whose index is out of range is a protocol error; one
   whose data does not match its check (CRC-32) is dropped (``CORRUPT``: not acked,
   so it is sent again). When every chunk is committed the caller hashes the
   whole; a digest other than the offer's fails the transfer on both sides
   (``Failed(DIGEST_MISMATCH)``).
5. *Terminal states answer again.* Messages arrive out of order and twice
   (each is a reliable message of its own), so an ended transfer repeats its
   end (``Complete``, ``Failed``, ``Refuse``) to a repeated offer and ignores
   late acks and chunks; anything else out of turn is a
   :class:`RemoteProtocolError`, and a sender's own misuse a
   :class:`LocalProtocolError`.

Sender states (``(state, input) -> state``, :data:`SENDER_TABLE`)::

    OFFERED ──Accept──► SENDING ──ChunkAck(all)──► SENT ──Complete──► DONE
       │                   │ reoffer(): back to OFFERED, acks kept   │
       ├──Refuse──► REFUSED                                            │
       └──Failed (any live state)──► FAILED ◄──────────────────────────┘ (mismatch)

Receiver states (:data:`RECEIVER_TABLE`)::

    RECEIVING ──committed(all)──► VERIFYING ──verified(ok)──► DONE
                                           └──verified(bad)──► FAILED
    any live state ──Failed (the sender cancelled)──► FAILED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .wire import Accept, Chunk, ChunkAck, Complete, Failed, FailReason, Offer, Refuse, RefuseReason

__all__ = [
    "RECEIVER_TABLE",
    "SENDER_TABLE",
    "ChunkVerdict",
    "Limits",
    "Receiver",
    "ReceiverState",
    "Sender",
    "SenderState",
    "judge",
]


class SenderState(enum.Enum):
    OFFERED = "offered"
    SENDING = "sending"
    SENT = "sent"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"


class ReceiverState(enum.Enum):
    RECEIVING = "receiving"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


_S = SenderState
SENDER_TABLE: dict[tuple[SenderState, type], SenderState] = {
    (_S.OFFERED, Accept): _S.SENDING,
    (_S.OFFERED, ChunkAck): _S.OFFERED,
    (_S.OFFERED, Refuse): _S.REFUSED,
    (_S.SENDING, Accept): _S.SENDING,
    (_S.SENDING, ChunkAck): _S.SENDING,
    (_S.SENT, Accept): _S.SENT,
    (_S.SENT, ChunkAck): _S.SENT,
    (_S.OFFERED, Complete): _S.DONE,
    (_S.SENDING, Complete): _S.DONE,
    (_S.SENT, Complete): _S.DONE,
    (_S.DONE, Accept): _S.DONE,
    (_S.DONE, ChunkAck): _S.DONE,
    (_S.DONE, Complete): _S.DONE,
    (_S.REFUSED, Refuse): _S.REFUSED,
    (_S.FAILED, Failed): _S.FAILED,
    (_S.FAILED, ChunkAck): _S.FAILED,
    (_S.FAILED, Accept): _S.FAILED,
    **{(s, Failed): _S.FAILED for s in (_S.OFFERED, _S.SENDING, _S.SENT)},
}
"""What each message from the receiver does to the sender; a pair missing is a RemoteProtocolError.
(An ``Accept`` in SENDING or SENT answers a re-offer; acks after the end are late copies.)"""

_R = ReceiverState
RECEIVER_TABLE: dict[tuple[ReceiverState, type], ReceiverState] = {
    (_R.RECEIVING, Offer): _R.RECEIVING,
    (_R.VERIFYING, Offer): _R.VERIFYING,
    (_R.DONE, Offer): _R.DONE,
    (_R.FAILED, Offer): _R.FAILED,
    (_R.RECEIVING, Chunk): _R.RECEIVING,
    (_R.VERIFYING, Chunk): _R.VERIFYING,
    (_R.DONE, Chunk): _R.DONE,
    (_R.FAILED, Chunk): _R.FAILED,
    (_R.RECEIVING, Failed): _R.FAILED,
    (_R.VERIFYING, Failed): _R.FAILED,
    (_R.FAILED, Failed): _R.FAILED,
    (_R.DONE, Failed): _R.DONE,
}
"""What each message from the sender does to the receiver; a pair missing is a RemoteProtocolError.
(``Failed`` after DONE is a cancel that crossed the ``Complete``: the file stays.)"""


@dataclass(frozen=True)
class Limits:
    """What a receiver takes: at most ``max_bytes``, only ``kinds`` (None: any), leaving ``reserve_bytes`` free."""

    max_bytes: int = 1 << 40
    kinds: frozenset[str] | None = None
    reserve_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_bytes", "reserve_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LocalProtocolError(f"{name} must be an int >= 0, got {value!r}")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", frozenset(self.kinds))


def judge(offer: Offer, limits: Limits, free_bytes: int) -> Refuse | None:
    """The refusal of ``offer`` under ``limits`` with ``free_bytes`` of disk left, or None to take it."""
    if offer.size > limits.max_bytes:
        detail = f"{offer.size} bytes exceeds the receiver's limit of {limits.max_bytes}"
        return Refuse(offer.transfer_id, RefuseReason.TOO_LARGE, detail)
    if limits.kinds is not None and offer.kind not in limits.kinds:
        detail = f"kind {offer.kind!r} is not one of {sorted(limits.kinds)}"
        return Refuse(offer.transfer_id, RefuseReason.KIND_NOT_ALLOWED, detail[:1000])
    if offer.size + limits.reserve_bytes > free_bytes:
        detail = f"{offer.size} bytes would leave less than {limits.reserve_bytes} of the {free_bytes} free"
        return Refuse(offer.transfer_id, RefuseReason.NO_SPACE, detail)
    return None


class ChunkVerdict(enum.Enum):
    """What to do with an arriving chunk."""

    WRITE = "write"
    """New and intact: write it, commit it, then call :meth:`Receiver.committed`."""
    DUPLICATE = "duplicate"
    """Already committed (or the transfer has ended): drop it."""
    CORRUPT = "corrupt"
    """Its data does not match its check: drop it (it is not acked, so it comes again)."""


class Sender:
    """The sending end of one transfer: what to send next, and what the receiver's answers mean."""

    def __init__(self, offer: Offer, window: int, acked: int = 0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise LocalProtocolError(f"window must be an int >= 1, got {window!r}")
        if not 0 <= acked <= offer.chunks:
            raise LocalProtocolError(f"acked must be in 0..{offer.chunks}, got {acked!r}")
        self.offer = offer
        self.window = window
        self.acked = acked
        """Chunks the receiver has committed, in order from 0 (as far as the sender knows)."""
        self.next = acked
        """The next chunk to send."""
        self.state = SenderState.OFFERED
        self.verdict: Refuse | Failed | None = None
        """The refusal or failure that ended the transfer."""

    @property
    def ended(self) -> bool:
        return self.state in (SenderState.DONE, SenderState.REFUSED, SenderState.FAILED)

    def reoffer(self) -> Offer:
        """Offer again (after a restart, or when acks stall): the receiver answers with its resume point."""
        if self.ended:
            raise LocalProtocolError(f"transfer {self.offer.transfer_id.hex()} has ended ({self.state.value})")
        self.state = SenderState.OFFERED
        return self.offer

    def receive(self, message: Accept | Refuse | ChunkAck | Complete | Failed) -> None:
        """Take the receiver's ``message``."""
        key = (self.state, type(message))
        if key not in SENDER_TABLE:
            raise RemoteProtocolError(
                f"transfer {self.offer.transfer_id.hex()}: {type(message).__name__} while {self.state.value}"
            )
        if self.ended:
            self.state = SENDER_TABLE[key]
            return  # a late copy: the end stands
        chunks = self.offer.chunks
        if isinstance(message, Accept | ChunkAck):
            point = message.resume_from if isinstance(message, Accept) else message.committed
            if point > chunks:
                raise RemoteProtocolError(f"transfer {self.offer.transfer_id.hex()}: {point} of {chunks} chunks")
            if isinstance(message, Accept):
                self.acked = point  # the receiver's record is the truth
                self.next = point
            else:
                self.acked = max(self.acked, point)
                self.next = max(self.next, self.acked)
        elif isinstance(message, Complete) and message.digest != self.offer.digest:
            raise RemoteProtocolError(f"transfer {self.offer.transfer_id.hex()}: completed with another digest")
        elif isinstance(message, Refuse | Failed):
            self.verdict = message
        self.state = SENDER_TABLE[key]
        if self.state in (SenderState.SENDING, SenderState.SENT):
            self.state = SenderState.SENT if self.acked == chunks else SenderState.SENDING

    def next_chunks(self) -> list[int]:
        """The chunks to send now (the window's room), each handed out once until an Accept rewinds."""
        if self.state is not SenderState.SENDING:
            return []
        end = min(self.acked + self.window, self.offer.chunks)
        out = list(range(self.next, end))
        self.next = max(self.next, end)
        return out

    def cancel(self, detail: str) -> Failed:
        """End the transfer here; the message tells the receiver."""
        if self.ended:
            raise LocalProtocolError(f"transfer {self.offer.transfer_id.hex()} has ended ({self.state.value})")
        self.state = SenderState.FAILED
        self.verdict = Failed(self.offer.transfer_id, FailReason.CANCELLED, detail)
        return self.verdict


class Receiver:
    """The receiving end of one transfer, made once its offer was taken (:func:`judge`)."""

    def __init__(self, offer: Offer, committed: frozenset[int] | set[int] = frozenset()) -> None:
        self.offer = offer
        self.state = ReceiverState.RECEIVING
        self.prefix = 0
        """Chunks committed in order from 0: the resume point."""
        self.beyond: set[int] = set()
        """Committed chunks past the prefix (out of order; at most a window of them)."""
        self.verdict: Failed | None = None
        self.committed(sorted(committed))

    @property
    def chunks(self) -> int:
        return self.offer.chunks

    def _step(self, message: Offer | Chunk | Failed) -> ReceiverState:
        key = (self.state, type(message))
        if key not in RECEIVER_TABLE:
            raise RemoteProtocolError(
                f"transfer {self.offer.transfer_id.hex()}: {type(message).__name__} while {self.state.value}"
            )
        return RECEIVER_TABLE[key]

    def answer(self, offer: Offer) -> Accept | Complete | Failed:
        """The answer to the offer (again): where to resume, or the end already reached."""
        if offer != self.offer:
            raise RemoteProtocolError(f"transfer {offer.transfer_id.hex()} offered again with other terms")
        self.state = self._step(offer)
        if self.state is ReceiverState.DONE:
            return Complete(offer.transfer_id, offer.digest)
        if self.state is ReceiverState.FAILED:
            assert self.verdict is not None
            return self.verdict
        return Accept(offer.transfer_id, self.prefix)

    def chunk(self, chunk: Chunk) -> ChunkVerdict:
        """What to do with ``chunk``."""
        self.state = self._step(chunk)
        if not chunk.index < self.chunks:
            raise RemoteProtocolError(f"chunk {chunk.index} of a transfer of {self.chunks} chunks")
        if len(chunk.data) != self.offer.chunk_length(chunk.index):
            expected = self.offer.chunk_length(chunk.index)
            raise RemoteProtocolError(f"chunk {chunk.index} has {len(chunk.data)} bytes, not {expected}")
        if self.state is not ReceiverState.RECEIVING or chunk.index < self.prefix or chunk.index in self.beyond:
            return ChunkVerdict.DUPLICATE
        if not chunk.intact:
            return ChunkVerdict.CORRUPT
        return ChunkVerdict.WRITE

    def committed(self, indexes: list[int]) -> ChunkAck:
        """The caller committed ``indexes``; the ack to send (VERIFYING once every chunk is in)."""
        if self.state is not ReceiverState.RECEIVING:
            raise LocalProtocolError(f"transfer {self.offer.transfer_id.hex()} is {self.state.value}")
        for index in indexes:
            if not 0 <= index < self.chunks:
                raise LocalProtocolError(f"chunk {index} of a transfer of {self.chunks} chunks")
            if index >= self.prefix:
                self.beyond.add(index)
        while self.prefix in self.beyond:
            self.beyond.discard(self.prefix)
            self.prefix += 1
        if self.prefix == self.chunks:
            self.state = ReceiverState.VERIFYING
        return ChunkAck(self.offer.transfer_id, self.prefix)

    @property
    def verifying(self) -> bool:
        """Every chunk is committed: hash the whole and call :meth:`verified`."""
        return self.state is ReceiverState.VERIFYING

    def verified(self, digest: bytes) -> Complete | Failed:
        """The whole hashed to ``digest``: DONE (Complete) or FAILED (Failed, DIGEST_MISMATCH)."""
        if self.state is not ReceiverState.VERIFYING:
            raise LocalProtocolError(f"transfer {self.offer.transfer_id.hex()} is {self.state.value}, not verifying")
        if digest == self.offer.digest:
            self.state = ReceiverState.DONE
            return Complete(self.offer.transfer_id, digest)
        self.state = ReceiverState.FAILED
        detail = f"the bytes hash to {digest.hex()}, not the offered {self.offer.digest.hex()}"
        self.verdict = Failed(self.offer.transfer_id, FailReason.DIGEST_MISMATCH, detail)
        return self.verdict

    def fail(self, reason: FailReason, detail: str) -> Failed:
        """End the transfer here (storage failed, or the sender cancelled); the message tells the sender."""
        if self.state is ReceiverState.DONE:
            raise LocalProtocolError(f"transfer {self.offer.transfer_id.hex()} is done")
        self.state = ReceiverState.FAILED
        self.verdict = Failed(self.offer.transfer_id, reason, detail)
        return self.verdict

    def cancelled(self, message: Failed) -> None:
        """The sender ended the transfer (``message``)."""
        self.state = self._step(message)
        if self.state is ReceiverState.FAILED and self.verdict is None:
            self.verdict = message
