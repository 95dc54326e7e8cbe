"""The sniffer: a pure, never-flipping verdict from a connection's first bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.protocols import strategies as vst
from villagemesh.protocols.sniff import (
    DISCOVERY_MAX_LENGTH,
    HTTP_METHODS,
    MAX_SNIFF_BYTES,
    MULTISTREAM_HEADER,
    SECURE_MAGIC,
    Sniffed,
    sniff,
)

EXAMPLES = {
    Sniffed.DISCOVERY_JSON: struct.pack(">I", 17) + b'{"type": "x"}....',
    Sniffed.SECURE: SECURE_MAGIC + b"\x01" + bytes(34),
    Sniffed.LIBP2P_MULTISTREAM: MULTISTREAM_HEADER + b"\x07/noise\n",
    Sniffed.HTTP: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    Sniffed.TLS: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}

# Byte strings that start like one of the protocols, to steer hypothesis near the edges.
_near_signatures = st.one_of(
    st.sampled_from(list(EXAMPLES.values())),
    st.sampled_from([m + b" " for m in HTTP_METHODS]),
    st.builds(lambda n: struct.pack(">I", n) + b"{", st.integers(0, 2**32 - 1)),
    st.just(b"\x16\x03"),
)
prefixes = st.one_of(
    st.binary(max_size=3 * MAX_SNIFF_BYTES),
    vst.openings().map(lambda opening: opening[1]),
    st.builds(lambda a, b: a + b, _near_signatures, st.binary(max_size=MAX_SNIFF_BYTES)),
    st.builds(lambda a, n: a[:n], _near_signatures, st.integers(0, MAX_SNIFF_BYTES)),
)


@pytest.mark.parametrize("expected", list(EXAMPLES))
def test_each_protocol_is_recognised_from_its_first_bytes(expected: Sniffed) -> None:
    """A typical opening of each protocol gets its verdict."""
    assert sniff(EXAMPLES[expected]) is expected


@pytest.mark.parametrize("expected", list(EXAMPLES))
def test_every_proper_prefix_of_a_signature_needs_more(expected: Sniffed) -> None:
    """Before the signature is complete the verdict is NEED_MORE, never a guess."""
    data = EXAMPLES[expected]
    decided_at = next(n for n in range(len(data) + 1) if sniff(data[:n]) is not Sniffed.NEED_MORE)
    assert all(sniff(data[:n]) is Sniffed.NEED_MORE for n in range(decided_at))
    assert decided_at <= MAX_SNIFF_BYTES


@pytest.mark.parametrize("method", HTTP_METHODS)
def test_every_http_method_followed_by_a_space_is_http(method: bytes) -> None:
    """Each listed method token, then a space, is HTTP."""
    assert sniff(method + b" /") is Sniffed.HTTP


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x01{",  # shorter than the shortest JSON object
        b"\x00\x01\x00\x01{",  # one byte over the discovery bound
        b"\x00\x00\x00\x10[",  # a JSON array, not an object
        b"\x16\x03\x05",  # not a TLS version
        b"\x16\x04",
        b"GETX",
        b"get ",
        b"VMSX",
        b"\x13/multistream/2.0.0\n",
        b"\xff",
    ],
)
def test_near_misses_are_unknown(data: bytes) -> None:
    """Bytes that resemble a signature but break it are UNKNOWN."""
    assert sniff(data) is Sniffed.UNKNOWN


def test_empty_prefix_needs_more() -> None:
    """Nothing received yet: wait."""
    assert sniff(b"") is Sniffed.NEED_MORE


def test_largest_discovery_length_is_accepted() -> None:
    """A frame exactly at the bound is discovery (the bound is inclusive)."""
    assert sniff(struct.pack(">I", DISCOVERY_MAX_LENGTH) + b"{") is Sniffed.DISCOVERY_JSON


def test_sniff_accepts_bytearray_and_memoryview() -> None:
    """An acceptor's receive buffer can be passed as it is."""
    data = EXAMPLES[Sniffed.HTTP]
    assert sniff(bytearray(data)) is sniff(memoryview(data)) is Sniffed.HTTP


@given(vst.openings())
def test_real_openings_get_their_verdict_and_wait_until_then(opening: tuple[Sniffed, bytes]) -> None:
    """Each protocol's real first bytes are recognised, and every shorter prefix waits or agrees."""
    verdict, data = opening
    assert sniff(data) is verdict
    assert all(sniff(data[:n]) in (Sniffed.NEED_MORE, verdict) for n in range(MAX_SNIFF_BYTES))


@given(data=prefixes, more=st.binary(max_size=2 * MAX_SNIFF_BYTES))
def test_a_decided_verdict_never_flips_as_more_bytes_arrive(data: bytes, more: bytes) -> None:
    """Once sniff(p) is not NEED_MORE, every extension of p gets the same verdict."""
    verdict = sniff(data)
    if verdict is not Sniffed.NEED_MORE:
        assert sniff(data + more) is verdict


@given(data=prefixes)
def test_need_more_only_below_the_byte_cap(data: bytes) -> None:
    """A prefix of MAX_SNIFF_BYTES or more always gets a verdict."""
    if len(data) >= MAX_SNIFF_BYTES:
        assert sniff(data) is not Sniffed.NEED_MORE


@given(data=prefixes, tail=st.binary(max_size=MAX_SNIFF_BYTES))
def test_bytes_past_the_cap_are_never_examined(data: bytes, tail: bytes) -> None:
    """Only the first MAX_SNIFF_BYTES bytes decide."""
    head = data[:MAX_SNIFF_BYTES]
    assert sniff(head + tail) is sniff(head) or len(head) < MAX_SNIFF_BYTES


@given(data=prefixes)
def test_sniff_does_not_consume_its_input(data: bytes) -> None:
    """The buffer handed in is unchanged afterwards (the acceptor forwards it whole)."""
    buffer = bytearray(data)
    sniff(buffer)
    assert bytes(buffer) == data
