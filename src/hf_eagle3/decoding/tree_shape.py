"""The tree that fits the device: the draft tree shape `eagle3_tree="auto"` decodes with.

The best tree trades acceptance against step time, and step time depends on the device, the target, the head, the
dtype and the decoding path: on a small CPU only a few tree tokens pay, on a GPU hundreds verify about as fast as
one. The shape maximising expected tokens/s = tau(shape) / step_seconds(shape) is chosen from a grid of shapes, once
per device, target, head, dtype, path and acceptance rule, and cached on disk (`tree_shape_cache_dir`).

Acceptance (tau: tokens per step) is measured exactly for every shape of the grid at once, per `top_k`: EAGLE-2's
tree of `(total_tokens, depth, top_k)` is the `total_tokens - 1` best-scoring candidates of levels `<= depth` of the
level-by-level expansion, which depends on `top_k` only (`draft_tree.grow_draft_tree`), and the target's logits at a
node depend only on that node's ancestors (tree attention). One decode per `top_k` that verifies the union of every
shape's nodes therefore gives, at each step, the drafts each shape would accept from the same root. The decodes run
on a fixed set of short, varied requests (`calibration`), not on the call's prompt: acceptance differs widely from
prompt to prompt, and the choice should not depend on which came first; tau pools their steps. Under the call's
own rule (`AcceptanceRule`: greedy or sampling, with its processors and warpers applied to every node as
`tree_processors` does): greedy acceptance follows the argmax, so a shape accepts the greedy path's prefix inside its
tree; the multi-candidate sampling rule moves to a drafted child `c` with probability exactly `p(c)` (the processed
target distribution at its parent), so a shape accepts, in expectation, the sum over its drafts of the product of `p`
along their paths: computed, not sampled. The decode follows the path the rule accepts through the union (drawn,
when sampling), so it roots its steps at fewer positions than a small tree would: tau is averaged over the positions
it visits. Greedy and each sampling setting (temperature, top-k, top-p, penalties...) get their own choice; a call
whose processors `tree_processors` cannot apply to a whole tree decodes with the greedy choice.

Step time is measured on the call's path (dynamic cache, or static caches with CUDA graphs) by short greedy decodes
with a few shapes, read from the loop's phase timers (device time on CUDA), and modelled as
`draft = base(top_k) + (depth - 1) * level(top_k)` (two depths per `top_k`) plus `verify(tree nodes)`, acceptance
included (piecewise linear between the measured sizes). It is cached apart from the choices, shared by every
acceptance rule. The compiled path (`eagle3_compile=True`) decodes with the static path's choice: compiling speeds up
drafting and verification by similar factors, so the order of the shapes carries over, and only the chosen shape is
compiled (which any shape would be) instead of every measured one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.generation import LogitsProcessorList
from transformers.utils import logging

from .._compat import CACHE_NAME
from ..target_features import TargetFeatureCapture
from .acceptance import StepResult, TreePath, greedy_path, sampled_path
from .calibration import CALIBRATION_REQUESTS, calibration_prompts, render_requests, requests_key, target_tokenizer
from .draft_tree import DraftTree
from .dynamic_tree import DynamicTreeDecoder
from .sdpa_backends import shape_stable_attention
from .static_tree import tree_size, use_static_tree
from .tree_processors import process_tree_logits, processes_rows_independently, processor_settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig

logger = logging.get_logger(__name__)

# Bump when what a cache file holds, or how it is measured, changes: older files are then measured again.
CACHE_FORMAT = 3
# Timed decodes per measured shape: each phase keeps its fastest, which discounts first-call costs and the time other
# processes take from a shared CPU.
TIMING_ROUNDS = 3


@dataclass(frozen=True)
class TreeShape:
    """A draft tree shape: `total_tokens` nodes verified per step (root included), `depth` drafts at most per step
    (head forwards per step), `top_k` branching."""

    total_tokens: int
    depth: int
    top_k: int

    @property
    def nodes(self) -> int:
        """Nodes the tree actually has: fewer than `total_tokens` when the expansion has fewer candidates."""
        return tree_size(self.total_tokens, self.depth, self.top_k)

    def generate_kwargs(self) -> dict[str, int]:
        return {"eagle3_total_tokens": self.total_tokens, "eagle3_depth": self.depth, "eagle3_top_k": self.top_k}

    def __str__(self) -> str:
        return f"{self.total_tokens}/{self.depth}/{self.top_k}"


@dataclass(frozen=True)
class ShapeGrid:
    """The shapes `auto` chooses from: every `(total_tokens, depth, top_k)` combination whose tree has
    `total_tokens` nodes; and the new tokens of each calibration decode (one per top_k and prompt) and of each
    timed decode."""

    total_tokens: tuple[int, ...]
    depths: tuple[int, ...]
    top_ks: tuple[int, ...]
    calibration_tokens: int = 64
    timing_tokens: int = 16

    def for_head(self, draft_model: Eagle3DraftModel) -> ShapeGrid:
        """The grid without the branchings beyond the head's draft vocabulary (no tree `generate` can grow)."""
        return replace(self, top_ks=tuple(k for k in self.top_ks if k <= draft_model.config.draft_vocab_size))

    def shapes(self) -> list[TreeShape]:
        shapes = (
            TreeShape(total, depth, top_k)
            for top_k in self.top_ks
            for depth in self.depths
            for total in self.total_tokens
        )
        return [shape for shape in shapes if shape.nodes == shape.total_tokens]


# Small trees on a CPU, where every verified token costs; large ones on accelerators, where a forward over hundreds
# of tokens costs about as much as over one, and longer measurements are cheap. Shallow ones too: sampling at
# temperature 1 rarely accepts more than three or four drafts, and every level drafted costs a head forward. Each
# calibration prompt (eight built-in ones, `calibration`) is decoded for the start of its answer, per top_k: 192 tokens
# per top_k in all on a CPU, 512 on an accelerator.
CPU_GRID = ShapeGrid(
    total_tokens=(3, 4, 5, 6, 8, 10, 12, 16, 20, 24), depths=(2, 3, 4, 5, 6), top_ks=(2, 3, 4), calibration_tokens=24
)
ACCELERATOR_GRID = ShapeGrid(
    total_tokens=(32, 48, 64, 96, 128, 192, 256, 384),
    depths=(3, 4, 5, 6, 8, 10, 12),
    top_ks=(8, 16, 24),
    calibration_tokens=64,
    timing_tokens=64,
)


def default_grid(device: torch.device) -> ShapeGrid:
    return CPU_GRID if device.type == "cpu" else ACCELERATOR_GRID


# ------------------------------------------------------------------------------------------------ acceptance
@dataclass(frozen=True)
class AcceptanceRule:
    """How a call accepts drafts, which acceptance is calibrated under: greedily or by sampling (`do_sample`), from
    every node's logits processed by `logits_processor` (its processors and warpers, `tree_processors`)."""

    do_sample: bool = False
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)

    def path(self, scores: torch.Tensor, tree: DraftTree, width: int) -> TreePath:
        """The path this rule accepts through `tree` given its nodes' processed `scores` (drawn when sampling)."""
        return sampled_path(scores, tree, width) if self.do_sample else greedy_path(scores, tree, width)

    def key(self) -> dict[str, Any]:
        """What identifies the rule in a cache key: `do_sample`, and each processor's type and settings."""
        return {"do_sample": self.do_sample, "processors": [processor_settings(p) for p in self.logits_processor]}


GREEDY = AcceptanceRule()


def acceptance_rule(do_sample: bool, logits_processor: LogitsProcessorList | None) -> AcceptanceRule:
    """The rule a call's acceptance is calibrated under: its own where `process_tree_logits` can apply its processors
    to a whole tree (transformers' own processors and warpers), else plain greedy acceptance."""
    logits_processor = LogitsProcessorList(logits_processor or [])
    if not processes_rows_independently(logits_processor):
        return GREEDY
    return AcceptanceRule(do_sample, logits_processor)


def expansion_size(depth: int, top_k: int) -> int:
    """Nodes of the tree that keeps every candidate of the expansion, root included."""
    return 1 + top_k + (depth - 1) * top_k * top_k


def union_nodes(tree: DraftTree, depths: tuple[int, ...], max_total_tokens: int) -> torch.LongTensor:
    """Nodes of `tree` (grown with every candidate kept) in some shape of `depths` with at most `max_total_tokens`
    nodes, root included, in tree order: the union of the `max_total_tokens - 1` best of levels `<= depth`."""
    order = torch.sort(tree.scores[1:], descending=True, stable=True).indices + 1
    keep = torch.zeros(len(tree), dtype=torch.bool, device=tree.tokens.device)
    keep[0] = True
    for depth in depths:
        best = order[tree.depths[order] <= depth][: max_total_tokens - 1]
        keep[best] = True
    return keep.nonzero()[:, 0]


def subtree(tree: DraftTree, nodes: torch.LongTensor) -> DraftTree:
    """The tree of the ancestor-closed `nodes` (ascending, root first) of `tree`."""
    index_of = torch.zeros(len(tree), dtype=torch.long, device=nodes.device)
    index_of[nodes] = torch.arange(nodes.numel(), device=nodes.device)
    return DraftTree(
        tokens=tree.tokens[nodes],
        parents=index_of[tree.parents[nodes]],
        depths=tree.depths[nodes],
        ancestors=tree.ancestors[nodes][:, nodes],
        scores=tree.scores[nodes],
    )


def reach_probabilities(scores: torch.Tensor, tree: DraftTree, do_sample: bool) -> torch.Tensor:
    """`(n,)`: the probability that a step's acceptance walks from the root to each node of `tree`, given every
    node's processed `scores` `(n, vocab)` (the root's is 1).

    Greedy acceptance moves from a node to the child holding its argmax. The multi-candidate sampling rule moves to a
    drafted child `c` with probability exactly `p(c)`, the softmax of its parent's scores, whichever other children
    were drafted and in whatever order (`acceptance.sample_with_candidates`): so a node is reached with the product of
    `p` along its path, and a tree accepts, in expectation, the sum of that over its drafts.
    """
    if do_sample:
        moves = (scores.log_softmax(-1)[tree.parents, tree.tokens]).exp()
    else:
        moves = (scores.argmax(-1)[tree.parents] == tree.tokens).to(scores.dtype)
    moves[0] = 1
    return torch.where(tree.ancestors, moves[None, :], 1).prod(-1)


def accepted_per_shape(tree: DraftTree, reach: torch.Tensor, shapes: list[TreeShape]) -> dict[TreeShape, float]:
    """The drafts each shape (of `tree`'s top_k, its nodes all in `tree`) accepts in expectation from the same root:
    the `reach` probabilities of its nodes summed (for greedy decoding, the greedy path's prefix in its tree)."""
    order = torch.sort(tree.scores[1:], descending=True, stable=True).indices + 1
    accepted = {}
    for shape in shapes:
        selected = order[tree.depths[order] <= shape.depth][: shape.total_tokens - 1]
        accepted[shape] = float(reach[selected].sum())
    return accepted


def union_step(
    logits: torch.Tensor,
    tree: DraftTree,
    input_ids: torch.LongTensor,
    rule: AcceptanceRule,
    depth: int,
    shapes: list[TreeShape],
) -> tuple[TreePath, dict[TreeShape, float]]:
    """The path `rule` accepts through the verified union `tree` (`logits` `(n, vocab)`, after `input_ids`; `depth`
    bounds the tree's depth), and the drafts each shape accepts from its root in expectation."""
    scores = process_tree_logits(logits, tree, input_ids, rule.logits_processor, depth)
    path = rule.path(scores, tree, min(depth + 1, len(tree)))
    return path, accepted_per_shape(tree, reach_probabilities(scores, tree, rule.do_sample), shapes)


class _UnionTreeDecoder(DynamicTreeDecoder):
    """The dynamic-cache decoder, verifying the union of the shapes' trees out of a tree grown with every candidate."""

    def __init__(self, *args, depths: tuple[int, ...], max_total_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.union_depths, self.max_total_tokens = depths, max_total_tokens

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        grown = super().draft(input_ids)
        self.tree = subtree(grown, union_nodes(grown, self.union_depths, self.max_total_tokens))
        return self.tree


def calibration_seed(prompt: torch.LongTensor) -> int:
    """The seed of a prompt's sampled calibration decodes: a digest of its ids."""
    return zlib.crc32(prompt.cpu().numpy().tobytes())


@torch.no_grad()
def calibrate_acceptance(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    prompts: list[torch.LongTensor],
    shapes: list[TreeShape],
    new_tokens: int,
    rule: AcceptanceRule = GREEDY,
) -> dict[TreeShape, float]:
    """Tau (tokens per step: accepted drafts + 1) of every shape under `rule`, from one decode per top_k and prompt.

    Every prompt `(1, length)` is decoded for `new_tokens` tokens (past EOS: only acceptance is counted) along the
    path `rule` accepts through the union of the shapes' trees of one top_k; every step adds each shape's expected
    accepted drafts from the step's root. The prompts are pooled: tau counts every prompt's steps alike, so each
    prompt weighs by the steps its decode took. A sampled path is drawn from generators of its own (every device's),
    seeded by the prompt (`calibration_seed`): a prompt's draws do not depend on the prompts beside it, and the
    caller's random streams stay as they were.
    """
    totals = {shape: 0.0 for shape in shapes}
    steps = {shape: 0 for shape in shapes}
    cuda_devices = list(range(torch.cuda.device_count())) if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        for top_k in sorted({shape.top_k for shape in shapes}):
            group = [shape for shape in shapes if shape.top_k == top_k]
            depths = tuple(sorted({shape.depth for shape in group}))
            max_total = max(shape.total_tokens for shape in group)
            full = expansion_size(depths[-1], top_k)
            for prompt in prompts:
                torch.manual_seed(calibration_seed(prompt))
                steps_of_prompt = union_steps(
                    model, draft_model, prompt, new_tokens, full, depths, top_k, max_total, group, rule
                )
                for _, step in steps_of_prompt:
                    for shape, accepted in step.items():
                        totals[shape] += accepted
                        steps[shape] += 1
    return {shape: 1 + totals[shape] / steps[shape] for shape in shapes}


def union_steps(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    prompt: torch.LongTensor,
    new_tokens: int,
    full: int,
    depths: tuple[int, ...],
    top_k: int,
    max_total: int,
    shapes: list[TreeShape],
    rule: AcceptanceRule = GREEDY,
) -> Iterator[tuple[int, dict[TreeShape, float]]]:
    """Each step of a decode of the union trees under `rule`: the tokens it emitted, and the drafts each shape
    accepts from the step's root (in expectation when sampling). Sampling draws from the global random generators."""
    model_kwargs = {CACHE_NAME: DynamicCache(config=model.config), "attention_mask": None, "use_cache": True}
    with TargetFeatureCapture(model, draft_model.config.target_layer_ids) as capture, shape_stable_attention():
        decoder = _UnionTreeDecoder(
            model,
            draft_model,
            capture,
            full,
            depths[-1],
            top_k,
            model_kwargs,
            depths=depths,
            max_total_tokens=max_total,
        )
        logits = decoder.prefill(prompt, model_kwargs)
        root = DraftTree.root_only(prompt[0, -1])
        _, _, first = rule.path(process_tree_logits(logits, root, prompt, rule.logits_processor, 0), root, 1)
        input_ids = torch.cat([prompt, first.view(1, 1)], dim=1)
        decoder.start(input_ids)
        while input_ids.shape[1] - prompt.shape[1] < new_tokens:
            tree = decoder.draft(input_ids)
            logits, _ = decoder.verify()
            (num_visited, visited, emitted), accepted = union_step(logits, tree, input_ids, rule, depths[-1], shapes)
            num_visited = int(num_visited)
            path, emitted = visited[:num_visited], emitted[:num_visited]
            input_ids = torch.cat([input_ids, emitted[None]], dim=1)
            step = StepResult(emitted.tolist(), path.tolist(), num_visited - 1, finished=False)
            decoder.commit(step, path, input_ids)
            yield num_visited, accepted


# ------------------------------------------------------------------------------------------------ step time
@dataclass(frozen=True)
class StepTiming:
    """Seconds per step of one shape, as its decode's phase timers recorded them."""

    shape: TreeShape
    draft: float
    verify: float  # verification and acceptance


def timing_shapes(grid: ShapeGrid) -> list[TreeShape]:
    """The shapes decoded to fit the step-time model: two depths per top_k (the draft cost), spread over the grid's
    tree sizes (the verify cost), larger trees on the deeper and wider expansions that can hold them."""
    depths = sorted({min(grid.depths), max(grid.depths)})
    expansions = sorted(
        ((depth, top_k) for top_k in grid.top_ks for depth in depths),
        key=lambda expansion: expansion_size(*expansion),
    )
    totals = sorted(grid.total_tokens)
    last = max(len(expansions) - 1, 1)
    picks = [totals[round(i * (len(totals) - 1) / last)] for i in range(len(expansions))]
    return [
        TreeShape(min(total, tree_size(total, depth, top_k)), depth, top_k)
        for total, (depth, top_k) in zip(picks, expansions, strict=True)
    ]


@torch.no_grad()
def time_shapes(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    prompt: torch.LongTensor,
    shapes: list[TreeShape],
    static_cache: bool,
    compile: bool,
    new_tokens: int,
    rounds: int = TIMING_ROUNDS,
    attention_mask: torch.LongTensor | None = None,
) -> list[StepTiming]:
    """Draft and verify seconds per step of each shape, the fastest of `rounds` greedy decodes of `prompt` on the
    given path (a left-padded batch with its `attention_mask`: seconds per batch step). The dynamic path takes the
    shapes in turn every round, so that a busy spell of a shared CPU does not fall on one shape; the static one
    decodes each shape `rounds` times in a row (its runner is built per shape). A single prompt whose text ends at
    once (its first new token is EOS) is timed on its longest prefix that does not."""
    order = (
        [(r, s) for s in shapes for r in range(rounds)]
        if static_cache
        else [(r, s) for r in range(rounds) for s in shapes]
    )
    fastest: dict[TreeShape, StepTiming] = {}
    for _, shape in order:
        while True:
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt) if attention_mask is None else attention_mask,
                assistant_model=draft_model,
                do_sample=False,
                max_new_tokens=new_tokens,
                eagle3_mode="tree",
                eagle3_static_cache=static_cache,
                eagle3_compile=compile,
                **shape.generate_kwargs(),
            )
            stats = draft_model.last_generation_stats
            if stats.target_forwards or attention_mask is not None or prompt.shape[1] == 1:
                break
            # The text ends at once after this prompt: time on its prefix (a step's time does not depend on it).
            prompt = prompt[:, :-1]
        if stats.target_forwards == 0:
            raise RuntimeError(
                f"timing the tree {shape} decoded no step: the prompt (and each of its prefixes) ends the text at once."
            )
        # A batch's statistics count each verification once per row it served.
        phases, steps = stats.phase_seconds, stats.batch_forwards or stats.target_forwards
        draft, verify = phases["draft"] / steps, (phases["verify"] + phases["accept"]) / steps
        if shape in fastest:
            draft, verify = min(draft, fastest[shape].draft), min(verify, fastest[shape].verify)
        fastest[shape] = StepTiming(shape, draft, verify)
    return [fastest[shape] for shape in shapes]


def timing_rows(timings: list[StepTiming]) -> list[dict[str, Any]]:
    """The timings as a cache record keeps them, in milliseconds."""
    return [{"shape": asdict(t.shape), "draft_ms": 1000 * t.draft, "verify_ms": 1000 * t.verify} for t in timings]


class StepTimeModel:
    """Seconds per step of any shape from the timed ones: `base(top_k) + (depth - 1) * level(top_k)` to draft
    (fitted per top_k), `verify(nodes)` piecewise linear in the tree's nodes (linear past the ends)."""

    def __init__(self, timings: list[StepTiming]):
        self.draft_fit: dict[int, tuple[float, float]] = {}
        for top_k in {timing.shape.top_k for timing in timings}:
            points = [(timing.shape.depth - 1, timing.draft) for timing in timings if timing.shape.top_k == top_k]
            levels = [x for x, _ in points]
            mean_x, mean_y = sum(levels) / len(points), sum(y for _, y in points) / len(points)
            spread = sum((x - mean_x) ** 2 for x in levels)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
            slope = max(slope, 0.0)
            self.draft_fit[top_k] = (mean_y - slope * mean_x, slope)
        by_nodes: dict[int, list[float]] = {}
        for timing in timings:
            by_nodes.setdefault(timing.shape.nodes, []).append(timing.verify)
        self.verify_points = sorted((nodes, sum(ys) / len(ys)) for nodes, ys in by_nodes.items())

    def draft_seconds(self, shape: TreeShape) -> float:
        if shape.top_k not in self.draft_fit:
            raise ValueError(f"No timed shape has top_k={shape.top_k} (timed: {sorted(self.draft_fit)}).")
        base, level = self.draft_fit[shape.top_k]
        return base + level * (shape.depth - 1)

    def verify_seconds(self, shape: TreeShape) -> float:
        points, nodes = self.verify_points, shape.nodes
        if len(points) == 1:
            return points[0][1]
        # The segment holding `nodes`, or the nearest end segment.
        right = next((i for i, (x, _) in enumerate(points) if x >= nodes), len(points) - 1)
        right = min(max(right, 1), len(points) - 1)
        (x0, y0), (x1, y1) = points[right - 1], points[right]
        return max(y0 + (y1 - y0) * (nodes - x0) / (x1 - x0), 0.0)

    def step_seconds(self, shape: TreeShape) -> float:
        return self.draft_seconds(shape) + self.verify_seconds(shape)


def choose_shape(taus: dict[TreeShape, float], step_time: StepTimeModel) -> tuple[TreeShape, list[dict]]:
    """The shape with the most expected tokens/s (tau / step seconds; the smaller shape on a tie), and the table of
    every shape's figures, best first."""
    rows = [
        {
            "shape": asdict(shape),
            "tau": tau,
            "step_ms": 1000 * step_time.step_seconds(shape),
            "tokens_per_s": tau / max(step_time.step_seconds(shape), 1e-9),
        }
        for shape, tau in taus.items()
    ]
    rows.sort(key=lambda row: (-row["tokens_per_s"], row["shape"]["total_tokens"], row["shape"]["depth"]))
    return TreeShape(**rows[0]["shape"]), rows


# ------------------------------------------------------------------------------------------------ the cache
def tree_shape_cache_dir() -> Path:
    """Where chosen shapes are kept: `$HF_EAGLE3_TREE_CACHE`, else `$HF_EAGLE3_CACHE/tree_shapes` (default
    `~/.cache/hf_eagle3/tree_shapes`)."""
    if os.environ.get("HF_EAGLE3_TREE_CACHE"):
        return Path(os.environ["HF_EAGLE3_TREE_CACHE"])
    return Path(os.environ.get("HF_EAGLE3_CACHE", Path.home() / ".cache" / "hf_eagle3")) / "tree_shapes"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# Where a head keeps its fingerprint, with the storage and version of every tensor it was computed from.
FINGERPRINT_ATTRIBUTE = "_eagle3_fingerprint"


def head_fingerprint(draft_model: Eagle3DraftModel) -> str:
    """A digest of the head's weights (names, shapes, sums and first values), kept on the head while they are
    unchanged (same tensors, no in-place update)."""
    tensors = dict(draft_model.named_parameters())
    tensors.update(draft_model.named_buffers())
    version = tuple((tensor.data_ptr(), tensor._version) for tensor in tensors.values())
    known = getattr(draft_model, FINGERPRINT_ATTRIBUTE, None)
    if known is not None and known[0] == version:
        return known[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        values = tensor.detach().double()
        summary = [float(values.sum()), float(values.abs().sum()), *values.flatten()[:8].tolist()]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{summary}".encode())
    setattr(draft_model, FINGERPRINT_ATTRIBUTE, (version, digest.hexdigest()))
    return digest.hexdigest()


def cache_key(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    path: str,
    grid: ShapeGrid,
    rule: AcceptanceRule = GREEDY,
    requests: str | None = None,
) -> dict[str, Any]:
    """What a chosen shape depends on: device, target, head, dtypes, attention, decoding path, acceptance rule (greedy
    or sampling, and the processors), grid, versions; and `requests`, the digest of a call's own calibration requests
    (`calibration.requests_key`; None for the default calibration, which `tune_tree_shape` may also make)."""
    target_config = model.config.to_json_string(use_diff=False)
    key = {
        "format": CACHE_FORMAT,
        "device": device_name(model.device),
        "target_config": hashlib.sha256(target_config.encode()).hexdigest(),
        "head": head_fingerprint(draft_model),
        "dtype": str(model.dtype),
        "head_dtype": str(draft_model.dtype),
        "attention": model.config._attn_implementation,
        "path": path,
        "acceptance": rule.key(),
        "calibration_requests": requests,
        "grid": asdict(grid),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return json.loads(json.dumps(key))  # as a cache file holds it (lists, not tuples)


def cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return tree_shape_cache_dir() / f"{digest}.json"


def check_shape(stored: Any) -> TreeShape:
    """The shape a cache file holds (`asdict` of a `TreeShape`); a ValueError, KeyError or TypeError if it is not
    three positive integers."""
    shape = TreeShape(**stored)
    if not all(isinstance(value, int) and value > 0 for value in asdict(shape).values()):
        raise ValueError(f"its shape {stored} is not three positive integers")
    return shape


def timings_of_record(record: dict[str, Any]) -> list[StepTiming]:
    """The step times a cache record holds (`timing_rows`); a ValueError, KeyError or TypeError if it holds none."""
    timings = [
        StepTiming(TreeShape(**row["shape"]), float(row["draft_ms"]) / 1000, float(row["verify_ms"]) / 1000)
        for row in record["timings"]
    ]
    if not timings:
        raise ValueError("it holds no step times")
    return timings


def read_cached_record(
    key: dict[str, Any], check: Callable[[dict[str, Any]], Any] = lambda record: check_shape(record["shape"])
) -> dict[str, Any] | None:
    """The record stored for `key` (checked by `check`: by default its `shape`; `timings_of_record` for a
    `step_times_key`), or None when there is none; an unreadable file is reported and ignored."""
    path = cache_file(key)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["key"] != key:
            raise ValueError("it was written for other settings")
        check(record)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(f"The cached EAGLE-3 tree shape {path} is unreadable ({error}): measuring it again.")
        return None
    return record


def write_cached_shape(key: dict[str, Any], record: dict[str, Any]) -> Path:
    """Store `record` (with `shape`, or `timings`) for `key`, through a temporary file so no reader sees half a
    file."""
    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"key": key, **record}, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


# ------------------------------------------------------------------------------------------------ choosing
def decoding_path(static_cache: bool) -> str:
    """The path whose step times a choice is made from: compiled steps decode with the static path's choice."""
    return "static" if static_cache else "dynamic"


def step_times_key(key: dict[str, Any]) -> dict[str, Any]:
    """The cache key of the step times behind the choice of `key`: they do not depend on the acceptance rule."""
    return {**key, "acceptance": None}


def step_times(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    key: dict[str, Any],
    prompt: torch.LongTensor,
    shapes: list[TreeShape],
    static_cache: bool,
    new_tokens: int,
    refresh: bool,
    attention_mask: torch.LongTensor | None = None,
) -> list[StepTiming]:
    """Step times of `shapes` on the path of `key`: cached (shared by every acceptance rule), else `time_shapes` of
    `prompt` (a left-padded batch with its `attention_mask`: seconds per batch step)."""
    timing_key = step_times_key(key)
    record = None if refresh else read_cached_record(timing_key, timings_of_record)
    if record is not None:
        return timings_of_record(record)
    timings = time_shapes(
        model,
        draft_model,
        prompt,
        shapes,
        static_cache,
        compile=False,
        new_tokens=new_tokens,
        attention_mask=attention_mask,
    )
    write_cached_shape(timing_key, {"timings": timing_rows(timings)})
    return timings


def tune_tree_shape(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    prompts: list[torch.LongTensor] | None = None,
    static_cache: bool = False,
    grid: ShapeGrid | None = None,
    refresh: bool = False,
    rule: AcceptanceRule = GREEDY,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[TreeShape, dict[str, Any]]:
    """The shape `eagle3_tree="auto"` decodes with on the dynamic or static (`static_cache`, compiled or not) path
    under the acceptance `rule` (`acceptance_rule` of the call's `do_sample` and processors), and the cache record
    (acceptance and timings of every shape). Unless cached, measured on `prompts` (`(1, length)` ids each, e.g.
    chat-templated ones of your workload), by default on the built-in requests (`calibration.CALIBRATION_REQUESTS`)
    rendered with `tokenizer` (by default the target's own, found on this machine); then cached: call it before
    `generate` to calibrate on prompts of your choosing; `refresh` measures again."""

    def calibration() -> tuple[list[torch.LongTensor], str]:
        if prompts is not None:
            return list(prompts), "the prompts given to tune_tree_shape"
        found = target_tokenizer(model, tokenizer)
        if found is None:
            raise ValueError(
                f"tune_tree_shape without prompts encodes its built-in requests with the target's tokenizer, and none "
                f"of {model.config.name_or_path!r} is on this machine: pass `tokenizer=` or `prompts=`."
            )
        return render_requests(found, CALIBRATION_REQUESTS), f"the {len(CALIBRATION_REQUESTS)} built-in requests"

    return _tuned_shape(model, draft_model, calibration, static_cache, grid, refresh, rule)


def _tuned_shape(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    calibration: Callable[[], tuple[list[torch.LongTensor], str]],
    static_cache: bool,
    grid: ShapeGrid | None,
    refresh: bool,
    rule: AcceptanceRule,
    requests: str | None = None,
) -> tuple[TreeShape, dict[str, Any]]:
    """`tune_tree_shape` on the prompts `calibration()` gives (with what they are), asked for only when measuring;
    `requests` as `cache_key` takes it."""
    grid = (grid or default_grid(model.device)).for_head(draft_model)
    key = cache_key(model, draft_model, decoding_path(static_cache), grid, rule, requests)
    record = None if refresh else read_cached_record(key)
    if record is not None:
        return TreeShape(**record["shape"]), record
    start = time.perf_counter()
    prompts, calibrated_on = calibration()
    prompts = [prompt.to(model.device) for prompt in prompts]
    shapes = grid.shapes()
    timed = timing_shapes(grid)
    logger.warning(
        f"EAGLE-3 is measuring which draft tree fits {key['device']} on the {key['path']} path (eagle3_tree='auto'): "
        f"{'sampled' if rule.do_sample else 'greedy'} acceptance of {len(shapes)} shapes from "
        f"{len({s.top_k for s in shapes}) * len(prompts)} calibration decodes ({calibrated_on}), step time of "
        f"{len(timed)} shapes (uncompiled; unless measured already). Once for this device, target, head, path and "
        f"sampling settings; the choice is kept in {tree_shape_cache_dir()}."
    )
    taus = calibrate_acceptance(model, draft_model, prompts, shapes, grid.calibration_tokens, rule)
    timings = step_times(model, draft_model, key, prompts[0], timed, static_cache, grid.timing_tokens, refresh)
    shape, table = choose_shape(taus, StepTimeModel(timings))
    record = {
        "shape": asdict(shape),
        "seconds": round(time.perf_counter() - start, 2),
        "calibration": {"prompts": calibrated_on, "prompt_tokens": [prompt.shape[1] for prompt in prompts]},
        "timings": timing_rows(timings),
        "candidates": table,
    }
    path = write_cached_shape(key, record)
    best = table[0]
    logger.warning(
        f"EAGLE-3 tree for this device: {shape} (total_tokens/depth/top_k; expected tau {best['tau']:.2f}, "
        f"{best['step_ms']:.1f} ms per step), measured in {record['seconds']:.0f} s, kept in {path}."
    )
    return shape, {"key": key, **record}


def unpadded_first_rows(
    input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None, rows: int
) -> list[torch.LongTensor]:
    """The first `rows` prompts of a left-padded batch without their padding, `(1, length)` each."""
    if attention_mask is None:
        return [row[None] for row in input_ids[:rows]]
    return [row[mask.bool()][None] for row, mask in zip(input_ids[:rows], attention_mask[:rows], strict=True)]


def resolve_auto_tree(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    config: Eagle3DecodingConfig,
    input_ids: torch.LongTensor,
    model_kwargs: dict[str, Any],
    do_sample: bool = False,
    logits_processor: LogitsProcessorList | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Eagle3DecodingConfig:
    """`config` with the shape `tune_tree_shape` gives for this call's path and acceptance (`do_sample` and the
    call's `logits_processor`), calibrated the first time on the call's `eagle3_calibration_prompts` or the built-in
    requests (`calibration.calibration_prompts`; rendered with `tokenizer`, else the target's own)."""
    static = use_static_tree(config.static_cache, model, draft_model, input_ids.device, model_kwargs)
    rule = acceptance_rule(do_sample, logits_processor)

    def calibration() -> tuple[list[torch.LongTensor], str]:
        call_prompt = partial(unpadded_first_rows, input_ids, model_kwargs.get("attention_mask"), 1)
        return calibration_prompts(model, config.calibration_prompts, tokenizer, call_prompt)

    requests = requests_key(config.calibration_prompts)
    shape, _ = _tuned_shape(model, draft_model, calibration, static, None, False, rule, requests)
    return replace(config, total_tokens=shape.total_tokens, depth=shape.depth, top_k=shape.top_k)


__all__ = [
    "ACCELERATOR_GRID",
    "CPU_GRID",
    "GREEDY",
    "AcceptanceRule",
    "ShapeGrid",
    "StepTimeModel",
    "StepTiming",
    "TreeShape",
    "acceptance_rule",
    "calibrate_acceptance",
    "choose_shape",
    "resolve_auto_tree",
    "tree_shape_cache_dir",
    "tune_tree_shape",
]
