"""The `generate` hook: EAGLE-3 heads are routed to EAGLE-3 decoding, everything else is stock transformers."""

import pytest
import torch
from conftest import make_head, make_target
from transformers import GenerationConfig, GenerationMixin, StoppingCriteria
from transformers.cache_utils import StaticCache
from transformers.generation import LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

from hf_eagle3 import Eagle3DraftModel, disable_eagle3_generation, enable_eagle3_generation
from hf_eagle3._compat import CACHE_NAME
from hf_eagle3.decoding import Eagle3DecodingConfig, dispatch
from hf_eagle3.target_features import get_decoder_layers

PROMPT = torch.tensor([[11, 23, 5, 42, 7]])


def _stock_outputs(target, assistant):
    """Outputs of several generation modes and assistants, seeded where they sample."""
    results = []
    for kwargs in (
        dict(do_sample=False),
        dict(do_sample=True, top_k=5),
        dict(num_beams=3, do_sample=False),
        dict(prompt_lookup_num_tokens=3, do_sample=False),
        dict(assistant_model=assistant, do_sample=False),
        dict(assistant_model=assistant, do_sample=True),
    ):
        torch.manual_seed(0)
        results.append(target.generate(PROMPT, max_new_tokens=8, **kwargs))
    return results


def test_other_modes_and_assistants_are_untouched():
    target, assistant = make_target("llama", seed=0), make_target("llama", num_hidden_layers=4, seed=1)
    patched = {name: GenerationMixin.__dict__[name] for name in dispatch._WRAPPERS}
    hooked = _stock_outputs(target, assistant)
    disable_eagle3_generation()
    try:
        assert all(GenerationMixin.__dict__[name] is not patched[name] for name in patched)
        stock = _stock_outputs(target, assistant)
    finally:
        enable_eagle3_generation()
    for hooked_output, stock_output in zip(hooked, stock, strict=True):
        assert torch.equal(hooked_output, stock_output)
    # eagle3_* knobs without an EAGLE-3 head would be read by nobody: an error, not silently ignored input.
    for assistant_kwargs in ({}, {"assistant_model": assistant}):
        with pytest.raises(ValueError, match=r"\['eagle3_mode'\] configure EAGLE-3 decoding"):
            target.generate(PROMPT, max_new_tokens=8, eagle3_mode="chain", **assistant_kwargs)
    with pytest.raises(ValueError, match=r"\['eagle3_depth'\] configure EAGLE-3 decoding.*no assistant_model"):
        target.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=8, eagle3_depth=3))


def test_enable_and_disable_are_reversible():
    originals = {name: original for name, (original, _) in dispatch._installed.items()}
    disable_eagle3_generation()
    try:
        guarded = GenerationMixin.__dict__["_validate_generation_mode"]
        assert guarded.__wrapped__ is originals.pop("_validate_generation_mode")
        assert all(GenerationMixin.__dict__[name] is original for name, original in originals.items())
        head_target = make_target("llama")
        # Stock transformers cannot use an EAGLE-3 head at all; the guard left in place says so by name.
        with pytest.raises(ValueError, match=r"disable_eagle3_generation\(\) removed.*enable_eagle3_generation"):
            head_target.generate(PROMPT, max_new_tokens=4, assistant_model=make_head(head_target))
    finally:
        enable_eagle3_generation()
    enable_eagle3_generation()  # idempotent
    assert all(GenerationMixin.__dict__[name] is wrapper for name, (_, wrapper) in dispatch._installed.items())


@pytest.fixture
def fake_tree(monkeypatch):
    """Replace the tree loop by a recorder that returns the prompt plus one token."""
    calls = []

    def tree_assisted_decoding(model, input_ids, *args, draft_model, decoding_config, stats, **model_kwargs):
        calls.append((model, input_ids, decoding_config, args, model_kwargs, draft_model, stats))
        return torch.cat([input_ids, input_ids[:, -1:]], dim=-1)

    monkeypatch.setattr(dispatch, "tree_assisted_decoding", tree_assisted_decoding)
    return calls


def test_tree_mode_gets_the_assisted_decoding_arguments(fake_tree):
    target = make_target("llama")
    head = make_head(target, draft_vocab_size=50)
    result = target.generate(
        PROMPT,
        assistant_model=head,
        max_new_tokens=9,
        do_sample=False,
        eagle3_total_tokens=12,
        eagle3_depth=3,
        eagle3_top_k=4,
    )
    assert torch.equal(result[:, :-1], PROMPT)
    (model, input_ids, config, args, model_kwargs, draft_model, stats) = fake_tree[0]
    logits_processor, stopping_criteria, generation_config, streamer = args
    assert model is target and torch.equal(input_ids, PROMPT)
    assert isinstance(config, Eagle3DecodingConfig) and draft_model is head
    assert (config.mode, config.total_tokens, config.depth, config.top_k) == ("tree", 12, 3, 4)
    assert head.has_target_embeddings and head.last_generation_stats is stats
    assert isinstance(logits_processor, LogitsProcessorList) and isinstance(stopping_criteria, StoppingCriteriaList)
    assert any(isinstance(criterion, MaxLengthCriteria) for criterion in stopping_criteria)
    assert generation_config.max_length == PROMPT.shape[1] + 9 and streamer is None
    assert CACHE_NAME in model_kwargs and "use_cache" in model_kwargs
    assert not {"assistant_model", "inputs_tensor", "tokenizer", "eagle3_depth"} & set(model_kwargs)


def test_knobs_saved_with_the_head_come_back_with_it(fake_tree, tmp_path):
    target = make_target("llama")
    head = make_head(target)
    head.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()
    assert Eagle3DraftModel.from_pretrained(tmp_path / "plain").generation_config is None
    head.generation_config = GenerationConfig(eagle3_total_tokens=9, eagle3_depth=3, eagle3_top_k=2)
    head.save_pretrained(tmp_path / "tuned")
    loaded = Eagle3DraftModel.from_pretrained(tmp_path / "tuned").attach_target(target)
    target.generate(PROMPT, assistant_model=loaded, max_new_tokens=6)
    config = fake_tree[0][2]
    assert (config.total_tokens, config.depth, config.top_k) == (9, 3, 2)
    # A foreign layout has no place for them: serving engines take their own settings.
    head.config.target_name_or_path = "org/target"
    head.save_pretrained(tmp_path / "vllm", format="vllm")
    assert not (tmp_path / "vllm" / "generation_config.json").exists()


def test_knobs_from_the_draft_generation_config(fake_tree):
    target = make_target("llama")
    head = make_head(target)
    head.generation_config = GenerationConfig(eagle3_mode="chain", num_assistant_tokens=2, eagle3_depth=5)
    output = target.generate(PROMPT, assistant_model=head, max_new_tokens=6, return_dict_in_generate=True)
    assert not fake_tree and output.sequences.shape[1] == PROMPT.shape[1] + 6
    # generate kwargs win over the head's config; so does an explicit num_assistant_tokens.
    target.generate(PROMPT, assistant_model=head, max_new_tokens=6, eagle3_mode="tree", num_assistant_tokens=4)
    config = fake_tree[0][2]
    assert (config.mode, config.depth, config.num_assistant_tokens) == ("tree", 5, 4)
    # A generation config passed to generate carries the knobs as custom entries.
    target.generate(
        PROMPT,
        assistant_model=head,
        generation_config=GenerationConfig(max_new_tokens=6, eagle3_mode="tree", eagle3_top_k=3),
    )
    assert (fake_tree[1][2].mode, fake_tree[1][2].top_k, fake_tree[1][2].num_assistant_tokens) == ("tree", 3, 2)
    head.generation_config = None
    target.generate(PROMPT, assistant_model=head, max_new_tokens=6)
    assert (fake_tree[2][2].mode, fake_tree[2][2].num_assistant_tokens, fake_tree[2][2].total_tokens) == (
        "tree",
        6,
        60,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(num_return_sequences=2, do_sample=True), "once per sample"),
        (dict(cache_implementation="static"), "default dynamic cache"),
        (dict(prompt_lookup_num_tokens=3), "one candidate source"),
        (dict(eagle3_mode="beam"), "eagle3_mode must be one of"),
        (dict(eagle3_depth=0), "eagle3_depth must be a positive integer"),
        (dict(eagle3_width=3), "Unknown EAGLE-3 generate arguments"),
    ],
)
def test_bad_settings_get_clear_errors(kwargs, message):
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match=message):
        target.generate(PROMPT, assistant_model=head, max_new_tokens=4, **kwargs)


def test_bad_inputs_get_clear_errors():
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match="eagle3_mode='tree'"):
        target.generate(PROMPT.repeat(2, 1), assistant_model=head, max_new_tokens=4, eagle3_mode="chain")
    static = StaticCache(config=target.config, max_cache_len=32)
    with pytest.raises(ValueError, match="StaticCache"):
        target.generate(PROMPT, assistant_model=head, max_new_tokens=4, eagle3_mode="chain", **{CACHE_NAME: static})
    for other in (
        make_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
        make_target("llama", vocab_size=80),
    ):
        with pytest.raises(ValueError, match="does not fit the target"):
            other.generate(PROMPT, assistant_model=head, max_new_tokens=4)
    target.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        target.generate(PROMPT, assistant_model=head, max_new_tokens=4)


class FailingCriterion(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


def test_feature_hooks_are_removed_after_generate():
    target = make_target("llama")
    head = make_head(target, draft_vocab_size=50)
    layers = get_decoder_layers(target)
    target.generate(PROMPT, assistant_model=head, max_new_tokens=6, eagle3_mode="chain")
    assert not any(layer._forward_pre_hooks for layer in layers)
    with pytest.raises(RuntimeError, match="boom"):
        target.generate(
            PROMPT,
            assistant_model=head,
            max_new_tokens=6,
            eagle3_mode="chain",
            stopping_criteria=StoppingCriteriaList([FailingCriterion()]),
        )
    assert not any(layer._forward_pre_hooks for layer in layers)


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_ensemble_verification_is_refused(mode):
    """`assistant_ensemble_weight` would mix the head's distribution into the output: EAGLE-3 refuses, in both modes."""
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match="assistant_ensemble_weight=0.5 asks for ensemble verification"):
        target.generate(
            PROMPT,
            assistant_model=head,
            max_new_tokens=4,
            do_sample=True,
            assistant_ensemble_weight=0.5,
            eagle3_mode=mode,
        )


@pytest.mark.parametrize(
    "kwargs, unused",
    [
        (dict(eagle3_mode="tree", num_assistant_tokens=4), ["num_assistant_tokens"]),
        (dict(eagle3_mode="chain", eagle3_depth=3, eagle3_top_k=2), ["eagle3_depth", "eagle3_top_k"]),
        (dict(eagle3_total_tokens=8, eagle3_calibration_prompts=["Hi"]), ["eagle3_calibration_prompts"]),
        (dict(assistant_confidence_threshold=0.2, num_assistant_tokens_schedule="heuristic"), None),
    ],
)
def test_knobs_the_mode_does_not_read_are_named_in_a_warning(kwargs, unused, caplog):
    target = make_target("llama")
    head = make_head(target)
    with caplog.at_level("WARNING", logger="hf_eagle3"):
        output = target.generate(PROMPT, assistant_model=head, max_new_tokens=4, do_sample=False, **kwargs)
    reference = target.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert torch.equal(output, reference)
    unused = unused or ["num_assistant_tokens_schedule", "assistant_confidence_threshold"]
    assert "does not use" in caplog.text and all(repr(name) in caplog.text for name in unused)
    caplog.clear()
    # Knobs the mode reads (and the head's own defaults) draw no warning.
    head.generation_config = GenerationConfig(num_assistant_tokens=3, eagle3_depth=3)
    with caplog.at_level("WARNING", logger="hf_eagle3"):
        target.generate(PROMPT, assistant_model=head, max_new_tokens=4, eagle3_mode="chain", num_assistant_tokens=2)
        target.generate(PROMPT, assistant_model=head, max_new_tokens=4, eagle3_total_tokens=8)
    assert "does not use" not in caplog.text
