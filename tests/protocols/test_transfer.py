"""protocols.transfer: the wire codec (round trip, arbitrary bytes, strictness) and both ends' state machines."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.transfer import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
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
    RefuseReason,
    Sender,
    SenderState,
    decode,
    encode,
    judge,
    whole_digest,
)

ids = st.binary(min_size=16, max_size=16)
texts = st.text(max_size=40)
digests = st.binary(min_size=32, max_size=32)
messages = st.one_of(
    st.builds(
        Offer,
        ids,
        st.integers(0, 1 << 40),
        st.integers(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
        digests,
        st.text(min_size=1, max_size=20),
        texts,
    ),
    st.builds(Accept, ids, st.integers(0, 2**32 - 1)),
    st.builds(ChunkAck, ids, st.integers(0, 2**32 - 1)),
    st.builds(Refuse, ids, st.sampled_from(RefuseReason), texts),
    st.builds(Failed, ids, st.sampled_from(FailReason), texts),
    st.builds(Complete, ids, digests),
    st.builds(Chunk.of, ids, st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=64)),
)


@given(messages)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_only_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@given(messages, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_are_refused_except_in_a_chunk(message, extra):
    if isinstance(message, Chunk):
        assert decode(encode(message) + extra).data == message.data + extra  # the data runs to the end
        return
    with pytest.raises(RemoteProtocolError):
        decode(encode(message) + extra)


TID = bytes(16)


def offer(size=1000, chunk=256, data=None, kind="MODEL"):
    digest = whole_digest()
    digest.update(data if data is not None else bytes(size))
    return Offer(TID, size, chunk, digest.digest(), kind, "w.bin")


@pytest.mark.parametrize(
    "raw",
    [
        bytes([2, 1]) + TID,  # wrong version
        bytes([1, 9]) + TID,  # unknown type
        bytes([1, 3]) + TID + bytes([99, 0, 0]),  # unknown refuse reason
        bytes([1, 1]) + TID + (10).to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(32) + b"\x01A\x00\x00",
        bytes([1, 7]) + TID + bytes([1, 0, 2]) + b"\xff\xfe",  # detail not UTF-8
        bytes([1, 6]) + TID + bytes(5),  # truncated digest
    ],
)
def test_malformed_messages_are_remote_protocol_errors(raw):
    with pytest.raises(RemoteProtocolError):
        decode(raw)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Offer(b"short", 1, 256, bytes(32), "K", ""),
        lambda: Offer(TID, -1, 256, bytes(32), "K", ""),
        lambda: Offer(TID, 1, 1, bytes(32), "K", ""),
        lambda: Offer(TID, 1, 256, b"x", "K", ""),
        lambda: Offer(TID, 1, 256, bytes(32), "", ""),
        lambda: Offer(TID, 1, 256, bytes(32), "K" * 300, ""),
        lambda: Offer(TID, 1, 256, bytes(32), "K", "n" * 2000),
        lambda: Accept(TID, -1),
        lambda: Accept(TID, True),
        lambda: Chunk(TID, 0, b"x", b"data"),
        lambda: Chunk(TID, 0, bytes(16), b""),
        lambda: Complete(TID, b"x"),
        lambda: Failed(TID, FailReason.CANCELLED, 5),
        lambda: Limits(max_bytes=-1),
    ],
)
def test_invalid_messages_cannot_be_made(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_limits_refuse_before_anything_with_the_reason_named():
    o = offer(size=10_000)
    assert judge(o, Limits(max_bytes=999), 1 << 30).reason is RefuseReason.TOO_LARGE
    assert judge(o, Limits(kinds={"DATA"}), 1 << 30).reason is RefuseReason.KIND_NOT_ALLOWED
    assert judge(o, Limits(reserve_bytes=100), 10_050).reason is RefuseReason.NO_SPACE
    assert judge(o, Limits(kinds={"MODEL"}, reserve_bytes=0), 10_000) is None


def test_the_sender_keeps_a_window_and_the_acks_move_it():
    o = offer(size=1000, chunk=256)  # 4 chunks
    s = Sender(o, window=2)
    assert s.next_chunks() == []  # nothing before the answer
    s.receive(Accept(TID, 0))
    assert s.next_chunks() == [0, 1]
    assert s.next_chunks() == []  # the window is full
    s.receive(ChunkAck(TID, 1))
    assert s.next_chunks() == [2]
    s.receive(ChunkAck(TID, 4))
    assert s.state is SenderState.SENT and s.next_chunks() == []
    s.receive(Complete(TID, o.digest))
    assert s.state is SenderState.DONE
    s.receive(ChunkAck(TID, 3))  # a late copy
    assert s.state is SenderState.DONE
    with pytest.raises(LocalProtocolError):
        s.reoffer()
    with pytest.raises(LocalProtocolError):
        s.cancel("too late")


def test_a_reoffer_resumes_from_the_receivers_point_and_keeps_late_acks():
    o = offer(size=1000, chunk=256)
    s = Sender(o, window=4, acked=1)
    assert s.reoffer() == o
    s.receive(ChunkAck(TID, 2))  # an ack overtaking the answer
    assert s.acked == 2 and s.state is SenderState.OFFERED
    s.receive(Accept(TID, 3))
    assert s.next_chunks() == [3]
    s.receive(Accept(TID, 4))
    assert s.state is SenderState.SENT
    s.reoffer()
    s.receive(Complete(TID, o.digest))
    assert s.state is SenderState.DONE


@pytest.mark.parametrize(
    "answer",
    [Accept(TID, 9), ChunkAck(TID, 9), Complete(TID, bytes(32))],
)
def test_impossible_answers_are_remote_protocol_errors(answer):
    s = Sender(offer(size=1000, chunk=256), window=2)
    s.receive(Accept(TID, 0))
    with pytest.raises(RemoteProtocolError):
        s.receive(answer)


def test_refusal_and_failure_end_the_sender_with_the_verdict():
    s = Sender(offer(), window=1)
    s.receive(Refuse(TID, RefuseReason.TOO_LARGE, "big"))
    assert s.state is SenderState.REFUSED and s.verdict.reason is RefuseReason.TOO_LARGE
    s.receive(Refuse(TID, 1, "big"))  # repeated
    with pytest.raises(RemoteProtocolError):
        s.receive(Accept(TID, 0))
    f = Sender(offer(), window=1)
    f.receive(Accept(TID, 0))
    f.receive(Failed(TID, FailReason.DIGEST_MISMATCH, "bad"))
    assert f.state is SenderState.FAILED
    f.receive(ChunkAck(TID, 1))
    c = Sender(offer(), window=1)
    assert c.cancel("user").reason is FailReason.CANCELLED and c.ended


def test_sender_arguments_are_checked():
    with pytest.raises(LocalProtocolError):
        Sender(offer(), window=0)
    with pytest.raises(LocalProtocolError):
        Sender(offer(), window=1, acked=99)


def test_the_receiver_writes_new_chunks_acks_commits_and_verifies():
    data = os.urandom(1000)
    o = offer(size=1000, chunk=256, data=data)
    r = Receiver(o)
    assert r.answer(o) == Accept(TID, 0)
    pieces = [Chunk.of(TID, i, data[i * 256 : (i + 1) * 256]) for i in range(4)]
    assert r.chunk(pieces[1]) is ChunkVerdict.WRITE
    assert r.committed([1]) == ChunkAck(TID, 0)  # out of order: the prefix waits
    assert r.chunk(pieces[1]) is ChunkVerdict.DUPLICATE
    bad = Chunk(TID, 0, pieces[0].digest, bytes(256))
    assert r.chunk(bad) is ChunkVerdict.CORRUPT
    assert r.chunk(pieces[0]) is ChunkVerdict.WRITE
    assert r.committed([0]) == ChunkAck(TID, 2)
    assert r.committed([0]) == ChunkAck(TID, 2)  # committed twice (a restart replays it): no change
    assert r.chunk(pieces[0]) is ChunkVerdict.DUPLICATE
    assert r.answer(o) == Accept(TID, 2)  # the resume point
    assert r.committed([2, 3]) == ChunkAck(TID, 4)
    assert r.verifying and r.state is ReceiverState.VERIFYING
    assert r.chunk(pieces[3]) is ChunkVerdict.DUPLICATE
    assert r.verified(o.digest) == Complete(TID, o.digest)
    assert r.answer(o) == Complete(TID, o.digest)
    assert r.chunk(pieces[2]) is ChunkVerdict.DUPLICATE
    r.cancelled(Failed(TID, FailReason.CANCELLED, "crossed"))
    assert r.state is ReceiverState.DONE
    with pytest.raises(LocalProtocolError):
        r.fail(FailReason.STORAGE, "x")
    with pytest.raises(LocalProtocolError):
        r.verified(o.digest)
    with pytest.raises(LocalProtocolError):
        r.committed([0])


def test_a_digest_mismatch_fails_the_receiver_and_is_repeated():
    o = offer(size=300, chunk=256)
    r = Receiver(o, committed={0, 1})
    assert r.verifying
    failed = r.verified(bytes(32))
    assert failed.reason is FailReason.DIGEST_MISMATCH
    assert r.answer(o) == failed
    assert r.chunk(Chunk.of(TID, 0, bytes(256))) is ChunkVerdict.DUPLICATE
    r.cancelled(Failed(TID, FailReason.CANCELLED, "again"))
    assert r.verdict == failed


def test_bad_chunks_and_other_terms_are_remote_protocol_errors():
    o = offer(size=300, chunk=256)
    r = Receiver(o)
    with pytest.raises(RemoteProtocolError):
        r.chunk(Chunk.of(TID, 2, bytes(10)))
    with pytest.raises(RemoteProtocolError):
        r.chunk(Chunk.of(TID, 1, bytes(10)))  # the last chunk holds 44 bytes
    with pytest.raises(RemoteProtocolError):
        r.answer(offer(size=301, chunk=256))
    with pytest.raises(LocalProtocolError):
        r.committed([5])
    assert r.fail(FailReason.STORAGE, "disk").reason is FailReason.STORAGE
    r2 = Receiver(o)
    r2.cancelled(Failed(TID, FailReason.CANCELLED, "user"))
    assert r2.state is ReceiverState.FAILED and r2.verdict.reason is FailReason.CANCELLED
    done = Receiver(offer(size=0, chunk=256))
    assert done.verifying
    done.verified(done.offer.digest)
    with pytest.raises(RemoteProtocolError):
        done._step(Accept(TID, 0))  # not a message a receiver takes
