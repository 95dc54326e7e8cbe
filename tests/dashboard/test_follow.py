"""The log follower: whole lines only, through rotation and truncation, in bounded memory."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from villagemesh.dashboard.follow import MAX_LINE, LogFollower


def line(event: str, **fields: object) -> str:
    return json.dumps({"event": event, "node": "n1", **fields}) + "\n"


def events(records: list[dict]) -> list[str]:
    return [r["event"] for r in records]


def test_a_missing_file_yields_nothing_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    follower = LogFollower(path)
    assert follower.poll() == []
    path.write_text(line("child_started"))
    assert events(follower.poll()) == ["child_started"]


def test_a_partial_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    whole = line("child_crashed", exc_type="ValueError")
    with open(path, "w") as log:
        follower = LogFollower(path)
        log.write(whole[:10])
        log.flush()
        assert follower.poll() == []
        log.write(whole[10:-1])
        log.flush()
        assert follower.poll() == []
        log.write("\n" + line("child_started"))
        log.flush()
        records = follower.poll()
    assert events(records) == ["child_crashed", "child_started"]
    assert records[0]["exc_type"] == "ValueError"


def test_rotation_reads_the_old_file_to_its_end_then_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line("a"))
    follower = LogFollower(path)
    assert events(follower.poll()) == ["a"]
    with open(path, "a") as log:
        log.write(line("b"))  # written before the rename: still the old file's
    os.rename(path, tmp_path / "events.jsonl.1")
    path.write_text(line("c"))
    assert events(follower.poll()) == ["b", "c"]
    assert follower.rotations == 1


def test_truncation_starts_again_from_the_top(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line("a") + line("b"))
    follower = LogFollower(path)
    assert events(follower.poll()) == ["a", "b"]
    with open(path, "r+") as log:  # copytruncate: same file, cut to nothing, then written again
        log.truncate(0)
    with open(path, "a") as log:
        log.write(line("c"))
    assert events(follower.poll()) == ["c"]
    assert follower.truncations == 1


def test_bad_and_oversized_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("not json\n[1, 2]\n" + "x" * (MAX_LINE + 10) + "\n" + line("after"))
    follower = LogFollower(path)
    assert events(follower.poll()) == ["after"]
    assert (follower.bad_lines, follower.oversized) == (2, 1)


def test_an_oversized_line_split_across_reads_is_skipped_whole(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with open(path, "w") as log:
        follower = LogFollower(path)
        log.write("y" * (MAX_LINE // 2))
        log.flush()
        assert follower.poll() == []
        log.write("y" * MAX_LINE)
        log.flush()
        assert follower.poll() == []
        log.write("y\n" + line("after"))
    assert events(follower.poll()) == ["after"]
    assert follower.oversized == 1


def test_from_the_end_skips_what_the_file_already_holds(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line("old"))
    follower = LogFollower(path, from_start=False)
    assert follower.poll() == []
    with open(path, "a") as log:
        log.write(line("new"))
    assert events(follower.poll()) == ["new"]


def test_a_copied_log_reads_like_the_original(tmp_path: Path) -> None:
    original = tmp_path / "a.jsonl"
    original.write_text("".join(line("e", seq=i) for i in range(50)))
    copy = tmp_path / "b.jsonl"
    copy.write_bytes(original.read_bytes())
    assert [r["seq"] for r in LogFollower(copy).poll()] == list(range(50))


@pytest.mark.slow
def test_a_100_mb_log_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    record = line(
        "message_delivered",
        peer="p" * 40,
        message_id="ab" * 16,
        attempts=1,
        traceback='  File "x.py", line 1, in f\n' * 40,
    )
    block = record * 4096
    with open(path, "w") as log:
        while log.tell() < 100 * 1024 * 1024:
            log.write(block)
    size = path.stat().st_size
    follower = LogFollower(path)
    tracemalloc.start()
    seen = 0
    try:
        while True:
            got = follower.poll(max_bytes=1024 * 1024)
            if not got:
                break
            seen += len(got)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        follower.close()
    assert seen == size // len(record)
    print(f"100 MB log: {seen} records, {size / 1e6:.0f} MB, peak traced memory {peak / 1e6:.1f} MB")
    assert peak < 32 * 1024 * 1024, f"peak {peak} bytes while reading a {size}-byte log"


def test_a_file_rotated_away_and_not_yet_recreated_is_read_on(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line("a"))
    follower = LogFollower(path)
    assert events(follower.poll()) == ["a"]
    os.rename(path, tmp_path / "events.jsonl.1")
    with open(tmp_path / "events.jsonl.1", "a") as old:
        old.write(line("late"))  # the writer has not reopened yet
    assert events(follower.poll()) == ["late"]
    path.write_text(line("new"))
    assert events(follower.poll()) == ["new"]
