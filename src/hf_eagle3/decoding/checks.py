"""Everything a `generate` call with an EAGLE-3 head is checked for, before any forward runs; each check runs once.

`check_generation_mode` runs where transformers validates the generation mode (also for modes that would never reach
the assistant, such as beam search); `check_eagle3_inputs` runs once the call's `Eagle3DecodingConfig` is resolved.
Settings that change the output and cannot be honoured are errors; assisted-generation knobs that only tune another
kind of assistant's speed are accepted with a warning naming them, as transformers warns about flags that have no
effect in the chosen generation mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import StaticCache
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS, GenerationMode
from transformers.utils import logging

from .._compat import CACHE_NAME
from .config import CALL_KNOBS_ATTRIBUTE, DEFAULT_EAGLE3_KNOBS, TREE_KNOBS, UNUSED_ASSISTED_KNOBS
from .kv_cache import check_tree_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig

logger = logging.get_logger(__name__)

# Attention implementations that apply an arbitrary additive 4D mask (flash attention only knows causal).
TREE_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def check_no_eagle3_knobs(generation_config: GenerationConfig, assistant_model: Any) -> None:
    """Raise when the call sets `eagle3_*` knobs but its assistant is not an EAGLE-3 head: nothing would read them."""
    knobs = sorted(
        name for name in getattr(generation_config, CALL_KNOBS_ATTRIBUTE, ()) if name in DEFAULT_EAGLE3_KNOBS
    )
    if knobs:
        given = (
            "no assistant_model" if assistant_model is None else f"assistant_model={type(assistant_model).__name__}"
        )
        raise ValueError(
            f"{knobs} configure EAGLE-3 decoding, which runs only with an EAGLE-3 head as the assistant, but this "
            f"call has {given}. Pass `assistant_model=<Eagle3DraftModel>`, or drop those arguments."
        )


def check_generation_mode(
    target: PreTrainedModel, draft: Eagle3DraftModel, generation_mode: GenerationMode, generation_config
) -> None:
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
    if getattr(generation_config, "assistant_ensemble_weight", None) is not None:
        raise ValueError(
            f"assistant_ensemble_weight={generation_config.assistant_ensemble_weight} asks for ensemble verification, "
            "which mixes the assistant's distribution into the output; EAGLE-3 decoding keeps the target's output "
            "exactly and does not implement it. Drop `assistant_ensemble_weight`."
        )


def _warn_unused_knobs(config: Eagle3DecodingConfig, generation_config: GenerationConfig) -> None:
    """Warn about the knobs this call set that its decoding mode does not read."""
    call_knobs = set(getattr(generation_config, CALL_KNOBS_ATTRIBUTE, ()))
    unused = [name for name in UNUSED_ASSISTED_KNOBS if name in call_knobs]
    if config.mode == "tree" and "num_assistant_tokens" in call_knobs:
        unused.append("num_assistant_tokens")
    if config.mode == "chain":
        unused += [name for name in TREE_KNOBS if name in call_knobs]
    elif config.tree == "fixed" and "eagle3_calibration_prompts" in call_knobs:
        unused.append("eagle3_calibration_prompts")  # they calibrate the automatic tree only
    if unused:
        logger.warning(
            f"EAGLE-3 {config.mode} decoding does not use {unused}: they have no effect on this call. The knobs of "
            f"tree mode are {sorted(TREE_KNOBS)} (eagle3_calibration_prompts with the automatic tree only, "
            "eagle3_tree='auto' and no shape knob); chain mode drafts `num_assistant_tokens` tokens per step."
        )


def check_eagle3_inputs(
    model: PreTrainedModel,
    draft: Eagle3DraftModel,
    config: Eagle3DecodingConfig,
    input_ids: torch.LongTensor,
    generation_config: GenerationConfig,
    synced_gpus: bool,
    model_kwargs: dict[str, Any],
) -> None:
    """Clear errors for what this call's decoding mode cannot do with these inputs, before any forward runs."""
    if input_ids.shape[0] > 1:
        _check_batch(config, input_ids, model_kwargs)
    if config.mode == "chain" and isinstance(model_kwargs.get(CACHE_NAME), StaticCache):
        raise ValueError(
            "EAGLE-3 decoding rolls the target's KV cache back after every verification, which a StaticCache "
            "cannot do. Let `generate` create its default dynamic cache (pass no cache object)."
        )
    draft.check_vocab_maps()
    _warn_unused_knobs(config, generation_config)
    if config.mode == "tree":
        _check_tree_inputs(model, draft, config, input_ids, generation_config, synced_gpus, model_kwargs)


def _check_tree_inputs(
    model: PreTrainedModel,
    draft: Eagle3DraftModel,
    config: Eagle3DecodingConfig,
    input_ids: torch.LongTensor,
    generation_config: GenerationConfig,
    synced_gpus: bool,
    model_kwargs: dict[str, Any],
) -> None:
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("EAGLE-3 decoding embeds the prompt tokens itself: pass `input_ids`, not `inputs_embeds`.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("EAGLE-3 decoding requires `use_cache=True`.")
    if synced_gpus:
        raise ValueError("EAGLE-3 tree decoding does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP generation).")
    if generation_config.return_dict_in_generate and (
        generation_config.output_attentions or generation_config.output_hidden_states
    ):
        raise ValueError(
            "EAGLE-3 tree decoding cannot return attentions or hidden states (tree forwards have no per-token ones); "
            "drop `output_attentions`/`output_hidden_states` or pass eagle3_mode='chain'."
        )
    implementation = model.config.get_text_config()._attn_implementation
    if implementation not in TREE_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"EAGLE-3 tree decoding verifies the draft tree with a 4D attention mask, which the target's attention "
            f"implementation {implementation!r} cannot take. Load the target with attn_implementation='sdpa' (or "
            "'eager'), e.g. `model.set_attn_implementation('sdpa')`, or pass eagle3_mode='chain'."
        )
    draft_vocab = draft.config.draft_vocab_size
    # The automatic tree's shape is filled in later, from shapes that fit the draft vocabulary.
    if config.tree == "fixed" and (config.total_tokens < 2 or not config.top_k <= draft_vocab):
        raise ValueError(
            f"Invalid draft tree shape total_tokens={config.total_tokens}, depth={config.depth}, top_k={config.top_k}: "
            f"need total_tokens >= 2 (root plus at least one draft node) and top_k <= the draft vocabulary "
            f"({draft_vocab})."
        )
    max_length = generation_config.max_length
    if input_ids.shape[0] > 1:
        # The rows' caches grow by the longest accepted run of each step: up to `depth + 1` entries per token.
        max_length = input_ids.shape[1] + (max_length - input_ids.shape[1]) * (config.depth + 1)
    check_tree_cache(model_kwargs.get(CACHE_NAME), max_length)


def _check_batch(config: Eagle3DecodingConfig, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> None:
    """Clear errors for a batch of several prompts that batched tree decoding cannot take."""
    batch = input_ids.shape[0]
    if config.mode == "chain":
        raise ValueError(
            f"EAGLE-3 chain mode runs transformers' assisted-decoding loop, which decodes one sequence at a time; got "
            f"a batch of {batch}. Pass eagle3_mode='tree' (the default) to decode the batch at once, or call "
            "`generate` once per prompt."
        )
    padding_mask = model_kwargs.get("attention_mask")
    if padding_mask is not None and not bool(padding_mask[:, -1].all()):
        raise ValueError(
            "EAGLE-3 decodes a batch from the last token of every row, but some rows end in padding (right padding). "
            "Pad on the left: `tokenizer.padding_side = 'left'`."
        )
    cache = model_kwargs.get(CACHE_NAME)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"EAGLE-3 decodes a batch of {batch} prompts from an empty cache, but this call passes a filled one. "
            "Pass the whole sequences without `past_key_values`, or continue one prompt at a time."
        )


__all__ = ["check_eagle3_inputs", "check_generation_mode", "check_no_eagle3_knobs"]
