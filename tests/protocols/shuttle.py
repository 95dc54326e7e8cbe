"""Two sans-I/O protocol objects talking to each other, for tests: bytes shuttled both ways until quiet."""

from __future__ import annotations

from typing import Any, Protocol


class Endpoint(Protocol):
    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes) -> list[Any]: ...


def pump(a: Endpoint, b: Endpoint) -> tuple[list[Any], list[Any]]:
    """Shuttle bytes both ways until neither side has any to send; the events each side saw."""
    seen_a: list[Any] = []
    seen_b: list[Any] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return seen_a, seen_b
        seen_b += b.receive_data(to_b)
        seen_a += a.receive_data(to_a)
