"""Differences between the transformers releases we support (5.17 up to the newest)."""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the KV-cache argument and output field from `past_key_values` to `cache`
# (the old keyword still works there, with a deprecation warning on every call).
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword a stock causal LM takes its KV cache under, in this transformers release."""
    return {CACHE_NAME: cache}
