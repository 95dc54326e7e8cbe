"""The lab fixture: hosts in network namespaces on a private bridge, a node process on each.

``make_cluster(n, **options)`` builds a :class:`~villagemesh.lab.Cluster` of ``n`` hosts under the
test's ``tmp_path`` and starts a node on each; every cluster made is torn down after the test
(namespaces deleted, processes killed) however the test ends, and a killed run's leftovers are
removed by the next lab's start. Where namespaces cannot be made at all (no root, no user
namespace, no iproute2) the tests skip, saying why; as root here they always run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from villagemesh.lab import Cluster, can_make_namespaces

MakeCluster = Callable[..., Cluster]


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = can_make_namespaces()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")


@pytest.fixture
def make_cluster(netns_available: None, tmp_path: Path) -> Iterator[MakeCluster]:
    made: list[Cluster] = []

    def make(n: int, *, start: bool = True, **options: Any) -> Cluster:
        cluster = Cluster(n, tmp_path / f"lab{len(made)}", **options)
        made.append(cluster)
        return cluster.up(start=start)

    yield make
    for cluster in made:
        cluster.down()
