"""slidestream.db (being built)."""
