"""The lab's radio: BitChat frames between node processes over Unix datagram sockets.

The lab's hosts have no Bluetooth adapter, and the in-memory air of the tests
(:class:`~villagemesh.actors.bitchat.radio.MemoryAir`) lives inside one process.
This medium joins node processes in different network namespaces: a path-bound
Unix socket is reached through the file system, which the namespaces share, so a
host whose cable is cut keeps its radio (as a phone out of Wi-Fi keeps its
Bluetooth). It is the one fake part of a lab host, standing in for radio physics:

- the air is a directory; a radio is the datagram socket ``<dir>/<peer id hex>.radio``;
- every radio in the directory is in range of every other, except those the lab
  puts out of range with :func:`jam` (the file ``<peer id hex>.jammed``: nobody
  hears that radio, and it hears nobody);
- a radio scans the directory every :data:`SCAN_S` seconds and greets each new
  neighbour with an empty datagram: ``LinkUp`` once the greeting went out (or one
  came in), ``LinkDown`` when a write finds nobody bound there (the node process
  was killed: its socket file stays, refusing), when the file is gone, or when a
  write has waited :data:`WRITE_TIMEOUT_S` for room in the neighbour's queue;
- a datagram is the sender's 8-byte peer id and one frame of at most :data:`MTU`
  bytes. Unix datagrams are neither lost nor reordered: what this air adds to the
  mesh is links that come and go, not noise.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from pathlib import Path

from villagemesh.actors.bitchat.radio import Frame, Handler, LinkDown, LinkUp
from villagemesh.errors import ConfigError, ConnectError

__all__ = ["MTU", "SCAN_S", "WRITE_TIMEOUT_S", "SocketRadio", "jam", "unjam"]

MTU = 512
"""The largest frame one write takes (BLE's usual ATT MTU)."""
SCAN_S = 0.1
"""Seconds between two scans of the air's directory for neighbours."""
WRITE_TIMEOUT_S = 0.25
"""Seconds a write waits for room in a neighbour's queue before that link counts as down."""
PEER_ID_BYTES = 8
_SUFFIX = ".radio"
_GONE = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.EPIPE)


def jam(directory: Path, peer: bytes) -> None:
    """Put the radio of ``peer`` out of everyone's range (its links go down within a scan)."""
    (Path(directory) / f"{peer.hex()}.jammed").touch()


def unjam(directory: Path, peer: bytes) -> None:
    """Bring it back in range."""
    (Path(directory) / f"{peer.hex()}.jammed").unlink(missing_ok=True)


class SocketRadio:
    """One node's radio on the air in ``directory`` (a :class:`~villagemesh.actors.bitchat.radio.Radio`)."""

    mtu = MTU

    def __init__(self, directory: str | os.PathLike[str], me: bytes) -> None:
        if not isinstance(me, bytes) or len(me) != PEER_ID_BYTES:
            raise ConfigError(f"a BitChat peer id is {PEER_ID_BYTES} bytes, got {me!r}")
        self.dir = Path(directory)
        self.me = me
        self.path = self.dir / f"{me.hex()}{_SUFFIX}"
        self.frames_sent = 0
        self.frames_heard = 0
        self.last_error: str | None = None
        """The last greeting that failed for another reason than nobody being there (greeted again next scan)."""
        self._up: set[bytes] = set()
        self._lock = threading.Lock()
        self._handler: Handler | None = None
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SocketRadio({str(self.dir)!r}, {self.me.hex()})"

    # -- the Radio interface ------------------------------------------------------------------------

    def start(self, handler: Handler) -> None:
        """Bind our socket (a stale one of an earlier run is replaced) and begin scanning and hearing."""
        if self._thread is not None:
            raise ConfigError(f"{self!r} is already started")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"radio socket {self.path}: {exc}") from exc
        sock.settimeout(WRITE_TIMEOUT_S)
        self._sock = sock
        self._handler = handler
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"air-{self.me.hex()}", daemon=True)
        self._thread.start()

    def send(self, peer: bytes, data: bytes) -> None:
        """Write one frame to ``peer``.

        Raises:
            ConnectError: no link to ``peer`` (or it went down on this write: its ``LinkDown`` follows).
        """
        if len(data) > self.mtu:
            raise ConfigError(f"a frame of {len(data)} bytes exceeds the radio's MTU of {self.mtu}")
        with self._lock:
            linked = peer in self._up
        if not linked or self._sock is None:
            raise ConnectError(f"no radio link to {peer.hex()}")
        try:
            self._sock.sendto(self.me + data, str(self._path_of(peer)))
        except (TimeoutError, OSError) as exc:
            self._down(peer)
            raise ConnectError(f"radio link to {peer.hex()} lost: {exc}") from exc
        self.frames_sent += 1

    def stop(self) -> None:
        """Links closed, no more events; our socket file removed (neighbours see it go)."""
        self._handler = None
        thread, self._thread = self._thread, None
        if thread is not None:
            os.write(self._wake_w, b"x")
            thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)
        with self._lock:
            self._up.clear()

    # -- the radio's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._handler is not None:
            self._scan()
            readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [], SCAN_S)
            if self._wake_r in readable:
                return
            if sock.fileno() in readable:
                self._drain(sock)

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                datagram = sock.recv(PEER_ID_BYTES + MTU + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                return  # closed by stop(): the loop ends at its next turn
            peer, data = datagram[:PEER_ID_BYTES], datagram[PEER_ID_BYTES:]
            if len(peer) != PEER_ID_BYTES or self._jammed(self.me) or self._jammed(peer):
                continue  # not from a radio of this air, or out of range: nothing was heard
            self._up_now(peer)
            if data:
                self.frames_heard += 1
                self._emit(Frame(peer, data))

    def _scan(self) -> None:
        """Greet the neighbours in range and not linked yet; drop the links to those gone or out of range."""
        present: set[bytes] = set()
        jammed_me = self._jammed(self.me)
        for entry in self.dir.glob(f"*{_SUFFIX}"):
            try:
                peer = bytes.fromhex(entry.name[: -len(_SUFFIX)])
            except ValueError:
                continue  # a file that is not a radio's: not ours to judge
            if peer == self.me or len(peer) != PEER_ID_BYTES or jammed_me or self._jammed(peer):
                continue
            present.add(peer)
            with self._lock:
                linked = peer in self._up
            if not linked:
                self._greet(peer)
        with self._lock:
            gone = self._up - present
        for peer in gone:
            self._down(peer)

    def _greet(self, peer: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(self.me, socket.MSG_DONTWAIT, str(self._path_of(peer)))
        except BlockingIOError:
            return  # its queue is full: greeted again at the next scan
        except OSError as exc:
            if exc.errno not in _GONE:  # _GONE: a socket file left by a killed process, nobody there
                self.last_error = f"greeting {peer.hex()}: {exc}"
            return
        self._up_now(peer)

    # -- links --------------------------------------------------------------------------------------

    def _up_now(self, peer: bytes) -> None:
        with self._lock:
            if peer in self._up:
                return
            self._up.add(peer)
        self._emit(LinkUp(peer))

    def _down(self, peer: bytes) -> None:
        with self._lock:
            if peer not in self._up:
                return
            self._up.discard(peer)
        self._emit(LinkDown(peer))

    def _emit(self, event: LinkUp | LinkDown | Frame) -> None:
        handler = self._handler
        if handler is not None:
            handler(event)

    def _path_of(self, peer: bytes) -> Path:
        return self.dir / f"{peer.hex()}{_SUFFIX}"

    def _jammed(self, peer: bytes) -> bool:
        return (self.dir / f"{peer.hex()}.jammed").exists()
