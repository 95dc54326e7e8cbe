"""What the node API hands out for transfers, shared between callers' threads and the transfer actor.

:class:`TransferHandle` (progress: bytes done of total, rate; ``wait``; ``await``),
:class:`TransferTable` (the handles by transfer id), :class:`ReceivedFile` (what a
receiving handler gets: the verified file's path, or its bytes as an async
stream) and :class:`Receivers` (the receiving handlers); :func:`hash_file`, the whole digest of
a file on disk (the node's before it offers one, the actor's of a file it moved).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from villagemesh.errors import ConfigError, DigestMismatch, TransferError, TransferRefused
from villagemesh.protocols.transfer import DigestAlgorithm, whole_digest

__all__ = ["Progress", "ReceivedFile", "Receivers", "TransferHandle", "TransferTable", "error_of", "hash_file"]

READ_BYTES = 1024 * 1024
"""Bytes :meth:`ReceivedFile.stream` and :func:`hash_file` read at a time."""


def hash_file(path: str | Path, algorithm: DigestAlgorithm) -> tuple[int, bytes]:
    """``(size, digest by algorithm)`` of the file at ``path``, read a block at a time into one buffer."""
    digest = whole_digest(algorithm)
    size = 0
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.digest()


@dataclass(frozen=True)
class Progress:
    """A transfer's progress: ``done`` of ``total`` bytes committed by the receiver, ``rate`` in bytes/s."""

    transfer_id: str
    peer_id: str
    done: int
    total: int
    rate: float
    state: str
    """running, done, refused or failed."""
    error: TransferError | None = None

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.done / self.total


def error_of(transfer_id: str, peer_id: str, state: str, reason: str, detail: str) -> TransferError:
    """The error a failed or refused transfer raises."""
    if state == "refused":
        return TransferRefused(transfer_id, peer_id, reason, detail)
    if reason == "digest_mismatch":
        return DigestMismatch(transfer_id, peer_id, reason, detail)
    return TransferError(transfer_id, peer_id, reason, detail)


class TransferHandle:
    """What ``Node.send_file`` and ``send_stream`` return: progress, and the end to wait for."""

    def __init__(self, transfer_id: bytes, peer_id: str, name: str, total: int) -> None:
        self.raw_id = transfer_id
        self.transfer_id = transfer_id.hex()
        self.peer_id = peer_id
        self.name = name
        self.total = total
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._done = 0
        self._state = "running"
        self._error: TransferError | None = None
        self._started = time.monotonic()
        self._first: tuple[float, int] | None = None
        self._callbacks: list[Callable[[Progress], None]] = []

    def __repr__(self) -> str:
        return f"<TransferHandle {self.transfer_id} to {self.peer_id} {self._done}/{self.total} {self._state}>"

    @property
    def progress(self) -> Progress:
        """Bytes done and total now, and the rate since the first progress this process saw."""
        with self._lock:
            done, state, error, first = self._done, self._state, self._error, self._first
        rate = 0.0
        if first is not None:
            elapsed = time.monotonic() - first[0]
            rate = (done - first[1]) / elapsed if elapsed > 0 else 0.0
        return Progress(self.transfer_id, self.peer_id, done, self.total, rate, state, error)

    def done(self) -> bool:
        """Whether the transfer has ended (verified, refused or failed)."""
        return self._ended.is_set()

    def wait(self, timeout: float) -> Progress:
        """Block up to ``timeout`` s for the end; the final progress.

        Raises:
            TransferRefused: the receiver refused it (nothing was written).
            DigestMismatch: the bytes received did not hash to the digest offered.
            TransferError: it failed otherwise (cancelled, storage, unknown transfer).
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._ended.wait(timeout):
            raise TimeoutError(f"transfer {self.transfer_id} still running after {timeout} s ({self._done} bytes)")
        final = self.progress
        if final.error is not None:
            raise final.error
        return final

    def add_done_callback(self, fn: Callable[[Progress], None]) -> None:
        """Call ``fn(progress)`` at the end (at once if it has ended), in the ending thread."""
        with self._lock:
            if not self._ended.is_set():
                self._callbacks.append(fn)
                return
        fn(self.progress)

    def __await__(self) -> Generator[Any, None, Progress]:
        """``await handle``: the final progress, raising as :meth:`wait` does."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Progress] = loop.create_future()

        def settle(progress: Progress) -> None:
            if future.done():
                return
            if progress.error is not None:
                future.set_exception(progress.error)
            else:
                future.set_result(progress)

        def resolve(progress: Progress) -> None:
            loop.call_soon_threadsafe(settle, progress)

        self.add_done_callback(resolve)
        return future.__await__()

    def _progress(self, done: int) -> None:
        with self._lock:
            if self._first is None:
                self._first = (time.monotonic(), done)
            self._done = max(self._done, done)

    def _end(self, state: str, error: TransferError | None) -> None:
        with self._lock:
            if self._ended.is_set():
                return
            self._state, self._error = state, error
            if error is None:
                self._done = self.total
            callbacks, self._callbacks = self._callbacks, []
            self._ended.set()
        final = self.progress
        for fn in callbacks:
            fn(final)


class TransferTable:
    """The handles of this process's outgoing transfers, by raw transfer id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[bytes, TransferHandle] = {}

    def new(self, transfer_id: bytes, peer_id: str, name: str, total: int) -> TransferHandle:
        handle = TransferHandle(transfer_id, peer_id, name, total)
        with self._lock:
            self._handles[transfer_id] = handle
        return handle

    def get(self, transfer_id: bytes) -> TransferHandle | None:
        with self._lock:
            return self._handles.get(transfer_id)

    def progress(self, transfer_id: bytes, done: int) -> None:
        handle = self.get(transfer_id)
        if handle is not None:
            handle._progress(done)

    def end(self, transfer_id: bytes, state: str, error: TransferError | None) -> None:
        with self._lock:
            handle = self._handles.pop(transfer_id, None)
        if handle is not None:
            handle._end(state, error)


@dataclass(frozen=True)
class ReceivedFile:
    """A verified file another node sent: at ``path`` (moved into place atomically), ``size`` bytes,
    hashing to ``digest`` by ``algorithm`` ("sha256" or "blake2b-256": compare ``digest.hex()`` with
    what ``sha256sum`` or ``b2sum -l 256`` prints, or a model hub publishes)."""

    transfer_id: str
    peer_id: str
    kind: str
    name: str
    size: int
    digest: bytes
    path: Path
    algorithm: str = "blake2b-256"

    async def stream(self, block: int = READ_BYTES) -> AsyncIterator[bytes]:
        """The file's bytes as an async stream, ``block`` bytes at a time (read off the event loop)."""
        loop = asyncio.get_running_loop()
        handle = await loop.run_in_executor(None, self.path.open, "rb")
        try:
            while data := await loop.run_in_executor(None, handle.read, block):
                yield data
        finally:
            handle.close()


ReceiveHandler = Callable[[ReceivedFile], object] | Callable[[ReceivedFile], Awaitable[object]]


class Receivers:
    """The receiving handlers by kind ("*": every kind); async ones run on the loop they subscribed from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: list[tuple[str, ReceiveHandler, asyncio.AbstractEventLoop | None]] = []
        self._failures: list[Callable[[TransferError], object]] = []

    def add(self, kind: str, handler: ReceiveHandler) -> Callable[[], None]:
        """``handler(received)`` for each verified file of ``kind``; returns the unsubscribe."""
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"kind must be a non-empty str ('*' for every kind), got {kind!r}")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return self._add(self._handlers, handler, (kind, handler, loop))

    def add_failure(self, handler: Callable[[TransferError], object]) -> Callable[[], None]:
        """``handler(error)`` for each incoming transfer that ends without a verified file (runs on the
        transfer actor's thread); returns the unsubscribe."""
        return self._add(self._failures, handler, handler)

    def _add(self, into: list[Any], handler: object, entry: Any) -> Callable[[], None]:
        if not callable(handler):
            raise ConfigError(f"handler must be callable, got {type(handler).__name__}")
        with self._lock:
            into.append(entry)

        def remove() -> None:
            with self._lock:
                if entry in into:
                    into.remove(entry)

        return remove

    def failures(self) -> list[Callable[[TransferError], object]]:
        with self._lock:
            return list(self._failures)

    def of(self, kind: str) -> list[tuple[ReceiveHandler, asyncio.AbstractEventLoop | None]]:
        with self._lock:
            return [(h, loop) for k, h, loop in self._handlers if k in ("*", kind)]
