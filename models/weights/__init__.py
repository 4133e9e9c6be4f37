"""slidestream.models.weights (being built)."""
