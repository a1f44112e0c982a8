"""The target decoding alone, as `generate` would decode the call without an assistant: a batch's fallback where no
draft tree pays (`batch_tree_shape`), and the step time the trees are compared with.

On the static path (`static_tree.use_static_tree`) the baseline a user compares with is transformers' static-cache
generate (`cache_implementation="static"`), whose decoding forward transformers compiles by itself on CUDA
(`_valid_auto_compile_criteria`); elsewhere it is the default dynamic cache. `decode_without_drafts` decodes the
call that way and `time_plain_steps` times the same decoding, so a batch falls back to exactly what it was compared
with. Both leave the decoding to transformers: the cache is made by its `_prepare_cache_for_generation` (its sizing
included: `max_cache_len`, and the longest length of earlier calls, which spares a recompilation), the tokens by its
`_sample`.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch

from .._compat import CACHE_NAME

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
    from transformers.generation import GenerateDecoderOnlyOutput
    from transformers.generation.streamers import BaseStreamer


def decode_without_drafts(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool,
    streamer: BaseStreamer | None,
    model_kwargs: dict[str, Any],
    static_cache: bool,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """`_sample` on the call's prepared inputs, processors and stopping criteria: the output `generate` gives without
    an assistant, with `cache_implementation="static"` on the static path (a static cache in place of the call's
    empty dynamic one, compiled on CUDA as transformers compiles it)."""
    if static_cache:
        generation_config = copy.copy(generation_config)
        generation_config.cache_implementation = "static"
        model_kwargs = {name: value for name, value in model_kwargs.items() if name != CACHE_NAME}
        # As `generate` sizes it: a position for every token but the last.
        model._prepare_cache_for_generation(
            generation_config,
            model_kwargs,
            generation_config.get_generation_mode(),
            input_ids.shape[0],
            generation_config.max_length - 1,
        )
    return model._sample(
        input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
    )


@torch.no_grad()
def time_plain_steps(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    new_tokens: int,
    rounds: int,
    static_cache: bool = False,
) -> float:
    """Seconds per step of the target's own greedy decoding of the batch (no drafts) on the path `static_cache` names:
    the fastest of `rounds` pairs of decodes, one of `new_tokens` tokens less one of a single token (the prefill). On
    CUDA the static path's first decode compiles, which the fastest round leaves out."""

    cache = {"cache_implementation": "static"} if static_cache else {}

    def seconds(max_new_tokens: int) -> tuple[float, int]:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **cache,
        )
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - start, output.shape[1] - input_ids.shape[1]

    fastest = float("inf")
    for _ in range(rounds):
        prefill, _ = seconds(1)
        total, steps = seconds(new_tokens)
        if steps > 1:
            fastest = min(fastest, max(total - prefill, 0.0) / (steps - 1))
    if fastest == float("inf"):
        raise RuntimeError("timing plain decoding of the batch decoded one token at most: every row ends at once.")
    return fastest


__all__ = ["decode_without_drafts", "time_plain_steps"]
