"""Envelope codec: messages/s encoded and decoded, beside msgpack on the same fields in the same run.

The message is a typical one: a 256-byte payload, both ids, a recipient and a
correlation id. ``encode_msgs_per_s`` times :func:`encode_message`;
``decode_msgs_per_s`` times :func:`decode_message`, which *validates* every
field (building the frozen ``Message`` runs its checks). ``stream_decode_msgs_per_s``
times a :class:`FrameDecoder` draining a 64 KiB-chunked stream of framed messages.

The baseline is ``msgpack.packb`` / ``unpackb`` of the same fields as a list
(msgpack is already a dependency: the in-node bus uses it). It does no
validation, so ``encode_ratio`` / ``decode_ratio`` (ours / msgpack) show what
strictness costs. A signed discovery ``Announce`` (JSON + Ed25519 sign/verify)
is timed too, for scale.

    .venv/bin/python benchmarks/codec.py [--quick] [--messages 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgpack
from _common import emit
from nacl.signing import SigningKey

from villagemesh.protocols.discovery import Capabilities, decode_discovery, encode_discovery, sign_announce
from villagemesh.protocols.envelope import (
    FrameDecoder,
    Message,
    Priority,
    decode_message,
    encode_message,
    frame_message,
)

MESSAGE = Message(
    id=bytes(range(16)),
    kind="DATA",
    sender="3f" * 16,
    recipient="a1" * 16,
    priority=Priority.NORMAL,
    created_at=1_700_000_000.25,
    ttl=86_400.0,
    correlation_id=bytes(range(16, 32)),
    payload=bytes(256),
)
FIELDS = [
    MESSAGE.version,
    MESSAGE.id,
    MESSAGE.kind,
    MESSAGE.sender,
    MESSAGE.recipient,
    int(MESSAGE.priority),
    MESSAGE.created_at,
    MESSAGE.ttl,
    MESSAGE.correlation_id,
    MESSAGE.payload,
]


def rate(fn: Callable[[], object], count: int) -> float:
    """Calls per second of ``fn`` over ``count`` calls."""
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - start)


def stream_rate(count: int) -> float:
    """Messages per second out of a FrameDecoder fed 64 KiB chunks."""
    stream = frame_message(MESSAGE) * count
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    decoder = FrameDecoder()
    received = 0
    start = time.perf_counter()
    for chunk in chunks:
        decoder.receive_data(chunk)
        while isinstance(decoder.next_event(), Message):
            received += 1
    elapsed = time.perf_counter() - start
    assert received == count
    return count / elapsed


def main(count: int, rounds: int) -> None:
    encoded = encode_message(MESSAGE)
    packed = msgpack.packb(FIELDS)
    assert decode_message(encoded) == MESSAGE
    key = SigningKey(bytes(32))
    caps = Capabilities(
        cpu_cores=4,
        ram_mb=8192,
        battery_percent=None,
        network_type="wifi",
        device_type="laptop",
        performance_tier="high",
        evolution_capacity=0.5,
        available_for_evolution=True,
        transports=("libp2p", "websocket"),
    )
    announce = sign_announce(key, addresses=("libp2p://127.0.0.1:4001",), capabilities=caps, timestamp=1.0)
    body = encode_discovery(announce)
    runs: dict[str, Callable[[], float]] = {
        "encode": lambda: rate(lambda: encode_message(MESSAGE), count),
        "msgpack_encode": lambda: rate(lambda: msgpack.packb(FIELDS), count),
        "decode": lambda: rate(lambda: decode_message(encoded), count),
        "msgpack_decode": lambda: rate(lambda: msgpack.unpackb(packed), count),
        "stream_decode": lambda: stream_rate(count),
        "announce_encode": lambda: rate(lambda: encode_discovery(announce), count // 50),
        "announce_decode": lambda: rate(lambda: decode_discovery(body), count // 50),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for name, run in runs.items():
            samples[name].append(run())
    med = {name: statistics.median(values) for name, values in samples.items()}
    emit(
        "codec",
        encode_msgs_per_s=round(med["encode"]),
        decode_msgs_per_s=round(med["decode"]),
        stream_decode_msgs_per_s=round(med["stream_decode"]),
        msgpack_encode_msgs_per_s=round(med["msgpack_encode"]),
        msgpack_decode_msgs_per_s=round(med["msgpack_decode"]),
        encode_ratio=round(med["encode"] / med["msgpack_encode"], 3),
        decode_ratio=round(med["decode"] / med["msgpack_decode"], 3),
        announce_encode_per_s=round(med["announce_encode"]),
        announce_decode_verify_per_s=round(med["announce_decode"]),
        message_bytes=len(encoded),
        msgpack_bytes=len(packed),
        messages_per_round=count,
        rounds=rounds,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a couple of seconds: 20000 messages, 3 rounds")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    main(20_000 if args.quick else args.messages, 3 if args.quick else args.rounds)
