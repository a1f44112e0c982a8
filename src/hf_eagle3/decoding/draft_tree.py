"""EAGLE-2's dynamic draft tree: its structure (nodes, attention mask, positions) and how the head grows it.

Each step the head grows a tree of likely continuations of the last emitted token (the root), one head forward per
level; the `total_tokens - 1` best nodes by cumulative draft log-probability are verified together with the root by
one target forward under the tree's attention mask (`tree_loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

if TYPE_CHECKING:
    from ..modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput


def additive_mask(allowed: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask `(batch, 1, q, k)` a stock transformers model takes for `allowed` `(q, k)` (batch 1) or
    `(batch, q, k)`: 0 or `dtype`'s minimum.

    Float, not boolean: eager attention adds a boolean mask as 0/1 instead of masking.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None] if allowed.dim() == 2 else mask[:, None]


@dataclass
class DraftTree:
    """A draft tree, nodes in level order: node 0 is the root (the last emitted token), parents precede children.

    Args:
        tokens: target-vocabulary token of each node, `(n,)`.
        parents: index of each node's parent, `(n,)`; the root's entry is 0.
        depths: distance from the root, `(n,)`; node `i` sits at position `root_position + depths[i]`.
        ancestors: `(n, n)` boolean, `ancestors[i, j]` when node `j` is node `i` or one of its ancestors,
            i.e. what node `i` may attend to inside the tree.
        scores: cumulative draft log-probability of each node's path, `(n,)`, 0 for the root; what the tree was
            pruned by.
    """

    tokens: torch.LongTensor
    parents: torch.LongTensor
    depths: torch.LongTensor
    ancestors: torch.BoolTensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.numel()

    def attention_mask(self, padding_mask: torch.Tensor | None, past_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive float mask `(1, 1, n, past_length + n)` in `dtype` for a stock transformers model.

        Every node sees the cached prefix (minus padding, from the 2D `padding_mask`), its ancestors and itself.
        """
        allowed = self.ancestors
        if past_length:
            prefix = (
                torch.ones(past_length, dtype=torch.bool, device=allowed.device)
                if padding_mask is None
                else padding_mask[0, :past_length].to(device=allowed.device, dtype=torch.bool)
            )
            allowed = torch.cat([prefix.expand(len(self), past_length), allowed], dim=1)
        return additive_mask(allowed, dtype)

    def position_ids(self, root_position: int) -> torch.LongTensor:
        """Real token positions of the nodes, `(1, n)`: siblings share a position."""
        return (self.depths + root_position)[None]

    @classmethod
    def root_only(cls, root_token: torch.LongTensor) -> DraftTree:
        """A tree without drafts: what the prefill's token is accepted through."""
        device = root_token.device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        ancestors = torch.ones(1, 1, dtype=torch.bool, device=device)
        return cls(tokens=root_token.view(1), parents=zero, depths=zero, ancestors=ancestors, scores=zero.float())

    def row(self, index: int) -> DraftTree:
        """Row `index` of a batch of trees (fields with a leading batch dimension, see `grow_draft_trees`)."""
        return DraftTree(
            tokens=self.tokens[index],
            parents=self.parents[index],
            depths=self.depths[index],
            ancestors=self.ancestors[index],
            scores=self.scores[index],
        )

    def children(self) -> list[list[int]]:
        """Children of every node, best draft score first (one host transfer; used by the acceptance walk)."""
        children: list[list[int]] = [[] for _ in range(len(self))]
        for node, parent in enumerate(self.parents.tolist()[1:], start=1):
            children[parent].append(node)
        return children


def grow_draft_tree(
    draft_model: Eagle3DraftModel,
    root_token: torch.LongTensor,
    root_hidden: torch.Tensor,
    root_logits: torch.Tensor,
    forward_level: Callable[[int, torch.LongTensor, torch.Tensor, torch.BoolTensor], Eagle3DraftOutput],
    total_tokens: int,
    depth: int,
    top_k: int,
) -> DraftTree:
    """EAGLE-2's dynamic tree: expand level by level with `depth - 1` head forwards, then rerank.

    Every shape depends on the tree knobs only and nothing is read on the host, so the static path can record it in
    a CUDA graph. `forward_level(level, tokens, hidden, tree_mask)` runs the head on the `top_k` frontier nodes at
    depth `level` (their tokens `(top_k,)` and their parents' hidden states `(top_k, hidden)`), appending them to the
    head's cache; besides the prefix they may attend to the tree entries of the cache that `tree_mask`
    `(top_k, level * top_k)` marks (earlier frontiers, in the order they were appended, then their own entries).
    The other arguments are those of `build_draft_tree`.
    """
    device = root_hidden.device
    identity = torch.eye(top_k, dtype=torch.bool, device=device)

    # Level 1: the root's top_k children. Every candidate of every level is kept for the final rerank.
    scores, draft_ids = root_logits.float().log_softmax(-1).topk(top_k)
    frontier_tokens = draft_model.draft_to_target_ids(draft_ids)
    frontier_hidden = root_hidden.expand(top_k, -1)
    frontier_ids = torch.arange(top_k, device=device)
    # Which earlier frontier entries of the head cache each frontier node descends from.
    frontier_ancestors = torch.zeros(top_k, 0, dtype=torch.bool, device=device)
    all_scores, all_tokens = [scores], [frontier_tokens]
    all_parents = [torch.full((top_k,), -1, device=device)]
    all_depths = [torch.ones(top_k, dtype=torch.long, device=device)]
    num_candidates = top_k

    for level in range(1, depth):
        tree_mask = torch.cat([frontier_ancestors, identity], dim=1)
        out = forward_level(level, frontier_tokens, frontier_hidden, tree_mask)
        child_scores, child_ids = out.logits[0].float().log_softmax(-1).topk(top_k)
        cumulative = (scores[:, None] + child_scores).flatten()
        tokens = draft_model.draft_to_target_ids(child_ids).flatten()
        all_scores.append(cumulative)
        all_tokens.append(tokens)
        all_parents.append(frontier_ids[:, None].expand(top_k, top_k).flatten())
        all_depths.append(torch.full((top_k * top_k,), level + 1, device=device))

        scores, best = cumulative.topk(top_k)
        parent_slot = best // top_k
        frontier_tokens = tokens[best]
        frontier_hidden = out.hidden_states[0, parent_slot]
        frontier_ancestors = tree_mask[parent_slot]
        frontier_ids = best + num_candidates
        num_candidates += top_k * top_k

    # Rerank: the best total_tokens - 1 candidates. A child never outscores its parent (log-probs are <= 0) and a
    # stable sort puts a parent (lower index) before an equal-scoring child, so the kept set is ancestor-closed.
    candidate_scores = torch.cat(all_scores)
    order = torch.sort(candidate_scores, descending=True, stable=True).indices
    selected = order[: total_tokens - 1].sort().values
    node_of = torch.zeros(num_candidates + 1, dtype=torch.long, device=device)
    node_of[selected + 1] = torch.arange(1, selected.numel() + 1, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    parents = torch.cat([zero, node_of[torch.cat(all_parents)[selected] + 1]])
    tokens = torch.cat([root_token.view(1), torch.cat(all_tokens)[selected]])
    depths = torch.cat([zero, torch.cat(all_depths)[selected]])

    # Pointer jumping: after `depth` hops from every node, all of its ancestors have been marked.
    n = tokens.numel()
    ancestors = torch.eye(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    # Device-side values throughout: a Python `True` would be copied from the host, which CUDA graphs cannot replay.
    marks = torch.ones(n, dtype=torch.bool, device=device)
    hop = parents
    for _ in range(depth):
        ancestors.index_put_((rows, hop), marks)
        hop = parents[hop]
    scores = torch.cat([candidate_scores.new_zeros(1), candidate_scores[selected]])
    return DraftTree(tokens=tokens, parents=parents, depths=depths, ancestors=ancestors, scores=scores)


def grow_draft_trees(
    draft_model: Eagle3DraftModel,
    root_tokens: torch.LongTensor,
    root_hidden: torch.Tensor,
    root_logits: torch.Tensor,
    forward_level: Callable[[int, torch.LongTensor, torch.Tensor, torch.BoolTensor], Eagle3DraftOutput],
    total_tokens: int,
    depth: int,
    top_k: int,
) -> DraftTree:
    """`grow_draft_tree` for each row of a batch: expand level by level with `depth - 1` head forwards, rerank.

    The same steps with a leading batch dimension. Batch 1 keeps its own function: the batched indexing costs it
    more host-side operations per step, which the eager path and the captured graphs of batch 1 should not pay.

    Every shape depends on the batch size and the tree knobs only and nothing is read on the host, so the static
    path can record it in a CUDA graph. `forward_level(level, tokens, hidden, tree_mask)` runs the head on the
    `top_k` frontier nodes of every row at depth `level` (their tokens `(batch, top_k)` and their parents' hidden
    states `(batch, top_k, hidden)`), appending them to the head's cache; besides the prefix they may attend to the
    tree entries of the cache that `tree_mask` `(batch, top_k, level * top_k)` marks (earlier frontiers, in the
    order they were appended, then their own entries). Returns the trees with a leading batch dimension. The
    other arguments are those of `build_draft_tree`, with a leading batch dimension.
    """
    device = root_hidden.device
    batch = root_tokens.shape[0]
    identity = torch.eye(top_k, dtype=torch.bool, device=device).expand(batch, top_k, top_k)

    # Level 1: the root's top_k children. Every candidate of every level is kept for the final rerank.
    scores, draft_ids = root_logits.float().log_softmax(-1).topk(top_k)
    frontier_tokens = draft_model.draft_to_target_ids(draft_ids)
    frontier_hidden = root_hidden[:, None].expand(batch, top_k, root_hidden.shape[-1])
    frontier_ids = torch.arange(top_k, device=device).expand(batch, top_k)
    # Which earlier frontier entries of the head cache each frontier node descends from.
    frontier_ancestors = torch.zeros(batch, top_k, 0, dtype=torch.bool, device=device)
    all_scores, all_tokens = [scores], [frontier_tokens]
    all_parents = [torch.full((batch, top_k), -1, device=device)]
    all_depths = [torch.ones(batch, top_k, dtype=torch.long, device=device)]
    num_candidates = top_k

    for level in range(1, depth):
        tree_mask = torch.cat([frontier_ancestors, identity], dim=2)
        out = forward_level(level, frontier_tokens, frontier_hidden, tree_mask)
        child_scores, child_ids = out.logits.float().log_softmax(-1).topk(top_k)
        cumulative = (scores[:, :, None] + child_scores).flatten(1)
        tokens = draft_model.draft_to_target_ids(child_ids).flatten(1)
        all_scores.append(cumulative)
        all_tokens.append(tokens)
        all_parents.append(frontier_ids[:, :, None].expand(batch, top_k, top_k).flatten(1))
        all_depths.append(torch.full((batch, top_k * top_k), level + 1, device=device))

        scores, best = cumulative.topk(top_k)
        parent_slot = best // top_k
        frontier_tokens = tokens.gather(1, best)
        frontier_hidden = gather_rows(out.hidden_states, parent_slot)
        frontier_ancestors = gather_rows(tree_mask, parent_slot)
        frontier_ids = best + num_candidates
        num_candidates += top_k * top_k

    # Rerank: the best total_tokens - 1 candidates. A child never outscores its parent (log-probs are <= 0) and a
    # stable sort puts a parent (lower index) before an equal-scoring child, so the kept set is ancestor-closed.
    candidate_scores = torch.cat(all_scores, dim=1)
    order = torch.sort(candidate_scores, dim=1, descending=True, stable=True).indices
    selected = order[:, : total_tokens - 1].sort(dim=1).values
    node_of = torch.zeros(batch, num_candidates + 1, dtype=torch.long, device=device)
    node_of.scatter_(1, selected + 1, torch.arange(1, selected.shape[1] + 1, device=device).expand_as(selected))
    zero = torch.zeros(batch, 1, dtype=torch.long, device=device)
    parents = torch.cat([zero, node_of.gather(1, torch.cat(all_parents, dim=1).gather(1, selected) + 1)], dim=1)
    tokens = torch.cat([root_tokens.view(batch, 1), torch.cat(all_tokens, dim=1).gather(1, selected)], dim=1)
    depths = torch.cat([zero, torch.cat(all_depths, dim=1).gather(1, selected)], dim=1)

    # Pointer jumping: after `depth` hops from every node, all of its ancestors have been marked.
    n = tokens.shape[1]
    ancestors = torch.eye(n, dtype=torch.bool, device=device).repeat(batch, 1, 1)
    rows = torch.arange(n, device=device).expand(batch, n)
    batch_rows = torch.arange(batch, device=device)[:, None].expand(batch, n)
    # Device-side values throughout: a Python `True` would be copied from the host, which CUDA graphs cannot replay.
    marks = torch.ones(batch, n, dtype=torch.bool, device=device)
    hop = parents
    for _ in range(depth):
        ancestors.index_put_((batch_rows, rows, hop), marks)
        hop = parents.gather(1, hop)
    scores = torch.cat([candidate_scores.new_zeros(batch, 1), candidate_scores.gather(1, selected)], dim=1)
    return DraftTree(tokens=tokens, parents=parents, depths=depths, ancestors=ancestors, scores=scores)


def gather_rows(values: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """`values[b, index[b]]` for every row `b`: `(batch, m, ...)` from `values` `(batch, n, ...)`."""
    shape = (*index.shape, *values.shape[2:])
    return values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))


@torch.no_grad()
def build_draft_tree(
    draft_model: Eagle3DraftModel,
    root_token: torch.LongTensor,
    root_hidden: torch.Tensor,
    root_logits: torch.Tensor,
    cache: DynamicCache,
    root_position: int,
    padding_mask: torch.Tensor | None,
    total_tokens: int,
    depth: int,
    top_k: int,
) -> DraftTree:
    """Grow EAGLE-2's dynamic draft tree (expand level by level, then rerank) with `depth - 1` head forwards.

    Args:
        root_token: the last emitted token, `()`; it is not in either KV cache yet.
        root_hidden / root_logits: the head's pre-norm output `(hidden,)` and draft logits `(draft_vocab,)` at the
            position before the root, i.e. its prediction of the root's child.
        cache: the head's KV cache, holding exactly the positions before the root. Tree levels are appended while
            drafting and cropped away before returning.
        padding_mask: 2D `(1, >= cache length)` padding mask of the sequence, or None.
        total_tokens: nodes to verify, root included; depth: most draft tokens on a path; top_k: branching.
    """
    device = root_hidden.device
    past_length = cache.get_seq_length()
    prefix = (
        torch.ones(past_length, dtype=torch.bool, device=device)
        if padding_mask is None
        else padding_mask[0, :past_length].to(device=device, dtype=torch.bool)
    )

    def forward_level(level: int, tokens: torch.LongTensor, hidden: torch.Tensor, tree_mask: torch.BoolTensor):
        mask = torch.cat([prefix.expand(top_k, -1), tree_mask], dim=1)[None, None]
        # A level-d node predicts its children at the position of its parent's successor: root_position + d - 1.
        position_ids = torch.full((1, top_k), root_position + level - 1, device=device)
        return draft_model(
            input_ids=tokens[None],
            hidden_states=hidden[None],
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )

    tree = grow_draft_tree(
        draft_model, root_token, root_hidden, root_logits, forward_level, total_tokens, depth, top_k
    )
    if depth > 1:
        cache.crop(-top_k * (depth - 1))
    return tree


__all__ = ["DraftTree", "additive_mask", "build_draft_tree", "gather_rows", "grow_draft_tree", "grow_draft_trees"]
