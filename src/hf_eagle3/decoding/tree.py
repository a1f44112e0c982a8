"""EAGLE-2 dynamic draft trees verified in one target forward: the default EAGLE-3 decoding mode.

Each step the head grows a tree of likely continuations of the last emitted token (the root), one
head forward per level; the `total_tokens - 1` best nodes by cumulative draft log-probability are
verified together with the root by ONE target forward under a tree attention mask; the longest path
the target agrees with is kept in both KV caches and the rest is dropped. Greedy output is
token-identical to the target decoding alone, sampled output has exactly the target's distribution.

transformers' `_assisted_decoding` verifies one chain and crops its cache from the end, so the tree
needs its own loop: `tree_assisted_decoding` takes the same arguments and returns the same outputs.
It drives a `TreeDecoder` through the steps: `DynamicTreeDecoder` (transformers' dynamic cache, eager
forwards) or, on CUDA where it applies, `static_tree.StaticTreeRunner` (static caches, CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerateDecoderOnlyOutput, GenerationConfig, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import logging

from .._compat import CACHE_NAME, cache_kwargs
from ..target_features import TargetFeatureCapture
from .kv_cache import check_tree_cache, keep_cache_positions
from .stats import PhaseTimer
from .stopping import HostStopRule, first_stop, host_stop_rule

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer

    from ..modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput

# Attention implementations that apply an arbitrary additive 4D mask (flash attention only knows causal).
TREE_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def additive_mask(allowed: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask `(1, 1, q, k)` a stock transformers model takes for `allowed` `(q, k)`: 0 or `dtype`'s minimum.

    Float, not boolean: eager attention adds a boolean mask as 0/1 instead of masking.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


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


def sample_with_candidates(probs: torch.Tensor, candidates: torch.LongTensor) -> tuple[int, int | None]:
    """Sample one token from `probs` `(vocab,)`, trying draft `candidates` `(m,)` first; exact for any candidates.

    Candidate `x_i` is accepted with probability `p(x_i)` renormalised after zeroing the earlier, rejected
    candidates (EAGLE-2's multi-candidate rule, draft distributions taken as one-hot); if all are rejected the token is
    drawn from `p` with every candidate zeroed. Each token's overall probability is exactly `p`. Returns the
    token and the index of the accepted candidate, or None when the token came from the residual.
    """
    if candidates.numel():
        candidate_probs = probs[candidates]
        # Mass left after zeroing the earlier candidates: rejecting x_1..x_{i-1} renormalises by it.
        remaining = 1 - (candidate_probs.cumsum(0) - candidate_probs)
        accept_probs = candidate_probs / remaining.clamp_min(torch.finfo(probs.dtype).tiny)
        accepted = torch.rand(candidates.numel(), device=probs.device, dtype=probs.dtype) < accept_probs
        first = torch.where(accepted.any(), accepted.int().argmax(), -1)
        residual = probs.index_fill(0, candidates, 0)
        # Only float rounding can leave no residual mass (the candidates held all of it); p itself is then exact.
        residual = torch.where(residual.sum() > 0, residual, probs)
        # The residual draw is made whether or not it is used (it is independent of the acceptance draws), so
        # the outcome reaches the host in one transfer instead of one per decision.
        token = torch.where(first >= 0, candidates[first.clamp_min(0)], torch.multinomial(residual, 1)[0])
        token, first = torch.stack([token, first]).tolist()
        return token, (first if first >= 0 else None)
    return int(torch.multinomial(probs, 1)), None


@dataclass
class _StepResult:
    """What one pass over a verified tree produced."""

    tokens: list[int]  # emitted tokens, in order
    visited: list[int]  # tree nodes whose successor was emitted: the positions both caches keep
    num_accepted: int  # emitted tokens that were draft nodes
    finished: bool


def _accept(
    logits: torch.Tensor,
    tokens: torch.LongTensor,
    children: list[list[int]],
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    do_sample: bool,
    scores: tuple | None,
    raw_logits: tuple | None,
    stop_rule: HostStopRule | None = None,
) -> tuple[_StepResult, torch.LongTensor, tuple | None, tuple | None]:
    """Walk the tree from the root, emitting one token per visited node as `_sample` would at that position.

    Processors and warpers see exactly the sequence `_sample` would give them (prefix plus accepted tokens), so
    repetition penalties and the like stay exact. A token matching a child moves the walk to that child; any other
    token (the target's correction or bonus) ends the step. Stopping criteria are checked after every token
    (decided on the host when `stop_rule`, from `host_stop_rule`, is given).
    `logits` `(n, vocab)` are the target's at the `n` nodes, `tokens` `(n,)` the nodes' tokens.
    """
    tree_tokens = tokens.tolist()
    node, visited, emitted, num_accepted, finished = 0, [], [], 0, False
    while True:
        node_logits = logits[node : node + 1]
        processed = logits_processor(input_ids, node_logits)
        kids = children[node]
        if do_sample:
            token, hit = sample_with_candidates(processed[0].softmax(-1), tokens[kids])
        else:
            token = int(processed[0].argmax())
            kid_tokens = [tree_tokens[kid] for kid in kids]
            hit = kid_tokens.index(token) if token in kid_tokens else None
        visited.append(node)
        emitted.append(token)
        input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=-1)
        if scores is not None:
            scores += (processed,)
        if raw_logits is not None:
            raw_logits += (node_logits,)
        num_accepted += hit is not None
        if stop_rule is not None:
            max_length, eos_ids = stop_rule
            finished = input_ids.shape[1] >= max_length or token in eos_ids
        else:
            finished = bool(stopping_criteria(input_ids, scores).any())
        if hit is None or finished:
            break
        node = kids[hit]
    return _StepResult(emitted, visited, num_accepted, finished), input_ids, scores, raw_logits


def _uses_batched_greedy(do_sample: bool, logits_processor: LogitsProcessorList, device: torch.device) -> bool:
    """Whether to accept through `_accept_greedy`: greedy, no processors, and an accelerator.

    There it replaces one host-device synchronisation per emitted token by one per step. On the CPU host reads
    cost nothing while the argmax over every node's full-vocabulary row does (~7 ms for 60 x 49k logits on one
    core), so the node-by-node walk of `_accept` is cheaper.
    """
    return not do_sample and len(logits_processor) == 0 and device.type != "cpu"


# `(num_visited, visited, emitted)` of `greedy_path`, on the device.
GreedyPath = tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]


def greedy_path(logits: torch.Tensor, tree: DraftTree, width: int) -> GreedyPath:
    """The path greedy acceptance keeps, found on the device with fixed shapes (no host read).

    A node is on the path when every node from the root to it holds the target's argmax at its parent (siblings are
    distinct tokens, so the path is unique): the walk of `_accept` without processors. Returns the path length (a
    device scalar), `visited` `(width,)`: the path nodes in level order (= path order) followed by other nodes,
    and `emitted` `(width,)`: the target's argmax at each of them. `width` must be at least the longest path.
    """
    argmax = logits.argmax(-1)
    agrees = tree.tokens == argmax[tree.parents]
    agrees[:1].fill_(True)  # the root is already emitted (a device fill: graphs cannot copy a host value)
    on_path = ~(tree.ancestors & ~agrees).any(-1)
    # Path nodes first, in level order: a stable sort of "not on path".
    visited = torch.sort((~on_path).to(torch.uint8), stable=True).indices[:width]
    return on_path.sum(), visited, argmax[visited]


def _accept_greedy(
    logits: torch.Tensor,
    tree: DraftTree,
    input_ids: torch.LongTensor,
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    scores: tuple | None,
    raw_logits: tuple | None,
    path: GreedyPath | None = None,
) -> tuple[_StepResult, torch.LongTensor, torch.LongTensor, tuple | None, tuple | None]:
    """`_accept` for greedy decoding without logits processors, with ONE host-device transfer per step.

    Without processors a node's processed logits are its raw logits, so the accepted path is found on the device at
    once (`greedy_path`, or `path` when the verification computed it already). Also returns the accepted path as a
    device index `(len(visited),)`, for the caches and the next head input.
    """
    num_visited, visited_index, emitted = path if path is not None else greedy_path(logits, tree, len(tree))
    width = visited_index.numel()
    host = torch.cat([num_visited.view(1), visited_index, emitted]).tolist()
    num_visited = host[0]
    visited, tokens = host[1 : 1 + num_visited], host[1 + width : 1 + width + num_visited]

    new_ids = emitted[None, :num_visited]
    new_scores = [logits[node : node + 1] for node in visited]
    stop = first_stop(stopping_criteria, stop_rule, input_ids, new_ids, tokens, scores, new_scores)
    num_emitted, finished = (len(tokens), False) if stop is None else (stop + 1, True)
    input_ids = torch.cat([input_ids, new_ids[:, :num_emitted]], dim=-1)
    if scores is not None:
        scores += tuple(new_scores[:num_emitted])
    if raw_logits is not None:
        raw_logits += tuple(new_scores[:num_emitted])
    # Every emitted token but the full path's last (the target's bonus) matched a drafted child.
    step = _StepResult(tokens[:num_emitted], visited[:num_emitted], min(num_emitted, len(visited) - 1), finished)
    return step, visited_index[:num_emitted], input_ids, scores, raw_logits


class TreeDecoder(Protocol):
    """The caches and forwards of tree decoding, driven step by step by `tree_assisted_decoding`.

    `DynamicTreeDecoder` runs them eagerly on transformers' dynamic cache; `static_tree.StaticTreeRunner` on static
    caches with fixed shapes (CUDA graphs). The loop around them (acceptance, stopping, streaming, outputs) is shared.
    """

    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the target over the prompt; return its float logits at the last position, `(1, vocab)`."""

    def start(self, input_ids: torch.LongTensor) -> None:
        """Prepare the first step, once the prefill's token has been appended to `input_ids`."""

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        """Grow the draft tree rooted at the last token of `input_ids`."""

    def verify(self) -> tuple[torch.Tensor, GreedyPath | None]:
        """Run the target over the tree: its float logits `(n, vocab)`, and the greedy path if it came along."""

    def commit(self, step: _StepResult, visited: torch.LongTensor, input_ids: torch.LongTensor) -> None:
        """Keep the `visited` nodes in both caches; the head encodes them in the next `draft`."""

    def output_cache(self, cache: DynamicCache, length: int) -> Cache:
        """The target's KV cache to return, holding its first `length` positions (`cache` is the call's own)."""


class DynamicTreeDecoder:
    """Tree decoding on transformers' `DynamicCache`: eager forwards whose shapes follow the sequence.

    Works with any target whose cache `check_tree_cache` accepts, padded prompts included.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        capture: TargetFeatureCapture,
        total_tokens: int,
        depth: int,
        top_k: int,
        model_kwargs: dict[str, Any],
    ):
        self.model, self.draft_model, self.capture = model, draft_model, capture
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k
        self.cache = model_kwargs[CACHE_NAME]
        self.cache.activate_past_recording()
        self.draft_cache = DynamicCache()
        self.padding_mask = model_kwargs.get("attention_mask")
        self.position_ids = model_kwargs.get("position_ids")
        self.features: torch.Tensor | None = None  # the target's features of its last forward
        self.head_inputs: dict[str, Any] = {}
        self.root_position = 0
        self.prefix_length = 0
        self.tree: DraftTree | None = None

    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        # The target encodes the prompt and emits the first token itself, as `_sample` does.
        model_inputs = self.model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
        if "logits_to_keep" in model_inputs:
            model_inputs["logits_to_keep"] = 1
        outputs = self.model(**model_inputs, return_dict=True)
        self.features = self.capture.pop()
        if self.position_ids is None:
            self.position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return outputs.logits[0, -1:].float()

    def start(self, input_ids: torch.LongTensor) -> None:
        # Position of the root (the newest token); transformers derives positions from the padding mask.
        self.root_position = int(self.position_ids[0, -1]) + 1
        if self.padding_mask is not None:
            self.padding_mask = torch.cat([self.padding_mask, self.padding_mask.new_ones(1, 1)], dim=-1)
        # The head encodes the prompt: features of position t with the embedding of token t + 1.
        self._set_head_inputs(input_ids[:, 1:], self.features, self.position_ids)

    def _set_head_inputs(self, tokens: torch.LongTensor, features: torch.Tensor, position_ids: torch.LongTensor):
        self.head_inputs = dict(
            input_ids=tokens,
            target_hidden_states=features,
            attention_mask=self.padding_mask[:, :-1] if self.padding_mask is not None else None,
            position_ids=position_ids,
        )

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        encoded = self.draft_model(
            **self.head_inputs, past_key_values=self.draft_cache, use_cache=True, logits_to_keep=1
        )
        self.prefix_length = input_ids.shape[1] - 1
        self.tree = build_draft_tree(
            self.draft_model,
            input_ids[0, -1],
            encoded.hidden_states[0, -1],
            encoded.logits[0, -1],
            self.draft_cache,
            self.root_position,
            self.padding_mask,
            self.total_tokens,
            self.depth,
            self.top_k,
        )
        return self.tree

    def verify(self) -> tuple[torch.Tensor, None]:
        outputs = self.model(
            input_ids=self.tree.tokens[None],
            attention_mask=self.tree.attention_mask(self.padding_mask, self.prefix_length, self.model.dtype),
            position_ids=self.tree.position_ids(self.root_position),
            use_cache=True,
            return_dict=True,
            **cache_kwargs(self.cache),
        )
        self.features = self.capture.pop()
        return outputs.logits[0].float(), None

    def commit(self, step: _StepResult, visited: torch.LongTensor, input_ids: torch.LongTensor) -> None:
        # The root, and often the best first child, already sit where they stay: only the rest moves.
        in_place = next((i for i, node in enumerate(step.visited) if node != i), len(step.visited))
        keep_cache_positions(self.cache, self.prefix_length + in_place, visited[in_place:] - in_place)
        num_new = len(step.tokens)
        if self.padding_mask is not None:
            self.padding_mask = torch.cat([self.padding_mask, self.padding_mask.new_ones(1, num_new)], dim=-1)
        # The head encodes the kept nodes (old root and accepted drafts) with the embeddings of their successors.
        positions = torch.arange(self.root_position, self.root_position + num_new, device=input_ids.device)[None]
        self._set_head_inputs(input_ids[:, -num_new:], self.features[:, visited], positions)
        self.root_position += num_new

    def output_cache(self, cache: DynamicCache, length: int) -> DynamicCache:
        return self.cache


def _check_tree_inputs(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    candidate_generator: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool,
    model_kwargs: dict[str, Any],
) -> None:
    """Clear errors for what tree decoding cannot do, before any forward runs."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"EAGLE-3 tree decoding supports batch size 1, got {input_ids.shape[0]} sequences. Call generate once per "
            "prompt."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("EAGLE-3 decoding embeds the prompt tokens itself: pass `input_ids`, not `inputs_embeds`.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("EAGLE-3 decoding requires `use_cache=True`.")
    if synced_gpus:
        raise ValueError("EAGLE-3 tree decoding does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP generation).")
    if generation_config.return_dict_in_generate and (
        generation_config.output_attentions or generation_config.output_hidden_states
    ):
        raise ValueError(
            "EAGLE-3 tree decoding cannot return attentions or hidden states (tree forwards have no per-token ones); "
            "drop `output_attentions`/`output_hidden_states` or pass eagle3_mode='chain'."
        )
    implementation = model.config.get_text_config()._attn_implementation
    if implementation not in TREE_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"EAGLE-3 tree decoding verifies the draft tree with a 4D attention mask, which the target's attention "
            f"implementation {implementation!r} cannot take. Load the target with attn_implementation='sdpa' (or "
            "'eager'), e.g. `model.set_attn_implementation('sdpa')`, or pass eagle3_mode='chain'."
        )
    draft_vocab = candidate_generator.draft_model.config.draft_vocab_size
    total_tokens, depth, top_k = candidate_generator.total_tokens, candidate_generator.depth, candidate_generator.top_k
    if total_tokens < 2 or depth < 1 or not 1 <= top_k <= draft_vocab:
        raise ValueError(
            f"Invalid draft tree shape total_tokens={total_tokens}, depth={depth}, top_k={top_k}: need total_tokens >= 2 "
            f"(root plus at least one draft node), depth >= 1 and 1 <= top_k <= the draft vocabulary ({draft_vocab})."
        )
    check_tree_cache(model_kwargs.get(CACHE_NAME), generation_config.max_length)


@torch.no_grad()
def tree_assisted_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    candidate_generator: Any,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """EAGLE-3 decoding with dynamic draft trees; a drop-in for `GenerationMixin._assisted_decoding`.

    `candidate_generator` supplies the attached head (`draft_model`), the tree shape (`total_tokens`: nodes verified
    per step, root included; `depth`: most draft tokens per step = head forwards per step; `top_k`), the target
    layers to read (`feature_layer_ids`), `static_cache` (`eagle3_static_cache`: None picks the static-shape path
    where it applies, see `static_tree.use_static_tree`), `compile` (`eagle3_compile`: compile the static path's steps)
    and `stats` (an `Eagle3GenerationStats`, updated once per verification). The EAGLE reference code counts its
    depth without the first head forward: its `depth=d` is `depth=d + 1` here. `model_kwargs` are what `generate`
    passes to `_assisted_decoding`: the cache, attention mask, position ids.
    """
    from .static_tree import StaticTreeCaptureError, static_tree_runner, use_static_tree  # it builds on this module

    _check_tree_inputs(model, input_ids, candidate_generator, generation_config, synced_gpus, model_kwargs)
    draft_model: Eagle3DraftModel = candidate_generator.draft_model
    total_tokens, depth, top_k = candidate_generator.total_tokens, candidate_generator.depth, candidate_generator.top_k
    stats = candidate_generator.stats
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    batched_greedy = _uses_batched_greedy(do_sample, logits_processor, input_ids.device)
    stop_rule = host_stop_rule(stopping_criteria)
    static = use_static_tree(candidate_generator.static_cache, model, draft_model, input_ids.device, model_kwargs)
    compiled = candidate_generator.compile
    if compiled and not static:
        logger.warning_once(
            "eagle3_compile=True compiles the static-cache path, which this call does not take "
            "(eagle3_static_cache=None takes it on CUDA where it applies; pass eagle3_static_cache=True to insist, "
            "or to learn what stands in the way): it decodes uncompiled on the dynamic cache."
        )
    timer = PhaseTimer(input_ids.device)

    def accept(
        logits: torch.Tensor, tree: DraftTree, path: GreedyPath | None, input_ids: torch.LongTensor, scores, raw_logits
    ):
        if batched_greedy:
            return _accept_greedy(logits, tree, input_ids, stopping_criteria, stop_rule, scores, raw_logits, path)
        step, input_ids, scores, raw_logits = _accept(
            logits,
            tree.tokens,
            tree.children(),
            input_ids,
            logits_processor,
            stopping_criteria,
            do_sample,
            scores,
            raw_logits,
            stop_rule,
        )
        return step, torch.tensor(step.visited, device=tree.tokens.device), input_ids, scores, raw_logits

    with TargetFeatureCapture(model, candidate_generator.feature_layer_ids) as capture:
        timer.mark()
        decoder: TreeDecoder
        if static:
            try:
                decoder = static_tree_runner(
                    model,
                    draft_model,
                    capture,
                    total_tokens,
                    depth,
                    top_k,
                    generation_config.max_length,
                    batched_greedy=batched_greedy,
                    keep_logits=scores is not None or raw_logits is not None,
                    compiled=compiled,
                )
            except StaticTreeCaptureError as error:
                if compiled:
                    raise ValueError(
                        f"eagle3_compile=True cannot be honoured: {error}. Pass eagle3_compile=False to decode on "
                        "static caches without compiling."
                    ) from error
                if candidate_generator.static_cache:
                    raise ValueError(
                        f"eagle3_static_cache=True cannot be honoured: {error}. Pass eagle3_static_cache=False to "
                        "decode with the dynamic cache."
                    ) from error
                logger.warning_once(f"EAGLE-3 decodes with the dynamic cache instead: {error}.")
                static = False
        if not static:
            decoder = DynamicTreeDecoder(model, draft_model, capture, total_tokens, depth, top_k, model_kwargs)
        timer.mark("setup")
        first_logits = decoder.prefill(input_ids, model_kwargs)
        # The prompt's last token stands as the root of a tree without drafts.
        step, _, input_ids, scores, raw_logits = accept(
            first_logits, DraftTree.root_only(input_ids[0, -1]), None, input_ids, scores, raw_logits
        )
        if streamer is not None:
            streamer.put(torch.tensor([step.tokens]))
        finished = step.finished
        decoder.start(input_ids)
        timer.mark("prefill")

        while not finished:
            tree = decoder.draft(input_ids)
            timer.mark("draft")
            logits, path = decoder.verify()
            timer.mark("verify")
            step, visited, input_ids, scores, raw_logits = accept(logits, tree, path, input_ids, scores, raw_logits)
            decoder.commit(step, visited, input_ids)
            stats.record(step.num_accepted, len(step.tokens))
            if streamer is not None:
                streamer.put(torch.tensor([step.tokens]))
            finished = step.finished
            timer.mark("accept")

    if streamer is not None:
        streamer.end()
    stats.phase_seconds = timer.seconds()
    stats.static_cache = static
    stats.compiled = static and compiled
    if return_dict:
        cache = decoder.output_cache(model_kwargs[CACHE_NAME], input_ids.shape[1] - 1)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, **cache_kwargs(cache))
    return input_ids


__all__ = [
    "DraftTree",
    "DynamicTreeDecoder",
    "TreeDecoder",
    "build_draft_tree",
    "greedy_path",
    "grow_draft_tree",
    "sample_with_candidates",
    "tree_assisted_decoding",
]
