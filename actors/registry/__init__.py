"""Peer registry actor: peers, capabilities, evolution priority; persisted in SQLite."""
