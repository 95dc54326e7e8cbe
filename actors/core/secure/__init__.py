"""Authenticated sessions over the Noise secure channel: the kit's layer for every stream transport.

``keys`` (the node's Ed25519 identity on disk), ``session`` (the sans-I/O driver of one
authenticated session over :mod:`villagemesh.protocols.noise`), ``tcp`` (that session on an
asyncio stream: dial, serve a route, one envelope handler per connection).
"""
