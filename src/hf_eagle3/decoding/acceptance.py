"""Which tokens of a verified draft tree are emitted: the acceptance rules, exact for greedy decoding and sampling.

A walk from the root emits one token per visited node as `_sample` would at that position (`accept`); greedy
decoding without logits processors finds the same path on the device in one go (`greedy_path`, `accept_greedy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .draft_tree import DraftTree
from .stopping import HostStopRule, first_stop


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
class StepResult:
    """What one pass over a verified tree produced."""

    tokens: list[int]  # emitted tokens, in order
    visited: list[int]  # tree nodes whose successor was emitted: the positions both caches keep
    num_accepted: int  # emitted tokens that were draft nodes
    finished: bool


def accept(
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
) -> tuple[StepResult, torch.LongTensor, tuple | None, tuple | None]:
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
    return StepResult(emitted, visited, num_accepted, finished), input_ids, scores, raw_logits


def uses_batched_greedy(do_sample: bool, logits_processor: LogitsProcessorList, device: torch.device) -> bool:
    """Whether to accept through `accept_greedy`: greedy, no processors, and an accelerator.

    There it replaces one host-device synchronisation per emitted token by one per step. On the CPU host reads
    cost nothing while the argmax over every node's full-vocabulary row does not, so the node-by-node walk of
    `accept` (which stops at the first rejection) is cheaper.
    """
    return not do_sample and len(logits_processor) == 0 and device.type != "cpu"


# `(num_visited, visited, emitted)` of `greedy_path`, on the device.
GreedyPath = tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]


def greedy_path(logits: torch.Tensor, tree: DraftTree, width: int) -> GreedyPath:
    """The path greedy acceptance keeps, found on the device with fixed shapes (no host read).

    A node is on the path when every node from the root to it holds the target's argmax at its parent (siblings are
    distinct tokens, so the path is unique): the walk of `accept` without processors. Returns the path length (a
    device scalar), `visited` `(width,)`: the path nodes in level order (= path order) followed by other nodes,
    and `emitted` `(width,)`: the target's argmax at each of them. `width` must be at least the longest path.
    Trees with a leading batch dimension (`grow_draft_trees`) and their logits give every row's path, each output
    with that leading dimension.
    """
    argmax = logits.argmax(-1)
    agrees = tree.tokens == argmax.gather(-1, tree.parents)
    agrees[..., :1].fill_(True)  # the root is already emitted (a device fill: graphs cannot copy a host value)
    on_path = ~(tree.ancestors & ~agrees[..., None, :]).any(-1)
    # Path nodes first, in level order: a stable sort of "not on path".
    visited = torch.sort((~on_path).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    return on_path.sum(-1), visited, argmax.gather(-1, visited)


def accept_greedy(
    logits: torch.Tensor,
    tree: DraftTree | None,
    input_ids: torch.LongTensor,
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    scores: tuple | None,
    raw_logits: tuple | None,
    path: GreedyPath | None = None,
    host: list[int] | None = None,
) -> tuple[StepResult, torch.LongTensor, torch.LongTensor, tuple | None, tuple | None]:
    """`accept` for greedy decoding without logits processors, with ONE host-device transfer per step.

    Without processors a node's processed logits are its raw logits, so the accepted path is found on the device at
    once (`greedy_path`, or `path` when the verification computed it already). Also returns the accepted path as a
    device index `(len(visited),)`, for the caches and the next head input. `host` is `path` read on the host
    (`[num_visited, *visited, *emitted]`) where the caller read it already (one transfer for a whole batch); `tree` is
    only read without `path`.
    """
    num_visited, visited_index, emitted = path if path is not None else greedy_path(logits, tree, len(tree))
    width = visited_index.numel()
    if host is None:
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
    step = StepResult(tokens[:num_emitted], visited[:num_emitted], min(num_emitted, len(visited) - 1), finished)
    return step, visited_index[:num_emitted], input_ids, scores, raw_logits


__all__ = [
    "GreedyPath",
    "StepResult",
    "accept",
    "accept_greedy",
    "greedy_path",
    "sample_with_candidates",
    "uses_batched_greedy",
]
