"""Route `target.generate(..., assistant_model=<Eagle3DraftModel>)` to EAGLE-3 decoding.

transformers chooses a candidate generator in the private `GenerationMixin._get_candidate_generator`, a fixed
chain of `if`s with no registry, so one argument can only reach EAGLE-3 through a hook. `import hf_eagle3`
calls `enable_eagle3_generation()`, which wraps four `GenerationMixin` methods; `disable_eagle3_generation()`
puts the originals back, but for a guard that refuses an EAGLE-3 assistant by name. Each wrapper calls the
original unchanged unless the assistant is an `Eagle3DraftModel` (the first one only takes the `eagle3_*`
arguments out of the way):

- `_prepare_generation_config`: moves the `eagle3_*` generate kwargs onto the call's generation config (as
  custom entries, like any knob a generation config carries; transformers would reject them as unknown model
  kwargs) and records the `num_assistant_tokens` the caller chose, before transformers fills in its default.
- `_validate_generation_mode`: rejects what EAGLE-3 cannot honour (beam search, several return sequences,
  static caches, a second candidate source) with errors that name the fix.
- `_assisted_decoding`: builds the `Eagle3CandidateGenerator`. Tree mode runs
  `hf_eagle3.decoding.tree.tree_assisted_decoding` with exactly `_assisted_decoding`'s arguments; chain mode
  runs transformers' own loop with the feature hooks on. The statistics go on a dict output.
- `_get_candidate_generator`: yields that generator for an EAGLE-3 assistant.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from transformers import GenerationMixin
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS, GenerationMode

from ..modeling_eagle3 import Eagle3DraftModel
from .candidate_generator import DEFAULT_EAGLE3_KNOBS, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, Eagle3CandidateGenerator
from .stats import Eagle3GenerationStats


@dataclass
class Eagle3GenerateDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output with the EAGLE-3 statistics of the call."""

    eagle3_stats: Eagle3GenerationStats | None = None


# The generator `_assisted_decoding` built for the running call, handed to transformers' own loop when it asks
# `_get_candidate_generator` (a ContextVar, so concurrent threads each see their own).
_active_generator: ContextVar[Eagle3CandidateGenerator | None] = ContextVar("_active_generator", default=None)
# The GenerationMixin attributes replaced while enabled: name -> (original, wrapper).
_installed: dict[str, tuple[Callable, Callable]] = {}
# While disabled (after having been enabled), the one method left wrapped to refuse EAGLE-3 heads by name:
# name -> (original, guard).
_GUARDED = "_validate_generation_mode"
_guard: dict[str, tuple[Callable, Callable]] = {}


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
        chain_length = kwargs.get("num_assistant_tokens")
        for config in (generation_config, getattr(self, "generation_config", None)):
            if chain_length is None and config is not None:
                chain_length = getattr(config, "num_assistant_tokens", None)
        generation_config, model_kwargs = original(self, generation_config, **kwargs)
        for name, value in knobs.items():
            setattr(generation_config, name, value)
        if chain_length is not None:
            setattr(generation_config, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, chain_length)
        return generation_config, model_kwargs

    return _prepare_generation_config


def check_eagle3_generation_mode(target, draft: Eagle3DraftModel, generation_mode, generation_config) -> None:
    """Raise a clear error for generate settings EAGLE-3 decoding cannot honour."""
    draft.check_target(target)
    if generation_mode != GenerationMode.ASSISTED_GENERATION:
        raise ValueError(
            f"EAGLE-3 speculative decoding runs greedy decoding or sampling, but these settings select "
            f"{generation_mode.value!r} (num_beams={generation_config.num_beams}), which would silently ignore the "
            "assistant. Use num_beams=1 with the EAGLE-3 head, or drop `assistant_model` for beam search."
        )
    if generation_config.num_return_sequences > 1:
        raise ValueError(
            f"EAGLE-3 decoding produces one sequence per call; got num_return_sequences="
            f"{generation_config.num_return_sequences}. Call `generate` once per sample (with do_sample=True)."
        )
    if generation_config.cache_implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"EAGLE-3 decoding manages the target's KV cache itself (it rolls it back after every verification; "
            f"tree mode brings its own static caches on CUDA, see `eagle3_static_cache`), so "
            f"cache_implementation={generation_config.cache_implementation!r} cannot apply. Drop "
            "`cache_implementation` to use the default dynamic cache."
        )
    other_sources = {
        "prompt_lookup_num_tokens": getattr(generation_config, "prompt_lookup_num_tokens", None),
        "assistant_early_exit": getattr(generation_config, "assistant_early_exit", None),
        "use_mtp": getattr(generation_config, "use_mtp", None) or None,
        "speculation_type": getattr(generation_config, "speculation_type", None),
    }
    chosen = {name: value for name, value in other_sources.items() if value is not None}
    if chosen:
        raise ValueError(
            f"Both an EAGLE-3 head and {chosen} ask to propose draft tokens; transformers can use one candidate "
            "source per call. Drop those settings or drop `assistant_model`."
        )


def _wrap_validate_generation_mode(original: Callable) -> Callable:
    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        draft = generation_mode_kwargs.get("assistant_model")
        if isinstance(draft, Eagle3DraftModel):
            check_eagle3_generation_mode(self, draft, generation_mode, generation_config)
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    return _validate_generation_mode


def _wrap_get_candidate_generator(original: Callable) -> Callable:
    @functools.wraps(original)
    def _get_candidate_generator(self, *args, **kwargs):
        arguments = _bind(original, self, *args, **kwargs)
        draft = arguments["assistant_model"]
        if not isinstance(draft, Eagle3DraftModel):
            return original(self, *args, **kwargs)
        active = _active_generator.get()
        if active is not None and active.draft_model is draft:
            return active
        return Eagle3CandidateGenerator(
            self,
            draft,
            arguments["generation_config"],
            arguments["input_ids"],
            logits_processor=arguments["logits_processor"],
            model_kwargs=arguments["model_kwargs"],
        )

    return _get_candidate_generator


def _wrap_assisted_decoding(original: Callable) -> Callable:
    @functools.wraps(original)
    def _assisted_decoding(self, input_ids, *args, **kwargs):
        arguments = _bind(original, self, input_ids, *args, **kwargs)
        draft = arguments["assistant_model"]
        if not isinstance(draft, Eagle3DraftModel):
            return original(self, input_ids, *args, **kwargs)
        model_kwargs = arguments["model_kwargs"]
        generator = Eagle3CandidateGenerator(
            self,
            draft,
            arguments["generation_config"],
            input_ids,
            logits_processor=arguments["logits_processor"],
            stopping_criteria=arguments["stopping_criteria"],
            model_kwargs=model_kwargs,
        )
        if generator.mode == "tree":
            from .tree import tree_assisted_decoding

            result = tree_assisted_decoding(
                self,
                input_ids,
                generator,
                arguments["logits_processor"],
                arguments["stopping_criteria"],
                arguments["generation_config"],
                arguments["synced_gpus"],
                arguments["streamer"],
                **model_kwargs,
            )
        else:
            token = _active_generator.set(generator)
            try:
                with generator:
                    result = original(self, input_ids, *args, **kwargs)
            finally:
                _active_generator.reset(token)
        if isinstance(result, GenerateDecoderOnlyOutput):
            result = Eagle3GenerateDecoderOnlyOutput(**result, eagle3_stats=generator.stats)
        return result

    return _assisted_decoding


_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "_prepare_generation_config": _wrap_prepare_generation_config,
    "_validate_generation_mode": _wrap_validate_generation_mode,
    "_get_candidate_generator": _wrap_get_candidate_generator,
    "_assisted_decoding": _wrap_assisted_decoding,
}


def enable_eagle3_generation() -> None:
    """Let `generate(assistant_model=<Eagle3DraftModel>)` run EAGLE-3 decoding (done on `import hf_eagle3`).

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
    "check_eagle3_generation_mode",
    "disable_eagle3_generation",
    "enable_eagle3_generation",
    "is_eagle3_generation_enabled",
]
