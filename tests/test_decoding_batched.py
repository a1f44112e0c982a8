"""Tree decoding of a left-padded batch: every row as if decoded alone, and as plain batched `generate` leaves it."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE, make_head, make_target
from lossless import (
    assert_greedy_lossless,
    assert_rows_lossless,
    chi_square_p_value,
    exact_continuation_probs,
    left_pad,
    make_friendly_pair,
    prompt_reaching_eos,
)
from transformers import StoppingCriteria, StoppingCriteriaList
from tree_decoding import CollectingStreamer
from tree_decoding import prompt as tiny_prompt

from hf_eagle3.decoding import batched_static_tree, batched_tree, static_tree

SMALL_TREE = dict(eagle3_total_tokens=8, eagle3_depth=3, eagle3_top_k=2)


@pytest.fixture(params=["dynamic", "static"])
def path(request) -> dict:
    """Both backends of a batch: the dynamic cache (eager) and the static caches (CUDA graphs on CUDA, simply called
    elsewhere), as the `eagle3_static_cache` knob of the call."""
    return dict(eagle3_static_cache=request.param == "static")


@pytest.mark.parametrize("batched", [False, True], ids=["walk", "batched"])
@pytest.mark.parametrize("head_kind", ["friendly", "random"])
def test_greedy_rows_match_their_prompts_alone(arch, head_kind, batched, path, request):
    """Prompt lengths 5, 9 and 3; the first row stops at EOS early, the second runs to max_new_tokens, the third
    ends at EOS later. The friendly head gets long runs accepted (ragged per row), the random one mostly not. Rows
    accept by walking their trees on the host, or all at once on the device (the accelerator's greedy path)."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_friendly_pair(arch)
    if head_kind == "random":
        head = make_head(target, draft_vocab_size=64)
    prompts = [
        prompt_reaching_eos(target, 4, length=5),
        prompt_reaching_eos(target, 40, length=9),
        prompt_reaching_eos(target, 13, length=3),
    ]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=20, **path, **SMALL_TREE)
    stats = output.eagle3_stats
    assert stats.static_cache == path["eagle3_static_cache"]
    assert [row.new_tokens + 1 for row in stats.rows] == [5, 20, 14]  # the prefill's token is not counted
    assert stats.new_tokens == sum(row.new_tokens for row in stats.rows)
    assert stats.target_forwards == sum(row.target_forwards for row in stats.rows)
    assert stats.batch_forwards == max(row.target_forwards for row in stats.rows)
    if head_kind == "friendly":
        assert all(row.mean_accept_len > 2 for row in stats.rows)


def test_compacted_caches_keep_rows_lossless(monkeypatch):
    """Compacting the caches at every step (moving each row's entries to the end, dropping holes) changes nothing."""
    monkeypatch.setattr(batched_tree, "COMPACT_RATIO", 1.0)
    compactions = []
    compact = batched_tree.BatchedTreeDecoder._compact
    monkeypatch.setattr(
        batched_tree.BatchedTreeDecoder, "_compact", lambda decoder: (compactions.append(1), compact(decoder))
    )
    target, head = make_friendly_pair("qwen3")
    prompts = [
        prompt_reaching_eos(target, 6, length=8),
        prompt_reaching_eos(target, 40),
        prompt_reaching_eos(target, 17),
    ]
    # The dynamic cache's compaction (on CUDA the automatic choice would take the static caches).
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=24, eagle3_static_cache=False, **SMALL_TREE)
    assert output.eagle3_stats.cache_holes > 0 and compactions


def test_static_caches_compacted_before_they_fill_keep_rows_lossless(monkeypatch):
    """Caches sized for `max_length` only (plus a step's blocks): holes fill them, and the host compacts them between
    a draft and its verification."""
    monkeypatch.setattr(batched_static_tree, "CACHE_LENGTH_RATIO", 1.0)
    monkeypatch.setattr(static_tree, "CACHE_LENGTH_MULTIPLE", 1)
    compactions = []
    compact = batched_static_tree.BatchedStaticTreeRunner._compact
    monkeypatch.setattr(
        batched_static_tree.BatchedStaticTreeRunner,
        "_compact",
        lambda runner: (compactions.append(runner.host_length), compact(runner)),
    )
    target, head = make_friendly_pair("qwen3")
    # A runner with longer caches from another test would never need compacting.
    monkeypatch.delattr(head, static_tree.RUNNER_STATE_ATTRIBUTE, raising=False)
    prompts = [
        prompt_reaching_eos(target, 6, length=8),
        prompt_reaching_eos(target, 40),
        prompt_reaching_eos(target, 17),
    ]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=24, eagle3_static_cache=True, **SMALL_TREE)
    assert output.eagle3_stats.static_cache and output.eagle3_stats.cache_holes > 0
    assert compactions


def test_greedy_rows_with_default_tree_and_processors(path):
    """The default tree shape, a repetition penalty (per-row histories) and a random target whose rows differ."""
    target = make_target("llama")
    head = make_head(target)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (1, length), generator=generator).to(target.device) for length in (6, 11, 4, 8)]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=12, repetition_penalty=1.3, **path)
    assert output.eagle3_stats.static_cache == path["eagle3_static_cache"]


@pytest.mark.parametrize("batched", [False, True], ids=["walk", "batched"])
def test_scores_hold_each_rows_own_steps(batched, path, request):
    """`output_scores`/`output_logits`: step t holds each row's scores for its token t; zeros once a row stopped."""
    if batched:
        request.getfixturevalue("batched_greedy")
    target, head = make_friendly_pair("qwen2")
    prompts = [prompt_reaching_eos(target, 3), prompt_reaching_eos(target, 30, length=7)]
    kwargs = dict(max_new_tokens=10, output_scores=True, output_logits=True)
    output = assert_rows_lossless(target, head, prompts, **kwargs, **path, **SMALL_TREE)
    assert len(output.scores) == len(output.logits) == 10
    for row, prompt in enumerate(prompts):
        alone = target.generate(prompt, do_sample=False, return_dict_in_generate=True, **kwargs)
        steps = len(alone.scores)
        for name in ("scores", "logits"):
            got = torch.stack(getattr(output, name))[:, row]
            torch.testing.assert_close(got[:steps], torch.cat(getattr(alone, name)), atol=1e-4, rtol=1e-4)
            assert bool((got[steps:] == 0).all())


class StopAtToken(StoppingCriteria):
    """Stops a row once it emits `token`: a criterion of the caller's own, which the host cannot decide."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return input_ids[:, -1] == self.token


def test_batched_greedy_rows_are_decided_on_the_host(arch, batched_greedy, path, monkeypatch):
    """With every row's greedy path read in one transfer and only the EOS and length criteria, each row's step is
    decided from host lists (no per-row tensors); with a criterion of the caller's own, each row's sequence grows on
    the device as before. Lossless both ways."""
    target, head = make_friendly_pair(arch)
    prompts = [prompt_reaching_eos(target, 4, length=5), prompt_reaching_eos(target, 40, length=9)]
    per_row = []
    accept_greedy = batched_tree.accept_greedy
    monkeypatch.setattr(
        batched_tree, "accept_greedy", lambda *args, **kwargs: per_row.append(1) or accept_greedy(*args, **kwargs)
    )
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=20, **path, **SMALL_TREE)
    assert not per_row and output.eagle3_stats.batch_forwards > 1

    stop_token = int(output.sequences[1, -8])  # emitted by the second row only, mid-way
    criteria = StoppingCriteriaList([StopAtToken(stop_token)])
    stopped = assert_rows_lossless(
        target, head, prompts, max_new_tokens=20, stopping_criteria=criteria, **path, **SMALL_TREE
    )
    assert per_row and stopped.sequences.shape[1] < output.sequences.shape[1]


def test_rows_finishing_at_the_first_token(path):
    """A row whose prompt's next token is EOS leaves the batch at the prefill; the other decodes on."""
    target, head = make_friendly_pair("llama")
    prompts = [prompt_reaching_eos(target, 0), prompt_reaching_eos(target, 8, length=4)]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=12, **path, **SMALL_TREE)
    assert output.eagle3_stats.rows[0].target_forwards == 0


def test_sampling_keeps_each_rows_distribution(path):
    """Sampled continuations of each row of a padded batch follow that prompt's exact distribution."""
    target = make_target("llama", vocab_size=8, seed=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(6)  # context-dependent distributions far from uniform
    head = make_head(target, draft_vocab_size=6, seed=1)
    prompts = [torch.tensor([[3, 5, 4, 7]], device=target.device), torch.tensor([[6, 3]], device=target.device)]
    input_ids, attention_mask = left_pad(prompts, target.config.pad_token_id)
    settings = dict(do_sample=True, temperature=0.8, top_k=3, max_new_tokens=3)
    probs = [exact_continuation_probs(target, prompt, 3, temperature=0.8, top_k=3) for prompt in prompts]
    samples: list[list[tuple[int, ...]]] = [[], []]
    accepted = 0
    for seed in range(200):
        torch.manual_seed(seed)
        output = target.generate(
            input_ids,
            attention_mask=attention_mask,
            assistant_model=head,
            return_dict_in_generate=True,
            eagle3_total_tokens=6,
            eagle3_depth=3,
            eagle3_top_k=2,
            **settings,
            **path,
        )
        assert output.eagle3_stats.static_cache == path["eagle3_static_cache"]
        for row in range(2):
            tokens = output.sequences[row, input_ids.shape[1] :].tolist()
            # A row that stopped at EOS is padded after it.
            end = tokens.index(target.config.eos_token_id) + 1 if target.config.eos_token_id in tokens else 3
            samples[row].append(tuple(tokens[:end]))
        accepted += sum(output.eagle3_stats.accepted_per_depth)
    assert accepted > 40  # the drafts were really put to the test
    for row in range(2):
        assert chi_square_p_value(samples[row], probs[row]) > 1e-3, row


def test_batch_errors_name_the_fix():
    target, head = make_friendly_pair("llama")
    input_ids, attention_mask = left_pad(
        [prompt_reaching_eos(target, 5), prompt_reaching_eos(target, 5, length=3)], target.config.pad_token_id
    )
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, assistant_model=head, max_new_tokens=4)
    with pytest.raises(ValueError, match="eagle3_mode='tree'"):
        target.generate(**batch, eagle3_mode="chain")
    with pytest.raises(ValueError, match="Drop `streamer`"):
        target.generate(**batch, streamer=CollectingStreamer())
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        target.generate(**{**batch, "attention_mask": attention_mask.flip(1)})


def test_automatic_choice_and_runner_reuse():
    """A batch takes the static path where a single prompt would (on CUDA, or when insisted on); the head keeps one
    runner for batches next to the one for single prompts, reused by calls of the same batch size that fit it."""
    target, head = make_friendly_pair("mistral")
    prompts = [prompt_reaching_eos(target, 6), prompt_reaching_eos(target, 9, length=3)]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=12, **SMALL_TREE)
    assert output.eagle3_stats.static_cache == (TEST_DEVICE.type == "cuda")
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=12, eagle3_static_cache=True, **SMALL_TREE)
    runner = static_tree.cached_runner(head, batched=True)
    assert output.eagle3_stats.static_cache and runner.batch_size == 2
    assert_greedy_lossless(target, head, prompts[0], max_new_tokens=8, eagle3_static_cache=True, **SMALL_TREE)
    assert static_tree.cached_runner(head) is not runner and static_tree.cached_runner(head, batched=True) is runner
    assert_rows_lossless(target, head, prompts[::-1], max_new_tokens=6, eagle3_static_cache=True, **SMALL_TREE)
    assert static_tree.cached_runner(head, batched=True) is runner, "a call that fits the runner reuses it"
    assert_rows_lossless(target, head, prompts * 2, max_new_tokens=6, eagle3_static_cache=True, **SMALL_TREE)
    assert static_tree.cached_runner(head, batched=True).batch_size == 4


@pytest.mark.slow
def test_compiled_batch_steps_do_not_recompile(aot_eager, batched_greedy):
    """`eagle3_compile=True` on a batch: compiled once, then later calls of that batch size compile nothing."""
    target, head = make_friendly_pair("qwen2")
    knobs = dict(eagle3_static_cache=True, eagle3_compile=True, **SMALL_TREE)
    prompts = [
        prompt_reaching_eos(target, 5),
        prompt_reaching_eos(target, 30, length=8),
        prompt_reaching_eos(target, 2),
    ]
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=16, **knobs)
    runner = static_tree.cached_runner(head, batched=True)
    assert output.eagle3_stats.compiled and runner.compiled
    with torch.compiler.set_stance("fail_on_recompile"):
        output = assert_rows_lossless(target, head, prompts[::-1], max_new_tokens=12, **knobs)
    assert output.eagle3_stats.compiled and static_tree.cached_runner(head, batched=True) is runner


@pytest.mark.slow
def test_compiled_batch_steps_draft_as_uncompiled_ones():
    """Inductor-compiled batch steps (on the CPU here) grow the same trees as uncompiled ones: every row accepts as
    many tokens per step. Losslessness alone cannot show it: the target checks every token, so a head fed the wrong
    block only accepts less (once, the head's block start read the length after the step had moved it)."""
    target, head = make_friendly_pair("llama")
    input_ids, attention_mask = left_pad(
        [tiny_prompt(0, length=5), tiny_prompt(1, length=9), tiny_prompt(2, length=3), tiny_prompt(3, length=7)],
        pad_token_id=0,
    )
    accepted = {}
    for compiled in (False, True):
        output = target.generate(
            input_ids.to(TEST_DEVICE),
            attention_mask=attention_mask.to(TEST_DEVICE),
            assistant_model=head,
            max_new_tokens=24,
            do_sample=False,
            return_dict_in_generate=True,
            eagle3_static_cache=True,
            eagle3_compile=compiled,
        )
        assert output.eagle3_stats.compiled == compiled
        accepted[compiled] = [row.accepted_per_depth for row in output.eagle3_stats.rows]
    assert accepted[True] == accepted[False]
