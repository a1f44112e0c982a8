"""EAGLE-3 decoding inside transformers' `generate`: dynamic draft trees (default) and a chain candidate generator.

`dispatch` routes `generate(assistant_model=<Eagle3DraftModel>)` here and holds the path from `generate` to the target's
verification forward; `config` and `checks` are a call's settings and input checks; `draft_tree`, `acceptance`,
`tree_processors`, `tree_decoder`, `dynamic_tree`, `static_tree` (with `prompt_encoding`, how its runners encode a
call's prompts) and `tree_loop` are tree mode, `tree_shape` the automatic tree (`calibration` the prompts its
acceptance is calibrated on), `batched_tree` (eager) and `batched_static_tree` (static caches) tree mode for a padded
batch of prompts, `batch_tree_shape` a batch's automatic tree and `plain_decoding` its decoding without drafts where no
tree pays; `candidate_generator` is chain mode.
"""

from .candidate_generator import Eagle3CandidateGenerator
from .config import Eagle3DecodingConfig
from .dispatch import (
    Eagle3GenerateDecoderOnlyOutput,
    disable_eagle3_generation,
    enable_eagle3_generation,
    is_eagle3_generation_enabled,
)
from .stats import Eagle3GenerationStats

__all__ = [
    "Eagle3CandidateGenerator",
    "Eagle3DecodingConfig",
    "Eagle3GenerateDecoderOnlyOutput",
    "Eagle3GenerationStats",
    "disable_eagle3_generation",
    "enable_eagle3_generation",
    "is_eagle3_generation_enabled",
]
