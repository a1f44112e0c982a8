"""How the static runners encode a call's prompts into their caches: padded to a few lengths, and on CUDA replayed.

The steps of the static path have fixed shapes and replay as CUDA graphs, but a prompt's length is new at almost every
call, so its encoding ran eagerly: for a small model on a GPU, hundreds of kernel launches from Python, the largest
share of a short call's time outside the steps. Here a prompt is padded at its end to the next power of two (at least
`MIN_PADDED_LENGTH` tokens, at most the cache) and each padded length is captured once, in a memory pool of its own.

Padding cannot change what the prompt's positions compute: the padding queries come after every prompt token, which
attend causally as before and never see them. They see the prompt and themselves, so the cache entries they write (at
positions past the prompt) are finite; the steps keep those positions outside every mask until they overwrite them,
as they do with a tree's rejected nodes. The target's logits are taken at the prompt's last position
(`logits_to_keep` as an index, which the graph reads from a buffer), its features cut to the prompt. After the
encoding both caches are set to the lengths an unpadded encoding leaves. Arithmetic over a padded length can round
differently in the last bit (other kernel choices for other shapes), as transformers' own paths differ from each other.

Where the target does not take `logits_to_keep`, off CUDA, or where capture fails (with a warning, once per runner),
prompts are encoded eagerly and unpadded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .._compat import cache_kwargs
from .cuda_graphs import StepFunction, capture_steps
from .draft_tree import additive_mask
from .kv_cache import set_cache_length
from .sdpa_backends import shape_stable_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

    from ..modeling_eagle3 import Eagle3DraftModel
    from ..target_features import TargetFeatureCapture

logger = logging.get_logger(__name__)

MIN_PADDED_LENGTH = 64


def padded_length(length: int, max_cache_len: int) -> int:
    """The padded length a prompt of `length` tokens is encoded at: the next power of two, at least
    `MIN_PADDED_LENGTH`, at most the cache."""
    return min(max(MIN_PADDED_LENGTH, 1 << (length - 1).bit_length()), max_cache_len)


def pads_prompts(device: torch.device) -> bool:
    """Whether prompts are padded on `device`: where the padded encodings replay as CUDA graphs."""
    return device.type == "cuda"


class _PaddedEncoding:
    """The buffers of one padded length and the encoding over them (`step`: run directly, or replayed once
    captured)."""

    # Normal tensors even when built inside `torch.inference_mode()`: a later call outside it updates them in place.
    @torch.inference_mode(False)
    def __init__(self, encoder: PromptEncoder, batch_size: int, length: int):
        device = encoder.model.device
        self.length = length
        self.input_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.allowed = torch.zeros(batch_size, length, encoder.max_cache_len, dtype=torch.bool, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.encoder = encoder
        self.step = StepFunction(self.run)

    def fill(self, input_ids: torch.LongTensor, allowed: torch.BoolTensor, position_ids: torch.LongTensor) -> None:
        """Copy the prompts in; padding queries see every position up to their own."""
        prompt_length = input_ids.shape[1]
        padding = torch.arange(1, self.length - prompt_length + 1, device=input_ids.device)
        self.input_ids[:, :prompt_length].copy_(input_ids)
        self.input_ids[:, prompt_length:].zero_()
        self.position_ids[:, :prompt_length].copy_(position_ids)
        self.position_ids[:, prompt_length:].copy_(position_ids[:, -1:] + padding)
        self.allowed[:, :prompt_length].copy_(allowed)
        queries = torch.arange(prompt_length, self.length, device=input_ids.device)
        self.allowed[:, prompt_length:].copy_(self.encoder.columns <= queries[:, None])
        self.last.fill_(prompt_length - 1)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of the buffers: the target's float logits at the prompt's last position and its features."""
        return self.encoder.encode(self.input_ids, self.allowed, self.position_ids, self.last)

    def capture(self) -> None:
        """Record the encoding (running nothing) after a few warm-up runs, in a memory pool of its own."""
        capture_steps(self.input_ids.device, [self.step])


class PromptEncoder:
    """Encodes a call's prompts into a static runner's caches (`(batch, prompt)` ids, each query's visible cache
    positions `allowed` `(batch, prompt, max_cache_len)`, positions), from their start: padded and captured per padded
    length where `pads_prompts`, else eagerly."""

    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        target_cache: Cache,
        head_cache: Cache,
        columns: torch.LongTensor,
        capture_features: Callable[[], TargetFeatureCapture],
    ):
        self.model, self.draft_model = model, draft_model
        self.target_cache, self.head_cache = target_cache, head_cache
        self.columns = columns
        self.max_cache_len = columns.numel()
        self.capture_features = capture_features
        self.padded = pads_prompts(model.device)
        self.captured = model.device.type == "cuda"
        self.encodings: dict[tuple[int, int], _PaddedEncoding] = {}

    def encode(
        self,
        input_ids: torch.LongTensor,
        allowed: torch.BoolTensor,
        position_ids: torch.LongTensor,
        logits_to_keep: torch.LongTensor | int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both caches from their start: the target's float logits at the position `logits_to_keep` (an index, 1
        for the last, None where the target takes no such argument: every position is computed and the last taken)
        `(batch, vocab)` and its features at every position."""
        set_cache_length(self.target_cache, 0)
        set_cache_length(self.head_cache, 0)
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        # An eager encoding's prompt length is new at almost every call: no kernel that plans per shape.
        with shape_stable_attention():
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=additive_mask(allowed, self.model.dtype),
                position_ids=position_ids,
                use_cache=True,
                return_dict=True,
                **keep,
                **cache_kwargs(self.target_cache),
            )
            features = self.capture_features().pop()
            # The head encodes every prompt position but the last, whose successor (the first new token) is not
            # known yet: the first draft encodes it as a block with one new entry.
            if input_ids.shape[1] > 1:
                self.draft_model(
                    input_ids=input_ids[:, 1:],
                    target_hidden_states=features[:, :-1],
                    attention_mask=allowed[:, None, :-1],
                    position_ids=position_ids[:, :-1],
                    past_key_values=self.head_cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        return outputs.logits[:, -1].float(), features

    def __call__(
        self,
        input_ids: torch.LongTensor,
        allowed: torch.BoolTensor,
        position_ids: torch.LongTensor,
        model_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's float logits at the prompts' last position `(batch, vocab)` and its features at the prompts'
        positions; both caches then hold the prompts (the head all but their last position)."""
        # `generate` passes `logits_to_keep` where the model takes it.
        takes_logits_to_keep = "logits_to_keep" in model_kwargs
        if not self.padded or not takes_logits_to_keep:
            return self.encode(input_ids, allowed, position_ids, 1 if takes_logits_to_keep else None)
        batch_size, prompt_length = input_ids.shape
        key = (batch_size, padded_length(prompt_length, self.max_cache_len))
        encoding = self.encodings.get(key)
        new = encoding is None
        if new:
            encoding = _PaddedEncoding(self, *key)
        encoding.fill(input_ids, allowed, position_ids)
        if new and self.captured:
            try:
                encoding.capture()
            except RuntimeError as error:
                logger.warning_once(f"EAGLE-3 encodes prompts eagerly: their encoding could not be captured ({error})")
                self.padded = False
                return self.encode(input_ids, allowed, position_ids, 1)
        self.encodings[key] = encoding
        logits, features = encoding.step()
        set_cache_length(self.target_cache, prompt_length)
        set_cache_length(self.head_cache, prompt_length - 1)
        # The next replay of this length overwrites the graph's logits; the call may keep them (`output_logits`).
        return logits.clone(), features[:, :prompt_length]


__all__ = ["MIN_PADDED_LENGTH", "PromptEncoder", "padded_length", "pads_prompts"]
