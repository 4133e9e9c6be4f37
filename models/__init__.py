"""slidestream.models (being built)."""
