"""A short seeded chaos run under load: crashed actors, killed node processes, cut links; nothing lost or doubled.

The seed is new each run and printed (and named in the failure): ``VILLAGEMESH_CHAOS_SEED=S`` replays it
here, ``python -m villagemesh.lab.chaos --seed S`` at full length. ``make chaos`` runs 60 s.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from villagemesh.lab.chaos import run

pytestmark = pytest.mark.slow

HOSTS = 4
DURATION = 10.0


def test_a_short_chaos_run_delivers_every_message_exactly_once_and_the_log_accounts_for_every_crash(
    netns_available: None, tmp_path: Path
) -> None:
    seed = int(os.environ.get("VILLAGEMESH_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    report = run(seed, HOSTS, DURATION, tmp_path / "chaos")
    print(report.summary())
    assert report.ok, f"chaos seed {seed} failed (VILLAGEMESH_CHAOS_SEED={seed} replays it): {report.problems}"
    assert sum(report.faults.values()) > 0 and report.sent > 0
    assert report.handled == report.sent
