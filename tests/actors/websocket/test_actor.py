"""The WebSocket actor behind the acceptor actor on a real bus: authenticated envelopes in and out."""

from __future__ import annotations

import asyncio
import os
import queue
from typing import Any

import pytest
import structlog

from tests.actors.acceptor.support import WAIT, Sink, start
from tests.actors.transport_contract import Endpoint, TransportContract
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import Received, Transmit, TransmitResult
from villagemesh.actors.websocket.actor import WebSocketActor, config_keys, send_envelope, websocket_status
from villagemesh.actors.websocket.messages import EnvelopeSent, SendFailed
from villagemesh.actors.websocket.transport import WebSocketClient
from villagemesh.errors import ConfigError
from villagemesh.protocols.envelope import Message, Priority, decode_message, encode_message


def message(sender: str, payload: bytes) -> Message:
    return Message(
        id=os.urandom(16),
        kind="DATA",
        sender=sender,
        recipient=None,
        priority=Priority.HIGH,
        created_at=1.0,
        ttl=30.0,
        correlation_id=None,
        payload=payload,
    )


def endpoint(runtime: Any, suffix: str, keys: NodeKeys, **config: Any) -> tuple[queue.Queue[Any], str]:
    """A sink, a WebSocket actor with ``keys`` and an acceptor routing HTTP to it; their queue and ws:// URL."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, f"sink{suffix}", queue=inbox)
    start(runtime, WebSocketActor, f"websocket{suffix}", deliver_to=f"sink{suffix}", keys=keys, **config)
    start(runtime, AcceptorActor, f"acceptor{suffix}", routes={"http": f"websocket{suffix}"})
    port = acceptor_status(runtime.bus.client(), f"acceptor{suffix}").port
    return inbox, f"ws://127.0.0.1:{port}"


def test_envelopes_flow_in_through_the_acceptor_and_out_through_the_actor(runtime: Any) -> None:
    """A client's envelope reaches deliver_to with its node id; an envelope the actor sends to itself arrives."""
    keys, alice = NodeKeys.generate(), NodeKeys.generate()
    inbox, url = endpoint(runtime, "", keys, node_id=keys.node_id)
    client = runtime.bus.client()

    first = message(alice.node_id, b"from outside")

    async def outside() -> None:
        ws_client = WebSocketClient(lambda m, raw, peer_id: None, alice)
        await ws_client.send(url, encode_message(first), expected_peer=keys.node_id)
        await ws_client.close()

    asyncio.run(outside())
    received = inbox.get(timeout=WAIT)
    assert isinstance(received, Received) and received.transport == "websocket"
    assert decode_message(received.envelope) == first and received.remote == alice.node_id

    second = message(keys.node_id, b"to myself")
    send_envelope(client, second, url, reply_to="sink")
    got = [inbox.get(timeout=WAIT), inbox.get(timeout=WAIT)]
    sent = next(m for m in got if isinstance(m, EnvelopeSent))
    arrived = next(m for m in got if isinstance(m, Received))
    assert sent.message_id == second.id and decode_message(arrived.envelope) == second
    assert arrived.remote == keys.node_id
    status = websocket_status(client)
    assert status.server["received"] == 2 and status.client["sent"] == 1


def test_two_authenticated_endpoints_exchange_envelopes_both_ways(runtime: Any) -> None:
    """Transmits from a to b and from b to a succeed; each Received names the sending peer's node id."""
    a_keys, b_keys = NodeKeys.generate(), NodeKeys.generate()
    a_inbox, a_url = endpoint(runtime, "-a", a_keys)
    b_inbox, b_url = endpoint(runtime, "-b", b_keys)
    client = runtime.bus.client()
    for sender, keys, peer, url, inbox, other in (
        ("websocket-a", a_keys, b_keys, b_url, b_inbox, a_inbox),
        ("websocket-b", b_keys, a_keys, a_url, a_inbox, b_inbox),
    ):
        msg = message(keys.node_id, b"hello " + sender.encode())
        client.tell(sender, Transmit(msg.id, peer.node_id, url, encode_message(msg), f"sink-{sender[-1]}"))
        result = other.get(timeout=WAIT)
        assert isinstance(result, TransmitResult) and result.ok and result.peer_id == peer.node_id
        received = inbox.get(timeout=WAIT)
        assert isinstance(received, Received) and received.remote == keys.node_id
        assert decode_message(received.envelope) == msg


def test_a_transmit_that_asks_only_for_failures_is_silent_on_success_and_reports_a_failure(runtime: Any) -> None:
    """report_success=False (the retrier's way): no TransmitResult for a sent envelope, one for a failed send."""
    a_keys, b_keys, carol = NodeKeys.generate(), NodeKeys.generate(), NodeKeys.generate()
    a_inbox, _ = endpoint(runtime, "-a", a_keys)
    b_inbox, b_url = endpoint(runtime, "-b", b_keys)
    client = runtime.bus.client()
    quiet, loud = message(a_keys.node_id, b"quiet"), message(a_keys.node_id, b"loud")
    for msg, report in ((quiet, False), (loud, True)):  # one link, sends in order: a result for quiet would come first
        transmit = Transmit(msg.id, b_keys.node_id, b_url, encode_message(msg), "sink-a", report_success=report)
        client.tell("websocket-a", transmit)
    result = a_inbox.get(timeout=WAIT)
    assert isinstance(result, TransmitResult) and result.ok and result.message_id == loud.id
    assert [decode_message(b_inbox.get(timeout=WAIT).envelope).payload for _ in range(2)] == [b"quiet", b"loud"]
    failing = Transmit(quiet.id, carol.node_id, b_url, encode_message(quiet), "sink-a", report_success=False)
    client.tell("websocket-a", failing)
    result = a_inbox.get(timeout=WAIT)
    assert isinstance(result, TransmitResult) and not result.ok and result.message_id == quiet.id


def test_transmit_to_the_wrong_peer_is_a_retryable_failure_naming_both_ids(runtime: Any) -> None:
    """The node at the address authenticates as someone else: TransmitResult(ok=False, retryable=True), both ids."""
    a_keys, b_keys, carol = NodeKeys.generate(), NodeKeys.generate(), NodeKeys.generate()
    a_inbox, _ = endpoint(runtime, "-a", a_keys)
    b_inbox, b_url = endpoint(runtime, "-b", b_keys)
    msg = message(a_keys.node_id, b"for carol")
    runtime.bus.client().tell("websocket-a", Transmit(msg.id, carol.node_id, b_url, encode_message(msg), "sink-a"))
    result = a_inbox.get(timeout=WAIT)
    assert isinstance(result, TransmitResult) and not result.ok and result.retryable
    assert carol.node_id in (result.error or "") and b_keys.node_id in (result.error or "")
    assert b_inbox.empty()


def test_send_to_an_unreachable_peer_reports_failure_to_reply_to(runtime: Any) -> None:
    """A send to a closed port comes back as SendFailed naming the URL; the actor keeps running."""
    keys = NodeKeys.generate()
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    start(runtime, WebSocketActor, "websocket", keys=keys, connect_timeout=1.0)
    client = runtime.bus.client()
    send_envelope(client, message(keys.node_id, b"x"), "ws://127.0.0.1:9", reply_to="sink")
    failed = inbox.get(timeout=WAIT)
    assert isinstance(failed, SendFailed)
    assert failed.error == "ConnectError" and "ws://127.0.0.1:9" in failed.reason
    assert websocket_status(client).client.get("sent", 0) == 0


def test_transmit_is_answered_with_a_transmit_result_per_the_transport_contract(runtime: Any) -> None:
    """Transmit to a live peer: ok; to a closed port: a retryable failure naming the address."""
    keys = NodeKeys.generate()
    inbox, url = endpoint(runtime, "", keys, connect_timeout=1.0)
    client = runtime.bus.client()
    msg = message(keys.node_id, b"transmitted")
    client.tell("websocket", Transmit(msg.id, keys.node_id, url, encode_message(msg), "sink"))
    got = [inbox.get(timeout=WAIT), inbox.get(timeout=WAIT)]
    result = next(m for m in got if isinstance(m, TransmitResult))
    assert result.ok and result.message_id == msg.id and result.transport == "websocket" and result.error is None
    assert decode_message(next(m for m in got if isinstance(m, Received)).envelope) == msg
    client.tell("websocket", Transmit(msg.id, keys.node_id, "ws://127.0.0.1:9", encode_message(msg), "sink"))
    failed = inbox.get(timeout=WAIT)
    assert isinstance(failed, TransmitResult) and not failed.ok and failed.retryable
    assert "ws://127.0.0.1:9" in (failed.error or "")


def test_actor_without_keys_generates_them_and_says_so(runtime: Any, recorder: Any) -> None:
    """No keys in the config: fresh keys, a ws_keys_generated event naming the node id; it still authenticates."""
    inbox, url = endpoint(runtime, "", NodeKeys.generate())
    start(runtime, WebSocketActor, "websocket-nokeys")
    [event] = recorder.wait_for("ws_keys_generated", actor="websocket-nokeys")
    node_id = event["node_id"]
    msg = message(node_id, b"ephemeral")
    runtime.bus.client().tell("websocket-nokeys", Transmit(msg.id, "0" * 32, url, encode_message(msg), "sink"))
    result = inbox.get(timeout=WAIT)
    assert isinstance(result, TransmitResult) and not result.ok and result.retryable  # authenticated, wrong id


def test_config_keys_must_prove_the_configured_node_id() -> None:
    """A node_id other than the keys' (or without keys), or keys of the wrong type, are ConfigErrors naming them."""
    keys = NodeKeys.generate()
    with structlog.testing.capture_logs() as logs:
        assert config_keys({"keys": keys, "node_id": keys.node_id}, structlog.get_logger()) is keys
    assert logs == []
    with pytest.raises(ConfigError, match=f"'{'0' * 32}'.*{keys.node_id}"):
        config_keys({"keys": keys, "node_id": "0" * 32}, structlog.get_logger())
    with pytest.raises(ConfigError, match="'n1' but gives no keys"):
        config_keys({"node_id": "n1"}, structlog.get_logger())
    with pytest.raises(ConfigError, match="got bytes"):
        config_keys({"keys": keys.to_bytes()}, structlog.get_logger())


class TestWebSocketKeepsTheTransportContract(TransportContract):
    """The shared contract suite (tests/actors/transport_contract.py) on the WebSocket transport."""

    NAME = "websocket"
    UNREACHABLE = "ws://127.0.0.1:9"

    @pytest.fixture
    def transport_factory(self) -> Any:
        def make(runtime: Any, suffix: str, keys: NodeKeys) -> Endpoint:
            inbox, url = endpoint(runtime, suffix, keys, connect_timeout=2.0)
            return Endpoint(f"websocket{suffix}", f"sink{suffix}", inbox, url, keys)

        return make
