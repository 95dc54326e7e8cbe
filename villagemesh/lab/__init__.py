"""A lab of many hosts on one machine: network namespaces, one node process per host, faults.

- :mod:`villagemesh.lab.netns`: the hosts (namespaces on a private bridge, 10.77.0.0/16), cut and
  restore, partition and heal, power off and on; leftovers of killed runs removed at start;
- :mod:`villagemesh.lab.tapswitch`: a user-space switch for delay, jitter and loss (no netem here);
- :mod:`villagemesh.lab.agent`: a host's node process (the public API), driven by JSON lines;
- :mod:`villagemesh.lab.cluster`: the hosts and their nodes together, and the exactly-once check;
- :mod:`villagemesh.lab.chaos`: the seeded chaos run (``python -m villagemesh.lab.chaos``).

Needs root (or a user namespace) and iproute2; see ``docs/lab.md``.
"""

from __future__ import annotations

from villagemesh.lab.cluster import Cluster, LabHost
from villagemesh.lab.netns import NetLab, can_make_namespaces, cleanup_leftovers

__all__ = ["Cluster", "LabHost", "NetLab", "can_make_namespaces", "cleanup_leftovers"]
