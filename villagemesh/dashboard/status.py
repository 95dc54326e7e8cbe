"""A node's read-only status: ``GET /villagemesh/status`` on its one port, JSON.

The acceptor sniffs HTTP and hands the connection to the WebSocket actor's
aiohttp app, which serves this route beside ``/villagemesh/ws`` and ``/health``:
no extra port, and it binds exactly where the node binds (``NodeConfig.host``).
It only reads: the handler asks the node's actors for figures (with short
timeouts) and answers JSON; it accepts GET alone and takes no parameters.
``NodeConfig(status_endpoint=False)`` turns it off (404).

What it reveals, to whoever can reach the node's port::

    node        name, node id, network mode, address, pid, time
    tree        the supervision tree: ids, isolation, pids, alive, restart counts
    actors      per actor: messages in and out, mailbox depth, ask count and p50/p99 latency,
                the actor's own counters (a transport's transmit_ok / transmit_failed)
    peers       every known peer: node id, addresses per transport (IP addresses and
                ports of other nodes), last seen, trust, round-trip time, capabilities,
                evolution priority
    outbox      the retrier's counters and pending messages per priority
    transfers   every large transfer: id, peer, direction, file name, kind, size, bytes done, state

No message payloads, keys or file paths. Peer addresses are what a node
already tells any peer that asks through peer exchange, but a node that
should not show its neighbours to a browser turns the endpoint off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import pykka
from aiohttp import web

from villagemesh.actors.core.transport import TRANSPORT_NAMES
from villagemesh.errors import VillageMeshError
from villagemesh.protocols.envelope import Priority

__all__ = ["STATUS_ASK_TIMEOUT", "STATUS_PATH", "node_status", "status_handler"]

STATUS_PATH = "/villagemesh/status"

STATUS_ASK_TIMEOUT = 1.0
"""Seconds the status waits for each actor it asks (a restarting actor is reported, not waited for)."""


def node_status(node: Any) -> dict[str, Any]:
    """The status of a running :class:`~villagemesh.node.Node` (call it off the event loop: it asks actors).

    A part whose actor does not answer (restarting, busy) is left out and named
    in ``errors`` with the reason, never invented.
    """
    from villagemesh.actors.registry.messages import ListPeers
    from villagemesh.actors.registry.state import evolution_priority
    from villagemesh.actors.retrier.messages import GetRetrierStatus
    from villagemesh.actors.transfer.actor import transfers
    from villagemesh.supervision.supervisor import which_children

    env = node._env
    if env is None or node._root is None:
        raise VillageMeshError(f"node {node.name} is not running")
    client = env.bus.client()
    errors: dict[str, str] = {}
    status: dict[str, Any] = {
        "version": 1,
        "node": node.name,
        "node_id": node.node_id,
        "mode": node.config.mode.value,
        "address": node.address,
        "pid": os.getpid(),
        "time": time.time(),
    }
    actors = env.bus.metrics.snapshot()
    status["actors"] = actors
    status["transports"] = {
        name: {k: actors[name].get(k, 0) for k in ("transmit_ok", "transmit_failed")}
        for name in TRANSPORT_NAMES
        if name in actors
    }
    try:
        status["tree"] = which_children(node._root.actor_ref, timeout=STATUS_ASK_TIMEOUT)
    except (pykka.Timeout, pykka.ActorDeadError) as exc:  # the root is busy or gone
        errors["tree"] = f"{type(exc).__name__}: {exc}"
    try:
        peers = client.ask("registry", ListPeers(), timeout=STATUS_ASK_TIMEOUT).peers
        status["peers"] = [_peer(p.record(), evolution_priority) for p in peers]
    except VillageMeshError as exc:
        errors["peers"] = f"{type(exc).__name__}: {exc}"
    try:
        retrier = client.ask("retrier", GetRetrierStatus(), timeout=STATUS_ASK_TIMEOUT)
        outbox = {f.name: getattr(retrier, f.name) for f in dataclasses.fields(retrier)}
        by = outbox.pop("pending_by_priority")
        outbox["pending_by_priority"] = {p.name.lower(): by[p.value] for p in Priority if p.value < len(by)}
        status["outbox"] = outbox
    except VillageMeshError as exc:
        errors["outbox"] = f"{type(exc).__name__}: {exc}"
    try:
        rows = transfers(client, timeout=STATUS_ASK_TIMEOUT).rows
        status["transfers"] = [dataclasses.asdict(row) for row in rows]
    except VillageMeshError as exc:
        errors["transfers"] = f"{type(exc).__name__}: {exc}"
    status["errors"] = errors
    return status


def _peer(rec: Any, priority: Any) -> dict[str, Any]:
    caps = rec.capabilities
    return {
        "peer_id": rec.peer_id,
        "addresses": {transport: list(addresses) for transport, addresses in rec.addresses},
        "last_seen": rec.last_seen,
        "trust": rec.trust,
        "latency_ms": rec.latency_ms,
        "capabilities": dataclasses.asdict(caps) if caps is not None else None,
        "evolution_priority": round(priority(rec), 4),
    }


def status_handler(node: Any) -> Any:
    """The aiohttp GET handler of :data:`STATUS_PATH` for ``node``."""

    async def handle(request: web.Request) -> web.Response:
        try:
            status = await asyncio.to_thread(node_status, node)
        except VillageMeshError as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=503)
        return web.json_response(status, headers={"Cache-Control": "no-store"})

    return handle
