"""The transport contract's many-at-once messages: what they carry is what their parts would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.core import codec
from villagemesh.actors.core.transport import (
    Received,
    ReceivedMany,
    Transmit,
    TransmitMany,
    group_transmits,
)

peers = st.sampled_from(["alice", "bob", "carol"])
transmits = st.lists(
    st.builds(
        Transmit,
        message_id=st.binary(min_size=16, max_size=16),
        peer_id=peers,
        address=st.sampled_from(["", "ws://a:1", "/ip4/1.2.3.4/tcp/5"]),
        envelope=st.binary(max_size=64),
        reply_to=st.just("retrier"),
        report_success=st.just(False),
    ),
    max_size=12,
)


def many_of(parts: list[Transmit]) -> TransmitMany:
    return TransmitMany(
        tuple(t.message_id for t in parts),
        tuple(t.peer_id for t in parts),
        tuple(t.address for t in parts),
        tuple(t.envelope for t in parts),
        "retrier",
        report_success=False,
    )


@given(transmits)
def test_a_transmit_many_is_its_transmits_in_order_across_the_bus_codec(parts: list[Transmit]) -> None:
    many = codec.decode(codec.encode(many_of(parts)))
    assert list(many) == parts and len(many) == len(parts)


@given(st.lists(st.tuples(st.binary(max_size=64), peers), max_size=12))
def test_a_received_many_is_its_received_in_order_across_the_bus_codec(parts: list[tuple[bytes, str]]) -> None:
    many = ReceivedMany("libp2p", tuple(e for e, _ in parts), tuple(r for _, r in parts))
    back = codec.decode(codec.encode(many))
    assert list(back) == [Received("libp2p", e, r) for e, r in parts] and len(back) == len(parts)


@given(st.lists(st.tuples(transmits, st.booleans()), max_size=4))
def test_grouping_keeps_each_peer_addresss_transmits_in_order_whether_alone_or_many(
    batches: list[tuple[list[Transmit], bool]],
) -> None:
    sends: list[Transmit | TransmitMany] = []
    for parts, as_one in batches:
        if as_one:
            sends.append(many_of(parts))
        else:
            sends.extend(parts)
    flat = [t for parts, _ in batches for t in parts]
    groups = group_transmits(sends)
    assert sum(len(g) for g in groups.values()) == len(flat)
    for (peer, address, _), group in groups.items():
        assert group == [t for t in flat if (t.peer_id, t.address) == (peer, address)]
