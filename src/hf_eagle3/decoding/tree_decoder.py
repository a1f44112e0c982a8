"""The interface between the tree loop and its two backends: the caches and forwards of tree decoding.

`dynamic_tree.DynamicTreeDecoder` runs them eagerly on transformers' dynamic cache; `static_tree.StaticTreeRunner` on
static caches with fixed shapes (CUDA graphs). The loop around them (`tree_loop`: acceptance, stopping, streaming,
outputs) is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers.generation import LogitsProcessorList

from .acceptance import StepResult, TreePath
from .draft_tree import DraftTree


class TreeDecoder(Protocol):
    """The caches and forwards of tree decoding, driven step by step by `tree_loop.tree_assisted_decoding`."""

    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the target over the prompt; return its float logits at the last position, `(1, vocab)`."""

    def start(self, input_ids: torch.LongTensor) -> None:
        """Prepare the first step, once the prefill's token has been appended to `input_ids`."""

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        """Grow the draft tree rooted at the last token of `input_ids`."""

    def verify(self) -> tuple[torch.Tensor, TreePath | None]:
        """Run the target over the tree: its float logits `(n, vocab)`, and the greedy path if it came along."""

    def sampled_path(
        self,
        logits: torch.Tensor,
        logits_processor: LogitsProcessorList,
        process: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, TreePath]:
        """The verified tree's processed scores `(n, vocab)` and `acceptance.sampled_path` over them, from its
        `logits`: `process` applies `logits_processor` eagerly, where the backend does not apply them itself."""

    def commit(self, step: StepResult, visited: torch.LongTensor, input_ids: torch.LongTensor) -> None:
        """Keep the `visited` nodes in both caches; the head encodes them in the next `draft`."""


__all__ = ["TreeDecoder"]
