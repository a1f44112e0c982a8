"""The tree loop: greedy output identical to the target, sampling exact, through `generate`, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_head, make_target
from lossless import assert_greedy_lossless
from tree_decoding import (
    DEFAULT_TREE,
    SMALL_TREE,
    RecordingStats,
    assert_friendly_head_lossless,
    assert_sampling_matches_target_distribution,
    assert_scores_and_stream_match_sample,
    make_oracle_pair,
    prompt,
    tree_generate,
)


@pytest.mark.parametrize("tree_shape", [SMALL_TREE, DEFAULT_TREE], ids=["8-3-2", "60-8-10"])
def test_greedy_matches_target_with_random_head(arch, tree_shape):
    """Mostly rejections; a reduced draft vocabulary on the small tree, the default tree shape on the full one."""
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=64 if tree_shape == SMALL_TREE else None)
    for seed in (0, 1) if tree_shape == SMALL_TREE else (0,):
        input_ids = prompt(seed, length=5 + 3 * seed)
        expected = target.generate(input_ids, max_new_tokens=12, do_sample=False)
        stats = RecordingStats()
        output = tree_generate(target, head, input_ids, tree_shape, stats, max_new_tokens=12, do_sample=False)
        assert torch.equal(output, expected)
        # The prefill emits the first token; random targets may also stop early at their EOS.
        assert stats.new_tokens == output.shape[1] - input_ids.shape[1] - 1
        assert stats.target_forwards == len(stats.steps)


@pytest.mark.parametrize("batched", [False, True], ids=["walk", "batched"])
@pytest.mark.parametrize("context_weight", [0.0, 0.3])
def test_greedy_matches_target_with_friendly_head(arch, context_weight, batched, request):
    """Long accepted runs (and, with some context, rejections deep in the tree) stay token-identical, through
    both greedy acceptance paths: the node-by-node walk and the accelerator's one-transfer batched path."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_oracle_pair(arch, context_weight)
    input_ids = prompt(3)
    expected = target.generate(input_ids, max_new_tokens=30, do_sample=False)
    stats = RecordingStats()
    output = tree_generate(target, head, input_ids, (16, 5, 3), stats, max_new_tokens=30, do_sample=False)
    assert torch.equal(output, expected)
    assert stats.new_tokens == output.shape[1] - input_ids.shape[1] - 1
    accepted = [accepted for accepted, _ in stats.steps]
    if context_weight == 0:
        assert stats.mean_accept_len > 4
    else:
        assert max(accepted) >= 2 and min(accepted) < 5


def test_eos_and_max_new_tokens_inside_an_accepted_run():
    target, head = make_oracle_pair("llama", 0.0, eos_token_id=None)
    input_ids = prompt(4)
    free_run = target.generate(input_ids, max_new_tokens=20, do_sample=False)[0, input_ids.shape[1] :]
    # An EOS the target reaches mid-run: the 9th new token, whose first occurrence ends the reference run too.
    eos = int(free_run[8])
    expected = target.generate(input_ids, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    stats = RecordingStats()
    output = tree_generate(target, head, input_ids, (16, 5, 3), stats, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(output, expected) and int(output[0, -1]) == eos
    # The last verification accepted the EOS as a draft token and stopped there: nothing after it was emitted.
    assert stats.steps[-1][0] == stats.steps[-1][1]

    cut_inside_run = 0
    for max_new_tokens in range(8, 14):
        expected = target.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        stats = RecordingStats()
        output = tree_generate(target, head, input_ids, (16, 5, 3), stats, max_new_tokens=max_new_tokens)
        assert torch.equal(output, expected)
        cut_inside_run += stats.steps[-1][0] == stats.steps[-1][1]
    assert cut_inside_run > 0


def test_greedy_with_processors_padding_scores_and_streamer():
    """Repetition penalty sees the accepted tokens; a padded prompt keeps its positions; scores match `_sample`."""
    target, head = make_oracle_pair("qwen2", 0.3)
    input_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt(5)], dim=1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, :2] = 0
    assert_scores_and_stream_match_sample(
        target, head, input_ids, attention_mask=attention_mask, repetition_penalty=1.5
    )


def test_sampling_matches_target_distribution():
    assert_sampling_matches_target_distribution()


@pytest.mark.parametrize(
    "knobs", [{}, dict(eagle3_total_tokens=8, eagle3_depth=3, eagle3_top_k=2)], ids=["default", "8-3-2"]
)
def test_generate_with_assistant_model_is_lossless(arch, knobs):
    assert_friendly_head_lossless(arch, knobs)


def test_peft_wrapped_target():
    """Under LoRA the feature hooks and the tree forward go through the wrapped layers."""
    from peft import LoraConfig, get_peft_model

    peft_target = get_peft_model(
        make_target("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    head = make_head(peft_target.get_base_model(), 50)
    assert_greedy_lossless(peft_target, head, prompt(6), max_new_tokens=10, eagle3_total_tokens=8, eagle3_depth=3)


def test_bad_input_gets_clear_errors():
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match="DynamicCache"):
        tree_generate(target, head, prompt(0), max_new_tokens=3, cache_implementation="static")
    with pytest.raises(ValueError, match="top_k"):
        tree_generate(target, head, prompt(0), (8, 3, 200), max_new_tokens=3)
    with pytest.raises(ValueError, match="attentions or hidden states"):
        tree_generate(
            target, head, prompt(0), max_new_tokens=3, return_dict_in_generate=True, output_hidden_states=True
        )
    target.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        tree_generate(target, head, prompt(0), max_new_tokens=3)

    windowed = make_target("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window"):
        tree_generate(windowed, make_head(windowed), prompt(0), max_new_tokens=20)


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_eager_paths_keep_cudnn_attention_out(mode):
    """The eager paths' forwards change shape almost every step: cuDNN's attention, which plans per shape, is left out
    of SDPA's choice for every forward of the call (target and head), and given back after it."""
    target = make_target("llama")
    head = make_head(target)
    seen = []

    def record(module, args):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())

    handles = [model.register_forward_pre_hook(record) for model in (target, head)]
    try:
        target.generate(
            prompt(0),
            assistant_model=head,
            eagle3_mode=mode,
            eagle3_static_cache=False if mode == "tree" else None,
            max_new_tokens=6,
            do_sample=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) > 2 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("rows", [1, 2])
def test_static_path_encodes_prompts_without_cudnn_attention(rows):
    """The static path's steps keep fixed shapes, but its prompt encoding meets a new length at almost every call:
    the prefill's forwards (target and head) leave cuDNN's attention out, and the call gives it back."""
    target = make_target("llama")
    head = make_head(target)
    calls = []

    def record(module, args):
        calls.append((module, torch.backends.cuda.cudnn_sdp_enabled()))

    input_ids = torch.cat([prompt(seed) for seed in range(rows)])
    handles = [model.register_forward_pre_hook(record) for model in (target, head)]
    try:
        target.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            assistant_model=head,
            eagle3_static_cache=True,
            eagle3_total_tokens=8,
            eagle3_depth=3,
            eagle3_top_k=2,
            max_new_tokens=6,
            do_sample=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    first_target = next(enabled for module, enabled in calls if module is target)
    first_head = next(enabled for module, enabled in calls if module is head)
    assert not first_target and not first_head
    assert torch.backends.cuda.cudnn_sdp_enabled()
