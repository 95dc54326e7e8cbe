"""protocols.transfer: the wire codec (round trip, arbitrary bytes, strictness) and both ends' state machines."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.strategies import transfer_messages
from villagemesh.protocols.transfer import (
    Accept,
    Chunk,
    ChunkAck,
    ChunkVerdict,
    Complete,
    DigestAlgorithm,
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

messages = transfer_messages()


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


def raw_offer(chunk_size, algorithm):
    size = (10).to_bytes(8, "big") + chunk_size.to_bytes(4, "big")
    return bytes([2, 1]) + TID + size + bytes([algorithm]) + bytes(32) + b"\x01A\x00\x00"


def offer(size=1000, chunk=256, data=None, kind="MODEL"):
    digest = whole_digest()
    digest.update(data if data is not None else bytes(size))
    return Offer(TID, size, chunk, digest.digest(), kind, "w.bin")


@pytest.mark.parametrize(
    "raw",
    [
        bytes([1, 4]) + TID + bytes(16) + b"data",  # version 1 (a BLAKE2b-128 per chunk)
        bytes([3, 1]) + TID,  # an unknown version
        bytes([2, 9]) + TID,  # unknown type
        bytes([2, 3]) + TID + bytes([99, 0, 0]),  # unknown refuse reason
        raw_offer(chunk_size=1, algorithm=1),  # a chunk size below the least
        raw_offer(chunk_size=256, algorithm=7),  # an unknown digest algorithm
        bytes([2, 7]) + TID + bytes([1, 0, 2]) + b"\xff\xfe",  # detail not UTF-8
        bytes([2, 6]) + TID + bytes(5),  # truncated digest
        bytes([2, 4]) + TID + bytes(7),  # a chunk without data
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
        lambda: Offer(TID, 1, 256, bytes(32), "K", "", 7),
        lambda: Offer(TID, 1, 256, bytes(32), "K", "", "sha256"),
        lambda: Offer(TID, 1, 256, bytes(32), "K", "", True),
        lambda: Accept(TID, -1),
        lambda: Accept(TID, True),
        lambda: Chunk(TID, 0, b"x", b"data"),
        lambda: Chunk(TID, 0, -1, b"data"),
        lambda: Chunk(TID, 0, 0, b""),
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
    bad = Chunk(TID, 0, pieces[0].check, bytes(256))
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


def test_the_offer_names_its_digest_algorithm_and_each_hashes_as_the_tools_do():
    import hashlib

    data = os.urandom(3000)
    for algorithm, expected in (
        (DigestAlgorithm.BLAKE2B_256, hashlib.blake2b(data, digest_size=32).digest()),
        (DigestAlgorithm.SHA_256, hashlib.sha256(data).digest()),
    ):
        digest = whole_digest(algorithm)
        digest.update(data)
        assert digest.digest() == expected
        assert DigestAlgorithm.of(algorithm.label) is algorithm
        o = Offer(TID, 3000, 256, expected, "MODEL", "w.bin", algorithm)
        assert decode(encode(o)).algorithm is algorithm
    assert Offer(TID, 1, 256, bytes(32), "K", "", 2).algorithm is DigestAlgorithm.SHA_256
    assert DigestAlgorithm.SHA_256.label == "sha256" and DigestAlgorithm.BLAKE2B_256.label == "blake2b-256"
    with pytest.raises(LocalProtocolError, match="'md5'"):
        DigestAlgorithm.of("md5")


def test_an_offer_again_with_another_algorithm_is_other_terms():
    o = offer(size=300, chunk=256)
    r = Receiver(o)
    other = Offer(o.transfer_id, o.size, o.chunk_size, o.digest, o.kind, o.name, DigestAlgorithm.SHA_256)
    with pytest.raises(RemoteProtocolError, match="other terms"):
        r.answer(other)


@given(st.binary(min_size=1, max_size=512), st.integers(0, 511), st.integers(1, 255))
def test_the_chunk_check_catches_any_changed_byte(data, at, flip):
    chunk = Chunk.of(TID, 0, data)
    torn = bytearray(data)
    torn[at % len(data)] ^= flip
    assert chunk.intact
    assert not Chunk(TID, 0, chunk.check, bytes(torn)).intact


def test_the_version_2_layout_byte_for_byte():
    chunk = Chunk.of(TID, 5, b"abc")
    assert chunk.check == 0x352441C2  # zlib's CRC-32 of b"abc"
    assert encode(chunk) == bytes([2, 4]) + TID + bytes([0, 0, 0, 5, 0x35, 0x24, 0x41, 0xC2]) + b"abc"
    o = Offer(TID, 10, 256, bytes(range(32)), "K", "n", DigestAlgorithm.SHA_256)
    fields = (10).to_bytes(8, "big") + (256).to_bytes(4, "big") + b"\x02" + bytes(range(32))
    assert encode(o) == bytes([2, 1]) + TID + fields + b"\x01K" + b"\x00\x01n"
