"""The static tree path with compiled step functions (`eagle3_compile=True`), on the CPU: greedy output stays the
target's own, sampling keeps its distribution, a second call reuses the compiled code, and misuse is a clear error.

CI has no GPU, so inductor compiles C++ here; one test runs that real default backend (slow from a cold inductor
cache). The others compile with `aot_eager`: dynamo traces the same whole steps (fullgraph, so a graph break would
fail them) and AOT autograd functionalises them, which is quick. On CUDA `tests/test_decoding_cuda.py`
compiles with inductor and captures the compiled steps as CUDA graphs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_head, make_target
from lossless import assert_greedy_lossless
from transformers import GenerationConfig
from tree_decoding import (
    RecordingStats,
    assert_sampling_matches_target_distribution,
    make_oracle_pair,
    prompt,
    tree_generate,
)

from hf_eagle3.decoding import cuda_graphs, static_tree

COMPILED = dict(eagle3_static_cache=True, eagle3_compile=True)
SMALL_TREE = dict(eagle3_total_tokens=8, eagle3_depth=3, eagle3_top_k=2)
ORACLE_TREE = dict(eagle3_total_tokens=16, eagle3_depth=5, eagle3_top_k=3)


def assert_compiled_run(output, head) -> static_tree.StaticTreeRunner:
    """The call decoded on static caches with compiled steps; its runner."""
    stats = output.eagle3_stats
    assert stats.static_cache and stats.compiled and stats.to_dict()["compiled"] is True
    runner = static_tree.cached_runner(head)
    assert runner.compiled and runner.key[0] is True
    return runner


def assert_lossless_without_recompiling(target, head, **knobs) -> static_tree.StaticTreeRunner:
    """A first call compiles; later calls that fit its runner (another prompt, a shorter one, another max length)
    run the compiled steps without compiling anything again. Every call is the target's own greedy text."""
    output = assert_greedy_lossless(target, head, prompt(0), max_new_tokens=16, **knobs)
    runner = assert_compiled_run(output, head)
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, length, max_new_tokens in ((1, 7, 16), (2, 1, 9), (3, 4, 20)):
            output = assert_greedy_lossless(
                target, head, prompt(seed, length=length), max_new_tokens=max_new_tokens, **knobs
            )
            assert assert_compiled_run(output, head) is runner
    return runner


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_target_and_a_second_call_does_not_recompile(arch, aot_eager):
    """A random head (mostly rejections, a reduced draft vocabulary) and one that drafts long accepted runs, asked
    for the compiled steps in its `generation_config`."""
    target = make_target(arch)
    assert_lossless_without_recompiling(target, make_head(target, draft_vocab_size=64), **COMPILED, **SMALL_TREE)
    target, head = make_oracle_pair(arch, 0.3, eos_token_id=None)
    head.generation_config = GenerationConfig(**COMPILED)
    output = assert_greedy_lossless(target, head, prompt(4), max_new_tokens=30, **ORACLE_TREE)
    assert assert_compiled_run(output, head) and output.eagle3_stats.mean_accept_len > 2


@pytest.mark.slow
def test_same_steps_as_the_uncompiled_static_path(aot_eager, batched_greedy):
    """Compiled and eager steps draft the same trees and accept the same runs, through the batched acceptance."""
    target, head = make_oracle_pair("qwen3", 0.3)
    input_ids = prompt(3)
    steps = {}
    for compile in (False, True):
        stats = RecordingStats()
        output = tree_generate(
            target,
            head,
            input_ids,
            (16, 5, 3),
            stats,
            static_cache=True,
            compile=compile,
            max_new_tokens=30,
            do_sample=False,
        )
        assert torch.equal(output, target.generate(input_ids, max_new_tokens=30, do_sample=False))
        assert stats.compiled == compile
        steps[compile] = stats.steps
    assert steps[True] == steps[False]


def test_sampling_matches_target_distribution(aot_eager):
    assert_sampling_matches_target_distribution(static_cache=True, compile=True)


@pytest.mark.slow
def test_inductor_the_default_backend():
    """Inductor's C++ kernels: the same greedy text, no recompilation on later calls."""
    assert cuda_graphs.COMPILE_OPTIONS["backend"] == "inductor"
    target = make_target("llama", num_hidden_layers=4)
    assert_lossless_without_recompiling(
        target,
        make_head(target, draft_vocab_size=64),
        **COMPILED,
        eagle3_total_tokens=4,
        eagle3_depth=2,
        eagle3_top_k=2,
    )


@pytest.mark.slow
def test_each_runner_compiles_its_own_copy(aot_eager, monkeypatch):
    """More runners than dynamo's recompile limit (one here; runners for other cache lengths) each compile their own
    step functions: none counts against another's limit, which a fullgraph function would fail at."""
    monkeypatch.setattr(static_tree, "CACHE_LENGTH_MULTIPLE", 16)
    target, head = make_oracle_pair("llama", 0.3, eos_token_id=None)
    runners = []
    with torch._dynamo.config.patch(recompile_limit=1):
        for max_new_tokens in (4, 36):
            output = assert_greedy_lossless(
                target, head, prompt(5), max_new_tokens=max_new_tokens, **COMPILED, **SMALL_TREE
            )
            runners.append(assert_compiled_run(output, head))
    assert len({runner.max_cache_len for runner in runners}) == len(runners)
    # Code objects compare by value: tell the copies apart by identity (the runners keep them alive).
    codes = {id(step.function.__wrapped__.__func__.__code__) for runner in runners for step in runner._steps}
    assert len(codes) == 3 * len(runners)


def test_compiled_runners_grow_their_cache_by_doubling():
    """Each new cache length recompiles a compiled runner: it doubles, where an uncompiled one grows by 256 positions."""
    sizes = {positions: static_tree.runner_cache_length(positions, compiled=True) for positions in (1, 256, 257, 600)}
    assert sizes == {1: 256, 256: 256, 257: 512, 600: 1024}
    uncompiled = [static_tree.runner_cache_length(positions, compiled=False) for positions in (1, 257, 600, 1100)]
    assert uncompiled == [256, 512, 768, 1280]


def test_asking_for_it_where_it_cannot_apply(caplog):
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match="eagle3_compile must be True or False, got 'yes'"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_compile="yes")
    for knobs in (dict(eagle3_static_cache=False), dict(eagle3_mode="chain")):
        with pytest.raises(ValueError, match="eagle3_compile=True compiles the tree step on static caches"):
            target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_compile=True, **knobs)
    windowed = make_target("mistral", sliding_window=64)
    with pytest.raises(ValueError, match="eagle3_static_cache=True cannot be honoured: cache layer 0"):
        windowed.generate(prompt(0), assistant_model=make_head(windowed), max_new_tokens=4, **COMPILED)
    # Automatic: the CPU takes the dynamic cache, which nothing compiles.
    with caplog.at_level(logging.WARNING, logger="hf_eagle3"):
        output = target.generate(
            prompt(0), assistant_model=head, max_new_tokens=4, return_dict_in_generate=True, eagle3_compile=True
        )
    assert not output.eagle3_stats.static_cache and not output.eagle3_stats.compiled
    assert "eagle3_compile=True compiles the static-cache path, which this call does not take" in caplog.text


def test_a_step_that_cannot_be_compiled_is_a_clear_error(aot_eager, monkeypatch):
    """A graph break inside a step fails its whole-graph compilation: the call refuses rather than decode otherwise."""
    target = make_target("llama")
    head = make_head(target)
    original = static_tree.StaticTreeRunner._draft

    def draft_with_a_graph_break(self):
        torch._dynamo.graph_break()
        return original(self)

    monkeypatch.setattr(static_tree.StaticTreeRunner, "_draft", draft_with_a_graph_break)
    with pytest.raises(
        ValueError,
        match="eagle3_compile=True cannot be honoured: the tree step of LlamaForCausalLM could not be compiled",
    ):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, **COMPILED)
    # The uncompiled static path is another runner, unaffected.
    output = assert_greedy_lossless(target, head, prompt(0), max_new_tokens=4, eagle3_static_cache=True)
    assert output.eagle3_stats.static_cache and not output.eagle3_stats.compiled
