"""fxprune.passes."""
