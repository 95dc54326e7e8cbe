"""villagemesh.protocols."""
