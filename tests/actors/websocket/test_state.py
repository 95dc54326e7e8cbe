"""The WebSocket actor's pure decisions: the side a Transmit goes by, and each outcome's answer."""

from __future__ import annotations

import asyncio

import pytest

from villagemesh.actors.core.transport import REPLY_ADDRESS, Transmit, TransmitResult
from villagemesh.actors.websocket.messages import EnvelopeSent, SendEnvelope, SendFailed
from villagemesh.actors.websocket.state import TRANSPORT, Via, send_outcome, transmit_outcome, via
from villagemesh.errors import ConnectError, TransportTimeout

MID = bytes(range(16))


def transmit(address: str = "ws://127.0.0.1:7000") -> Transmit:
    return Transmit(MID, "peer-1", address, b"envelope", "retrier")


def test_an_ack_back_goes_on_the_peers_own_connection_and_anything_else_is_dialled() -> None:
    assert via(transmit(REPLY_ADDRESS)) is Via.SERVER
    assert via(transmit("ws://10.0.0.1:7000")) is Via.CLIENT


def test_a_sent_transmit_is_ok() -> None:
    assert transmit_outcome(transmit(), None) == TransmitResult(MID, TRANSPORT, "peer-1", True, False, None)


def test_a_refused_connection_is_retryable_at_once() -> None:
    outcome = transmit_outcome(transmit(), ConnectError("refused"))
    assert (outcome.ok, outcome.retryable, outcome.error) == (False, True, "ConnectError: refused")


@pytest.mark.parametrize("error", [TransportTimeout("slow"), asyncio.CancelledError()])
def test_a_send_that_may_have_reached_the_peer_is_not_retryable(error: BaseException) -> None:
    outcome = transmit_outcome(transmit(), error)
    assert (outcome.ok, outcome.retryable) == (False, False)
    assert outcome.error is not None and outcome.error.startswith(type(error).__name__)


def test_a_bug_is_raised_again_not_reported_as_a_transport_failure() -> None:
    with pytest.raises(KeyError):
        transmit_outcome(transmit(), KeyError("bug"))
    with pytest.raises(KeyError):
        send_outcome(SendEnvelope("ws://h:1", b"e", "me"), MID, KeyError("bug"))


def test_a_direct_send_answers_sent_or_failed_with_the_error() -> None:
    request = SendEnvelope("ws://h:1", b"e", "me")
    assert send_outcome(request, MID, None) == EnvelopeSent("ws://h:1", MID)
    assert send_outcome(request, MID, ConnectError("no")) == SendFailed("ws://h:1", MID, "ConnectError", "no")
