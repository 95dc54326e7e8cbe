"""The BetaNet transport: a Sphinx mixnode relay (see .actor)."""
