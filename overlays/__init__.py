"""slidestream.overlays (being built)."""
