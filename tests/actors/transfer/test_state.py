"""The transfer actor's pure decisions: chunk sizes, received names, stall detection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.transfer.state import (
    TRANSPORT_CHUNK_BYTES,
    Stall,
    WholeDigest,
    chunk_size_for,
    digest_for_cpu,
    received_name,
)
from villagemesh.errors import LocalProtocolError
from villagemesh.protocols.transfer import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, DigestAlgorithm, whole_digest

TID = bytes(range(16))


def test_the_chunk_size_is_the_smallest_of_the_transports_that_carry_chunks():
    assert chunk_size_for(("websocket",)) == TRANSPORT_CHUNK_BYTES["websocket"]
    assert chunk_size_for(("websocket", "bitchat")) == TRANSPORT_CHUNK_BYTES["bitchat"]
    assert chunk_size_for(("betanet",)) == TRANSPORT_CHUNK_BYTES["websocket"]  # carries none: the default


@given(st.lists(st.sampled_from([*sorted(TRANSPORT_CHUNK_BYTES), "betanet"])).map(tuple))
def test_every_chunk_size_is_one_the_protocol_takes(transports):
    assert MIN_CHUNK_BYTES <= chunk_size_for(transports) <= MAX_CHUNK_BYTES


def test_a_received_name_is_the_last_part_made_safe_and_never_one_taken():
    never = lambda _name: False  # noqa: E731
    assert received_name("weights.bin", TID, never) == "weights.bin"
    assert received_name("../../etc/passwd", TID, never) == "passwd"
    assert received_name("C:\\models\\m.pt", TID, never) == "m.pt"
    assert received_name("a\x00b;rm *.bin", TID, never) == "a_b_rm _.bin"
    assert received_name("..", TID, never) == TID.hex()
    assert received_name("", TID, never) == TID.hex()
    assert received_name("w.bin", TID, {"w.bin"}.__contains__) == f"w-{TID.hex()[:8]}.bin"
    assert received_name("README", TID, {"README"}.__contains__) == f"README-{TID.hex()[:8]}"


@given(st.text(max_size=200))
def test_a_received_name_never_leaves_its_folder(name):
    got = received_name(name, TID, lambda _n: False)
    assert got and "/" not in got and "\\" not in got and got not in (".", "..")


def test_a_sender_without_progress_for_a_tick_offers_again():
    stall = Stall()
    assert not stall.tick(0)  # the first look
    assert stall.tick(0)  # nothing moved since
    assert not stall.tick(3)
    assert stall.tick(3)


@given(st.lists(st.binary(min_size=1, max_size=64), max_size=12), st.data())
def test_the_whole_digest_fed_as_the_prefix_grows_is_the_digest_of_the_whole(chunks, data):
    whole = WholeDigest()
    prefix = 0
    while prefix < len(chunks):
        prefix = data.draw(st.integers(prefix, len(chunks)))  # the committed prefix moves on unevenly
        for index in whole.due(prefix):
            whole.feed(index, chunks[index])
        assert list(whole.due(prefix)) == []
    expected = whole_digest()
    expected.update(b"".join(chunks))
    assert whole.digest() == expected.digest()


def test_the_whole_digest_takes_chunks_only_in_order():
    whole = WholeDigest()
    assert list(whole.due(3)) == [0, 1, 2]
    with pytest.raises(LocalProtocolError, match="chunk 1 fed to the whole digest, which needs chunk 0"):
        whole.feed(1, b"x")
    whole.feed(0, b"x")
    assert list(whole.due(0)) == [] and list(whole.due(3)) == [1, 2]


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "expected"),
    [
        ("x86_64", "processor\t: 0\nflags\t\t: fpu sse2 avx2 sha_ni aes\n", DigestAlgorithm.SHA_256),
        ("x86_64", "processor\t: 0\nflags\t\t: fpu sse2 avx2 aes\n", DigestAlgorithm.BLAKE2B_256),
        ("aarch64", "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32\n", DigestAlgorithm.SHA_256),
        ("aarch64", "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", DigestAlgorithm.BLAKE2B_256),  # Pi 4
        ("armv7l", "Features\t: half thumb fastmult vfp edsp neon\n", DigestAlgorithm.BLAKE2B_256),
        ("arm64", "", DigestAlgorithm.BLAKE2B_256),  # no /proc/cpuinfo
        ("x86_64", "flags\t\t: sha2\n", DigestAlgorithm.BLAKE2B_256),  # an Arm name on x86 is not x86's flag
    ],
)
def test_the_digest_a_cpu_hashes_fastest_is_chosen(machine, cpuinfo, expected):
    assert digest_for_cpu(machine, cpuinfo) is expected


def test_the_whole_digest_hashes_by_the_offers_algorithm():
    for algorithm in DigestAlgorithm:
        whole = WholeDigest(algorithm)
        whole.feed(0, b"ab")
        whole.feed(1, b"c")
        reference = whole_digest(algorithm)
        reference.update(b"abc")
        assert whole.digest() == reference.digest()
