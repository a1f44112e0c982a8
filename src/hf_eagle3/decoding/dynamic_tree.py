"""Tree decoding on transformers' `DynamicCache`: the backend for every target and device, padded prompts included.

The target's cache is the call's own: the accepted path is gathered to the front of each verified tree block and the
rest is cropped away (`kv_cache.keep_cache_positions`), so it is what `generate` returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from .._compat import CACHE_NAME, cache_kwargs
from .acceptance import StepResult, TreePath, sampled_path
from .draft_tree import DraftTree, build_draft_tree
from .kv_cache import keep_cache_positions

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel
    from transformers.generation import LogitsProcessorList

    from ..modeling_eagle3 import Eagle3DraftModel
    from ..target_features import TargetFeatureCapture


def prefill_forward(
    model: PreTrainedModel, capture: TargetFeatureCapture, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target over the prompt(s) on the call's dynamic cache, as `_sample` runs its first forward: the logits at
    the last position `(batch, 1, vocab)` and the features `capture` took."""
    model_inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    if "logits_to_keep" in model_inputs:
        model_inputs["logits_to_keep"] = 1
    outputs = model(**model_inputs, return_dict=True)
    return outputs.logits, capture.pop()


class DynamicTreeDecoder:
    """Tree decoding on transformers' `DynamicCache`: eager forwards whose shapes follow the sequence.

    Works with any target whose cache `check_tree_cache` accepts, padded prompts included.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        capture: TargetFeatureCapture,
        total_tokens: int,
        depth: int,
        top_k: int,
        model_kwargs: dict[str, Any],
    ):
        self.model, self.draft_model, self.capture = model, draft_model, capture
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k
        self.cache = model_kwargs[CACHE_NAME]
        self.cache.activate_past_recording()
        self.draft_cache = DynamicCache()
        self.padding_mask = model_kwargs.get("attention_mask")
        self.position_ids = model_kwargs.get("position_ids")
        self.features: torch.Tensor | None = None  # the target's features of its last forward
        self.head_inputs: dict[str, Any] = {}
        self.root_position = 0
        self.prefix_length = 0
        self.tree: DraftTree | None = None

    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        logits, self.features = prefill_forward(self.model, self.capture, input_ids, model_kwargs)
        if self.position_ids is None:
            self.position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return logits[0, -1:].float()

    def start(self, input_ids: torch.LongTensor) -> None:
        # Position of the root (the newest token); transformers derives positions from the padding mask.
        self.root_position = int(self.position_ids[0, -1]) + 1
        if self.padding_mask is not None:
            self.padding_mask = torch.cat([self.padding_mask, self.padding_mask.new_ones(1, 1)], dim=-1)
        # The head encodes the prompt: features of position t with the embedding of token t + 1.
        self._set_head_inputs(input_ids[:, 1:], self.features, self.position_ids)

    def _set_head_inputs(self, tokens: torch.LongTensor, features: torch.Tensor, position_ids: torch.LongTensor):
        self.head_inputs = dict(
            input_ids=tokens,
            target_hidden_states=features,
            attention_mask=self.padding_mask[:, :-1] if self.padding_mask is not None else None,
            position_ids=position_ids,
        )

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        encoded = self.draft_model(
            **self.head_inputs, past_key_values=self.draft_cache, use_cache=True, logits_to_keep=1
        )
        self.prefix_length = input_ids.shape[1] - 1
        self.tree = build_draft_tree(
            self.draft_model,
            input_ids[0, -1],
            encoded.hidden_states[0, -1],
            encoded.logits[0, -1],
            self.draft_cache,
            self.root_position,
            self.padding_mask,
            self.total_tokens,
            self.depth,
            self.top_k,
        )
        return self.tree

    def verify(self) -> tuple[torch.Tensor, None]:
        outputs = self.model(
            input_ids=self.tree.tokens[None],
            attention_mask=self.tree.attention_mask(self.padding_mask, self.prefix_length, self.model.dtype),
            position_ids=self.tree.position_ids(self.root_position),
            use_cache=True,
            return_dict=True,
            **cache_kwargs(self.cache),
        )
        self.features = self.capture.pop()
        return outputs.logits[0].float(), None

    def sampled_path(
        self,
        logits: torch.Tensor,
        logits_processor: LogitsProcessorList,
        process: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, TreePath]:
        scores = process(logits)
        return scores, sampled_path(scores, self.tree, min(self.depth + 1, len(self.tree)))

    def commit(self, step: StepResult, visited: torch.LongTensor, input_ids: torch.LongTensor) -> None:
        # The root, and often the best first child, already sit where they stay: only the rest moves.
        in_place = next((i for i, node in enumerate(step.visited) if node != i), len(step.visited))
        keep_cache_positions(self.cache, self.prefix_length + in_place, visited[in_place:] - in_place)
        num_new = len(step.tokens)
        if self.padding_mask is not None:
            self.padding_mask = torch.cat([self.padding_mask, self.padding_mask.new_ones(1, num_new)], dim=-1)
        # The head encodes the kept nodes (old root and accepted drafts) with the embeddings of their successors.
        positions = torch.arange(self.root_position, self.root_position + num_new, device=input_ids.device)[None]
        self._set_head_inputs(input_ids[:, -num_new:], self.features[:, visited], positions)
        self.root_position += num_new


__all__ = ["DynamicTreeDecoder", "prefill_forward"]
