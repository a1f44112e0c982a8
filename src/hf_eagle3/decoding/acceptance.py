"""Which tokens of a verified draft tree are emitted: the acceptance rules, exact for greedy decoding and sampling.

A walk from the root emits one token per visited node as `_sample` would at that position (`accept`). The same path
is found on the device for the whole tree in one go, with one host transfer: for greedy decoding without processors
(`greedy_path`, `accept_greedy`), and for sampling or processed greedy decoding (`sampled_path`, `accept_on_device`)
where every processor is one `tree_processors` can apply to all nodes exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .draft_tree import DraftTree
from .stopping import HostStopRule, first_stop, host_stop
from .tree_processors import process_tree_logits, processes_rows_independently


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


def uses_device_acceptance(do_sample: bool, logits_processor: LogitsProcessorList, device: torch.device) -> bool:
    """Whether to accept through `accept_on_device`: sampling or processors, every processor one that
    `process_tree_logits` handles exactly, and an accelerator.

    On the CPU the walk of `accept` wins again: it processes and samples only the rows it visits.
    """
    return (
        (do_sample or len(logits_processor) > 0)
        and processes_rows_independently(logits_processor)
        and device.type != "cpu"
    )


# `(num_visited, visited, emitted)`, on the device: the path length (a scalar), `visited` `(width,)`: the path's
# nodes in level order (= path order) followed by other nodes, and `emitted` `(width,)`: the token emitted at each.
TreePath = tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]
# A backend's sampled acceptance over the verified tree: `(logits, logits_processor, process)` to the nodes' processed
# scores and the drawn path, where `process` applies the processors eagerly (`process_tree_logits`).
SampledPathDraw = Callable[
    [torch.Tensor, LogitsProcessorList, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, TreePath]
]


def _path_nodes(on_child: torch.BoolTensor, tree: DraftTree, width: int) -> tuple[torch.Tensor, torch.LongTensor]:
    """The path through the nodes whose parent moved on to them (`on_child`): its length (a device scalar), and its
    nodes in level order (= path order) followed by other nodes, `(width,)`.

    A node is on the path when every node from the root to it is. Trees with a leading batch dimension
    (`grow_draft_trees`) give every row's path, each output with that leading dimension.
    """
    on_child[..., :1].fill_(True)  # the root is already emitted (a device fill: graphs cannot copy a host value)
    on_path = ~(tree.ancestors & ~on_child[..., None, :]).any(-1)
    # Path nodes first, in level order: a stable sort of "not on path".
    return on_path.sum(-1), torch.sort((~on_path).to(torch.uint8), dim=-1, stable=True).indices[..., :width]


def greedy_path(logits: torch.Tensor, tree: DraftTree, width: int) -> TreePath:
    """The path greedy acceptance keeps, found on the device with fixed shapes (no host read).

    A node is on the path when every node from the root to it holds the argmax of `logits` at its parent (siblings
    are distinct tokens, so the path is unique): the walk of `accept` for greedy decoding. `width` must be at least
    the longest path. Batched trees and their logits give every row's path (see `_path_nodes`).
    """
    argmax = logits.argmax(-1)
    num_visited, visited = _path_nodes(tree.tokens == argmax.gather(-1, tree.parents), tree, width)
    return num_visited, visited, argmax.gather(-1, visited)


def sampled_path(scores: torch.Tensor, tree: DraftTree, width: int) -> TreePath:
    """The path sampling acceptance keeps, drawn on the device with fixed shapes (no host read).

    `sample_with_candidates` at every node at once, `scores` `(n, vocab)` being the nodes' processed scores (their
    softmax is what `_sample` draws from): each node's children are tried in level order (best draft score first),
    the child `x_i` accepted with probability `p(x_i) / (1 - mass of the earlier, rejected children)`. Every node
    decides independently and the walk from the root only reads the nodes it visits, so only the path's last node
    needs its residual (its children's tokens zeroed): one draw there ends the step. `width` must be at least the
    longest path.
    """
    nodes = torch.arange(len(tree), device=scores.device)
    drafted = nodes > 0
    log_norm = scores.logsumexp(-1)
    child_probs = (scores[tree.parents, tree.tokens] - log_norm[tree.parents]).exp()
    # [i, j]: j is an earlier sibling of i. Elementwise sums, not a matmul: TF32 would round the masses.
    earlier = (tree.parents[:, None] == tree.parents[None, :]) & (nodes[None, :] < nodes[:, None]) & drafted
    rejected_mass = (earlier * child_probs).sum(-1)
    accept_probs = child_probs / (1 - rejected_mass).clamp_min(torch.finfo(scores.dtype).tiny)
    accepted = torch.rand(len(tree), device=scores.device, dtype=scores.dtype) < accept_probs
    num_visited, visited = _path_nodes(accepted & ~(earlier & accepted).any(-1), tree, width)

    last = visited.gather(0, (num_visited - 1).view(1))
    probs = scores.index_select(0, last)[0].sub(log_norm.index_select(0, last)).exp()
    # Count, not assign: a child's token may also be another node's, whose entry must not win.
    children = torch.zeros_like(probs).index_add_(0, tree.tokens, ((tree.parents == last) & drafted).to(probs.dtype))
    residual = probs * (children == 0)
    # Only float rounding can leave no residual mass (the children held all of it); p itself is then exact.
    residual = torch.where(residual.sum() > 0, residual, probs)
    # A categorical draw: argmax of p / Exp(1) noise (`torch.multinomial` would read the device).
    noise = torch.empty_like(residual).exponential_()
    draw = torch.where(residual > 0, residual / noise, -1).argmax().view(1)
    # Along the path each node emits its successor's token; the last one emits the draw.
    successors = torch.cat([tree.tokens[visited[1:]], draw])
    emitted = torch.where(nodes[:width] == num_visited - 1, draw, successors)
    return num_visited, visited, emitted


def accept_path(
    path: TreePath,
    processed: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.LongTensor,
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    scores: tuple | None,
    raw_logits: tuple | None,
    host: list[int] | None = None,
) -> tuple[StepResult, torch.LongTensor, torch.LongTensor, tuple | None, tuple | None]:
    """`accept`'s outputs for a path found on the device, with ONE host-device transfer (none where the caller
    passes the path read already as `host`: `[num_visited, *visited, *emitted]`).

    `processed` / `logits` `(n, vocab)`: the nodes' processed scores and raw logits (what `scores` and `raw_logits`
    collect). Generation stops after the first emitted token a criterion stops at. Also returns the kept path as a
    device index `(len(visited),)`, for the caches and the next head input.
    """
    num_visited, visited_index, emitted = path
    width = visited_index.numel()
    if host is None:
        host = torch.cat([num_visited.view(1), visited_index, emitted]).tolist()
    visited, tokens = _host_path(host, width)

    new_ids = emitted[None, : len(tokens)]
    new_scores = [processed[node : node + 1] for node in visited]
    step = _step(
        visited, tokens, first_stop(stopping_criteria, stop_rule, input_ids, new_ids, tokens, scores, new_scores)
    )
    num_emitted = len(step.tokens)
    input_ids = torch.cat([input_ids, new_ids[:, :num_emitted]], dim=-1)
    if scores is not None:
        scores += tuple(new_scores[:num_emitted])
    if raw_logits is not None:
        raw_logits += tuple(logits[node : node + 1] for node in visited[:num_emitted])
    return step, visited_index[:num_emitted], input_ids, scores, raw_logits


def accept_host_path(host: list[int], width: int, length: int, stop_rule: HostStopRule) -> StepResult:
    """`accept_path`'s step from a path read on the host already (`host`: `[num_visited, *visited, *emitted]`, of
    `width` each), for a row of `length` tokens so far whose stopping the host decides: no device work at all.

    Where nothing else needs the device (no scores or logits kept, no processor reading the sequence), a batch's rows
    are decided this way and their tokens joined to the sequences once, at the end.
    """
    visited, tokens = _host_path(host, width)
    return _step(visited, tokens, host_stop(stop_rule, length, tokens))


def _host_path(host: list[int], width: int) -> tuple[list[int], list[int]]:
    """The visited nodes and the tokens emitted at them, from a path read on the host."""
    num_visited = host[0]
    return host[1 : 1 + num_visited], host[1 + width : 1 + width + num_visited]


def _step(visited: list[int], tokens: list[int], stop: int | None) -> StepResult:
    """The step that emits `tokens` up to the one generation stops after (`stop`, None: all of them)."""
    num_emitted, finished = (len(tokens), False) if stop is None else (stop + 1, True)
    # Every emitted token but the full path's last (drawn at the last node) matched a drafted child.
    return StepResult(tokens[:num_emitted], visited[:num_emitted], min(num_emitted, len(visited) - 1), finished)


def accept_greedy(
    logits: torch.Tensor,
    tree: DraftTree | None,
    input_ids: torch.LongTensor,
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    scores: tuple | None,
    raw_logits: tuple | None,
    path: TreePath | None = None,
    host: list[int] | None = None,
) -> tuple[StepResult, torch.LongTensor, torch.LongTensor, tuple | None, tuple | None]:
    """`accept` for greedy decoding without logits processors, with ONE host-device transfer per step.

    Without processors a node's processed logits are its raw logits, so the accepted path is found on the device at
    once (`greedy_path`, or `path` when the verification computed it already). `host` is `path` read on the host
    where the caller read it already (one transfer for a whole batch); `tree` is only read without `path`. Returns
    what `accept_path` does.
    """
    path = path if path is not None else greedy_path(logits, tree, len(tree))
    return accept_path(path, logits, logits, input_ids, stopping_criteria, stop_rule, scores, raw_logits, host)


def accept_on_device(
    logits: torch.Tensor,
    tree: DraftTree,
    depth: int,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    do_sample: bool,
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    scores: tuple | None,
    raw_logits: tuple | None,
    draw: SampledPathDraw | None = None,
) -> tuple[StepResult, torch.LongTensor, torch.LongTensor, tuple | None, tuple | None]:
    """`accept` for sampling or processed greedy decoding, with ONE host-device transfer per step.

    Every node's logits are processed as `_sample` would process them (`process_tree_logits`: the processors must
    satisfy `processes_rows_independently`), then the path is drawn (`sampled_path`, or the backend's `draw`, which
    may process the logits itself) or found (`greedy_path`) for the whole tree at once. `depth` bounds the tree's
    depth. Returns what `accept_path` does.
    """

    def process(tree_logits: torch.Tensor) -> torch.Tensor:
        return process_tree_logits(tree_logits, tree, input_ids, logits_processor, depth)

    width = min(depth + 1, len(tree))
    if do_sample and draw is not None:
        processed, path = draw(logits, logits_processor, process)
    else:
        processed = process(logits)
        path = sampled_path(processed, tree, width) if do_sample else greedy_path(processed, tree, width)
    return accept_path(path, processed, logits, input_ids, stopping_criteria, stop_rule, scores, raw_logits)


__all__ = [
    "SampledPathDraw",
    "StepResult",
    "TreePath",
    "accept",
    "accept_greedy",
    "accept_host_path",
    "accept_on_device",
    "accept_path",
    "greedy_path",
    "sample_with_candidates",
    "sampled_path",
    "uses_batched_greedy",
    "uses_device_acceptance",
]
