"""The gateway's pure parts: outcome reports, payload codecs, the handle table's send window."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.app.messages import OUTCOMES_PER_REPORT, HandledBatch, Outcome, OutcomeStatus
from villagemesh.actors.app.payload import BytesCodec, JsonCodec, MsgpackCodec, payload_codec
from villagemesh.actors.app.state import (
    Bridge,
    DeliveryState,
    HandleTable,
    InboundMessage,
    OutboxLimits,
    Subscribers,
)
from villagemesh.errors import (
    ConfigError,
    DeliveryFailed,
    OutboxFull,
    RemoteError,
    RemoteProtocolError,
    Unconfirmed,
    Unhandled,
)
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.envelope import Message

outcomes = st.builds(
    Outcome,
    st.sampled_from(OutcomeStatus),
    st.none() | st.text(max_size=50),
    st.none() | st.text(max_size=20),
    st.none() | st.binary(max_size=50),
)


@given(outcomes)
def test_an_outcome_report_round_trips(outcome: Outcome) -> None:
    assert Outcome.decode(outcome.encode()) == outcome


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_as_an_outcome_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        Outcome.decode(data)
    except RemoteProtocolError:
        pass


def test_malformed_outcome_fields_are_refused_naming_them() -> None:
    import msgpack

    with pytest.raises(RemoteProtocolError, match="'r'"):
        Outcome.decode(msgpack.packb({"s": "handled", "r": 5, "t": None, "v": None}))
    with pytest.raises(RemoteProtocolError, match="reply"):
        Outcome.decode(msgpack.packb({"s": "handled", "r": None, "t": None, "v": "text"}))


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=OUTCOMES_PER_REPORT))
def test_a_batch_report_round_trips(ids: list[bytes]) -> None:
    assert HandledBatch.decode(HandledBatch(tuple(ids)).encode()).ids == tuple(ids)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_as_a_batch_report_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        HandledBatch.decode(data)
    except RemoteProtocolError:
        pass


def test_a_batch_report_with_no_ids_too_many_or_ids_not_bytes_is_refused_naming_them() -> None:
    import msgpack

    with pytest.raises(RemoteProtocolError, match=r"1 to 32 ids, got \[\]"):
        HandledBatch.decode(msgpack.packb({"h": []}))
    with pytest.raises(RemoteProtocolError, match="1 to 32 ids"):
        HandledBatch.decode(msgpack.packb({"h": [b"x" * 16] * (OUTCOMES_PER_REPORT + 1)}))
    with pytest.raises(RemoteProtocolError, match="must be bytes, got 'text'"):
        HandledBatch.decode(msgpack.packb({"h": [b"x" * 16, "text"]}))
    with pytest.raises(RemoteProtocolError, match="not a batch report"):
        HandledBatch.decode(msgpack.packb({"s": "handled"}))


@given(vst.messages(), st.booleans(), st.integers())
def test_an_inbound_message_is_its_envelope_with_the_flag_and_value(message: Message, redelivered: bool, value: int):
    """InboundMessage.of copies the (already checked) fields: equal to building it field by field, frozen."""
    got = InboundMessage.of(message, redelivered=redelivered, value=value)
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(Message)}
    assert got == InboundMessage(**fields, redelivered=redelivered, value=value)
    assert (got.redelivered, got.value, got.expires_at) == (redelivered, value, message.expires_at)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.kind = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        (BytesCodec(), b"\x00raw"),
        (JsonCodec(), {"task": [1, 2.5, "x", None]}),
        (MsgpackCodec(), {"b": b"\x01", "n": 7}),
    ],
)
def test_each_codec_round_trips_its_values(codec: object, value: object) -> None:
    c = payload_codec(codec)  # type: ignore[arg-type]
    assert c.decode(c.encode(value)) == value


def test_codecs_are_named_or_given_by_their_two_methods_and_refuse_what_they_cannot_carry() -> None:
    assert isinstance(payload_codec("json"), JsonCodec) and isinstance(payload_codec("msgpack"), MsgpackCodec)
    with pytest.raises(ConfigError, match="'yaml'"):
        payload_codec("yaml")
    with pytest.raises(ConfigError, match="encode"):
        payload_codec(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bytes-like"):
        BytesCodec().encode("text")
    with pytest.raises(ConfigError, match="JSON"):
        JsonCodec().encode({1, 2})
    with pytest.raises(ConfigError, match="msgpack"):
        MsgpackCodec().encode(object())

    class Upper:
        def encode(self, value: object) -> bytes:
            return str(value).upper().encode()

        def decode(self, data: bytes) -> str:
            return data.decode()

    user = Upper()
    assert payload_codec(user) is user


def test_the_window_bounds_count_and_bytes_per_peer_and_in_all_and_frees_on_the_end() -> None:
    table = HandleTable(OutboxLimits(per_peer_messages=2, per_peer_bytes=100, total_messages=3, total_bytes=1000))
    first = table.try_new(b"1" * 16, "p", 10)
    assert not isinstance(first, str)
    table.try_new(b"2" * 16, "p", 10)
    assert "per_peer_messages=2" in str(table.try_new(b"3" * 16, "p", 10))
    table.try_new(b"3" * 16, "q", 10)
    assert "total_messages=3" in str(table.try_new(b"4" * 16, "r", 10))
    assert (table.pending_messages, table.pending_bytes) == (3, 30)
    table.resolve(b"1" * 16, True, 1, None)
    assert not isinstance(table.try_new(b"4" * 16, "p", 10), str)
    big = HandleTable(OutboxLimits(per_peer_bytes=100))
    assert not isinstance(big.try_new(b"5" * 16, "p", 500), str), "one message always fits an empty window"
    assert "per_peer_bytes=100" in str(big.try_new(b"6" * 16, "p", 1))
    small = HandleTable(OutboxLimits(total_bytes=10))
    small.try_new(b"7" * 16, "a", 11)
    assert "total_bytes=10" in str(small.try_new(b"8" * 16, "b", 1))
    with pytest.raises(ConfigError, match="per_peer_messages"):
        OutboxLimits(per_peer_messages=0)


def test_a_blocked_new_waits_for_room_then_raises_outbox_full_naming_the_bound() -> None:
    table = HandleTable(OutboxLimits(per_peer_messages=1))
    table.new(b"1" * 16, "p", 1)
    with pytest.raises(OutboxFull, match="per_peer_messages=1") as info:
        table.new(b"2" * 16, "p", 1, timeout=0.01)
    assert info.value.peer_id == "p"
    freed: list[bool] = []
    table.on_room(lambda: freed.append(True))
    threading.Timer(0.05, table.resolve, (b"1" * 16, True, 1, None)).start()
    assert table.new(b"2" * 16, "p", 1, timeout=10).peer_id == "p" and freed == [True]


def test_every_end_state_raises_its_own_error_from_result() -> None:
    table = HandleTable()
    cases = [
        (DeliveryState.UNHANDLED, Unhandled, {}),
        (DeliveryState.HANDLER_FAILED, RemoteError, {"remote_type": "KeyError"}),
        (DeliveryState.UNCONFIRMED, Unconfirmed, {}),
        (DeliveryState.FAILED, DeliveryFailed, {}),
    ]
    for n, (state, error, extra) in enumerate(cases):
        handle = table.new(bytes([n]) * 16, "p", 0)
        table.resolve(handle.raw_id, state, None, "why", **extra)
        with pytest.raises(error, match="why"):
            handle.result(1)
        assert handle.status.message_id == handle.message_id and len(handle.message_id) == 32
    ok = table.new(b"\x09" * 16, "p", 0)
    assert table.acked(ok.raw_id, 2) and not table.acked(b"\x0b" * 16, 1)  # False: no such pending handle
    assert ok.status.acked and ok.status.state is DeliveryState.PENDING and ok.status.attempts == 2
    table.resolve(ok.raw_id, DeliveryState.DELIVERED, None, None, reply=b"r")
    assert ok.result(1).reply == b"r" and ok.status.attempts == 2
    assert table.resolve(ok.raw_id, True, 1, None) is None
    early = table.new(b"\x0a" * 16, "p", 0)  # the outcome report overtook the retrier's ack
    table.resolve(early.raw_id, DeliveryState.DELIVERED, None, None)
    assert early.status.acked and early.status.attempts == 1


def test_an_end_for_an_abandoned_request_is_dropped_and_counted() -> None:
    table = HandleTable()
    handle = table.new(b"1" * 16, "p", 0)
    table.abandon(handle.raw_id)
    table.resolve(handle.raw_id, DeliveryState.DELIVERED, None, None)
    assert table.late == 1


def test_the_bridge_resolves_a_future_on_its_loop_from_another_thread() -> None:
    bridge = Bridge()

    async def main() -> object:
        token, future = bridge.register()
        threading.Thread(target=bridge.answer, args=(token, "answer")).start()
        value = await future
        failing_token, failing = bridge.register()
        bridge.answer(failing_token, error=ConfigError("no"))
        with pytest.raises(ConfigError):
            await failing
        assert not bridge.answer(failing_token, "again"), "an answered token is gone"
        bridge.forget(bridge.register()[0])
        return value

    assert asyncio.run(main()) == "answer"


def test_reserved_kinds_cannot_be_subscribed() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        Subscribers().add("villagemesh.outcome", lambda m: None)
