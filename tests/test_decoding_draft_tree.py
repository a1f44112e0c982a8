"""Draft trees: growth scores, the tree mask and positions under verification, cache compaction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_head, make_target
from transformers.cache_utils import DynamicCache
from tree_decoding import hand_built_tree, prompt

from hf_eagle3._compat import cache_kwargs
from hf_eagle3.decoding.draft_tree import build_draft_tree, grow_draft_tree, grow_draft_trees
from hf_eagle3.decoding.kv_cache import keep_cache_positions
from hf_eagle3.target_features import TargetFeatureCapture


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
    """Our `depth` counts drafts per path; the official EAGLE code's counts head forwards after the first, one less.

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


@torch.no_grad()
@pytest.mark.parametrize(("total_tokens", "depth", "top_k"), [(8, 3, 2), (60, 8, 10), (12, 1, 16)])
def test_batched_trees_are_each_rows_own_tree(total_tokens, depth, top_k):
    """`grow_draft_trees` gives every row the tree `grow_draft_tree` grows for it alone, frontier inputs included."""
    vocab, hidden_size, batch = 40, 8, 3
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(vocab, hidden_size, generator=generator)
    unembedding = torch.randn(hidden_size, vocab, generator=generator)
    head = SimpleNamespace(draft_to_target_ids=lambda ids: ids + 1)

    def head_output(level, tokens, hidden, tree_mask):
        """A stand-in head: its outputs depend on each node's token, parent state, level and tree-mask row."""
        states = torch.tanh(hidden + embedding[tokens - 1] + level + tree_mask.float().sum(-1, keepdim=True))
        return states, 3 * states @ unembedding

    def forward_row(level, tokens, hidden, tree_mask):
        states, logits = head_output(level, tokens, hidden, tree_mask)
        return SimpleNamespace(hidden_states=states[None], logits=logits[None])

    def forward_rows(level, tokens, hidden, tree_mask):
        states, logits = head_output(level, tokens, hidden, tree_mask)
        return SimpleNamespace(hidden_states=states, logits=logits)

    roots = torch.randint(1, vocab, (batch,), generator=generator)
    root_hidden = torch.randn(batch, hidden_size, generator=generator)
    root_logits = 3 * torch.randn(batch, vocab, generator=generator)
    trees = grow_draft_trees(head, roots, root_hidden, root_logits, forward_rows, total_tokens, depth, top_k)
    for row in range(batch):
        alone = grow_draft_tree(
            head, roots[row], root_hidden[row], root_logits[row], forward_row, total_tokens, depth, top_k
        )
        batched = trees.row(row)
        for field in ("tokens", "parents", "depths", "ancestors"):
            assert torch.equal(getattr(batched, field), getattr(alone, field)), (row, field)
        torch.testing.assert_close(batched.scores, alone.scores)
