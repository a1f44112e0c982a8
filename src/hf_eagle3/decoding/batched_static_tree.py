"""Static-shape tree decoding of a left-padded batch: `batched_tree`'s layout on preallocated caches, as CUDA graphs.

The eager batched path keeps both caches rectangular by appending, each step, as many entries to every row as the
row that accepted most, each row's own at the end of that block and holes (masked) before them. The same layout
fits static caches: every row is written at one shared device position (`length`), which a step advances by the
longest row's count, a device scalar. What differs per row lives in device buffers: `valid` `(batch,
max_cache_len)` marks each row's real entries (its prompt without padding, then its kept nodes; nothing at or past
`length`), `root_positions` the position of each row's root (positions are the rows' own, so holes shift nothing).
A step writes a fixed block of `width` = depth + 1 entries (the longest accepted path), of which the first
`block_length` count, so its shapes never change: it is `static_tree`'s three step functions with a batch
dimension, captured as CUDA graphs on CUDA (and compiled with `eagle3_compile=True`) and simply called elsewhere.

A row that finishes stays in the graphs (its results are ignored) and keeps nothing more. The host knows every
length from the acceptance, so it compacts the caches (each row's entries moved to the end of the longest row's,
holes dropped) outside the captured steps, before a step could write past their end: they hold
`CACHE_LENGTH_RATIO` times `max_length`, so compaction is rare and the holes cost at most that factor in attention.
The rules of `static_tree` for what may run inside a captured step hold here too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .._compat import cache_kwargs
from .acceptance import StepResult, greedy_path
from .cuda_graphs import StepFunction
from .draft_tree import DraftTree, additive_mask, gather_rows, grow_draft_trees
from .kv_cache import keep_static_cache_positions, set_cache_length
from .static_tree import GraphRunner, bound_runner, runner_cache_length, runner_key, tree_size

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput
    from ..target_features import TargetFeatureCapture

# The caches hold this many times `max_length` positions (plus a step's blocks): holes fill the room beyond the
# longest row until the host compacts them.
CACHE_LENGTH_RATIO = 2.0


class BatchedStaticTreeRunner(GraphRunner):
    """Tree decoding of a batch of `batch_size` rows on static caches with fixed shapes; the decoder
    `batched_tree.batched_tree_decoding` drives (like `batched_tree.BatchedTreeDecoder`).

    Between steps the state lives in device buffers: `length`, `valid` and `root_positions` (see the module), and the
    head's next input block, `width` rows written at `head_start` of which the last `block_length` count (each row's
    own at the end): `head_tokens`, `head_features`, `head_positions`. The host hands each row's acceptance to
    `_commit` in `accepted` `(batch, 1 + 2 * width)`: the count kept, the visited nodes, the emitted tokens.
    """

    # Normal tensors even when built inside `torch.inference_mode()`: a later call outside it updates them in place.
    @torch.inference_mode(False)
    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        batch_size: int,
        total_tokens: int,
        depth: int,
        top_k: int,
        max_cache_len: int,
        key: tuple,
        compiled: bool = False,
    ):
        self.model, self.draft_model, self.batch_size = model, draft_model, batch_size
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k
        self.max_cache_len, self.key, self.compiled = max_cache_len, key, compiled
        self._allocate_caches(batch_size)
        device = model.device
        num_nodes = tree_size(total_tokens, depth, top_k)
        self.width = min(depth + 1, num_nodes)
        # The most a step writes past the length: the tree into the target cache, the tree levels into the head's.
        self.largest_block = max(num_nodes, (depth - 1) * top_k)
        self.columns = torch.arange(max_cache_len, device=device)
        self.block = torch.arange(self.width, device=device)
        self.length = torch.ones((), dtype=torch.long, device=device)
        self.head_start = torch.zeros((), dtype=torch.long, device=device)
        self.block_length = torch.ones((), dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_cache_len, dtype=torch.bool, device=device)
        self.root_positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.head_tokens = torch.zeros(batch_size, self.width, dtype=torch.long, device=device)
        self.head_features = torch.zeros(
            batch_size, self.width, 3 * draft_model.config.target_hidden_size, dtype=model.dtype, device=device
        )
        self.head_positions = torch.zeros(batch_size, self.width, dtype=torch.long, device=device)
        self.accepted = torch.zeros(batch_size, 1 + 2 * self.width, dtype=torch.long, device=device)
        self._draft_step = StepFunction(self._draft, compiled)
        self._verify_step = StepFunction(self._verify, compiled)
        self._commit_step = StepFunction(self._commit, compiled)
        self._steps = (self._draft_step, self._verify_step, self._commit_step)
        # The batch row each of the runner's rows decodes: all of them, always (finished rows stay in the graphs).
        self.rows = list(range(batch_size))
        # The host's copy of the lengths: the caches' (`length`) and each row's real entries.
        self.host_length = 0
        self.valid_counts: list[int] = []
        # Set per call by `begin`.
        self.capture: TargetFeatureCapture | None = None
        self.batched_greedy = False
        self.keep_logits = False

    def _warm_up_state(self) -> None:
        # Every row holds one real entry and keeps one node per step.
        self.valid.zero_()
        self.valid[:, 0] = True
        self.length.fill_(1)
        self.head_start.fill_(0)
        self.block_length.fill_(1)
        self.root_positions.fill_(1)
        self.head_positions.zero_()
        self.accepted.zero_()
        self.accepted[:, 0] = 1
        set_cache_length(self.target_cache, 1)

    # ------------------------------------------------------------------ step functions (captured)
    def _visible(self, block: torch.BoolTensor) -> torch.BoolTensor:
        """`(batch, q, max_cache_len)`: each row's valid entries, and its `block` `(batch, q, n)` right after the
        length."""
        index = self.columns - self.length
        inside = (index >= 0) & (index < block.shape[2])
        return self.valid[:, None, :] | (block[:, :, index.clamp(0, block.shape[2] - 1)] & inside)

    def _forward_level(
        self, level: int, tokens: torch.LongTensor, hidden: torch.Tensor, tree_mask: torch.BoolTensor
    ) -> Eagle3DraftOutput:
        return self.draft_model(
            input_ids=tokens,
            hidden_states=hidden,
            attention_mask=self._visible(tree_mask)[:, None],
            # A level-d node predicts its children at the position of its parent's successor: root + d - 1.
            position_ids=(self.root_positions + (level - 1))[:, None].expand(self.batch_size, self.top_k),
            past_key_values=self.head_cache,
            use_cache=True,
        )

    def _draft(self) -> DraftTree:
        """Encode last step's block in the head, grow every row's tree."""
        head = self.draft_model
        # The block's entries are valid already: each query sees its row's valid entries up to its own position.
        set_cache_length(self.head_cache, self.head_start)
        queries = self.head_start + self.block
        encoded = head(
            input_ids=self.head_tokens,
            target_hidden_states=self.head_features,
            attention_mask=(self.valid[:, None, :] & (self.columns <= queries[:, None]))[:, None],
            position_ids=self.head_positions,
            past_key_values=self.head_cache,
            use_cache=True,
        )
        set_cache_length(self.head_cache, self.length)
        # Every row's last real entry closes the block: its root, and the head's prediction of the root's child.
        last = (self.block_length - 1).view(1)
        trees = grow_draft_trees(
            head,
            self.head_tokens.index_select(1, last)[:, 0],
            encoded.hidden_states.index_select(1, last)[:, 0],
            encoded.logits.index_select(1, last)[:, 0],
            self._forward_level,
            self.total_tokens,
            self.depth,
            self.top_k,
        )
        set_cache_length(self.head_cache, self.length)  # the tree levels are dropped
        return trees

    def _verify(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.LongTensor, torch.LongTensor]:
        """The target over every row's tree: logits, features and every row's greedy path."""
        trees = self._draft_step.outputs
        outputs = self.model(
            input_ids=trees.tokens,
            attention_mask=additive_mask(self._visible(trees.ancestors), self.model.dtype),
            position_ids=self.root_positions[:, None] + trees.depths,
            use_cache=True,
            return_dict=True,
            **cache_kwargs(self.target_cache),
        )
        features = self.capture.pop()
        logits = outputs.logits.float()
        return logits, features, *greedy_path(logits, trees, self.width)

    def _commit(self) -> None:
        """Keep each row's visited nodes at the end of a block of the longest row's count; they and their
        successors become the head's next input block."""
        features = self._verify_step.outputs[1]
        counts = self.accepted[:, 0]
        visited, emitted = self.accepted[:, 1 : 1 + self.width], self.accepted[:, 1 + self.width :]
        longest = counts.max()
        # Each row's index into its path at every slot of the block: negative for holes, which repeat the first
        # node so that their entries hold finite values.
        offsets = self.block - (longest - counts)[:, None]
        source = offsets.clamp(0, self.width - 1)
        nodes = visited.gather(1, source)
        keep_static_cache_positions(self.target_cache, self.length, nodes, longest)
        self.valid.index_copy_(1, self.length + self.block, (offsets >= 0) & (self.block < longest))
        self.head_tokens.copy_(emitted.gather(1, source))
        self.head_features.copy_(gather_rows(features, nodes))
        self.head_positions.copy_(self.root_positions[:, None] + offsets.clamp_min(0))
        self.root_positions.add_(counts)
        self.block_length.copy_(longest)
        self.length.add_(longest)
        # The block starts where the length stood. Copied after the length moved, not before: inductor (torch 2.13)
        # let a copy of the length taken before its `add_` read the added value.
        self.head_start.copy_(self.length - longest)

    # ------------------------------------------------------------------ the decoder interface (host)
    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Encode the left-padded prompts into both caches; the target's float logits at their last position,
        `(batch, vocab)`."""
        prompt_length = input_ids.shape[1]
        padding = model_kwargs.get("attention_mask")
        if padding is None:
            padding = torch.ones_like(input_ids)
        position_ids = model_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)
        self.valid.zero_()
        self.valid[:, :prompt_length] = padding.bool()
        queries = torch.arange(prompt_length, device=input_ids.device)[:, None]
        # Padding queries see themselves only: their rows of the mask are never empty.
        allowed = (self.valid[:, None, :] & (self.columns <= queries)) | (self.columns == queries)
        logits, features = self._prompt_encoder()(input_ids, allowed, position_ids, model_kwargs)
        self.head_features[:, :1].copy_(features[:, -1:])
        self.head_positions[:, :1].copy_(position_ids[:, -1:])
        self.root_positions.copy_(position_ids[:, -1] + 1)
        self.head_start.fill_(prompt_length - 1)
        self.block_length.fill_(1)
        self.length.fill_(prompt_length)
        self.host_length = prompt_length
        self.valid_counts = padding.sum(1).tolist()
        return logits

    def start(self, input_ids: torch.LongTensor, first_tokens: torch.LongTensor) -> None:
        """Prepare the first step once every row's first token `(batch,)` is known."""
        self.head_tokens[:, 0].copy_(first_tokens)

    def draft(self) -> DraftTree:
        """Every row's tree, with a leading batch dimension."""
        return self._draft_step()

    def verify(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]]:
        """Every row's tree through the target: float logits `(batch, n, vocab)` and every row's greedy path."""
        # Before the target writes the tree past the length, unless the next steps fit.
        if self.host_length + self.width + self.largest_block > self.max_cache_len:
            self._compact()
        logits, _, *path = self._verify_step()
        if self.keep_logits:
            # The scores and logits tuples keep rows of these; the next replay overwrites graph outputs.
            logits = logits.clone()
        return logits, tuple(path)

    def keep_rows(self, rows: list[int]) -> None:
        """Rows that finished stay in the graphs: `commit` keeps nothing for them."""

    def commit(self, steps: dict[int, StepResult]) -> int:
        """Keep the visited nodes of the rows that go on (batch row -> step); returns the holes their blocks left."""
        accepted = [[0] * (1 + 2 * self.width) for _ in self.rows]
        for row, step in steps.items():
            count = len(step.visited)
            accepted[row][0] = count
            accepted[row][1 : 1 + count] = step.visited
            accepted[row][1 + self.width : 1 + self.width + count] = step.tokens
            self.valid_counts[row] += count
        self.accepted.copy_(torch.tensor(accepted))
        self._commit_step()
        longest = max(len(step.visited) for step in steps.values())
        self.host_length += longest
        return sum(longest - len(step.visited) for step in steps.values())

    def _compact(self) -> None:
        """Move every row's valid entries, in order, to the end of the longest row's in both caches (in step
        between the draft and the verification) and drop the rest; positions are the rows' own, so nothing else
        changes."""
        length = max(self.valid_counts)
        # A stable sort of the mask puts each row's holes first and keeps its entries in order.
        order = torch.sort(self.valid.to(torch.uint8), dim=1, stable=True).indices[:, -length:]
        for cache in (self.target_cache, self.head_cache):
            keep_static_cache_positions(cache, 0, order, length)
        self.valid[:, :length] = self.valid.gather(1, order)
        self.valid[:, length:] = False
        self.length.fill_(length)
        self.host_length = length


def batched_static_tree_runner(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    capture: TargetFeatureCapture,
    batch_size: int,
    total_tokens: int,
    depth: int,
    top_k: int,
    max_length: int,
    batched_greedy: bool,
    keep_logits: bool,
    compiled: bool = False,
) -> BatchedStaticTreeRunner:
    """The head's batch runner for this target, batch size, tree shape and `compiled`, bound to this call; built when
    the head has none for them or its caches are too short for `max_length` (see `static_tree.bound_runner`)."""
    key = runner_key(model, draft_model, compiled, batch_size, total_tokens, depth, top_k)
    num_nodes = tree_size(total_tokens, depth, top_k)
    room = min(depth + 1, num_nodes) + max(num_nodes, (depth - 1) * top_k)
    max_cache_len = runner_cache_length(math.ceil(CACHE_LENGTH_RATIO * max_length) + room, compiled)

    def build(max_cache_len: int) -> BatchedStaticTreeRunner:
        return BatchedStaticTreeRunner(
            model, draft_model, batch_size, total_tokens, depth, top_k, max_cache_len, key, compiled
        )

    return bound_runner(draft_model, True, key, max_cache_len, build, capture, batched_greedy, keep_logits)


__all__ = ["BatchedStaticTreeRunner", "batched_static_tree_runner"]
