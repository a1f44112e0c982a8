"""EAGLE-3 decoding inside transformers' `generate`: a chain candidate generator and dynamic draft trees."""

from .candidate_generator import Eagle3CandidateGenerator
from .dispatch import (
    Eagle3GenerateDecoderOnlyOutput,
    disable_eagle3_generation,
    enable_eagle3_generation,
    is_eagle3_generation_enabled,
)
from .stats import Eagle3GenerationStats

__all__ = [
    "Eagle3CandidateGenerator",
    "Eagle3GenerateDecoderOnlyOutput",
    "Eagle3GenerationStats",
    "disable_eagle3_generation",
    "enable_eagle3_generation",
    "is_eagle3_generation_enabled",
]
