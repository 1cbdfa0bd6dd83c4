"""fxprune.graph."""
