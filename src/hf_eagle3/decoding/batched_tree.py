"""Tree decoding of a left-padded batch: every row grows its own tree, one target forward verifies them all.

Each row accepts its own number of tokens per step, exactly as if it were decoded alone. Both KV caches stay
rectangular: a step appends, to every row, as many entries as the row that accepted most; a row that accepted fewer
keeps its entries at the end of that block and leaves the first ones empty, as holes its 2D mask hides (the way
transformers hides left padding). Positions are counted per row, so holes shift nothing.

`BatchedTreeDecoder` runs this eagerly on transformers' dynamic cache, where a row that finishes leaves the batch
and its entries leave both caches; `batched_static_tree` runs it on static caches with fixed shapes (CUDA graphs),
where finished rows stay. `batched_tree_decoding` is the loop around either: acceptance, stopping, outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    GenerationConfig,
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SynthIDTextWatermarkLogitsProcessor,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList

from .._compat import CACHE_NAME, cache_kwargs
from ..target_features import TargetFeatureCapture
from . import static_tree
from .acceptance import StepResult, TreePath, accept, accept_greedy, accept_host_path, greedy_path
from .batched_static_tree import BatchedStaticTreeRunner, batched_static_tree_runner
from .draft_tree import DraftTree, additive_mask, gather_rows, grow_draft_trees
from .dynamic_tree import prefill_forward
from .kv_cache import keep_cache_positions
from .sdpa_backends import shape_stable_attention
from .stats import Eagle3GenerationStats, PhaseTimer
from .stopping import host_stop_rule

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig

# The caches are compacted (every row's entries moved to the end, most holes dropped) once they are this many times
# as long as the longest row: holes never cost more than this factor in cache memory and attention reads.
COMPACT_RATIO = 2.0


class BatchedTreeDecoder:
    """The caches and forwards of tree decoding for the rows of a batch still generating.

    `mask` `(rows, length)` marks the valid entries of both caches (the head's holds the same positions as the
    target's: the features of each kept position with the embedding of its successor), `valid_lengths` counts them
    per row on the host; `root_positions` `(rows,)` is each row's position of its last emitted token, the root of
    its next tree.
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
        self.mask = torch.empty(0)
        self.valid_lengths: list[int] = []
        self.root_positions = torch.empty(0)
        self.features = torch.empty(0)  # the target's features of its last forward
        self.roots = torch.empty(0)  # each row's last emitted token
        self.head_inputs: dict[str, Any] = {}
        self.trees: DraftTree | None = None
        self.rows: list[int] = []  # the batch row each of the decoder's rows decodes

    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the target over the prompts; its float logits at their last position, `(batch, vocab)`."""
        logits, self.features = prefill_forward(self.model, self.capture, input_ids, model_kwargs)
        self.mask = model_kwargs.get("attention_mask")
        if self.mask is None:
            self.mask = input_ids.new_ones(input_ids.shape)
        self.valid_lengths = self.mask.sum(1).tolist()
        self.rows = list(range(input_ids.shape[0]))
        position_ids = model_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (self.mask.long().cumsum(-1) - 1).clamp_min(0)
        self.root_positions = position_ids[:, -1] + 1
        # The head encodes the prompts once the first tokens are known: features of t with the embedding of t + 1.
        self.head_inputs = dict(
            target_hidden_states=self.features, attention_mask=self.mask, position_ids=position_ids
        )
        return logits[:, -1].float()

    def start(self, input_ids: torch.LongTensor, first_tokens: torch.LongTensor) -> None:
        """Prepare the first step once every row's first token `(rows,)` is known."""
        self.head_inputs["input_ids"] = torch.cat([input_ids[:, 1:], first_tokens[:, None]], dim=1)
        self.roots = first_tokens

    def draft(self) -> DraftTree:
        """Encode the new entries in the head and grow every row's tree; the trees, with a leading batch dimension."""
        # Each row's last entry is valid (holes come first in a block): the head's prediction of its root's child.
        encoded = self.draft_model(
            **self.head_inputs, past_key_values=self.draft_cache, use_cache=True, logits_to_keep=1
        )
        if self.mask.shape[1] > COMPACT_RATIO * max(self.valid_lengths):
            self._compact()
        prefix = self.mask.bool()
        rows, top_k = prefix.shape[0], self.top_k

        def forward_level(level: int, tokens: torch.LongTensor, hidden: torch.Tensor, tree_mask: torch.BoolTensor):
            mask = torch.cat([prefix[:, None].expand(rows, top_k, -1), tree_mask], dim=2)[:, None]
            # A level-d node predicts its children at the position of its parent's successor: root + d - 1.
            position_ids = (self.root_positions + level - 1)[:, None].expand(rows, top_k)
            return self.draft_model(
                input_ids=tokens,
                hidden_states=hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=self.draft_cache,
                use_cache=True,
            )

        self.trees = grow_draft_trees(
            self.draft_model,
            self.roots,
            encoded.hidden_states[:, -1],
            encoded.logits[:, -1],
            forward_level,
            self.total_tokens,
            self.depth,
            self.top_k,
        )
        if self.depth > 1:
            self.draft_cache.crop(-top_k * (self.depth - 1))
        return self.trees

    def _compact(self) -> None:
        """Move every row's valid entries, in order, to the end of both caches, and drop the holes before the
        longest row's; positions are the rows' own, so nothing else changes."""
        length = max(self.valid_lengths)
        # A stable sort of the mask puts each row's holes first and keeps its entries in order.
        order = torch.sort(self.mask.to(torch.uint8), dim=1, stable=True).indices[:, -length:]
        for cache in (self.cache, self.draft_cache):
            keep_cache_positions(cache, 0, order)
        self.mask = self.mask.gather(1, order)

    def verify(self) -> tuple[torch.Tensor, None]:
        """Run the target over every row's tree: float logits `(rows, n, vocab)` (and no greedy path)."""
        trees = self.trees
        rows, n = trees.tokens.shape
        allowed = torch.cat([self.mask.bool()[:, None].expand(rows, n, -1), trees.ancestors], dim=2)
        outputs = self.model(
            input_ids=trees.tokens,
            attention_mask=additive_mask(allowed, self.model.dtype),
            position_ids=trees.depths + self.root_positions[:, None],
            use_cache=True,
            return_dict=True,
            **cache_kwargs(self.cache),
        )
        self.features = self.capture.pop()
        return outputs.logits.float(), None

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with these batch rows only (the others finished); the caches still hold the verified trees."""
        if len(rows) == len(self.rows):
            return
        kept = [self.rows.index(row) for row in rows]
        self.rows = rows
        rows = torch.tensor(kept, device=self.mask.device)
        self.cache.batch_select_indices(rows)
        self.draft_cache.batch_select_indices(rows)
        self.mask, self.root_positions, self.features = self.mask[rows], self.root_positions[rows], self.features[rows]
        self.roots = self.roots[rows]
        self.head_inputs = {name: value[rows] for name, value in self.head_inputs.items()}
        self.valid_lengths = [self.valid_lengths[row] for row in kept]

    def commit(self, steps: dict[int, StepResult]) -> int:
        """Keep each row's visited nodes (batch row -> step) at the end of a block as long as the longest row's;
        returns the holes."""
        steps = [steps[row] for row in self.rows]
        lengths = [len(step.visited) for step in steps]
        self.valid_lengths = [valid + length for valid, length in zip(self.valid_lengths, lengths, strict=True)]
        counts = torch.tensor(lengths, device=self.mask.device)
        width = max(lengths)
        # Holes first: they repeat the row's first kept node, so their entries hold finite values.
        keep = torch.tensor([[step.visited[0]] * (width - len(step.visited)) + step.visited for step in steps])
        successors = torch.tensor([[step.tokens[0]] * (width - len(step.tokens)) + step.tokens for step in steps])
        keep, successors = keep.to(self.mask.device), successors.to(self.mask.device)
        offsets = torch.arange(width, device=self.mask.device) - (width - counts)[:, None]
        prefix_length = self.mask.shape[1]
        keep_cache_positions(self.cache, prefix_length, keep)
        self.mask = torch.cat([self.mask, (offsets >= 0).to(self.mask.dtype)], dim=1)
        # The head encodes the kept nodes (old root and accepted drafts) with the embeddings of their successors.
        self.head_inputs = dict(
            input_ids=successors,
            target_hidden_states=gather_rows(self.features, keep),
            attention_mask=self.mask,
            position_ids=self.root_positions[:, None] + offsets.clamp_min(0),
        )
        self.roots = successors[:, -1]
        self.root_positions = self.root_positions + counts
        return sum(width - length for length in lengths)


@torch.no_grad()
def batched_tree_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    *,
    draft_model: Eagle3DraftModel,
    decoding_config: Eagle3DecodingConfig,
    stats: Eagle3GenerationStats,
    batched_greedy: bool = False,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """`tree_loop.tree_assisted_decoding` for a batch of several left-padded prompts.

    With `batched_greedy` (`acceptance.uses_batched_greedy`), every row's greedy path is found on the device at
    once; otherwise each row's tree is walked on the host (`acceptance.accept`).

    Every row is decoded as `_sample` decodes it in a batch: processors and stopping criteria see that row's own
    sequence (its padding, prompt and tokens so far), a row that stops emits nothing more and is filled with
    `pad_token_id` up to the longest row. With `output_scores`/`output_logits`, step `t`'s entry holds each row's
    scores for its token `t`, and zeros for a row that had already stopped. The returned cache is None: its
    entries have holes and lack the rows that finished early.

    The caches and forwards are those of `batched_static_tree.BatchedStaticTreeRunner` where the static path
    applies (`static_tree.use_static_tree`, as for one prompt), else of `BatchedTreeDecoder`.
    """
    batch = input_ids.shape[0]
    processors = [row_processors(logits_processor, row) for row in range(batch)]
    if not any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria) and any(
        type(criterion) is not MaxLengthCriteria for criterion in stopping_criteria
    ):
        raise ValueError(
            "Without an EOS token, `generate` keeps decoding a row of a batch after its stopping criteria fired, "
            "until every row has stopped; EAGLE-3 decodes each row until its own criteria fire. Set "
            "`eos_token_id` (and `pad_token_id`), or call `generate` once per prompt."
        )
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    keep_scores = return_dict and generation_config.output_scores
    keep_logits = return_dict and generation_config.output_logits
    stop_rule = host_stop_rule(stopping_criteria)
    timer = PhaseTimer(input_ids.device)
    sequences = list(input_ids.split(1))
    scores: list[tuple | None] = [() if keep_scores else None for _ in range(batch)]
    raw_logits: list[tuple | None] = [() if keep_logits else None for _ in range(batch)]
    stats.rows = [Eagle3GenerationStats() for _ in range(batch)]
    # Greedy paths read in one transfer, stopping decided on the host, no scores or logits kept: each row's step is
    # decided from host lists alone, and its tokens (`new_tokens`) join its sequence once, at the end.
    on_host = batched_greedy and stop_rule is not None and not keep_scores and not keep_logits
    new_tokens: list[list[int]] = [[] for _ in range(batch)]

    def accept_row(row: int, logits: torch.Tensor, tree: DraftTree) -> StepResult:
        step, sequences[row], scores[row], raw_logits[row] = accept(
            logits,
            tree.tokens,
            tree.children(),
            sequences[row],
            processors[row],
            stopping_criteria,
            do_sample,
            scores[row],
            raw_logits[row],
            stop_rule,
        )
        return step

    def accept_rows(
        logits: torch.Tensor, trees: DraftTree, path: TreePath | None, rows: list[int], active: list[int]
    ) -> list[StepResult]:
        """The steps of the `active` rows; the decoder's tensors hold `rows` (batch rows) in that order."""
        slots = [rows.index(row) for row in active]
        if not batched_greedy:
            return [accept_row(row, logits[index], trees.row(index)) for index, row in zip(slots, active, strict=True)]
        if path is None:
            # The longest path holds the root and `depth` drafts.
            path = greedy_path(logits, trees, min(decoding_config.depth + 1, logits.shape[1]))
        num_visited, visited, emitted = path
        # Every row's path reaches the host in one transfer.
        hosts = torch.cat([num_visited[:, None], visited, emitted], dim=1).tolist()
        if on_host:
            steps = []
            for index, row in zip(slots, active, strict=True):
                length = sequences[row].shape[1] + len(new_tokens[row])
                steps.append(accept_host_path(hosts[index], visited.shape[1], length, stop_rule))
                new_tokens[row] += steps[-1].tokens
            return steps
        steps = []
        for index, row in zip(slots, active, strict=True):
            path = (num_visited[index], visited[index], emitted[index])
            step, _, sequences[row], scores[row], raw_logits[row] = accept_greedy(
                logits[index],
                None,  # the path is known
                sequences[row],
                stopping_criteria,
                stop_rule,
                scores[row],
                raw_logits[row],
                path,
                hosts[index],
            )
            steps.append(step)
        return steps

    with TargetFeatureCapture(model, draft_model.config.target_layer_ids) as capture, ExitStack() as contexts:
        timer.mark()
        decoder = _make_batch_decoder(
            model,
            draft_model,
            capture,
            decoding_config,
            input_ids.shape[0],
            generation_config.max_length,
            model_kwargs,
            batched_greedy=batched_greedy,
            keep_logits=keep_scores or keep_logits,
        )
        static = isinstance(decoder, BatchedStaticTreeRunner)
        if not static:
            # The dynamic cache gives almost every forward new shapes (see `sdpa_backends`).
            contexts.enter_context(shape_stable_attention())
        timer.mark("setup")
        first_logits = decoder.prefill(input_ids, model_kwargs)
        # Each prompt's last token stands as the root of a tree without drafts.
        steps = [
            accept_row(row, first_logits[row : row + 1], DraftTree.root_only(input_ids[row, -1]))
            for row in range(batch)
        ]
        first_tokens = torch.tensor([step.tokens[0] for step in steps], device=input_ids.device)
        decoder.start(input_ids, first_tokens)
        active = _go_on(decoder, list(range(batch)), steps)
        timer.mark("prefill")

        while active:
            trees = decoder.draft()
            timer.mark("draft")
            logits, path = decoder.verify()
            timer.mark("verify")
            steps = accept_rows(logits, trees, path, decoder.rows, active)
            stats.batch_forwards += 1
            for row, step in zip(active, steps, strict=True):
                stats.rows[row].record(step.num_accepted, len(step.tokens))
                stats.record(step.num_accepted, len(step.tokens))
            going_on = _go_on(decoder, active, steps)
            if going_on:
                kept = {row: step for row, step in zip(active, steps, strict=True) if not step.finished}
                stats.cache_holes += decoder.commit(kept)
            active = going_on
            timer.mark("accept")

    stats.phase_seconds = timer.seconds()
    stats.static_cache = static
    stats.compiled = static and decoding_config.compile
    if on_host:
        sequences = [
            torch.cat([sequence, sequence.new_tensor([tokens])], dim=1) if tokens else sequence
            for sequence, tokens in zip(sequences, new_tokens, strict=True)
        ]
    output_ids = _pad_rows(sequences, generation_config)
    if not return_dict:
        return output_ids
    return GenerateDecoderOnlyOutput(
        sequences=output_ids,
        scores=_stack_steps(scores) if keep_scores else None,
        logits=_stack_steps(raw_logits) if keep_logits else None,
        **cache_kwargs(None),
    )


def row_processors(processors: LogitsProcessorList, row: int) -> LogitsProcessorList:
    """The processors as `_sample` applies them to row `row` of its batch, for calls on that row alone.

    transformers' processors treat every row alike, but for the repetition penalty's padding lengths (per row) and
    the batch id `prefix_allowed_tokens_fn` is called with; processors whose state spans the batch are refused.
    """
    view = LogitsProcessorList()
    for processor in processors:
        if isinstance(processor, SynthIDTextWatermarkLogitsProcessor | UnbatchedClassifierFreeGuidanceLogitsProcessor):
            raise ValueError(
                f"{type(processor).__name__} keeps state for the whole batch, which EAGLE-3 cannot split into rows "
                "that advance by different numbers of tokens. Call `generate` once per prompt with it."
            )
        if isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(
            processor.prompt_ignore_length, torch.Tensor
        ):
            processor = copy.copy(processor)
            processor.prompt_ignore_length = processor.prompt_ignore_length[row : row + 1]
        elif isinstance(processor, PrefixConstrainedLogitsProcessor):
            processor = copy.copy(processor)
            processor._prefix_allowed_tokens_fn = _with_batch_id(processor._prefix_allowed_tokens_fn, row)
        view.append(processor)
    return view


def _with_batch_id(function: Callable[[int, torch.Tensor], list[int]], row: int) -> Callable:
    """`function(batch_id, input_ids)` called with `row` as the batch id whatever it is given."""

    def for_row(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return function(row, input_ids)

    return for_row


def _make_batch_decoder(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    capture: TargetFeatureCapture,
    config: Eagle3DecodingConfig,
    batch_size: int,
    max_length: int,
    model_kwargs: dict[str, Any],
    batched_greedy: bool,
    keep_logits: bool,
) -> BatchedTreeDecoder | BatchedStaticTreeRunner:
    """The batch's backend: the static-cache runner where it applies (see `eagle3_static_cache`) and could be built,
    else the dynamic-cache decoder."""
    total_tokens, depth, top_k = config.total_tokens, config.depth, config.top_k

    def build() -> BatchedStaticTreeRunner:
        return batched_static_tree_runner(
            model,
            draft_model,
            capture,
            batch_size,
            total_tokens,
            depth,
            top_k,
            max_length,
            batched_greedy=batched_greedy,
            keep_logits=keep_logits,
            compiled=config.compile,
        )

    runner = static_tree.static_runner(config, model, draft_model, model.device, model_kwargs, build)
    if runner is not None:
        return runner
    return BatchedTreeDecoder(model, draft_model, capture, total_tokens, depth, top_k, model_kwargs)


def _go_on(
    decoder: BatchedTreeDecoder | BatchedStaticTreeRunner, active: list[int], steps: list[StepResult]
) -> list[int]:
    """The rows of `active` that did not finish at `steps`; the decoder goes on with those."""
    going_on = [row for row, step in zip(active, steps, strict=True) if not step.finished]
    if going_on:
        decoder.keep_rows(going_on)
    return going_on


def _pad_rows(sequences: list[torch.LongTensor], generation_config: GenerationConfig) -> torch.LongTensor:
    """The rows as one tensor, the shorter ones filled with `pad_token_id` at the end, as `_sample` leaves them."""
    length = max(sequence.shape[1] for sequence in sequences)
    if all(sequence.shape[1] == length for sequence in sequences):
        return torch.cat(sequences)
    pad_token_id = generation_config._pad_token_tensor
    output = sequences[0].new_full((len(sequences), length), int(pad_token_id))
    for row, sequence in enumerate(sequences):
        output[row, : sequence.shape[1]] = sequence[0]
    return output


def _stack_steps(per_row: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Per-row tuples of `(1, vocab)` step tensors as a tuple of `(batch, vocab)`: zeros where a row had stopped."""
    reference = next(row[0] for row in per_row if row)
    steps = []
    for step in range(max(len(row) for row in per_row)):
        steps.append(
            torch.cat([row[step] if step < len(row) else torch.zeros_like(reference) for row in per_row], dim=0)
        )
    return tuple(steps)


__all__ = ["BatchedTreeDecoder", "batched_tree_decoding", "row_processors"]
