"""The transport contract as one suite that every transport actor passes (trio's ``_check_streams`` idea).

A transport's test module subclasses :class:`TransportContract` and provides one
fixture, ``transport_factory``: a callable ``(runtime, suffix, identity) -> Endpoint``
that starts one endpoint of the transport on the runtime's bus (its actor, and
whatever it needs in front of it: the WebSocket transport needs an acceptor), with
a sink actor as its ``deliver_to``, and returns where it can be reached. It also
sets ``UNREACHABLE`` (an address of its scheme that fails at once: nobody listens there,
or it cannot be used) and ``NAME``.
The identities are :class:`~villagemesh.actors.core.secure.keys.NodeKeys`.

Two promises hold only for a transport that talks to its peer directly; one that
cannot keep them says so, with the reason, by setting the flag False (the test is
then skipped naming it): ``ORDERED`` (one link keeps order) and ``SEES_PEER`` (it
learns at once that nobody listens at an address, or that another node answers).
An anonymous transport keeps neither: each message takes its own route through
mixes that hold it for a random time, and the sender never talks to the recipient.

What every transport promises (:mod:`villagemesh.actors.core.transport`):

- a ``Transmit`` to a live peer is answered ``TransmitResult(ok=True)`` (unless it
  asked only for failures) and the peer's ``deliver_to`` gets ``Received`` with the
  exact envelope, the transport's name and the *authenticated* sender as ``remote``;
- envelopes sent on one link arrive in the order they were sent;
- an address nobody listens on is a *retryable* failure naming the address;
- a peer that authenticates as another node id than ``Transmit.peer_id`` is a
  retryable failure naming both ids, and nothing reaches it;
- ``report_success=False`` is silent on success and still reports a failure;
- ``Discover`` is answered with ``Discovered`` of the same round, named after the transport;
- the actor survives all of the above: a failure is an answer, never a crash.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import Discover, Discovered, Received, Transmit, TransmitMany, TransmitResult
from villagemesh.protocols.envelope import Message, Priority, decode_message, encode_message

WAIT = 10.0


@dataclass
class Endpoint:
    """One running endpoint: its actor's bus name, the sink's queue, its address and identity."""

    actor: str
    sink: str
    inbox: queue.Queue[Any]
    address: str
    keys: NodeKeys


Factory = Callable[[Any, str, NodeKeys], Endpoint]


def envelope(sender: NodeKeys, payload: bytes) -> Message:
    return Message(
        id=os.urandom(16),
        kind="DATA",
        sender=sender.node_id,
        recipient=None,
        priority=Priority.NORMAL,
        created_at=1.0,
        ttl=30.0,
        correlation_id=None,
        payload=payload,
    )


def next_of(inbox: queue.Queue[Any], kind: type) -> Any:
    """The next item of ``kind`` in ``inbox`` (others are skipped), within WAIT seconds."""
    while True:
        item = inbox.get(timeout=WAIT)
        if isinstance(item, kind):
            return item


class TransportContract:
    """Subclass in a transport's tests; provide the ``transport_factory`` fixture, ``NAME`` and ``UNREACHABLE``."""

    NAME: ClassVar[str]
    UNREACHABLE: ClassVar[str]
    ORDERED: ClassVar[bool] = True
    SEES_PEER: ClassVar[bool] = True
    WHY: ClassVar[str] = ""
    """Why a flag is False (the skip names it)."""

    def needs(self, flag: str) -> None:
        if not getattr(self, flag):
            pytest.skip(f"{self.NAME} does not promise {flag}: {self.WHY}")

    def pair(self, runtime: Any, factory: Factory) -> tuple[Endpoint, Endpoint]:
        return factory(runtime, "-a", NodeKeys.generate()), factory(runtime, "-b", NodeKeys.generate())

    def transmit(self, runtime: Any, src: Endpoint, dst_id: str, address: str, msg: Message, **kw: Any) -> None:
        runtime.bus.client().tell(src.actor, Transmit(msg.id, dst_id, address, encode_message(msg), src.sink, **kw))

    def test_a_transmit_reaches_the_peer_with_the_authenticated_sender(
        self, runtime: Any, transport_factory: Factory
    ) -> None:
        a, b = self.pair(runtime, transport_factory)
        msg = envelope(a.keys, b"contract: hello")
        self.transmit(runtime, a, b.keys.node_id, b.address, msg)
        result = next_of(a.inbox, TransmitResult)
        assert (result.ok, result.message_id, result.transport, result.peer_id) == (
            True,
            msg.id,
            self.NAME,
            b.keys.node_id,
        )
        received = next_of(b.inbox, Received)
        assert received.transport == self.NAME and received.remote == a.keys.node_id
        assert decode_message(received.envelope) == msg

    def test_envelopes_on_one_link_arrive_in_order(self, runtime: Any, transport_factory: Factory) -> None:
        self.needs("ORDERED")
        a, b = self.pair(runtime, transport_factory)
        sent = [envelope(a.keys, b"n%d" % n) for n in range(20)]
        for msg in sent:
            self.transmit(runtime, a, b.keys.node_id, b.address, msg, report_success=False)
        got = [decode_message(next_of(b.inbox, Received).envelope) for _ in sent]
        assert got == sent

    def test_a_transmit_many_carries_each_of_its_envelopes_and_answers_each_failure(
        self, runtime: Any, transport_factory: Factory
    ) -> None:
        a, b = self.pair(runtime, transport_factory)
        sent = [envelope(a.keys, b"many %d" % n) for n in range(5)]
        failing = envelope(a.keys, b"nobody there")
        order = [*sent[:2], failing, *sent[2:]]
        peers = [b.keys.node_id] * 2 + [NodeKeys.generate().node_id] + [b.keys.node_id] * 3
        addresses = [b.address] * 2 + [self.UNREACHABLE] + [b.address] * 3
        many = TransmitMany(
            tuple(m.id for m in order),
            tuple(peers),
            tuple(addresses),
            tuple(encode_message(m) for m in order),
            a.sink,
            report_success=False,
        )
        runtime.bus.client().tell(a.actor, many)
        got = [decode_message(next_of(b.inbox, Received).envelope) for _ in sent]
        assert got == sent if self.ORDERED else sorted(got, key=lambda m: m.id) == sorted(sent, key=lambda m: m.id)
        result = next_of(a.inbox, TransmitResult)
        assert (result.message_id, result.ok) == (failing.id, False)

    def test_an_address_nobody_listens_on_is_a_retryable_failure_naming_it(
        self, runtime: Any, transport_factory: Factory
    ) -> None:
        self.needs("SEES_PEER")
        a = transport_factory(runtime, "-a", NodeKeys.generate())
        self.transmit(runtime, a, NodeKeys.generate().node_id, self.UNREACHABLE, envelope(a.keys, b"x"))
        result = next_of(a.inbox, TransmitResult)
        assert not result.ok and result.retryable and self.UNREACHABLE in (result.error or "")

    def test_a_peer_proving_another_identity_is_a_retryable_failure_naming_both(
        self, runtime: Any, transport_factory: Factory
    ) -> None:
        self.needs("SEES_PEER")
        a, b = self.pair(runtime, transport_factory)
        expected = NodeKeys.generate().node_id
        self.transmit(runtime, a, expected, b.address, envelope(a.keys, b"for someone else"))
        result = next_of(a.inbox, TransmitResult)
        assert not result.ok and result.retryable
        assert expected in (result.error or "") and b.keys.node_id in (result.error or "")
        with pytest.raises(queue.Empty):
            next_of_now(b.inbox, Received)

    def test_asking_only_for_failures_is_silent_on_success_and_reports_a_failure(
        self, runtime: Any, transport_factory: Factory
    ) -> None:
        a, b = self.pair(runtime, transport_factory)
        quiet, loud = envelope(a.keys, b"quiet"), envelope(a.keys, b"loud")
        self.transmit(runtime, a, b.keys.node_id, b.address, quiet, report_success=False)
        self.transmit(runtime, a, b.keys.node_id, b.address, loud)  # same link, after quiet: its result comes second
        assert next_of(a.inbox, TransmitResult).message_id == loud.id
        failing = envelope(a.keys, b"failing")
        self.transmit(runtime, a, b.keys.node_id, self.UNREACHABLE, failing, report_success=False)
        result = next_of(a.inbox, TransmitResult)
        assert result.message_id == failing.id and not result.ok

    def test_discover_is_answered_for_the_same_round(self, runtime: Any, transport_factory: Factory) -> None:
        a = transport_factory(runtime, "-a", NodeKeys.generate())
        runtime.bus.client().tell(a.actor, Discover(7, 2.0, a.sink))
        found = next_of(a.inbox, Discovered)
        assert found.round == 7 and found.transport == self.NAME

    def test_the_actor_still_serves_after_every_failure(self, runtime: Any, transport_factory: Factory) -> None:
        a, b = self.pair(runtime, transport_factory)
        self.transmit(runtime, a, b.keys.node_id, self.UNREACHABLE, envelope(a.keys, b"fails"))
        assert not next_of(a.inbox, TransmitResult).ok
        msg = envelope(a.keys, b"after the failure")
        self.transmit(runtime, a, b.keys.node_id, b.address, msg)
        assert next_of(a.inbox, TransmitResult).ok
        assert decode_message(next_of(b.inbox, Received).envelope) == msg


def next_of_now(inbox: queue.Queue[Any], kind: type) -> Any:
    """An item of ``kind`` already in ``inbox`` (after a short grace), else ``queue.Empty``."""
    while True:
        item = inbox.get(timeout=0.3)
        if isinstance(item, kind):
            return item
