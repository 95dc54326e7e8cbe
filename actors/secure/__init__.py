"""Authenticated sessions over the Noise secure channel."""
