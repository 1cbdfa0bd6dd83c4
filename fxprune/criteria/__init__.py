"""Scoring criteria, one per file, registered by name."""
from . import bn_scale, catro, dimap, hessian, lamp, magnitude, random, taylor  # noqa: F401  (registration)
from .base import Criterion, ScoreContext, available, get_criterion, register_criterion

__all__ = ["Criterion", "ScoreContext", "available", "get_criterion", "register_criterion"]
