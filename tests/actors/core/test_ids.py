"""Message ids: 16 bytes, unique, and ordered by the millisecond they were made in."""

from __future__ import annotations

import time

from villagemesh.actors.core.ids import RANDOM_BYTES, new_id, new_ids
from villagemesh.protocols.envelope import ID_BYTES


def stamp_ms(message_id: bytes) -> int:
    return int.from_bytes(message_id[: ID_BYTES - RANDOM_BYTES], "big")


def test_ids_are_sixteen_unique_bytes_stamped_with_the_millisecond_they_were_made_in() -> None:
    before = time.time_ns() // 1_000_000
    many = new_ids(10_000) + [new_id() for _ in range(1_000)]
    after = time.time_ns() // 1_000_000
    assert all(len(i) == ID_BYTES for i in many) and len(set(many)) == len(many)
    assert all(before <= stamp_ms(i) <= after for i in many)
    assert new_ids(0) == []


def test_ids_of_a_later_millisecond_sort_after_earlier_ones() -> None:
    first = new_ids(100)
    time.sleep(0.002)
    later = [*new_ids(100), new_id()]
    assert max(first) < min(later)  # what keeps the stores' indexes growing at one end
