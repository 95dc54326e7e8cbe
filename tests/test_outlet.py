"""The asyncio face's outlet on a stand-in node: a loop turn's sends in one hand-over, in order,
waiting out a full mailbox, failing on a refusing bus or at the deadline, handed over again after
a retrier restart, and a send cancelled before its hand-off left out."""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from villagemesh.actors.app.state import Bridge
from villagemesh.actors.retrier.messages import DeliverMany, DeliverManyReply
from villagemesh.aio import BATCHES_OUT, _Outlet
from villagemesh.errors import ActorCrashed, BusError, MailboxFull


@dataclass
class Config:
    send_timeout: float = 5.0


@dataclass
class StandIn:
    """What the outlet uses of a Node; its bus refuses ``full`` times with MailboxFull, then takes each
    DeliverMany and (unless ``silent``) answers it through the bridge at once, storing it."""

    full: int = 0
    silent: bool = False
    refuse: BusError | None = None
    config: Config = field(default_factory=Config)
    bridge: Bridge = field(default_factory=Bridge)
    told: list[tuple[bytes, ...]] = field(default_factory=list)
    _failure: BaseException | None = None
    _outlets: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    _outlets_lock: Any = field(default_factory=threading.Lock)

    def _client(self) -> StandIn:
        return self

    def tell(self, to: str, msg: Any, *, timeout: float) -> None:
        assert (to, timeout) == ("retrier", 0) and isinstance(msg, DeliverMany)
        if self.refuse is not None:
            raise self.refuse
        if self.full:
            self.full -= 1
            raise MailboxFull("the retrier's mailbox is full")
        self.told.append(msg.envelopes)
        if not self.silent:
            n = len(msg.envelopes)
            self.bridge.answer(msg.answer_token, DeliverManyReply((None,) * n, (None,) * n))


async def sends(outlet: _Outlet, envelopes: list[bytes]) -> list[Any]:
    """Put every envelope in this turn (as a turn's asend calls do) and await each's answer."""
    put = [outlet.put(e) for e in envelopes]
    return await asyncio.gather(*(future for _, future in put), return_exceptions=True)


async def handed_over(node: StandIn, envelopes: list[bytes]) -> tuple[_Outlet, asyncio.Future[list[Any]]]:
    """An outlet, and its sends of ``envelopes`` awaited, once the stand-in's bus has taken them."""
    outlet = _Outlet(asyncio.get_running_loop(), node)  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(sends(outlet, envelopes))
    while not node.told:
        await asyncio.sleep(0)
    return outlet, waiting


def test_a_loop_turns_sends_go_in_one_hand_over_and_each_returns_on_its_answer() -> None:
    node = StandIn()

    async def main() -> list[Any]:
        outlet = _Outlet(asyncio.get_running_loop(), node)  # type: ignore[arg-type]
        first = await sends(outlet, [b"a", b"b", b"c"])
        return [first, await sends(outlet, [b"d"])]

    assert asyncio.run(main()) == [[None, None, None], [None]]
    assert node.told == [(b"a", b"b", b"c"), (b"d",)]


def test_a_full_mailbox_is_waited_out_and_order_is_kept() -> None:
    node = StandIn(full=3)

    async def main() -> list[Any]:
        outlet = _Outlet(asyncio.get_running_loop(), node)  # type: ignore[arg-type]
        early = asyncio.ensure_future(sends(outlet, [b"1", b"2"]))
        await asyncio.sleep(0)  # the first hand-over met the full mailbox: a second turn's sends queue behind
        late = asyncio.ensure_future(sends(outlet, [b"3"]))
        return [await early, await late]

    assert asyncio.run(main()) == [[None, None], [None]]
    assert [e for batch in node.told for e in batch] == [b"1", b"2", b"3"]


def test_a_mailbox_full_past_the_deadline_fails_the_sends_with_it() -> None:
    node = StandIn(full=10**6, config=Config(send_timeout=0.05))

    async def main() -> list[Any]:
        return await sends(_Outlet(asyncio.get_running_loop(), node), [b"x"])  # type: ignore[arg-type]

    (error,) = asyncio.run(main())
    assert isinstance(error, MailboxFull) and node.told == []


def test_a_refusing_bus_fails_that_batch_at_once() -> None:
    node = StandIn(refuse=BusError("the bus is closed"))

    async def main() -> list[Any]:
        return await sends(_Outlet(asyncio.get_running_loop(), node), [b"x", b"y"])  # type: ignore[arg-type]

    assert [str(e) for e in asyncio.run(main())] == ["the bus is closed"] * 2


def test_a_send_cancelled_before_its_hand_off_is_left_out_of_it() -> None:
    node = StandIn()

    async def main() -> list[Any]:
        outlet = _Outlet(asyncio.get_running_loop(), node)  # type: ignore[arg-type]
        (batch, kept), (_, dropped) = outlet.put(b"kept"), outlet.put(b"dropped")
        dropped.cancel()  # (what cancelling the awaiting asend does to its future)
        return [await kept, batch.pushed]

    assert asyncio.run(main()) == [None, True]
    assert node.told == [(b"kept",)]


def test_unanswered_batches_are_handed_over_again_with_the_same_envelopes_when_the_retrier_restarts() -> None:
    node = StandIn(silent=True)

    async def main() -> list[Any]:
        outlet, waiting = await handed_over(node, [b"p", b"q"])
        node.silent = False
        outlet.retrier_restarted()  # (called from a supervisor's thread in a node)
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(main()) == [None, None]
    assert node.told == [(b"p", b"q"), (b"p", b"q")]


def test_a_failed_node_does_not_hand_over_again_and_the_sends_fail_as_crashed() -> None:
    node = StandIn(silent=True)

    async def main() -> list[Any]:
        outlet, waiting = await handed_over(node, [b"p"])
        node._failure = RuntimeError("the node failed")
        outlet.retrier_restarted()
        return await asyncio.wait_for(waiting, 5)

    (error,) = asyncio.run(main())
    assert isinstance(error, ActorCrashed) and len(node.told) == 1


def test_an_answer_that_is_an_error_fails_the_batch() -> None:
    node = StandIn(silent=True)

    async def main() -> list[Any]:
        outlet, waiting = await handed_over(node, [b"p"])
        (token,) = list(outlet.out)
        node.bridge.answer(token, error=BusError("the retrier refused the batch"))
        return await asyncio.wait_for(waiting, 5)

    (error,) = asyncio.run(main())
    assert str(error) == "the retrier refused the batch"


def test_at_most_batches_out_await_their_answers_and_the_sends_behind_gather_into_one() -> None:
    node = StandIn(silent=True)

    async def main() -> list[Any]:
        outlet = _Outlet(asyncio.get_running_loop(), node)  # type: ignore[arg-type]
        turns = []
        for turn in range(BATCHES_OUT + 3):  # one loop turn each
            turns.append(asyncio.ensure_future(sends(outlet, [b"%d" % turn])))
            await asyncio.sleep(0)
        assert len(node.told) == BATCHES_OUT, node.told
        node.silent = False
        for token in list(outlet.out):  # the retrier answers the first ones now
            node.bridge.answer(token, DeliverManyReply((None,), (None,)))
        return await asyncio.wait_for(asyncio.gather(*turns), 5)

    assert asyncio.run(main()) == [[None]] * (BATCHES_OUT + 3)
    behind = tuple(b"%d" % turn for turn in range(BATCHES_OUT, BATCHES_OUT + 3))
    assert node.told[BATCHES_OUT:] == [behind], "the three behind went as one batch"
