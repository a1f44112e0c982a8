"""The per-step overhead of tree decoding: batched greedy acceptance (one host transfer per step) and its exactness.

`accept_greedy` runs on accelerators only (on the CPU the node-by-node walk is cheaper), so these tests force it
on the CPU and compare it with the walk and with the target's own greedy decoding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_head, make_target
from lossless import left_pad
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)
from tree_decoding import RecordingStats, hand_built_tree, make_oracle_pair, prompt, tree_generate

from hf_eagle3._compat import cache_kwargs
from hf_eagle3.decoding.acceptance import accept, accept_greedy
from hf_eagle3.decoding.batched_static_tree import BatchedStaticTreeRunner
from hf_eagle3.decoding.batched_tree import BatchedTreeDecoder
from hf_eagle3.decoding.dynamic_tree import DynamicTreeDecoder
from hf_eagle3.decoding.kv_cache import keep_cache_positions
from hf_eagle3.decoding.static_tree import StaticTreeRunner
from hf_eagle3.decoding.stopping import host_stop_rule


class StopAfter(StoppingCriteria):
    """A criterion transformers does not ship: stops once `token` was emitted (called, never decided on the host)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return input_ids[:, -1] == self.token


def walk_tree_logits(tree, agree_along: list[int], vocab: int = 20, seed: int = 0) -> torch.Tensor:
    """Random logits whose argmax at each node of `agree_along` (a root-to-node path) is the next path node's token."""
    logits = torch.randn(len(tree), vocab, generator=torch.Generator().manual_seed(seed))
    for parent, child in zip(agree_along, agree_along[1:], strict=False):
        logits[parent, tree.tokens[child]] = 10.0
    return logits


@pytest.mark.parametrize("path", [[0], [0, 1], [0, 1, 3], [0, 1, 3, 5], [0, 2]])
@pytest.mark.parametrize("criteria", ["none", "max_length", "eos", "custom"])
def test_batched_acceptance_equals_the_walk(path, criteria):
    """Same tokens, path, acceptance count, stop and scores as `accept`, for every way a step can end."""
    tree = hand_built_tree()
    logits = walk_tree_logits(tree, path)
    input_ids = torch.tensor([[7, 8, 9]])
    emitted = logits[path].argmax(-1).tolist()
    stopping = {
        "none": [MaxLengthCriteria(max_length=100)],
        "max_length": [MaxLengthCriteria(max_length=input_ids.shape[1] + 2)],
        "eos": [MaxLengthCriteria(max_length=100), EosTokenCriteria(eos_token_id=emitted[len(emitted) // 2])],
        "custom": [MaxLengthCriteria(max_length=100), StopAfter(emitted[-1])],
    }[criteria]
    stopping = StoppingCriteriaList(stopping)
    expected, expected_ids, expected_scores, _ = accept(
        logits, tree.tokens, tree.children(), input_ids, LogitsProcessorList(), stopping, False, (), ()
    )
    stop_rule = host_stop_rule(stopping)
    assert (stop_rule is None) == (criteria == "custom")
    step, visited, ids, scores, raw_logits = accept_greedy(logits, tree, input_ids, stopping, stop_rule, (), ())
    assert step == expected
    assert visited.tolist() == expected.visited
    assert torch.equal(ids, expected_ids)
    assert len(scores) == len(raw_logits) == len(expected_scores)
    for got, reference in zip(scores, expected_scores, strict=True):
        assert torch.equal(got, reference)


def test_batched_greedy_stops_inside_a_run_and_keeps_scores(batched_greedy):
    """EOS, max_new_tokens and a custom criterion inside an accepted run; scores, logits and streamed tokens."""
    target, head = make_oracle_pair("llama", 0.0, eos_token_id=None)
    input_ids = prompt(4)
    free_run = target.generate(input_ids, max_new_tokens=20, do_sample=False)[0, input_ids.shape[1] :]
    eos, stop_token = int(free_run[8]), int(free_run[5])
    inside_run = []
    for kwargs in (
        {"eos_token_id": eos},
        {"max_new_tokens": 11},
        {"stopping_criteria": StoppingCriteriaList([StopAfter(stop_token)])},
    ):
        kwargs = {"max_new_tokens": 20, "do_sample": False, **kwargs}
        expected = target.generate(input_ids, return_dict_in_generate=True, output_scores=True, **kwargs)
        stats = RecordingStats()
        output = tree_generate(
            target,
            head,
            input_ids,
            (16, 5, 3),
            stats,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **kwargs,
        )
        assert torch.equal(output.sequences, expected.sequences), kwargs
        inside_run.append(stats.steps[-1][0] == stats.steps[-1][1])
        torch.testing.assert_close(torch.cat(output.scores), torch.cat(expected.scores), atol=1e-4, rtol=1e-4)
        assert len(output.logits) == len(output.scores)
    assert all(inside_run), "each stop should fall inside an accepted run"


def test_chain_greedy_drafts_whole_chains_and_stops_where_the_target_does():
    """Chain mode drafts greedily without per-token host reads; stops (EOS, length, custom) stay exact."""
    target, head = make_oracle_pair("llama", 0.0, eos_token_id=None)
    input_ids = prompt(4)
    free_run = target.generate(input_ids, max_new_tokens=20, do_sample=False)[0, input_ids.shape[1] :]
    chain = {"eagle3_mode": "chain", "num_assistant_tokens": 4}
    for kwargs in (
        {},
        {"eos_token_id": int(free_run[8])},
        {"max_new_tokens": 11},
        {"stopping_criteria": StoppingCriteriaList([StopAfter(int(free_run[5]))])},
    ):
        kwargs = {"max_new_tokens": 20, "do_sample": False, **kwargs}
        expected = target.generate(input_ids, **kwargs)
        output = target.generate(input_ids, assistant_model=head, return_dict_in_generate=True, **chain, **kwargs)
        assert torch.equal(output.sequences, expected), kwargs
        assert output.eagle3_stats.mean_accept_len > 2.5


class SyncCounter(TorchDispatchMode):
    """Counts scalar reads (`item`, `int()`, `bool()`), data-dependent shapes and `.tolist()` calls."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func.overloadpacket) in self.SYNCING
        return func(*args, **(kwargs or {}))


def counting_host_reads(monkeypatch) -> SyncCounter:
    """A `SyncCounter` that counts `.tolist()` calls too (they reach no dispatch mode)."""
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    return counter


@pytest.fixture
def counter(monkeypatch) -> SyncCounter:
    return counting_host_reads(monkeypatch)


def assert_one_host_transfer_per_step(monkeypatch, static_cache: bool, **generate_kwargs):
    """16 tokens through the tree loop read the device once per step, counted from the first draft on (the setup
    and the prefill, with its prompt checks and EOS ids, may read it more)."""
    target = make_target("llama")
    head = make_head(target, draft_vocab_size=64)
    counter = counting_host_reads(monkeypatch)
    first_step = {}
    for decoder in (DynamicTreeDecoder, StaticTreeRunner):

        def counting_draft(self, input_ids, draft=decoder.draft):
            first_step.setdefault("count", counter.count)
            return draft(self, input_ids)

        monkeypatch.setattr(decoder, "draft", counting_draft)
    stats = RecordingStats()
    with counter:
        tree_generate(
            target, head, prompt(0), (8, 3, 2), stats, static_cache=static_cache, max_new_tokens=16, **generate_kwargs
        )
    steps = stats.target_forwards
    assert steps > 5 and stats.static_cache == static_cache
    assert counter.count - first_step["count"] == steps


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_one_host_transfer_per_step(batched_greedy, monkeypatch, static_cache):
    """On an accelerator each host read stalls the launch queue: a greedy step reads the device once.

    On the static path this also shows that drafting, verification and commit read nothing on the host, as CUDA
    graph capture requires.
    """
    assert_one_host_transfer_per_step(monkeypatch, static_cache, do_sample=False)


def test_keep_cache_positions_with_nothing_to_move_only_crops():
    target = make_target("llama")
    cache = DynamicCache()
    with torch.no_grad():
        target(prompt(2, length=9), **cache_kwargs(cache), use_cache=True)
    keys = [layer.keys.clone() for layer in cache.layers]
    keep_cache_positions(cache, 6, torch.zeros(0, dtype=torch.long))
    assert cache.get_seq_length() == 6
    for layer, original in zip(cache.layers, keys, strict=True):
        assert torch.equal(layer.keys, original[..., :6, :])


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_one_host_transfer_per_batch_step(batched_greedy, monkeypatch, counter, static_cache):
    """A greedy step of a padded batch reads the device once, for every row's path: on the static path, drafting,
    verification and commit read nothing on the host, as CUDA graph capture requires."""
    target, head = make_oracle_pair("llama", 0.3, eos_token_id=None)
    input_ids, attention_mask = left_pad([prompt(0, length=3), prompt(1, length=7), prompt(2)], pad_token_id=0)
    first_step = {}
    for decoder in (BatchedTreeDecoder, BatchedStaticTreeRunner):

        def counting_draft(self, draft=decoder.draft):
            first_step.setdefault("count", counter.count)
            return draft(self)

        monkeypatch.setattr(decoder, "draft", counting_draft)
    with counter:
        output = target.generate(
            input_ids,
            attention_mask=attention_mask,
            assistant_model=head,
            max_new_tokens=16,
            do_sample=False,
            return_dict_in_generate=True,
            eagle3_static_cache=static_cache,
            eagle3_total_tokens=8,
            eagle3_depth=3,
            eagle3_top_k=2,
        )
    stats = output.eagle3_stats
    assert stats.batch_forwards > 5 and stats.static_cache == static_cache
    assert counter.count - first_step["count"] == stats.batch_forwards
