"""`Eagle3DecodingConfig`: one frozen record of a call's settings, from the call, the head's config, the defaults."""

import dataclasses

import pytest
from transformers import GenerationConfig

from hf_eagle3.decoding.config import (
    DEFAULT_CHAIN_LENGTH,
    DEFAULT_EAGLE3_KNOBS,
    EXPLICIT_CHAIN_LENGTH_ATTRIBUTE,
    Eagle3DecodingConfig,
)


def test_the_call_wins_over_the_head_which_wins_over_the_defaults():
    call = GenerationConfig(eagle3_depth=4, num_assistant_tokens=20)
    head = GenerationConfig(eagle3_depth=9, eagle3_top_k=3, num_assistant_tokens=5)
    config = Eagle3DecodingConfig.resolve(call, head)
    assert (config.depth, config.top_k, config.total_tokens) == (4, 3, DEFAULT_EAGLE3_KNOBS["eagle3_total_tokens"])
    # transformers' own num_assistant_tokens default (20) is not the caller's choice: only the recorded one is.
    assert config.num_assistant_tokens == 5
    setattr(call, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, 2)
    assert Eagle3DecodingConfig.resolve(call, head).num_assistant_tokens == 2
    assert Eagle3DecodingConfig.resolve(GenerationConfig(), None) == Eagle3DecodingConfig()
    assert Eagle3DecodingConfig().num_assistant_tokens == DEFAULT_CHAIN_LENGTH
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 2


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mode="beam"), "eagle3_mode must be one of"),
        (dict(top_k=0), "eagle3_top_k must be a positive integer, got 0"),
        (dict(total_tokens=True), "eagle3_total_tokens must be a positive integer"),
        (dict(num_assistant_tokens=-1), "num_assistant_tokens must be a positive integer"),
        (dict(static_cache="yes"), "eagle3_static_cache must be None"),
        (dict(mode="chain", static_cache=True), "applies to tree decoding"),
        (dict(compile=1), "eagle3_compile must be True or False"),
        (dict(compile=True, static_cache=False), "eagle3_compile=True compiles the tree step on static caches"),
        (dict(calibration_prompts="Hello"), "eagle3_calibration_prompts must be a list of requests"),
        (dict(calibration_prompts=[]), "eagle3_calibration_prompts must hold at least one request"),
        (dict(calibration_prompts=["Hello", 3]), "each a non-empty string, got \\['Hello', 3\\]"),
        (dict(calibration_prompts=["Hello", " "]), "each a non-empty string"),
    ],
)
def test_bad_settings_fail_when_resolved(settings, message):
    with pytest.raises(ValueError, match=message):
        Eagle3DecodingConfig(**settings)


def test_calibration_prompts_come_from_the_call_or_the_head():
    """The requests the automatic tree calibrates on: a list in a (JSON) generation config, kept as a tuple."""
    head = GenerationConfig(eagle3_calibration_prompts=["Explain tides."])
    assert Eagle3DecodingConfig.resolve(GenerationConfig(), head).calibration_prompts == ("Explain tides.",)
    call = GenerationConfig(eagle3_calibration_prompts=["Sort a list in C.", "Plan a picnic."])
    assert Eagle3DecodingConfig.resolve(call, head).calibration_prompts == ("Sort a list in C.", "Plan a picnic.")
    assert Eagle3DecodingConfig.resolve(GenerationConfig(), None).calibration_prompts is None
    saved = GenerationConfig.from_dict(head.to_dict())
    assert Eagle3DecodingConfig.resolve(GenerationConfig(), saved).calibration_prompts == ("Explain tides.",)
