"""Hypothesis strategies for node-level values, to test application handlers without a network.

A handler is a function of an :class:`~villagemesh.node.InboundMessage`; test
it against arbitrary messages of its kind, and test the code that reacts to a
send's end against every :class:`~villagemesh.node.DeliveryStatus`::

    from hypothesis import given
    from villagemesh.strategies import inbound_messages

    @given(inbound_messages(kind="TASK", values=st.dictionaries(st.text(), st.integers()), codec="json"))
    def test_my_handler_never_raises(message):
        my_handler(message)

Wire-level strategies (envelopes, discovery events, chunkings) are in
:mod:`villagemesh.protocols.strategies`.
"""

from __future__ import annotations

import time
from typing import Any

from hypothesis import strategies as st

from villagemesh.actors.app.payload import PayloadCodec, payload_codec
from villagemesh.actors.app.state import DeliveryState, DeliveryStatus, InboundMessage, MessageId, message_id_of
from villagemesh.node import NodeEvent
from villagemesh.protocols.envelope import ID_BYTES, Message, Priority
from villagemesh.protocols.strategies import node_ids

__all__ = ["delivery_statuses", "inbound_messages", "message_ids", "node_events", "node_ids"]

_IDS = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)
_FAILED_HANDLER = DeliveryState.HANDLER_FAILED
_REASONS = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :.,-_()", min_size=1, max_size=80)
_KINDS = st.sampled_from(["DATA", "REQUEST", "TASK"])
_ACKED = (DeliveryState.DELIVERED, DeliveryState.UNHANDLED, DeliveryState.HANDLER_FAILED, DeliveryState.UNCONFIRMED)


def message_ids() -> st.SearchStrategy[MessageId]:
    """Message ids as the API shows them (:data:`~villagemesh.node.MessageId`: 32 hex chars)."""
    return _IDS.map(message_id_of)


def inbound_messages(
    *,
    kind: str | st.SearchStrategy[str] = _KINDS,
    values: st.SearchStrategy[Any] | None = None,
    codec: str | PayloadCodec = "bytes",
    recipient: str | None = None,
) -> st.SearchStrategy[InboundMessage]:
    """Messages as a handler gets them: valid envelopes, ``value`` = the payload decoded by ``codec``.

    Args:
        kind: the kind, or a strategy of kinds.
        values: what the payloads carry (default: bytes up to 256 long, for the bytes codec).
        codec: the node's payload codec (``"bytes"``, ``"json"``, ``"msgpack"`` or an object).
        recipient: the receiving node's id (default: drawn).
    """
    chosen = payload_codec(codec)
    kinds = st.just(kind) if isinstance(kind, str) else kind
    drawn_values = st.binary(max_size=256) if values is None else values

    @st.composite
    def build(draw: st.DrawFn) -> InboundMessage:
        value = draw(drawn_values)
        payload = chosen.encode(value)
        envelope = Message(
            id=draw(_IDS),
            kind=draw(kinds),
            sender=draw(node_ids()),
            recipient=recipient if recipient is not None else draw(node_ids()),
            priority=draw(st.sampled_from(Priority)),
            created_at=time.time() - draw(st.floats(0, 60)),
            ttl=draw(st.floats(1.0, 86_400.0)),
            correlation_id=draw(st.none() | _IDS),
            payload=payload,
        )
        return InboundMessage.of(envelope, redelivered=draw(st.booleans()), value=chosen.decode(payload))

    return build()


def delivery_statuses(*, states: tuple[DeliveryState, ...] = tuple(DeliveryState)) -> st.SearchStrategy[DeliveryStatus]:
    """Statuses a handle can show, consistent with their state (a reason for every failed end)."""

    @st.composite
    def build(draw: st.DrawFn) -> DeliveryStatus:
        state = draw(st.sampled_from(states))
        failed = state not in (DeliveryState.PENDING, DeliveryState.DELIVERED)
        return DeliveryStatus(
            message_id=draw(message_ids()),
            state=state,
            attempts=draw(st.integers(0 if state is DeliveryState.FAILED else 1, 8)),
            last_error=draw(_REASONS) if failed else None,
            acked=state in _ACKED,
            remote_type=draw(st.sampled_from(["ValueError", "KeyError"])) if state is _FAILED_HANDLER else None,
            reply=draw(st.none() | st.binary(max_size=64)) if state is DeliveryState.DELIVERED else None,
            peer_id=draw(node_ids()),
        )

    return build()


def node_events() -> st.SearchStrategy[NodeEvent]:
    """Events of the node's public stream, with the fields each kind carries."""
    peer = st.fixed_dictionaries({"peer_id": node_ids()})
    return st.one_of(
        st.builds(NodeEvent, st.just("peer_discovered"), peer, st.just("")),
        st.builds(NodeEvent, st.just("peer_lost"), peer.map(lambda f: {**f, "why": "expired"}), st.just("")),
        st.builds(
            NodeEvent,
            st.just("delivered"),
            st.fixed_dictionaries({"message_id": message_ids(), "peer_id": node_ids(), "status": st.just("handled")}),
            st.just(""),
        ),
        st.builds(
            NodeEvent,
            st.just("failed"),
            st.fixed_dictionaries({"message_id": message_ids(), "reason": st.text(max_size=40)}),
            st.just(""),
        ),
        st.builds(
            NodeEvent,
            st.sampled_from(["child_crashed", "child_restarted"]),
            st.fixed_dictionaries({"child_id": st.sampled_from(["retrier", "websocket", "app"])}),
            st.just(""),
        ),
    )
