"""Route `target.generate(..., assistant_model=<Eagle3DraftModel>)` to EAGLE-3 decoding.

The path of `assistant_model` from `generate` to the verification forward:

1. `generate` prepares the generation config: the hook on `_prepare_generation_config` moves the `eagle3_*` kwargs
   onto it (transformers would reject them as unknown model kwargs) and records what the call itself set.
2. `generate` validates the generation mode: the hook on `_validate_generation_mode` runs
   `checks.check_generation_mode` for an EAGLE-3 head (beam search, several sequences, static caches, other candidate
   sources are errors) and rejects `eagle3_*` knobs without one.
3. `generate` calls `_assisted_decoding`; its hook runs `eagle3_assisted_decoding`: the call's settings are resolved
   once into an `Eagle3DecodingConfig` and the inputs checked once (`checks.check_eagle3_inputs`), the automatic tree
   shape filled in (`tree_shape.resolve_auto_tree`, for a batch `batch_tree_shape.resolve_batch_tree`: measured the
   first time, then cached; a batch that no tree speeds up decodes without drafts, as `generate` would without an
   assistant: `plain_decoding`); then tree mode runs `tree_loop.tree_assisted_decoding` (whose backend's `verify` is
   the target forward over the draft tree), and chain mode runs transformers' own loop with an
   `Eagle3CandidateGenerator`, which the hook on `_get_candidate_generator` hands it.

Why hooks and not a public seam: transformers picks the decoding method and the candidate generator in private
`GenerationMixin` methods, without a registry. `generate(custom_generate=callable)` would have to be passed on every
call, and it hands the callable neither `assistant_model` nor `streamer`; chain mode reuses `_assisted_decoding`, which
asks `_get_candidate_generator` for its generator. Each hook calls transformers' method unchanged unless the assistant
is an `Eagle3DraftModel` (or, for the first, `eagle3_*` kwargs are present). The first name used from `hf_eagle3`
installs them (`enable_eagle3_generation`); `disable_eagle3_generation()` puts transformers' methods back but for a
guard that refuses an EAGLE-3 assistant by name and says how to turn the hooks on again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationMixin
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.utils import logging

from ..modeling_eagle3 import Eagle3DraftModel
from .batch_tree_shape import resolve_batch_tree
from .candidate_generator import Eagle3CandidateGenerator
from .checks import check_eagle3_inputs, check_generation_mode, check_no_eagle3_knobs
from .config import (
    CALL_KNOBS_ATTRIBUTE,
    DEFAULT_EAGLE3_KNOBS,
    EXPLICIT_CHAIN_LENGTH_ATTRIBUTE,
    UNUSED_ASSISTED_KNOBS,
    Eagle3DecodingConfig,
)
from .plain_decoding import decode_without_drafts
from .sdpa_backends import shape_stable_attention
from .static_tree import use_static_tree
from .stats import Eagle3GenerationStats
from .tree_loop import tree_assisted_decoding
from .tree_shape import resolve_auto_tree

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.get_logger(__name__)


@dataclass
class Eagle3GenerateDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output with the EAGLE-3 statistics of the call."""

    eagle3_stats: Eagle3GenerationStats | None = None


# The chain generator of the running call, handed to transformers' own loop when it asks `_get_candidate_generator`
# (a ContextVar, so concurrent threads each see their own).
_active_generator: ContextVar[Eagle3CandidateGenerator | None] = ContextVar("_active_generator", default=None)
# The GenerationMixin attributes replaced while enabled: name -> (original, wrapper).
_installed: dict[str, tuple[Callable, Callable]] = {}
# While disabled (after having been enabled), the one method left wrapped to refuse EAGLE-3 heads by name:
# name -> (original, guard).
_GUARDED = "_validate_generation_mode"
_guard: dict[str, tuple[Callable, Callable]] = {}


def eagle3_assisted_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool,
    streamer,
    assistant_model: Eagle3DraftModel,
    model_kwargs: dict[str, Any],
    transformers_assisted_decoding: Callable[[], Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
):
    """EAGLE-3 decoding in place of `_assisted_decoding` (same arguments, same outputs plus `eagle3_stats`).

    `transformers_assisted_decoding` runs transformers' own loop on this call's arguments (chain mode); `tokenizer`
    (`generate(tokenizer=...)`) encodes the automatic tree's calibration requests.
    """
    draft = assistant_model
    config = Eagle3DecodingConfig.resolve(generation_config, getattr(draft, "generation_config", None))
    check_eagle3_inputs(model, draft, config, input_ids, generation_config, synced_gpus, model_kwargs)
    if not draft.has_target_embeddings:
        draft.attach_target(model)
    requested_static = config.static_cache
    if config.mode == "tree" and config.tree == "auto":
        resolve = resolve_batch_tree if input_ids.shape[0] > 1 else resolve_auto_tree
        config = resolve(
            model, draft, config, input_ids, model_kwargs, generation_config.do_sample, logits_processor, tokenizer
        )
    # A fresh record per call, also reachable from the head after the call.
    stats = Eagle3GenerationStats()
    draft.last_generation_stats = stats
    if config is None:
        # No tree pays at this batch size on this device: the target decodes alone, as `generate` would.
        logger.warning_once(
            f"EAGLE-3: no draft tree is expected to pay for a batch of {input_ids.shape[0]} on this device "
            "(see `batch_tree_shape`), so the batch decodes without drafts (eagle3_stats.plain_fallback). Set "
            "eagle3_total_tokens, eagle3_depth and eagle3_top_k to decode with drafts anyway."
        )
        stats.plain_fallback = True
        stats.static_cache = use_static_tree(requested_static, model, draft, input_ids.device, model_kwargs)
        result = decode_without_drafts(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus,
            streamer,
            model_kwargs,
            static_cache=stats.static_cache,
        )
    elif config.mode == "tree":
        result = tree_assisted_decoding(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer,
            draft_model=draft,
            decoding_config=config,
            stats=stats,
            **model_kwargs,
        )
        stats.tree_shape = (config.total_tokens, config.depth, config.top_k)
    else:
        generator = Eagle3CandidateGenerator(
            model, draft, generation_config, config, stats, logits_processor, stopping_criteria
        )
        token = _active_generator.set(generator)
        try:
            # Chain drafts and verifications change shape from step to step (see `sdpa_backends`).
            with generator, shape_stable_attention():
                result = transformers_assisted_decoding()
        finally:
            _active_generator.reset(token)
    if isinstance(result, GenerateDecoderOnlyOutput):
        result = Eagle3GenerateDecoderOnlyOutput(**result, eagle3_stats=stats)
    return result


def _bind(function: Callable, *args, **kwargs) -> dict:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _wrap_prepare_generation_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def _prepare_generation_config(self, generation_config=None, **kwargs):
        knobs = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("eagle3_")}
        unknown = sorted(set(knobs) - set(DEFAULT_EAGLE3_KNOBS))
        if unknown:
            raise ValueError(
                f"Unknown EAGLE-3 generate arguments {unknown}; the knobs are {sorted(DEFAULT_EAGLE3_KNOBS)}."
            )
        # What this call sets itself, as kwargs or in the generation config it passes (not the model's defaults).
        call_knobs = {name for name, value in knobs.items() if value is not None}
        for name in (*DEFAULT_EAGLE3_KNOBS, "num_assistant_tokens", *UNUSED_ASSISTED_KNOBS):
            if kwargs.get(name) is not None or getattr(generation_config, name, None) is not None:
                call_knobs.add(name)
        chain_length = kwargs.get("num_assistant_tokens")
        for config in (generation_config, getattr(self, "generation_config", None)):
            if chain_length is None and config is not None:
                chain_length = getattr(config, "num_assistant_tokens", None)
        generation_config, model_kwargs = original(self, generation_config, **kwargs)
        for name, value in knobs.items():
            setattr(generation_config, name, value)
        if call_knobs:
            setattr(generation_config, CALL_KNOBS_ATTRIBUTE, tuple(sorted(call_knobs)))
        if chain_length is not None:
            setattr(generation_config, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, chain_length)
        return generation_config, model_kwargs

    return _prepare_generation_config


def _wrap_validate_generation_mode(original: Callable) -> Callable:
    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        draft = generation_mode_kwargs.get("assistant_model")
        if isinstance(draft, Eagle3DraftModel):
            check_generation_mode(self, draft, generation_mode, generation_config)
        else:
            check_no_eagle3_knobs(generation_config, draft)
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    return _validate_generation_mode


def _wrap_get_candidate_generator(original: Callable) -> Callable:
    @functools.wraps(original)
    def _get_candidate_generator(self, *args, **kwargs):
        draft = _bind(original, self, *args, **kwargs)["assistant_model"]
        if not isinstance(draft, Eagle3DraftModel):
            return original(self, *args, **kwargs)
        active = _active_generator.get()
        if active is None or active.draft_model is not draft:
            raise RuntimeError(
                "An EAGLE-3 head drafts only inside `target.generate(..., assistant_model=head)`, which builds its "
                "candidate generator; call `generate` rather than transformers' private decoding methods."
            )
        return active

    return _get_candidate_generator


def _wrap_assisted_decoding(original: Callable) -> Callable:
    @functools.wraps(original)
    def _assisted_decoding(self, input_ids, *args, **kwargs):
        arguments = _bind(original, self, input_ids, *args, **kwargs)
        if not isinstance(arguments["assistant_model"], Eagle3DraftModel):
            return original(self, input_ids, *args, **kwargs)
        return eagle3_assisted_decoding(
            self,
            input_ids,
            arguments["logits_processor"],
            arguments["stopping_criteria"],
            arguments["generation_config"],
            arguments["synced_gpus"],
            arguments["streamer"],
            arguments["assistant_model"],
            arguments["model_kwargs"],
            functools.partial(original, self, input_ids, *args, **kwargs),
            arguments.get("tokenizer"),
        )

    return _assisted_decoding


_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "_prepare_generation_config": _wrap_prepare_generation_config,
    "_validate_generation_mode": _wrap_validate_generation_mode,
    "_get_candidate_generator": _wrap_get_candidate_generator,
    "_assisted_decoding": _wrap_assisted_decoding,
}


def enable_eagle3_generation() -> None:
    """Let `generate(assistant_model=<Eagle3DraftModel>)` run EAGLE-3 decoding (done on first use of `hf_eagle3`).

    Idempotent. Other assistants and generation modes keep transformers' behaviour exactly.
    """
    if _installed:
        return
    for name, (original, guard) in _guard.items():
        if GenerationMixin.__dict__.get(name) is not guard:
            raise RuntimeError(
                f"GenerationMixin.{name} was replaced by someone else after hf_eagle3 disabled EAGLE-3 generation; "
                "wrapping that change would keep refusing EAGLE-3 heads. Undo the other patch first."
            )
        setattr(GenerationMixin, name, original)
    _guard.clear()
    for name, make_wrapper in _WRAPPERS.items():
        original = GenerationMixin.__dict__[name]
        wrapper = make_wrapper(original)
        setattr(GenerationMixin, name, wrapper)
        _installed[name] = (original, wrapper)


def _refusing_eagle3_heads(original: Callable) -> Callable:
    """`_validate_generation_mode` while EAGLE-3 generation is disabled: transformers' own, except that an EAGLE-3
    head as assistant is refused by name (transformers would fail deep inside with an AttributeError)."""

    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if isinstance(generation_mode_kwargs.get("assistant_model"), Eagle3DraftModel):
            raise ValueError(
                "An Eagle3DraftModel drafts through hf_eagle3's generate hook, which disable_eagle3_generation() "
                "removed. Call hf_eagle3.enable_eagle3_generation() first, or generate without `assistant_model`."
            )
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    return _validate_generation_mode


def disable_eagle3_generation() -> None:
    """Restore transformers' own `GenerationMixin` methods; an EAGLE-3 head then no longer works as an assistant,
    and passing one raises an error that says so (the only check left in place)."""
    for name, (_, wrapper) in _installed.items():
        if GenerationMixin.__dict__.get(name) is not wrapper:
            raise RuntimeError(
                f"GenerationMixin.{name} was replaced by someone else after hf_eagle3 wrapped it; restoring "
                "transformers' method now would drop that change. Undo the other patch first."
            )
    for name, (original, _) in _installed.items():
        setattr(GenerationMixin, name, original)
    if _installed:
        original = _installed[_GUARDED][0]
        _guard[_GUARDED] = (original, _refusing_eagle3_heads(original))
        setattr(GenerationMixin, _GUARDED, _guard[_GUARDED][1])
    _installed.clear()


def is_eagle3_generation_enabled() -> bool:
    return bool(_installed)


__all__ = [
    "Eagle3GenerateDecoderOnlyOutput",
    "disable_eagle3_generation",
    "eagle3_assisted_decoding",
    "enable_eagle3_generation",
    "is_eagle3_generation_enabled",
]
