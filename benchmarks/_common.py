"""Helpers shared by the benchmark scripts: percentiles and the closing JSON line."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": sys.platform}


def emit(benchmark: str, **figures: Any) -> None:
    """Print the one JSON line every benchmark ends with."""
    print(json.dumps({"benchmark": benchmark, **figures, "machine": machine()}, sort_keys=False))
