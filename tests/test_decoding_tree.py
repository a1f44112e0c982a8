"""EAGLE-2 dynamic draft trees: the tree, its mask and positions, cache compaction and lossless decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import TEST_DEVICE, make_head, make_target, move_pair
from lossless import assert_greedy_lossless, make_friendly_pair, prompt_reaching_eos
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    MaxLengthCriteria,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3._compat import cache_kwargs
from hf_eagle3.decoding.kv_cache import keep_cache_positions
from hf_eagle3.decoding.stats import Eagle3GenerationStats
from hf_eagle3.decoding.tree import (
    DraftTree,
    _accept,
    build_draft_tree,
    grow_draft_tree,
    sample_with_candidates,
    tree_assisted_decoding,
)
from hf_eagle3.target_features import TargetFeatureCapture

SMALL_TREE = (8, 3, 2)  # total_tokens, depth, top_k
DEFAULT_TREE = (60, 8, 10)


@dataclass
class RecordingStats(Eagle3GenerationStats):
    """Also keeps every `(num_accepted, num_emitted)` pair, to see where generation stopped."""

    steps: list[tuple[int, int]] = field(default_factory=list)

    def record(self, num_accepted: int, num_emitted: int) -> None:
        super().record(num_accepted, num_emitted)
        self.steps.append((num_accepted, num_emitted))


class OracleHead(Eagle3DraftModel):
    """A head that mostly agrees with a near-bigram target: its logits get `oracle[token]` added.

    The head still runs its own layer (caches, masks, positions); the bias only makes it propose what the target
    will say, so long accepted runs happen without training a head.
    """

    oracle: torch.Tensor

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        bias = self.oracle[input_ids]
        keep = kwargs.get("logits_to_keep", 0)
        output.logits = output.logits + (bias[:, -keep:] if keep else bias)
        return output


def make_oracle_pair(
    arch: str,
    context_weight: float,
    eos_token_id: int | None = 2,
    device: str | torch.device | None = None,
    **overrides,
):
    """A target whose next token depends mostly on the current token, and an `OracleHead` for it.

    `context_weight` scales every layer's output projections: 0 gives a pure bigram model (the head always
    agrees), larger values let the context change the target's choice (rejections). Built on the CPU (the same
    models on every device), then moved to `device` (default `TEST_DEVICE`).
    """
    target = make_target(arch, eos_token_id=eos_token_id, device="cpu", **overrides)
    with torch.no_grad():
        # The padding row starts at zero, which would make every next token after a pad a tie.
        target.model.embed_tokens.weight[target.config.pad_token_id].normal_(0, 0.02)
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(context_weight)
            layer.mlp.down_proj.weight.mul_(context_weight)
        bigram = target.lm_head(target.model.norm(target.model.embed_tokens.weight)).log_softmax(-1)
    torch.manual_seed(0)
    head = OracleHead(Eagle3Config.from_target_config(target.config)).eval().attach_target(target)
    target, head = move_pair(target, head, device)
    head.oracle = 30 * bigram.to(target.device)
    return target, head


def tree_generator(head, tree_shape=SMALL_TREE, stats=None, static_cache=None, compile=False):
    """What the dispatch hands `tree_assisted_decoding`: the head, the tree knobs and the statistics."""
    total_tokens, depth, top_k = tree_shape
    return SimpleNamespace(
        draft_model=head,
        mode="tree",
        total_tokens=total_tokens,
        depth=depth,
        top_k=top_k,
        static_cache=static_cache,
        compile=compile,
        stats=stats if stats is not None else RecordingStats(),
        feature_layer_ids=head.config.target_layer_ids,
    )


def tree_generate(
    target,
    head,
    input_ids,
    tree_shape=SMALL_TREE,
    stats=None,
    streamer=None,
    static_cache=None,
    compile=False,
    **generate_kwargs,
):
    """`target.generate` with transformers' own processors, criteria and cache, decoding through the tree loop."""
    generator = tree_generator(head, tree_shape, stats, static_cache, compile)
    decode = partial(tree_assisted_decoding, candidate_generator=generator)
    if streamer is not None:
        decode = partial(decode, streamer=streamer)
    return target.generate(input_ids, custom_generate=decode, **generate_kwargs)


def prompt(
    seed: int, length: int = 7, vocab_size: int = 96, device: str | torch.device | None = None
) -> torch.LongTensor:
    """Random ids (no pad, BOS or EOS), the same on every device; on `device` (default `TEST_DEVICE`)."""
    ids = torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(TEST_DEVICE if device is None else device)


# ---------------------------------------------------------------------------------------------- the tree


@torch.no_grad()
def test_draft_tree_scores_match_sequential_drafting():
    """Every node's score equals running the head along its path as a plain chain: masks, positions, hiddens."""
    target = make_target("qwen3")
    head = make_head(target, draft_vocab_size=48)
    input_ids = prompt(0, length=6)
    with TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        target(input_ids[:, :-1])
        features = capture.pop()
    cache = DynamicCache()
    encoded = head(input_ids=input_ids[:, 1:], target_hidden_states=features, past_key_values=cache, use_cache=True)
    tree = build_draft_tree(
        head,
        input_ids[0, -1],
        encoded.hidden_states[0, -1],
        encoded.logits[0, -1],
        cache,
        root_position=5,
        padding_mask=None,
        total_tokens=12,
        depth=4,
        top_k=3,
    )
    assert cache.get_seq_length() == 5, "tree levels must be cropped from the head's cache"
    assert len(tree) == 12 and tree.depths.max() <= 4
    assert bool((tree.parents[1:] < torch.arange(1, 12)).all()), "parents precede children"
    assert bool((tree.scores[1:] <= tree.scores[tree.parents[1:]]).all())

    for node in range(1, len(tree)):
        path = tree.ancestors[node].nonzero().flatten()[1:]  # level order, root excluded
        chain_cache = DynamicCache()
        step = head(
            input_ids=input_ids[:, 1:], target_hidden_states=features, past_key_values=chain_cache, use_cache=True
        )
        hidden, logits, score = step.hidden_states[:, -1:], step.logits[0, -1], 0.0
        for position, path_node in enumerate(path.tolist(), start=5):
            draft_id = head.target_to_draft_ids(tree.tokens[path_node])
            score += float(logits.log_softmax(-1)[draft_id])
            step = head(
                input_ids=tree.tokens[path_node].view(1, 1),
                hidden_states=hidden,
                position_ids=torch.tensor([[position]]),
                past_key_values=chain_cache,
                use_cache=True,
            )
            hidden, logits = step.hidden_states, step.logits[0, -1]
        assert score == pytest.approx(float(tree.scores[node]), abs=1e-4)


# A draft distribution given by the path alone: the head's hidden state of a node carries an id of its path (exact in
# float32 below 2**24), and the draft logits at a node are drawn from a generator seeded with that id.
PATH_ID_MODULUS = 16_777_213


def _path_id(parent_id: int, token: int) -> int:
    return (parent_id * 1_000_003 + token + 1) % PATH_ID_MODULUS


def _path_log_probs(path_id: int, vocab: int) -> torch.Tensor:
    return (3 * torch.randn(vocab, generator=torch.Generator().manual_seed(path_id))).log_softmax(-1)


def official_tree_paths(root_id: int, vocab: int, total_tokens: int, official_depth: int, top_k: int) -> set:
    """The drafts the EAGLE reference decoder verifies, from its documented rule (EAGLE-2's dynamic tree).

    The first head forward gives the root's `top_k` children. Then `official_depth` more forwards each expand the
    `top_k` best nodes of the previous expansion (the root's children the first time) into their `top_k` best
    children, scored by the sum of the log-probabilities along the path. Every node ever generated is a candidate;
    the `total_tokens - 1` best candidates (the root completes `total_tokens`) are verified. Nodes are token paths.
    """
    root_scores = _path_log_probs(root_id, vocab)
    expansion = [
        ((int(token),), _path_id(root_id, int(token)), score)
        for score, token in zip(*root_scores.topk(top_k), strict=True)
    ]
    candidates = list(expansion)
    for _ in range(official_depth):
        frontier = sorted(expansion, key=lambda node: -float(node[2]))[:top_k]
        expansion = []
        for path, path_id, score in frontier:
            child_scores, child_tokens = _path_log_probs(path_id, vocab).topk(top_k)
            expansion += [
                ((*path, int(token)), _path_id(path_id, int(token)), score + child_score)
                for child_score, token in zip(child_scores, child_tokens, strict=True)
            ]
        candidates += expansion
    best = sorted(candidates, key=lambda node: -float(node[2]))[: total_tokens - 1]
    return {tuple(int(token) for token in path) for path, _, _ in best}


@pytest.mark.parametrize("official_shape", [(60, 7, 10), (20, 3, 4), (128, 9, 16), (8, 0, 3)])
def test_tree_selects_the_official_nodes_one_depth_deeper(official_shape):
    """Our `depth` counts drafts per path; the reference code's counts head forwards after the first, one less.

    With `eagle3_depth = official depth + 1` the tree holds exactly the nodes the reference rule selects (written
    from the rule above, on a draft distribution set by the path), as deep as it reaches, after as many forwards.
    """
    total_tokens, official_depth, top_k = official_shape
    vocab, root_id = 64, 12_345
    forwards = []

    def forward_level(level, tokens, hidden, tree_mask):
        forwards.append(level)
        ids = [
            _path_id(int(parent), int(token))
            for parent, token in zip(hidden[:, 0].tolist(), tokens.tolist(), strict=True)
        ]
        logits = torch.stack([_path_log_probs(path_id, vocab) for path_id in ids])
        return SimpleNamespace(
            logits=logits[None], hidden_states=torch.tensor(ids, dtype=torch.float32)[None, :, None]
        )

    draft_model = SimpleNamespace(draft_to_target_ids=lambda ids: ids)
    tree = grow_draft_tree(
        draft_model,
        torch.tensor(3),
        torch.tensor([float(root_id)]),
        _path_log_probs(root_id, vocab),
        forward_level,
        total_tokens,
        official_depth + 1,
        top_k,
    )
    node_paths: list[tuple[int, ...]] = [()]
    for node in range(1, len(tree)):
        node_paths.append((*node_paths[int(tree.parents[node])], int(tree.tokens[node])))
    expected = official_tree_paths(root_id, vocab, total_tokens, official_depth, top_k)
    assert set(node_paths[1:]) == expected
    assert len(tree) == 1 + len(expected)
    assert tree.depths.tolist() == [len(path) for path in node_paths]
    assert len(forwards) == official_depth
    assert max(len(path) for path in expected) <= official_depth + 1


def hand_built_tree() -> DraftTree:
    r"""root -> {1, 2}; 1 -> {3, 4}; 3 -> {5}."""
    parents = torch.tensor([0, 0, 0, 1, 1, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    ancestors = torch.eye(6, dtype=torch.bool)
    for node, chain in {1: [0], 2: [0], 3: [0, 1], 4: [0, 1], 5: [0, 1, 3]}.items():
        ancestors[node, chain] = True
    return DraftTree(
        tokens=torch.tensor([11, 12, 13, 14, 15, 16]),
        parents=parents,
        depths=depths,
        ancestors=ancestors,
        scores=torch.zeros(6),
    )


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tree_mask_positions_and_verification(arch, attn_implementation):
    """One target forward over the tree gives each node the logits of a plain forward over its own path."""
    target = make_target(arch)
    target.set_attn_implementation(attn_implementation)
    tree = hand_built_tree()
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]])
    mask = tree.attention_mask(padding, past_length=4, dtype=torch.float32)
    minimum = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 6, 10)
    assert bool((mask[0, 0, :, 0] == minimum).all()) and bool((mask[0, 0, :, 1:4] == 0).all())
    assert mask[0, 0, 5, 4:].tolist() == [0, 0, minimum, 0, minimum, 0]
    assert tree.position_ids(7).tolist() == [[7, 8, 8, 9, 9, 10]]
    assert tree.children() == [[1, 2], [3, 4], [], [5], [], []]

    prefix = prompt(1, length=4)
    cache = DynamicCache()
    with torch.no_grad():
        target(prefix, **cache_kwargs(cache), use_cache=True)
        tree_logits = target(
            tree.tokens[None],
            attention_mask=tree.attention_mask(None, 4, torch.float32),
            position_ids=tree.position_ids(4),
            **cache_kwargs(cache),
            use_cache=True,
        ).logits[0]
        for node in range(len(tree)):
            path = tree.ancestors[node].nonzero().flatten()
            reference = target(torch.cat([prefix, tree.tokens[path][None]], dim=1)).logits[0, -1]
            torch.testing.assert_close(tree_logits[node], reference, atol=1e-5, rtol=1e-5)


def test_keep_cache_positions_equals_fresh_forward():
    """After compaction the cache is the one a forward over prefix + accepted path builds."""
    target = make_target("llama")
    tree = hand_built_tree()
    prefix = prompt(2, length=4)
    cache = DynamicCache()
    with torch.no_grad():
        target(prefix, **cache_kwargs(cache), use_cache=True)
        target(
            tree.tokens[None],
            attention_mask=tree.attention_mask(None, 4, torch.float32),
            position_ids=tree.position_ids(4),
            **cache_kwargs(cache),
            use_cache=True,
        )
        path = torch.tensor([0, 1, 3, 5])
        keep_cache_positions(cache, 4, path)
        fresh = DynamicCache()
        target(torch.cat([prefix, tree.tokens[path][None]], dim=1), **cache_kwargs(fresh), use_cache=True)
    assert cache.get_seq_length() == 8
    for kept, reference in zip(cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(kept.keys, reference.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept.values, reference.values, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds only 8"):
        keep_cache_positions(cache, 6, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------- greedy


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


class CollectingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        self.ended = True


def assert_scores_and_stream_match_sample(target, head, input_ids, static_cache=None, **generate_kwargs):
    """16 greedy tokens through the tree loop: sequences, scores and logits equal `_sample`'s, every token streamed."""
    kwargs = dict(
        max_new_tokens=16,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **generate_kwargs,
    )
    expected = target.generate(input_ids, **kwargs)
    streamer = CollectingStreamer()
    output = tree_generate(target, head, input_ids, (16, 5, 3), streamer=streamer, static_cache=static_cache, **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    assert len(output.scores) == len(expected.scores) == output.sequences.shape[1] - input_ids.shape[1]
    torch.testing.assert_close(torch.cat(output.scores), torch.cat(expected.scores), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(output.logits), torch.cat(expected.logits), atol=1e-4, rtol=1e-4)
    # The loop streams every new token once, then ends (generate() streams the prompt when it owns the streamer).
    # Streamed chunks are on the host, as `generate` streams them.
    assert torch.equal(torch.cat(streamer.chunks, dim=-1), output.sequences[:, input_ids.shape[1] :].cpu())
    assert streamer.ended


# ---------------------------------------------------------------------------------------------- sampling


def test_sample_with_candidates_is_exact():
    """Chi-square: tokens drawn through candidate acceptance follow p exactly, whatever the candidates."""
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    draws = 3000
    for candidates in ([4, 1], [2, 5, 3], [0], []):
        candidates = torch.tensor(candidates, dtype=torch.long)
        counts = torch.zeros(6)
        for _ in range(draws):
            token, hit = sample_with_candidates(probs, candidates)
            counts[token] += 1
            assert (hit is None) or int(candidates[hit]) == token
        assert chi_square_p_value(counts, probs) > 1e-4, (candidates.tolist(), counts.tolist())


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs`; cells of probability 0 must stay empty."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc((support.sum() - 1) / 2.0, statistic / 2))


def test_acceptance_walk_samples_the_processed_target_distribution():
    """Chi-square on the first two tokens one verified tree emits, against the exact processed distributions.

    The second token is drawn at the accepted child, whose processors must see the child's token (repetition
    penalty) and whose logits are that node's: any slip shows in the joint distribution.
    """
    vocab = 6
    torch.manual_seed(0)
    logits = torch.randn(4, vocab) * 1.5
    children, tokens = [[1, 2], [3], [], []], [0, 3, 1, 4]
    prefix = torch.tensor([[5, 3, 2]])
    processors = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(2.0), TemperatureLogitsWarper(0.7), TopKLogitsWarper(4)]
    )
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=20)])

    def probs(node: int, context: list[int]) -> torch.Tensor:
        sequence = torch.cat([prefix, torch.tensor([context], dtype=torch.long)], dim=1)
        return processors(sequence, logits[node : node + 1])[0].softmax(-1)

    # Cell (a, b) for a drafted child a followed by b; cell (a, vocab) when a ended the step.
    exact = torch.zeros(vocab, vocab + 1)
    root = probs(0, [])
    for token in range(vocab):
        exact[token, vocab] = root[token]
    for child in children[0]:
        exact[tokens[child], vocab] = 0
        exact[tokens[child], :vocab] = root[tokens[child]] * probs(child, [tokens[child]])

    counts = torch.zeros(vocab, vocab + 1)
    for _ in range(2000):
        step, _, _, _ = _accept(logits, torch.tensor(tokens), children, prefix, processors, criteria, True, None, None)
        second = step.tokens[1] if len(step.tokens) > 1 else vocab
        counts[step.tokens[0], second] += 1
        assert step.num_accepted == len(step.tokens) - 1 and step.visited[0] == 0
    assert chi_square_p_value(counts.flatten(), exact.flatten()) > 1e-4


def test_sampling_matches_target_distribution():
    assert_sampling_matches_target_distribution()


def assert_sampling_matches_target_distribution(static_cache: bool | None = None, device=None, compile: bool = False):
    """End to end through `generate`: token 2 and 3 marginals vs the exact processed target distribution.

    Token 2 is drawn at the tree root, token 3 often below an accepted draft, both through temperature, top-k and
    a repetition penalty. Few runs keep it fast: the walk itself is checked precisely above. The models live on
    `device` (default `TEST_DEVICE`); the counts and exact probabilities on the CPU.
    """
    vocab = 8
    target, head = make_oracle_pair(
        "llama", 0.5, vocab_size=vocab, eos_token_id=None, num_hidden_layers=4, device=device
    )
    head.oracle = head.oracle / 10  # agree often, not always: both acceptance and residual draws happen
    input_ids = torch.tensor([[3, 5, 4, 6]], device=target.device)
    tokens = torch.arange(vocab, device=target.device)
    processors = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)]
    )

    def next_probs(sequences: torch.LongTensor) -> torch.Tensor:
        with torch.no_grad():
            logits = target(sequences).logits[:, -1]
        return processors(sequences, logits).softmax(-1)

    first = next_probs(input_ids)[0]
    contexts = torch.cat([input_ids.expand(vocab, -1), tokens[:, None]], dim=1)
    second = next_probs(contexts)  # [t1, t2]
    pairs = torch.cat([contexts.repeat_interleave(vocab, 0), tokens.repeat(vocab)[:, None]], dim=1)
    third = next_probs(pairs).view(vocab, vocab, vocab)  # [t1, t2, t3]
    joint12 = first[:, None] * second
    exact = {2: joint12.sum(0).cpu(), 3: (joint12[..., None] * third).sum((0, 1)).cpu()}

    torch.manual_seed(0)
    runs = 150
    counts = {2: torch.zeros(vocab), 3: torch.zeros(vocab)}
    stats = RecordingStats()
    for _ in range(runs):
        output = tree_generate(
            target,
            head,
            input_ids,
            (5, 2, 2),
            stats,
            static_cache=static_cache,
            compile=compile,
            max_new_tokens=3,
            do_sample=True,
            temperature=0.8,
            top_k=5,
            top_p=1.0,
            repetition_penalty=1.3,
        )
        counts[2][int(output[0, 5])] += 1
        counts[3][int(output[0, 6])] += 1
    assert 0 < sum(accepted for accepted, _ in stats.steps) < len(stats.steps), "need acceptances and rejections"
    assert stats.static_cache == bool(static_cache) and stats.compiled == compile
    for position in (2, 3):
        assert chi_square_p_value(counts[position], exact[position]) > 1e-4, (position, counts)


# ---------------------------------------------------------------------------------------------- through generate


@pytest.mark.parametrize(
    "knobs", [{}, dict(eagle3_total_tokens=8, eagle3_depth=3, eagle3_top_k=2)], ids=["default", "8-3-2"]
)
def test_generate_with_assistant_model_is_lossless(arch, knobs):
    assert_friendly_head_lossless(arch, knobs)


def assert_friendly_head_lossless(arch: str, knobs: dict):
    """`target.generate(assistant_model=head)` decodes with the tree (the default mode), token-identically.

    The trained head of the shared harness drafts long runs, so EOS and `max_new_tokens` land inside them.
    """
    target, head = make_friendly_pair(arch)
    output = assert_greedy_lossless(target, head, prompt_reaching_eos(target, 23), max_new_tokens=40, **knobs)
    assert output.sequences[0, -1] == target.config.eos_token_id
    assert output.eagle3_stats.mean_accept_len > 2
    assert output.eagle3_stats.static_cache == bool(knobs.get("eagle3_static_cache"))
    for max_new_tokens in (9, 14):
        assert_greedy_lossless(target, head, prompt_reaching_eos(target, 30), max_new_tokens=max_new_tokens, **knobs)


def test_peft_wrapped_target():
    """Under LoRA the feature hooks and the tree forward go through the wrapped layers."""
    from peft import LoraConfig, get_peft_model

    peft_target = get_peft_model(
        make_target("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    head = make_head(peft_target.get_base_model(), 50)
    assert_greedy_lossless(peft_target, head, prompt(6), max_new_tokens=10, eagle3_total_tokens=8, eagle3_depth=3)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_gets_clear_errors():
    target = make_target("llama")
    head = make_head(target)
    with pytest.raises(ValueError, match="batch size 1"):
        tree_generate(target, head, torch.cat([prompt(0), prompt(1)]), max_new_tokens=3)
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
