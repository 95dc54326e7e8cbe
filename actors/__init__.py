"""villagemesh.actors."""
