"""MB/s through the secure channel with 64 KiB frames, beside raw ChaCha20-Poly1305 on the same data.

Two figures, each against its own baseline measured in the same run on the
same bytes (rounds alternate channel/raw and the median of each is kept, so
drift on a shared machine hits both alike):

- ``mb_per_s``: ``SecureChannel.send`` of 65519-byte chunks (the largest
  plaintext a 65535-byte Noise frame holds): nonce, one AEAD call, the 2-byte
  length, the join. Baseline ``raw_mb_per_s``: ``crypto_aead_chacha20poly1305_ietf_encrypt``
  alone on the same chunks with fresh nonces. ``ratio`` = mb_per_s / raw_mb_per_s,
  ``target`` 0.7 (from the issue).
- ``roundtrip_mb_per_s``: send, then the peer's ``receive_data`` + ``next_event``
  (framing, decryption, rekey check). Baseline ``raw_roundtrip_mb_per_s``: raw
  encrypt then raw decrypt. ``roundtrip_ratio`` likewise.

    .venv/bin/python benchmarks/secure_channel.py [--quick] [--megabytes 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from _common import emit
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt, crypto_aead_chacha20poly1305_ietf_encrypt
from nacl.signing import SigningKey

from villagemesh.protocols.noise import MAX_PLAINTEXT, NEED_DATA, Data, SecureChannel

TARGET = 0.7


def pair() -> tuple[SecureChannel, SecureChannel]:
    """Two channels with the handshake done."""
    initiator = SecureChannel.initiator(bytes(range(32)), SigningKey(bytes([1]) * 32))
    responder = SecureChannel.responder(bytes(range(32, 64)), SigningKey(bytes([2]) * 32))
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    initiator.receive_data(responder.data_to_send())
    initiator.next_event()
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    return initiator, responder


def channel_send(chunks: list[bytes]) -> float:
    sender, _ = pair()
    send = sender.send
    start = time.perf_counter()
    for chunk in chunks:
        send(chunk)
    return time.perf_counter() - start


def raw_encrypt(chunks: list[bytes]) -> float:
    key = bytes(range(32))
    pad = bytes(4)
    start = time.perf_counter()
    for n, chunk in enumerate(chunks):
        crypto_aead_chacha20poly1305_ietf_encrypt(chunk, b"", pad + n.to_bytes(8, "little"), key)
    return time.perf_counter() - start


def channel_roundtrip(chunks: list[bytes]) -> float:
    sender, receiver = pair()
    send, receive, next_event = sender.send, receiver.receive_data, receiver.next_event
    start = time.perf_counter()
    for chunk in chunks:
        receive(send(chunk))
        event = next_event()
    elapsed = time.perf_counter() - start
    assert isinstance(event, Data) and event.data == chunks[-1] and next_event() is NEED_DATA
    return elapsed


def raw_roundtrip(chunks: list[bytes]) -> float:
    key = bytes(range(32))
    pad = bytes(4)
    start = time.perf_counter()
    for n, chunk in enumerate(chunks):
        nonce = pad + n.to_bytes(8, "little")
        plain = crypto_aead_chacha20poly1305_ietf_decrypt(
            crypto_aead_chacha20poly1305_ietf_encrypt(chunk, b"", nonce, key), b"", nonce, key
        )
    elapsed = time.perf_counter() - start
    assert plain == chunks[-1]
    return elapsed


def median_rate(runs: list[Callable[[list[bytes]], float]], chunks: list[bytes], rounds: int) -> list[float]:
    """MB/s of each run, median over rounds that interleave the runs."""
    megabytes = sum(map(len, chunks)) / 1e6
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            times[i].append(run(chunks))
    return [megabytes / statistics.median(t) for t in times]


def main(megabytes: int, rounds: int) -> None:
    count = max(1, megabytes * 1_000_000 // MAX_PLAINTEXT)
    pool = [bytes([n]) * MAX_PLAINTEXT for n in range(16)]  # 1 MiB of distinct chunks, reused by reference
    chunks = [pool[n % len(pool)] for n in range(count)]
    channel, raw, channel_rt, raw_rt = median_rate(
        [channel_send, raw_encrypt, channel_roundtrip, raw_roundtrip], chunks, rounds
    )
    emit(
        "secure_channel",
        mb_per_s=round(channel, 1),
        raw_mb_per_s=round(raw, 1),
        ratio=round(channel / raw, 3),
        roundtrip_mb_per_s=round(channel_rt, 1),
        raw_roundtrip_mb_per_s=round(raw_rt, 1),
        roundtrip_ratio=round(channel_rt / raw_rt, 3),
        target=TARGET,
        frame_plaintext_bytes=MAX_PLAINTEXT,
        megabytes_per_round=round(count * MAX_PLAINTEXT / 1e6, 1),
        rounds=rounds,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 32 MB, 3 rounds")
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    main(32 if args.quick else args.megabytes, 3 if args.quick else args.rounds)
