"""slidestream.models.tissue (being built)."""
