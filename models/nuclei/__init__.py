"""slidestream.models.nuclei (being built)."""
