"""villagemesh.supervision."""
