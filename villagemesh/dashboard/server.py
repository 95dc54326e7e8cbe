"""The dashboard's web side: one page, live over Server-Sent Events, on aiohttp.

Routes (GET only; nothing here changes a node)::

    /villagemesh/dashboard          the page (dashboard.html: no build step, no outside assets)
    /villagemesh/dashboard/events   text/event-stream: ``timeline`` (new entries) and ``state`` (the snapshot)
    /villagemesh/dashboard/state    the snapshot and the whole timeline, JSON (scripts, tests)

:class:`Dashboard` runs three loops on the app's event loop: the logs are
polled every :data:`LOG_POLL_S` (so a restart reaches the page well within a
second of its log line), the nodes' status every :data:`STATUS_POLL_S` (in a
worker thread: the requests block), and a changed snapshot is pushed at most
every :data:`PUSH_S`. A browser that reads too slowly is dropped (its
EventSource reconnects and gets the whole state again), so no queue grows
without bound.

It serves two ways: ``villagemesh dashboard`` (:func:`run`, its own port, any
logs and nodes), and inside a node (``NodeConfig(dashboard=True)``): then
:func:`install` adds the routes to the node's own aiohttp app on its one port,
following the node's log and reading its status directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web

from villagemesh.dashboard.sources import Sources
from villagemesh.dashboard.view import MeshView

__all__ = ["LOG_POLL_S", "PAGE_PATH", "PUSH_S", "STATUS_POLL_S", "Dashboard", "install", "run"]

PAGE_PATH = "/villagemesh/dashboard"
LOG_POLL_S = 0.1
STATUS_POLL_S = 1.0
PUSH_S = 0.2
RECONNECT = b"retry: 250\n\n"
"""Milliseconds a browser waits before reconnecting (EventSource's default is about 3 s): when the
WebSocket actor that serves a node's dashboard restarts, the page is back within a second."""
SUBSCRIBER_QUEUE = 64
"""Pushes a browser may fall behind by before it is dropped (it reconnects)."""


class Dashboard:
    """The live view behind the page: a :class:`MeshView` fed by :class:`Sources`, pushed to browsers."""

    def __init__(self, sources: Sources, *, log_bytes: int = 1024 * 1024) -> None:
        self.sources = sources
        self.view = MeshView()
        self.log_bytes = log_bytes
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()

    # -- life ------------------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the routes to ``app`` and run the loops while it runs."""
        app.router.add_get(PAGE_PATH, self._page)
        app.router.add_get(PAGE_PATH + "/", self._page)
        app.router.add_get(PAGE_PATH + "/events", self._events)
        app.router.add_get(PAGE_PATH + "/state", self._state)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)

    async def _start(self, app: web.Application) -> None:
        self._tasks = [
            asyncio.create_task(self._follow_logs(), name="dashboard-logs"),
            asyncio.create_task(self._poll_status(), name="dashboard-status"),
            asyncio.create_task(self._push_state(), name="dashboard-push"),
        ]

    async def _shutdown(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for queue in list(self._subscribers):
            self._offer(queue, None)  # ends each stream, so aiohttp's shutdown does not wait for them
        self.sources.close()

    # -- loops -----------------------------------------------------------------------------------

    async def _follow_logs(self) -> None:
        while True:
            entries = self.sources.poll_logs(self.view, self.log_bytes)
            if entries:
                self._broadcast(_sse("timeline", entries))
                self._dirty.set()
            await asyncio.sleep(LOG_POLL_S)

    async def _poll_status(self) -> None:
        while True:
            await asyncio.to_thread(self.sources.fetch_status, self.view)
            self._dirty.set()
            await asyncio.sleep(STATUS_POLL_S)

    async def _push_state(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._broadcast(_sse("state", self.snapshot()))
            await asyncio.sleep(PUSH_S)

    def snapshot(self) -> dict[str, Any]:
        """The view as of now, with the sources' errors."""
        snap = self.view.snapshot(time.time())
        snap["errors"] = dict(self.sources.errors)
        return snap

    def _broadcast(self, data: bytes) -> None:
        for queue in list(self._subscribers):
            self._offer(queue, data)

    def _offer(self, queue: asyncio.Queue[bytes | None], data: bytes | None) -> None:
        try:
            queue.put_nowait(data)
        except asyncio.QueueFull:
            # Too slow a reader: end its stream (its EventSource reconnects and starts afresh).
            self._subscribers.discard(queue)
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            queue.put_nowait(None)

    # -- routes ----------------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        html = resources.files("villagemesh.dashboard").joinpath("dashboard.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        body = {**self.snapshot(), "timeline": self.view.timeline_since(0)}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            await response.write(RECONNECT)
            await response.write(_sse("timeline", self.view.timeline_since(0)))
            await response.write(_sse("state", self.snapshot()))
            while True:
                data = await queue.get()
                if data is None:
                    break
                await response.write(data)
        except ConnectionResetError:
            return response  # the browser went away: nothing is owed to it
        finally:
            self._subscribers.discard(queue)
        return response


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def install(node: Any) -> Any:
    """For a node: the callable its WebSocket server calls with its aiohttp app, adding the
    status endpoint (unless ``status_endpoint=False``) and the dashboard (if ``dashboard=True``)."""
    from villagemesh.dashboard.status import STATUS_PATH, node_status, status_handler

    def add_routes(app: web.Application) -> None:
        if node.config.status_endpoint:
            app.router.add_get(STATUS_PATH, status_handler(node))
        if node.config.dashboard:
            # A fresh view per app: a restarted WebSocket actor reads the log again from its start.
            Dashboard(Sources([node.log_path], local=lambda: node_status(node)), log_bytes=256 * 1024).install(app)

    return add_routes


async def _serve(dashboard: Dashboard, host: str, port: int, ready: Any, stop: asyncio.Event) -> None:
    app = web.Application()
    dashboard.install(app)

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound(PAGE_PATH)

    app.router.add_get("/", root)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    ready(f"http://{host}:{bound[1]}{PAGE_PATH}")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(sources: Sources, *, host: str = "127.0.0.1", port: int = 0, ready: Any = print, stop: Any = None) -> None:
    """Serve the dashboard until ``stop`` (an asyncio.Event made by the caller's callback) is set,
    or until interrupted; ``ready(url)`` is called once it listens."""

    async def main() -> None:
        event = asyncio.Event()
        if stop is not None:
            stop(asyncio.get_running_loop(), event)
        await _serve(Dashboard(sources), host, port, ready, event)

    asyncio.run(main())
