"""Triton kernels of fxprune, installed as ``fxprune.kernels``."""
