"""Matchers assigning predicted queries to ground-truth segments (registered in MATCHER_REGISTRY)."""
from .build import build_matcher
from .fixed import FixedMatcher
from .hungarian import HungarianMatcher

__all__ = ["build_matcher", "FixedMatcher", "HungarianMatcher"]
