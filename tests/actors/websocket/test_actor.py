"""The WebSocket actor behind the acceptor actor on a real bus: envelopes in and out."""

from __future__ import annotations

import asyncio
import os
import queue
from typing import Any

from tests.actors.acceptor.support import WAIT, Sink, start
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.transport import Received, Transmit, TransmitResult
from villagemesh.actors.websocket.actor import WebSocketActor, send_envelope, websocket_status
from villagemesh.actors.websocket.messages import EnvelopeSent, SendFailed
from villagemesh.actors.websocket.transport import WebSocketClient
from villagemesh.protocols.envelope import Message, Priority, decode_message


def message(payload: bytes) -> Message:
    return Message(
        id=os.urandom(16),
        kind="DATA",
        sender="a",
        recipient=None,
        priority=Priority.HIGH,
        created_at=1.0,
        ttl=30.0,
        correlation_id=None,
        payload=payload,
    )


def test_envelopes_flow_in_through_the_acceptor_and_out_through_the_actor(runtime: Any) -> None:
    """A client's envelope reaches deliver_to; an envelope the actor sends to itself arrives and is confirmed."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    start(runtime, WebSocketActor, "websocket", deliver_to="sink", node_id="n1")
    start(runtime, AcceptorActor, "acceptor", routes={"http": "websocket"})
    client = runtime.bus.client()
    port = acceptor_status(client).port
    url = f"ws://127.0.0.1:{port}"

    first = message(b"from outside")

    async def outside() -> None:
        ws_client = WebSocketClient(lambda m, p: None)
        await ws_client.send(url, first)
        await ws_client.close()

    asyncio.run(outside())
    received = inbox.get(timeout=WAIT)
    assert isinstance(received, Received) and received.transport == "websocket"
    assert decode_message(received.envelope) == first

    second = message(b"to myself")
    send_envelope(client, second, url, reply_to="sink")
    got = [inbox.get(timeout=WAIT), inbox.get(timeout=WAIT)]
    sent = next(m for m in got if isinstance(m, EnvelopeSent))
    arrived = next(m for m in got if isinstance(m, Received))
    assert sent.message_id == second.id and decode_message(arrived.envelope) == second
    status = websocket_status(client)
    assert status.server["received"] == 2 and status.client["sent"] == 1


def test_send_to_an_unreachable_peer_reports_failure_to_reply_to(runtime: Any) -> None:
    """A send to a closed port comes back as SendFailed naming the URL; the actor keeps running."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    start(runtime, WebSocketActor, "websocket", connect_timeout=1.0)
    client = runtime.bus.client()
    send_envelope(client, message(b"x"), "ws://127.0.0.1:9", reply_to="sink")
    failed = inbox.get(timeout=WAIT)
    assert isinstance(failed, SendFailed)
    assert failed.error == "ConnectError" and "ws://127.0.0.1:9" in failed.reason
    assert websocket_status(client).client.get("sent", 0) == 0


def test_transmit_is_answered_with_a_transmit_result_per_the_transport_contract(runtime: Any) -> None:
    """Transmit to a live peer: ok; to a closed port: a retryable failure naming the address."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    start(runtime, WebSocketActor, "websocket", deliver_to="sink", connect_timeout=1.0)
    start(runtime, AcceptorActor, "acceptor", routes={"http": "websocket"})
    client = runtime.bus.client()
    url = f"ws://127.0.0.1:{acceptor_status(client).port}"
    msg = message(b"transmitted")
    from villagemesh.protocols.envelope import encode_message

    client.tell("websocket", Transmit(msg.id, "peer-a", url, encode_message(msg), "sink"))
    got = [inbox.get(timeout=WAIT), inbox.get(timeout=WAIT)]
    result = next(m for m in got if isinstance(m, TransmitResult))
    assert result.ok and result.message_id == msg.id and result.transport == "websocket" and result.error is None
    assert decode_message(next(m for m in got if isinstance(m, Received)).envelope) == msg
    client.tell("websocket", Transmit(msg.id, "peer-b", "ws://127.0.0.1:9", encode_message(msg), "sink"))
    failed = inbox.get(timeout=WAIT)
    assert isinstance(failed, TransmitResult) and not failed.ok and failed.retryable
    assert "ws://127.0.0.1:9" in (failed.error or "")
