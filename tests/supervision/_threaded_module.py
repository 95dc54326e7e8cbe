"""A module that starts a thread at import time: the fork server must refuse to fork after importing it."""

from __future__ import annotations

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, daemon=True, name="started-at-import").start()


def run(arg: bytes) -> None:
    """Never reached: the server refuses to fork once this module is imported."""
