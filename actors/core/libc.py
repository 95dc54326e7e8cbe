"""C library functions the kit calls through ``ctypes``, looked up once per process.

``libc_function("prctl")`` (thread names) and ``libc_function("malloc_trim")`` (the transfer
actor's heap trim) are each None where the C library lacks them (musl has no ``malloc_trim``;
macOS no ``prctl``): their callers then do without, as their docstrings say.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["libc_function"]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def libc_function(name: str) -> Any:
    """The C library's function ``name`` (errno kept for ``ctypes.get_errno``), or None if it has none."""
    lib = _libc()
    return getattr(lib, name, None) if lib is not None else None
