"""Runnable examples: ``python -m fxprune.examples.resnet``."""
