"""WebSocket transport actor (aiohttp), served through the acceptor's port."""
