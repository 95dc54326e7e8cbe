"""The exported node-level strategies draw valid values, usable to test handlers without a network."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.app.state import DeliveryState, DeliveryStatus, InboundMessage
from villagemesh.errors import DeliveryFailed, RemoteError, Unconfirmed, Unhandled
from villagemesh.node import NodeEvent, check_peer_id
from villagemesh.protocols.envelope import decode_message, encode_message
from villagemesh.strategies import delivery_statuses, inbound_messages, message_ids, node_events


@given(inbound_messages(kind="TASK", values=st.dictionaries(st.text(max_size=5), st.integers()), codec="json"))
def test_inbound_messages_are_valid_envelopes_whose_value_is_the_decoded_payload(message: InboundMessage) -> None:
    assert message.kind == "TASK" and json.loads(message.payload) == message.value
    assert decode_message(encode_message(message)).payload == message.payload
    assert check_peer_id(message.sender) == message.sender


@given(inbound_messages())
def test_with_the_bytes_codec_the_value_is_the_payload(message: InboundMessage) -> None:
    assert message.value == message.payload and isinstance(message.payload, bytes)


@given(delivery_statuses())
def test_every_status_end_has_its_own_error_and_a_reason(status: DeliveryStatus) -> None:
    error = status.exception()
    expected = {
        DeliveryState.UNHANDLED: Unhandled,
        DeliveryState.HANDLER_FAILED: RemoteError,
        DeliveryState.UNCONFIRMED: Unconfirmed,
        DeliveryState.FAILED: DeliveryFailed,
    }.get(status.state)
    if expected is None:
        assert error is None and status.last_error is None
    else:
        assert type(error) is expected and status.last_error and status.last_error in str(error)
    assert len(status.message_id) == 32


@given(node_events(), message_ids())
def test_node_events_have_a_public_kind_and_fields(event: NodeEvent, message_id: str) -> None:
    assert event.kind in {"peer_discovered", "peer_lost", "delivered", "failed", "child_crashed", "child_restarted"}
    assert event.fields and int(message_id, 16) >= 0


def test_log_records_map_to_public_events_and_others_do_not() -> None:
    lost = NodeEvent.of({"event": "peer_expired", "peer_id": "p", "level": "info", "timestamp": "t"})
    assert lost is not None and lost.kind == "peer_lost" and lost.fields == {"peer_id": "p", "why": "expired"}
    assert NodeEvent.of({"event": "peer_discovered", "node_id": "beacon"}) is None
    assert NodeEvent.of({"event": "discovery_round"}) is None
    failed = NodeEvent.of({"event": "message_handled", "status": "handler_failed", "message_id": "m"})
    assert failed is not None and failed.kind == "failed"
