"""The acceptor actor on a real bus: status, hand-off of a descriptor, unreachable route owners."""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any

from tests.actors.acceptor.support import WAIT, Sink, start
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.core.base import ActorContext
from villagemesh.actors.core.handoff import claim
from villagemesh.actors.core.transport import ConnectionHandedOff


def test_a_routed_connection_reaches_its_owner_as_a_live_descriptor(runtime: Any) -> None:
    """The owner gets ConnectionHandedOff with the peeked bytes; the fd is the live connection, and it
    keeps counting against the caps until the owner gives its slot back."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "owner", queue=inbox)
    start(runtime, AcceptorActor, "acceptor", routes={"secure": "owner"})
    client = runtime.bus.client()
    port = acceptor_status(client).port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(b"VMSC\x01hello")
        handed = inbox.get(timeout=WAIT)
        assert isinstance(handed, ConnectionHandedOff)
        assert handed.route == "secure" and handed.peeked == b"VMSC\x01hello"
        release = claim(handed.fd)
        assert release is not None and claim(handed.fd) is None  # the slot is the owner's now
        with socket.socket(fileno=handed.fd) as adopted:
            adopted.sendall(b"welcome")
            assert conn.recv(7, socket.MSG_WAITALL) == b"welcome"
            assert acceptor_status(client).open == 1
        release()
        release()  # once only
    status = acceptor_status(client)
    assert status.counts["routed.secure"] == 1 and status.open == 0


def test_unreachable_route_owner_closes_the_connection_and_says_why(runtime: Any, recorder: Any) -> None:
    """A route whose owner has no mailbox: the client is closed and connection_rejected is logged."""
    start(runtime, AcceptorActor, "acceptor", routes={"http": "nobody"})
    port = acceptor_status(runtime.bus.client()).port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert conn.recv(10) == b""
    (event,) = recorder.wait_for("connection_rejected")
    assert "nobody" in event["reason"] and event["protocol"] == "http"


def test_a_failed_start_leaves_no_loop_thread_behind(runtime: Any) -> None:
    """The port is taken: on_start crashes, and the loop thread it had started is stopped too."""
    reports: queue.Queue[Any] = queue.Queue()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        runtime.bus.open_mailbox("acceptor")
        ctx = ActorContext(
            bus=runtime.bus,
            name="acceptor",
            log=runtime.log,
            scheduler=runtime.scheduler,
            watcher=lambda actor, report: reports.put(report),
            config={"port": taken.getsockname()[1]},
        )
        AcceptorActor.start(ctx)
        report = reports.get(timeout=WAIT)
    assert report.crashed and report.exc_type == "ConnectError"
    assert not [t for t in threading.enumerate() if t.name.endswith("acceptor-loop") and t.is_alive()]
