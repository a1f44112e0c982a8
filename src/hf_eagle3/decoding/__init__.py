"""EAGLE-3 decoding inside transformers' `generate`: a chain candidate generator and dynamic draft trees."""

from .stats import Eagle3GenerationStats

__all__ = ["Eagle3GenerationStats"]
