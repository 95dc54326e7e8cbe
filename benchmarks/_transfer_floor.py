"""The floor under a verified, encrypted file transfer: the steps issue 20 requires and nothing else.

``benchmarks/transfer.py`` runs this beside the node, on the same file, in the same run. It answers
one question: how close to the secure channel's ceiling can *any* design come on this machine?

The steps are the ones the issue asks of every transfer, each done once, in the cheapest way
Python offers:

- the sender hashes the whole file first (SHA-256: the digest is announced up front), then per
  256 KiB chunk: ``os.pread``, CRC-32, ``SecureChannel.send`` of 64 KiB frames (ChaCha20-Poly1305,
  the project's own Noise session after a real handshake), ``sendall`` over loopback TCP;
- the receiver, per chunk: ``recv_into``, ``SecureChannel`` decryption, the CRC-32 check, the whole
  digest fed, ``os.pwrite`` into a ``.part`` file; at the end ``fsync``, ``os.replace`` and the
  digest sent back, which the sender checks before it stops the clock.

Nothing else: no acknowledgements (TCP's window is the only flow control), no commits, no
resumption, no priorities, no failover, no actors. Two shapes:

- ``floor_mib_per_s`` (``hops=False``): one thread per process does everything;
- ``floor_hop_mib_per_s`` (``hops=True``): the least the actor design allows, the socket owned by one
  thread and the file by another (a transport actor and the transfer actor), each chunk handed
  between them once per side over a ZeroMQ inproc PUSH/PULL pair, uncopied.

The receiver is a child process (``python _transfer_floor.py --receive HOPS OUT``) that prints its
port.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from villagemesh.protocols.noise import MAX_PLAINTEXT, NEED_DATA, Data, HandshakeComplete, SecureChannel

CHUNK = 256 * 1024
"""Bytes a chunk carries (the node's default chunk size)."""

HEADER = 4
"""The CRC-32 in front of each chunk."""

_END = b""
"""Handed between the threads: no more chunks."""


def _handshake(sock: socket.socket, channel: SecureChannel) -> None:
    """Drive ``channel``'s Noise handshake over ``sock`` until it completes."""
    while not isinstance(event := channel.next_event(), HandshakeComplete):
        if out := channel.data_to_send():
            sock.sendall(out)
        if event is NEED_DATA:
            if not (data := sock.recv(65536)):
                raise ConnectionError("the peer closed during the handshake")
            channel.receive_data(data)
    if out := channel.data_to_send():
        sock.sendall(out)


def _frames(channel: SecureChannel, framed: bytes | memoryview) -> bytes:
    """``framed`` as the secure channel's frames, ready for one ``sendall``."""
    view = memoryview(framed)
    return b"".join(channel.send(view[at : at + MAX_PLAINTEXT]) for at in range(0, len(view), MAX_PLAINTEXT))


def _pipe(context: Any, name: str) -> tuple[Any, Any]:
    """A connected inproc (PUSH, PULL) pair, at most 16 chunks queued between them."""
    import zmq

    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.setsockopt(zmq.SNDHWM, 16)
    pull.setsockopt(zmq.RCVHWM, 16)
    push.bind(f"inproc://{name}")
    pull.connect(f"inproc://{name}")
    return push, pull


class _Writer:
    """The receiver's file side: check each chunk, feed the digest, write it where it belongs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.part = out.with_name(out.name + ".part")
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.digest = hashlib.sha256()
        self.offset = 0

    def chunk(self, framed: bytes | memoryview) -> None:
        view = memoryview(framed)
        data = view[HEADER:]
        if zlib.crc32(data) != int.from_bytes(view[:HEADER], "big"):
            raise ValueError(f"chunk at offset {self.offset} fails its CRC-32")
        self.digest.update(data)
        os.pwrite(self.fd, data, self.offset)
        self.offset += len(data)

    def finish(self) -> bytes:
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.part, self.out)
        return self.digest.digest()


def receive(hops: bool, out: Path) -> None:
    """The child: accept one connection and take the file."""
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    channel = SecureChannel.responder(os.urandom(32), SigningKey.generate())
    _handshake(conn, channel)
    writer = _Writer(out)
    take: Callable[[bytes], None] = writer.chunk
    push = thread = None
    if hops:
        import zmq

        context = zmq.Context()
        push, pull = _pipe(context, "chunks")

        def write() -> None:
            while len(frame := pull.recv(copy=False).buffer):
                writer.chunk(frame)

        thread = threading.Thread(target=write, name="floor-file")
        thread.start()
        take = functools.partial(push.send, copy=False)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    pending = bytearray()
    recv_into, feed, next_event = conn.recv_into, channel.receive_data, channel.next_event
    whole = CHUNK + HEADER
    while n := recv_into(buffer):
        feed(view[:n])
        while isinstance(event := next_event(), Data):
            pending += event.data
            while len(pending) >= whole:
                take(bytes(pending[:whole]))
                del pending[:whole]
    if pending:
        take(bytes(pending))
    if push is not None and thread is not None:
        push.send(_END)
        thread.join()
    conn.sendall(writer.finish())
    conn.close()


def floor(path: Path, out: Path, hops: bool) -> float:
    """MiB/s of ``path`` through the floor to ``out``."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--receive", "1" if hops else "0", str(out)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as conn:
            channel = SecureChannel.initiator(os.urandom(32), SigningKey.generate())
            _handshake(conn, channel)
            start = time.perf_counter()
            size = send(conn, channel, path, hops)
            elapsed = time.perf_counter() - start
    finally:
        child.wait(60)
    if child.returncode != 0:
        raise RuntimeError(f"the floor's receiver exited with {child.returncode}")
    return size / (1 << 20) / elapsed


def send(conn: socket.socket, channel: SecureChannel, path: Path, hops: bool) -> int:
    """Hash ``path``, stream it, and check the digest the receiver sends back; its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256()
        for offset in range(0, size, 1 << 20):
            digest.update(os.pread(fd, 1 << 20, offset))
        whole = digest.digest()

        def framed(offset: int) -> bytes:
            chunk = os.pread(fd, CHUNK, offset)
            return zlib.crc32(chunk).to_bytes(HEADER, "big") + chunk

        if hops:
            import zmq

            context = zmq.Context()
            push, pull = _pipe(context, "chunks")

            def read() -> None:
                for offset in range(0, size, CHUNK):
                    push.send(framed(offset), copy=False)
                push.send(_END)

            thread = threading.Thread(target=read, name="floor-file")
            thread.start()
            while len(frame := pull.recv(copy=False).buffer):
                conn.sendall(_frames(channel, frame))
            thread.join()
            push.close()
            pull.close()
            context.term()
        else:
            for offset in range(0, size, CHUNK):
                conn.sendall(_frames(channel, framed(offset)))
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < len(whole) and (more := conn.recv(64)):
            answer += more
        if answer != whole:
            raise RuntimeError(f"the floor's receiver got digest {answer.hex()}, not {whole.hex()}")
        return size
    finally:
        os.close(fd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--receive", nargs=2, metavar=("HOPS", "OUT"), required=True)
    args = parser.parse_args()
    receive(args.receive[0] == "1", Path(args.receive[1]))
