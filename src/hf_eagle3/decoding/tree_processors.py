"""Logits processors and warpers over a whole verified tree: what `_sample` would make of every node's logits at once.

`_sample` processes one row per token, seeing the sequence before it. In a tree, node `i` at depth `d` follows the
prefix and the `d` tokens on its path, so every node at one depth has a sequence of the same length: a processor that
treats rows independently gives each node its exact scores from one call per depth, and one that ignores the sequence
from one call over all nodes. Only transformers' own processors are known to be either; any other keeps the
node-by-node walk of `acceptance.accept`, which calls the list once per emitted token as `_sample` does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers.generation import LogitsProcessorList
from transformers.generation import logits_process as processors

from .draft_tree import DraftTree

# Scores in, scores out: the sequence is not read.
SEQUENCE_FREE = frozenset(
    {
        processors.TemperatureLogitsWarper,
        processors.TopKLogitsWarper,
        processors.TopPLogitsWarper,
        processors.MinPLogitsWarper,
        processors.TypicalLogitsWarper,
        processors.EpsilonLogitsWarper,
        processors.EtaLogitsWarper,
        processors.TopHLogitsWarper,
        processors.InfNanRemoveLogitsProcessor,
        processors.LogitNormalization,
        processors.SuppressTokensLogitsProcessor,
    }
)
# The sequence-free processors that can run inside a captured graph: tensor operations of fixed shapes, no host read.
# Left out: Eta and Top-H build a `torch.distributions.Categorical`, whose argument validation reads the device (on by
# default; dynamo turns it off process-wide), and Top-H assigns through a boolean mask (a data-dependent shape);
# suppressing tokens copies its token list to the scores' device on every call, a host copy where it was built on the
# CPU.
CAPTURABLE = SEQUENCE_FREE - {
    processors.EtaLogitsWarper,
    processors.TopHLogitsWarper,
    processors.SuppressTokensLogitsProcessor,
}
# Each row's scores depend on that row's sequence (its tokens or its length) only, through tensor operations.
ROW_WISE = frozenset(
    {
        processors.RepetitionPenaltyLogitsProcessor,
        processors.SequenceBiasLogitsProcessor,
        processors.NoBadWordsLogitsProcessor,
        processors.MinLengthLogitsProcessor,
        processors.MinNewTokensLengthLogitsProcessor,
        processors.ForcedBOSTokenLogitsProcessor,
        processors.ForcedEOSTokenLogitsProcessor,
        processors.ExponentialDecayLengthPenalty,
        processors.SuppressTokensAtBeginLogitsProcessor,
    }
)


def _is_row_wise(processor) -> bool:
    # A per-row prompt length given as a tensor is sized for the call's batch, not for the tree's rows.
    return type(processor) in ROW_WISE and not isinstance(
        getattr(processor, "prompt_ignore_length", None), torch.Tensor
    )


def processes_rows_independently(logits_processor: LogitsProcessorList) -> bool:
    """Whether `process_tree_logits` gives every node exactly the scores `_sample` would (exact types, so a subclass
    that changes what a processor does is not mistaken for it)."""
    return all(type(processor) in SEQUENCE_FREE or _is_row_wise(processor) for processor in logits_processor)


def capturable(logits_processor: LogitsProcessorList) -> bool:
    """Whether every processor is one of `CAPTURABLE` (exact types): the list can run inside a captured step."""
    return all(type(processor) in CAPTURABLE for processor in logits_processor)


def processor_settings(value: Any) -> Any:
    """`value` as JSON that tells settings apart: a processor's type and attributes, tensors by a digest."""
    if isinstance(value, torch.Tensor):
        digest = hashlib.sha256(repr(value.detach().cpu().tolist()).encode()).hexdigest()[:16]
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha256": digest}
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [processor_settings(item) for item in value]
    if isinstance(value, dict):
        return {str(name): processor_settings(item) for name, item in value.items()}
    if hasattr(value, "__dict__"):
        return {
            "type": type(value).__name__,
            **{name: processor_settings(item) for name, item in sorted(vars(value).items())},
        }
    return type(value).__name__


def path_tokens(tree: DraftTree, depth: int) -> torch.LongTensor:
    """`(n, depth)`: column `k` holds the token of each node's ancestor (or itself) at depth `k + 1`, 0 where it has
    none. `depth` is at least the tree's deepest node."""
    levels = torch.arange(1, depth + 1, device=tree.depths.device)
    # [k, i, j]: node j is node i's ancestor at depth k + 1 (at most one j per (k, i)).
    at_level = tree.ancestors[None] & (tree.depths[None, None, :] == levels[:, None, None])
    return (at_level.long() * tree.tokens).sum(-1).T


def process_tree_logits(
    logits: torch.Tensor,
    tree: DraftTree,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    depth: int,
) -> torch.Tensor:
    """The processed scores `(n, vocab)` of every node: what `_sample` would pass on for the node's logits after the
    prefix `input_ids` `(1, length)` (ending with the root's token) and the node's path.

    `logits_processor` must satisfy `processes_rows_independently`; `depth` bounds the tree's depth (a host value, so
    nothing is read from the device). Sequence-free lists run once over all rows, others once per depth over all
    rows, each node keeping the rows of its own depth.
    """
    if not logits_processor:
        return logits
    num_nodes = len(tree)
    prefix = input_ids.expand(num_nodes, -1)
    if all(type(processor) in SEQUENCE_FREE for processor in logits_processor):
        return logits_processor(prefix, logits)
    depth = min(depth, num_nodes - 1)
    paths = path_tokens(tree, depth)
    processed = logits_processor(prefix, logits)
    for level in range(1, depth + 1):
        level_scores = logits_processor(torch.cat([prefix, paths[:, :level]], dim=-1), logits)
        processed = torch.where((tree.depths == level)[:, None], level_scores, processed)
    return processed


__all__ = [
    "CAPTURABLE",
    "ROW_WISE",
    "SEQUENCE_FREE",
    "capturable",
    "path_tokens",
    "process_tree_logits",
    "processes_rows_independently",
    "processor_settings",
]
