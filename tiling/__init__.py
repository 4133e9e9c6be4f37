"""slidestream.tiling (being built)."""
