"""Static-shape tree decoding (static caches, CUDA graphs on CUDA), forced on the CPU: there the same step functions
run without graphs, and must be exactly as lossless as the dynamic path.

With `HF_EAGLE3_TEST_DEVICE=cuda` (see conftest) the same tests run on CUDA in float32, capturing and replaying the
graphs; there the automatic choice (`eagle3_static_cache=None`) takes the static path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE, make_head, make_target
from lossless import assert_greedy_lossless
from transformers.cache_utils import DynamicCache
from tree_decoding import (
    RecordingStats,
    assert_friendly_head_lossless,
    assert_sampling_matches_target_distribution,
    assert_scores_and_stream_match_sample,
    make_oracle_pair,
    prompt,
    tree_generate,
)

from hf_eagle3._compat import CACHE_NAME, cache_kwargs
from hf_eagle3.decoding import static_tree
from hf_eagle3.decoding.static_tree import use_static_tree

PHASES = {"setup", "prefill", "draft", "verify", "accept"}
ORACLE_TREE = (16, 5, 3)


@pytest.mark.parametrize(
    "tree_shape",
    [(8, 3, 2), (60, 7, 10), (3, 4, 2), (6, 1, 3)],
    ids=["8-3-2", "60-7-10", "fewer-nodes-than-depth", "depth-1"],
)
def test_greedy_matches_target_with_random_head(arch, tree_shape):
    """Mostly rejections, on trees smaller than depth x top_k, with fewer nodes than levels, or one level deep;
    a one-token prompt leaves the head nothing to encode in the prefill."""
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=64)
    for length in (1, 8):
        input_ids = prompt(length, length=length)
        expected = target.generate(input_ids, max_new_tokens=12, do_sample=False)
        stats = RecordingStats()
        output = tree_generate(
            target, head, input_ids, tree_shape, stats, static_cache=True, max_new_tokens=12, do_sample=False
        )
        assert torch.equal(output, expected)
        assert stats.static_cache and stats.new_tokens == output.shape[1] - length - 1


@pytest.mark.parametrize(
    "knobs", [{}, dict(eagle3_total_tokens=8, eagle3_depth=3, eagle3_top_k=2)], ids=["default", "8-3-2"]
)
def test_generate_with_friendly_head_is_lossless(arch, knobs):
    assert_friendly_head_lossless(arch, dict(knobs, eagle3_static_cache=True))


@pytest.mark.parametrize("batched", [False, True], ids=["walk", "batched"])
@pytest.mark.parametrize("context_weight", [0.0, 0.3])
def test_same_steps_as_the_dynamic_path(arch, context_weight, batched, request):
    """Both paths draft the same trees and accept the same runs, step by step, through both greedy acceptances."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_oracle_pair(arch, context_weight)
    input_ids = prompt(3)
    expected = target.generate(input_ids, max_new_tokens=30, do_sample=False)
    steps = {}
    for static_cache in (False, True):
        stats = RecordingStats()
        output = tree_generate(
            target, head, input_ids, ORACLE_TREE, stats, static_cache=static_cache, max_new_tokens=30, do_sample=False
        )
        assert torch.equal(output, expected)
        steps[static_cache] = stats.steps
    assert steps[True] == steps[False]
    assert max(accepted for accepted, _ in steps[True]) >= 2


@pytest.mark.parametrize("batched", [False, True], ids=["walk", "batched"])
def test_stops_inside_an_accepted_run_and_returns_its_own_cache(batched, request):
    """EOS and max_new_tokens inside an accepted run; the returned cache is a copy of the kept prefix, equal to the
    cache a plain forward over the output builds."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_oracle_pair("llama", 0.0, eos_token_id=None)
    input_ids = prompt(4)
    free_run = target.generate(input_ids, max_new_tokens=20, do_sample=False)[0, input_ids.shape[1] :]
    for kwargs in ({"eos_token_id": int(free_run[8])}, {"max_new_tokens": 11}):
        kwargs = {"max_new_tokens": 20, "do_sample": False, **kwargs}
        expected = target.generate(input_ids, **kwargs)
        stats = RecordingStats()
        output = tree_generate(
            target, head, input_ids, ORACLE_TREE, stats, static_cache=True, return_dict_in_generate=True, **kwargs
        )
        assert torch.equal(output.sequences, expected), kwargs
        assert stats.steps[-1][0] == stats.steps[-1][1], "the stop should fall inside an accepted run"
        cache = getattr(output, CACHE_NAME)
        assert type(cache) is DynamicCache and cache.get_seq_length() == expected.shape[1] - 1
        fresh = DynamicCache()
        with torch.no_grad():
            target(expected[:, :-1], use_cache=True, **cache_kwargs(fresh))
        for kept, reference in zip(cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys, reference.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kept.values, reference.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["repetition-penalty", "batched"])
def test_scores_logits_and_streamer(batched, request):
    """Through the host walk (a processor) and the batched acceptance, whose logits outlive the step."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_oracle_pair("qwen2", 0.3)
    processors = {} if batched else {"repetition_penalty": 1.5}
    assert_scores_and_stream_match_sample(target, head, prompt(5), static_cache=True, **processors)


def test_sampling_matches_target_distribution():
    assert_sampling_matches_target_distribution(static_cache=True)


def test_runner_is_reused_and_grows(monkeypatch):
    """Later calls reuse the head's runner (its caches, and on CUDA its graphs) while it is long enough."""
    monkeypatch.setattr(static_tree, "CACHE_LENGTH_MULTIPLE", 16)
    target, head = make_oracle_pair("mistral", 0.3, eos_token_id=None)
    input_ids = prompt(6)
    knobs = dict(eagle3_static_cache=True, eagle3_total_tokens=16, eagle3_depth=5, eagle3_top_k=3)
    runners = []
    for max_new_tokens in (6, 6, 40, 12):
        # The first runner is built under inference mode, and its buffers still update in place outside it.
        with torch.inference_mode(max_new_tokens == 6 and not runners):
            output = assert_greedy_lossless(target, head, input_ids, max_new_tokens=max_new_tokens, **knobs)
        assert output.eagle3_stats.static_cache
        runners.append(static_tree.cached_runner(head))
    assert runners[1] is runners[0]
    assert runners[2] is not runners[1] and runners[2].max_cache_len > runners[1].max_cache_len
    assert runners[3] is runners[2], "a shorter call fits the grown runner"
    assert_greedy_lossless(target, head, input_ids, max_new_tokens=12, **dict(knobs, eagle3_top_k=2))
    assert static_tree.cached_runner(head) is not runners[3], "another tree shape needs other buffers"


def test_automatic_choice_and_phase_times():
    target = make_target("llama")
    head = make_head(target)
    input_ids = prompt(0)
    for knob, static in ((None, TEST_DEVICE.type == "cuda"), (False, False), (True, True)):
        output = target.generate(
            input_ids, assistant_model=head, max_new_tokens=6, return_dict_in_generate=True, eagle3_static_cache=knob
        )
        stats = output.eagle3_stats
        assert stats.static_cache == static, knob
        assert set(stats.phase_seconds) == PHASES and all(seconds >= 0 for seconds in stats.phase_seconds.values())
        assert stats.to_dict()["phase_seconds"] == stats.phase_seconds

    # Automatic: on CUDA wherever it applies (decided without running anything).
    model_kwargs = {CACHE_NAME: DynamicCache(), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_static_tree(None, target, head, cuda, model_kwargs)
    assert not use_static_tree(None, target, head, cpu, model_kwargs)
    assert not use_static_tree(False, target, head, cuda, model_kwargs)
    padded = dict(model_kwargs, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1]]))
    assert not use_static_tree(None, target, head, cuda, padded)
    windowed = make_target("mistral", sliding_window=64)
    assert not use_static_tree(None, windowed, make_head(windowed), cuda, model_kwargs)


def test_forcing_it_where_it_cannot_apply_is_a_clear_error():
    windowed = make_target("mistral", sliding_window=64)
    with pytest.raises(ValueError, match="cannot be honoured: cache layer 0 .*sliding-window"):
        windowed.generate(prompt(0), assistant_model=make_head(windowed), max_new_tokens=4, eagle3_static_cache=True)

    target = make_target("llama")
    head = make_head(target)
    input_ids = torch.cat([prompt(0).new_zeros(1, 2), prompt(0)], dim=1)
    attention_mask = (input_ids != 0).long()
    with pytest.raises(ValueError, match="prompt is padded"):
        target.generate(
            input_ids, attention_mask=attention_mask, assistant_model=head, max_new_tokens=4, eagle3_static_cache=True
        )
    target._can_compile_fullgraph = False
    with pytest.raises(ValueError, match="LlamaForCausalLM does not declare a forward that can be captured whole"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_static_cache=True)
    with pytest.raises(ValueError, match="eagle3_static_cache must be None"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_static_cache="yes")
    with pytest.raises(ValueError, match="applies to tree decoding"):
        target.generate(
            prompt(0), assistant_model=head, max_new_tokens=4, eagle3_mode="chain", eagle3_static_cache=True
        )


def test_a_step_that_cannot_be_captured_falls_back_unless_forced(monkeypatch, caplog):
    """Automatic mode decodes on the dynamic cache, with a warning, when capture fails; forcing it is an error."""

    def uncapturable(*args, **kwargs):
        raise static_tree.StaticTreeCaptureError("the tree step of LlamaForCausalLM could not be captured (host read)")

    monkeypatch.setattr(static_tree, "static_tree_runner", uncapturable)
    # Pretend the automatic choice picked the static path, as it would on CUDA.
    monkeypatch.setattr(static_tree, "use_static_tree", lambda requested, *args: requested is not False)
    target = make_target("llama")
    head = make_head(target)
    with caplog.at_level("WARNING"):
        output = assert_greedy_lossless(target, head, prompt(0), max_new_tokens=8, eagle3_static_cache=None)
    assert not output.eagle3_stats.static_cache
    assert "decodes with the dynamic cache instead" in caplog.text
    with pytest.raises(ValueError, match="cannot be honoured: the tree step .* could not be captured"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_static_cache=True)
