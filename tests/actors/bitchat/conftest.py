"""Fixtures of the BitChat tests: a private D-Bus system bus (python-dbusmock's, session-wide)."""

from dbusmock.pytest_fixtures import dbusmock_system

__all__ = ["dbusmock_system"]
