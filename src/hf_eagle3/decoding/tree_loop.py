"""The tree decoding loop: draft a tree, verify it in one target forward, accept, keep the path; until generation stops.

transformers' `_assisted_decoding` verifies one chain and crops its cache from the end, so the tree needs its own loop:
`tree_assisted_decoding` takes the same arguments and returns the same outputs. Greedy output is token-identical to the
target decoding alone, sampled output has exactly the target's distribution. It drives a `TreeDecoder` through the
steps: `DynamicTreeDecoder` (transformers' dynamic cache, eager forwards) or, where it applies,
`static_tree.StaticTreeRunner` (static caches, CUDA graphs).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation import GenerateDecoderOnlyOutput, GenerationConfig, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .._compat import CACHE_NAME, cache_kwargs
from ..target_features import TargetFeatureCapture
from . import static_tree
from .acceptance import (
    SampledPathDraw,
    TreePath,
    accept,
    accept_greedy,
    accept_on_device,
    uses_batched_greedy,
    uses_device_acceptance,
)
from .batched_tree import batched_tree_decoding
from .draft_tree import DraftTree
from .dynamic_tree import DynamicTreeDecoder
from .sdpa_backends import shape_stable_attention
from .stats import PhaseTimer
from .stopping import host_stop_rule

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer

    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig
    from .stats import Eagle3GenerationStats
    from .tree_decoder import TreeDecoder


@torch.no_grad()
def tree_assisted_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: BaseStreamer | None = None,
    *,
    draft_model: Eagle3DraftModel,
    decoding_config: Eagle3DecodingConfig,
    stats: Eagle3GenerationStats,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """EAGLE-3 decoding with dynamic draft trees; a drop-in for `GenerationMixin._assisted_decoding`.

    `draft_model` is the attached head; `decoding_config` gives the tree shape (`total_tokens`: nodes verified per
    step, root included; `depth`: most draft tokens per step = head forwards per step; `top_k`), `static_cache` (None
    picks the static-shape path where it applies, see `static_tree.use_static_tree`) and `compile` (compile the static
    path's steps); `stats` is updated once per verification. The inputs were checked by `checks.check_eagle3_inputs`.
    `model_kwargs` are what `generate` passes to `_assisted_decoding`: the cache, attention mask, position ids.
    A batch of several (left-padded) prompts is decoded by `batched_tree.batched_tree_decoding`.
    """
    batched_greedy = uses_batched_greedy(generation_config.do_sample, logits_processor, input_ids.device)
    if input_ids.shape[0] > 1:
        if streamer is not None:
            raise ValueError(
                f"transformers' streamers take one sequence, and this call decodes a batch of {input_ids.shape[0]}. "
                "Drop `streamer`, or call `generate` once per prompt to stream it."
            )
        return batched_tree_decoding(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            draft_model=draft_model,
            decoding_config=decoding_config,
            stats=stats,
            batched_greedy=batched_greedy,
            **model_kwargs,
        )
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    device_acceptance = not batched_greedy and uses_device_acceptance(do_sample, logits_processor, input_ids.device)
    stop_rule = host_stop_rule(stopping_criteria)
    timer = PhaseTimer(input_ids.device)

    def accept_step(
        logits: torch.Tensor,
        tree: DraftTree,
        path: TreePath | None,
        draw: SampledPathDraw | None,
        input_ids: torch.LongTensor,
        scores,
        raw_logits,
    ):
        if batched_greedy:
            return accept_greedy(logits, tree, input_ids, stopping_criteria, stop_rule, scores, raw_logits, path)
        if device_acceptance:
            return accept_on_device(
                logits,
                tree,
                decoding_config.depth,
                input_ids,
                logits_processor,
                do_sample,
                stopping_criteria,
                stop_rule,
                scores,
                raw_logits,
                draw,
            )
        step, input_ids, scores, raw_logits = accept(
            logits,
            tree.tokens,
            tree.children(),
            input_ids,
            logits_processor,
            stopping_criteria,
            do_sample,
            scores,
            raw_logits,
            stop_rule,
        )
        return step, torch.tensor(step.visited, device=tree.tokens.device), input_ids, scores, raw_logits

    with TargetFeatureCapture(model, draft_model.config.target_layer_ids) as capture, ExitStack() as contexts:
        timer.mark()
        decoder = _make_decoder(
            model,
            draft_model,
            capture,
            decoding_config,
            input_ids.device,
            generation_config.max_length,
            model_kwargs,
            batched_greedy=batched_greedy,
            keep_logits=scores is not None or raw_logits is not None,
        )
        static = isinstance(decoder, static_tree.StaticTreeRunner)
        if not static:
            # The dynamic cache gives almost every forward new shapes (see `sdpa_backends`).
            contexts.enter_context(shape_stable_attention())
        timer.mark("setup")
        first_logits = decoder.prefill(input_ids, model_kwargs)
        # The prompt's last token stands as the root of a tree without drafts.
        step, _, input_ids, scores, raw_logits = accept_step(
            first_logits, DraftTree.root_only(input_ids[0, -1]), None, None, input_ids, scores, raw_logits
        )
        if streamer is not None:
            streamer.put(torch.tensor([step.tokens]))
        finished = step.finished
        decoder.start(input_ids)
        timer.mark("prefill")

        while not finished:
            tree = decoder.draft(input_ids)
            timer.mark("draft")
            logits, path = decoder.verify()
            timer.mark("verify")
            step, visited, input_ids, scores, raw_logits = accept_step(
                logits, tree, path, decoder.sampled_path, input_ids, scores, raw_logits
            )
            decoder.commit(step, visited, input_ids)
            stats.record(step.num_accepted, len(step.tokens))
            if streamer is not None:
                streamer.put(torch.tensor([step.tokens]))
            finished = step.finished
            timer.mark("accept")

    if streamer is not None:
        streamer.end()
    stats.phase_seconds = timer.seconds()
    stats.static_cache = static
    stats.compiled = static and decoding_config.compile
    if return_dict:
        cache = model_kwargs[CACHE_NAME]
        if static:
            # The runner's caches serve the next call: the call's own cache gets a copy of the valid prefix.
            decoder.copy_prefix_to(cache, input_ids.shape[1] - 1)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, **cache_kwargs(cache))
    return input_ids


def _make_decoder(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    capture: TargetFeatureCapture,
    config: Eagle3DecodingConfig,
    device: torch.device,
    max_length: int,
    model_kwargs: dict[str, Any],
    batched_greedy: bool,
    keep_logits: bool,
) -> TreeDecoder:
    """The call's backend: the static-cache runner where it applies (see `eagle3_static_cache`) and could be built,
    else the dynamic-cache decoder."""
    total_tokens, depth, top_k = config.total_tokens, config.depth, config.top_k

    def build() -> static_tree.StaticTreeRunner:
        return static_tree.static_tree_runner(
            model,
            draft_model,
            capture,
            total_tokens,
            depth,
            top_k,
            max_length,
            batched_greedy=batched_greedy,
            keep_logits=keep_logits,
            compiled=config.compile,
        )

    runner = static_tree.static_runner(config, model, draft_model, device, model_kwargs, build)
    if runner is not None:
        return runner
    return DynamicTreeDecoder(model, draft_model, capture, total_tokens, depth, top_k, model_kwargs)


__all__ = ["tree_assisted_decoding"]
