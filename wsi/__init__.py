"""slidestream.wsi (being built)."""
