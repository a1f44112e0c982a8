"""Static-shape tree decoding: the EAGLE-3 tree step on preallocated caches, replayed as CUDA graphs.

In eager mode a small target's forward costs about the same for 1 or 128 tokens (kernel launches and Python dominate),
and so does each head forward. With the tree shape fixed, every tensor of a step can have a fixed shape: both KV caches
are static (`max_cache_len` positions, their lengths in device tensors that `StaticLayer.update` writes at), the masks
span every position, and whatever varies from step to step (the length, the tokens accepted) is a device scalar. A step
is then three functions on fixed buffers, each captured once as a CUDA graph and replayed: `_draft` (the head encodes
the tokens emitted last step, then grows the tree), `_verify` (the target over the tree, and greedy acceptance on the
device) and `_commit` (keep the accepted path in the target cache, prepare the next head input). A greedy step reads
the device once. A sampled one too: a fourth step function processes the verified tree's logits with the call's
processors and warpers and draws the path (`_process_and_sample`, built by the first sampled step for the processors'
settings, in a memory pool of its own since greedy steps skip it; random draws replay from the default generator's
graph-safe philox state). Processors that read the sequence or the host run eagerly before the step instead, which then
only draws (`_sample`). Off CUDA the same functions are simply called, which is how the CPU tests cover all of their
logic. A call's prompts, whose length changes from call to call, are encoded by `prompt_encoding.PromptEncoder`: padded
to a few lengths, each captured once on CUDA.

Captured as they are, the steps replay eager kernels: hundreds of small unfused launches per forward. With
`eagle3_compile=True` each step function is first compiled whole by torch.compile (`cuda_graphs.COMPILE_OPTIONS`:
inductor, which fuses norms, rotary embeddings, MLPs and softmaxes into Triton kernels on CUDA and C++ on the CPU, and
leaves CUDA graphs to the runner), warmed up, and the compiled function is captured instead. The feature hooks are
traced into the verify graph: dynamo guards on them by position (their code, and that they close over the runner's
`capture`), so the hooks a later call registers pass the guards and the compiled code works on that call's capture. A
host read does not fail the trace: dynamo turns `int(tensor)` into a guard on the value, which recompiles whenever the
value changes and, on CUDA, reads the device during capture. The CPU tests check that calls after the first compile
nothing.

What must hold for capture (the CUDA tests check it; nothing here enforces it):
- the step functions read nothing on the host: no `.item()`, `.tolist()`, `bool(tensor)`, Python branches on
  tensor values, data-dependent shapes (`nonzero`, boolean-mask indexing) or tensors made from Python data
  (`torch.tensor(...)` copies from the host);
- every buffer they read or write keeps its address: cache keys/values and `cumulative_length` (allocated by
  `early_initialization` before capture) and the runner's buffers are only updated in place;
- every index stays in range whatever a step accepted (a device assert poisons the CUDA context): `max_cache_len`
  covers `max_length` plus the largest block written past the length, padding rows index real nodes and tokens;
- no mask row is empty and nothing beyond a cache's length is NaN or inf (those entries come from finite inputs),
  so masked softmaxes stay finite;
- the target's forward only runs Python that does not depend on tensor values (`_can_compile_fullgraph` models
  with sdpa or eager attention and plain `StaticLayer`s), and the feature hooks only keep references: the
  concatenation happens inside `_verify`;
- the graphs share one memory pool and replay in capture order (draft, verify, commit); the outputs one graph
  leaves for the next are kept alive by the runner, and outputs the host keeps are cloned (`keep_logits`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer
from transformers.generation import LogitsProcessorList
from transformers.utils import logging

from .._compat import CACHE_NAME, cache_kwargs
from .acceptance import StepResult, TreePath, greedy_path, sampled_path
from .cuda_graphs import StepFunction, capture_steps, warm_up_steps
from .draft_tree import DraftTree, additive_mask, grow_draft_tree
from .kv_cache import keep_static_cache_positions, set_cache_length, static_cache_problem
from .prompt_encoding import PromptEncoder
from .tree_processors import capturable, processor_settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput
    from ..target_features import TargetFeatureCapture
    from .config import Eagle3DecodingConfig

logger = logging.get_logger(__name__)

# Cache lengths are rounded up to a multiple of this: later calls with a little more room reuse the runner, and the
# masks' last dimension stays aligned for the fused attention kernels.
CACHE_LENGTH_MULTIPLE = 256
# Where decoding keeps its runner on a head (as an attribute, so that it goes with the head).
RUNNER_STATE_ATTRIBUTE = "_eagle3_static_tree"


def tree_size(total_tokens: int, depth: int, top_k: int) -> int:
    """Nodes of every tree `grow_draft_tree` builds, root included: `total_tokens` unless fewer were expanded."""
    return 1 + min(total_tokens - 1, top_k + (depth - 1) * top_k * top_k)


def runner_cache_length(positions: int, compiled: bool) -> int:
    """Cache length of a runner that must hold `positions`: the next multiple of `CACHE_LENGTH_MULTIPLE`, or, for
    compiled steps, the next power of two (at least `CACHE_LENGTH_MULTIPLE`).

    A longer cache means a new runner, and for compiled steps a new compilation (slow): doubling bounds a conversation
    that keeps growing to a few of them instead of one every `CACHE_LENGTH_MULTIPLE` tokens. Captured uncompiled steps
    are cheap to rebuild, so they keep the tighter cache (attention spans all of it).
    """
    if compiled:
        return max(CACHE_LENGTH_MULTIPLE, 1 << (positions - 1).bit_length())
    return math.ceil(positions / CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE


def static_tree_problem(
    model: PreTrainedModel, draft_model: Eagle3DraftModel, model_kwargs: dict[str, Any]
) -> str | None:
    """Why this `generate` call cannot decode on static caches, or None when it can."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return (
            f"{type(model).__name__} does not declare a forward that can be captured whole (`_can_compile_fullgraph`)"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        return f"its {type(quantizer).__name__} quantization cannot run in a captured graph"
    problem = static_cache_problem(StaticCache(config=model.config, max_cache_len=1))
    if problem is not None:
        return problem
    devices = {parameter.device for module in (model, draft_model) for parameter in module.parameters()}
    if len(devices) > 1:
        return f"the target and the head are spread over several devices ({sorted(map(str, devices))})"
    padding_mask = model_kwargs.get("attention_mask")
    # A batch of several prompts is left-padded, which its runner masks (`batched_static_tree`).
    if padding_mask is not None and padding_mask.shape[0] == 1 and not bool(padding_mask.all()):
        return "the prompt is padded (its attention_mask has zeros); pass it without padding"
    if model_kwargs[CACHE_NAME].get_seq_length() > 0:
        return "generation continues from a filled cache"
    return None


def use_static_tree(
    requested: bool | None,
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    device: torch.device,
    model_kwargs: dict[str, Any],
) -> bool:
    """Whether a call on `device` decodes on the static path (the `eagle3_static_cache` knob is `requested`).

    None picks it on CUDA wherever it applies and the dynamic path otherwise; True insists (also off CUDA, without
    graphs) and raises when it cannot apply; False keeps the dynamic path.
    """
    if requested is False or (requested is None and device.type != "cuda"):
        return False
    problem = static_tree_problem(model, draft_model, model_kwargs)
    if problem is not None and requested:
        raise ValueError(
            f"eagle3_static_cache=True cannot be honoured: {problem}. Pass eagle3_static_cache=None to use static "
            "caches only where they apply, or False to decode with the dynamic cache."
        )
    return problem is None


class StaticTreeCaptureError(RuntimeError):
    """The static tree step could not be compiled or captured on this target; the dynamic path still decodes it."""


class GraphRunner:
    """What the static runners share: step functions of fixed shapes (`_steps`, in replay order) warmed up, then
    captured as CUDA graphs; bound to one `generate` call at a time (`begin`)."""

    key: tuple
    model: PreTrainedModel
    draft_model: Eagle3DraftModel
    max_cache_len: int
    compiled: bool
    length: torch.Tensor  # a device buffer of the runner: where its graphs run
    columns: torch.LongTensor  # every cache position, `(max_cache_len,)`
    _steps: tuple[StepFunction, ...]
    prompt_encoder: PromptEncoder | None = None  # made at the first prompt

    def _allocate_caches(self, batch_size: int) -> None:
        """The target's and the head's static caches of `max_cache_len` positions, allocated before capture."""
        model, draft_model, device = self.model, self.draft_model, self.model.device
        text_config = model.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.target_cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        self.target_cache.early_initialization(
            batch_size, text_config.num_key_value_heads, head_dim, model.dtype, device
        )
        head_config = draft_model.config
        self.head_cache = Cache(layers=[StaticLayer(self.max_cache_len)])
        self.head_cache.early_initialization(
            batch_size, head_config.num_key_value_heads, head_config.head_dim, draft_model.dtype, device
        )

    def begin(self, capture: TargetFeatureCapture, batched_greedy: bool, keep_logits: bool) -> None:
        """Bind a `generate` call: its feature hooks, its acceptance path, whether it keeps logits beyond a step."""
        self.capture, self.batched_greedy, self.keep_logits = capture, batched_greedy, keep_logits

    def _prompt_encoder(self) -> PromptEncoder:
        """What encodes a call's prompts into both caches from their start (see `prompt_encoding`), made at the first
        prompt."""
        if self.prompt_encoder is None:
            self.prompt_encoder = PromptEncoder(
                self.model, self.draft_model, self.target_cache, self.head_cache, self.columns, lambda: self.capture
            )
        return self.prompt_encoder

    def _warm_up_state(self) -> None:
        """Put the buffers in a state the steps can run from (what they leave lies beyond the prefill's lengths)."""
        raise NotImplementedError

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run a few steps from a valid state: compilation, lazy initialisations, library workspaces. Within a call
        (see `begin`)."""
        self._warm_up_state()
        warm_up_steps(self._steps)

    @torch.no_grad()
    def capture_graphs(self) -> None:
        """Warm up, then record the steps as CUDA graphs sharing one memory pool (see `cuda_graphs.capture_steps`)."""
        capture_steps(self.length.device, self._steps, prepare=self._warm_up_state)


class StaticTreeRunner(GraphRunner):
    """Tree decoding on static caches with fixed shapes, for one target, head and tree shape (a `TreeDecoder`).

    Kept on the head by `static_tree_runner` and reused by later calls, so the caches are allocated and the graphs
    captured once. Between steps the state lives in device buffers: `length` (tokens before the root: both caches'
    valid length while a step drafts and verifies, and the root's position) and the head's next input block of
    `width` rows, of which the first `num_new` are real: `head_tokens` (the tokens emitted last step) and
    `head_features` (the target's features of the nodes they follow). Acceptance leaves `visited` (path nodes first),
    `emitted` and `num_kept` for `_commit`. `compiled`: the step functions run compiled (`eagle3_compile`).
    """

    # Normal tensors even when built inside `torch.inference_mode()`: a later call outside it updates them in place.
    @torch.inference_mode(False)
    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        total_tokens: int,
        depth: int,
        top_k: int,
        max_cache_len: int,
        key: tuple,
        compiled: bool = False,
    ):
        self.model, self.draft_model = model, draft_model
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k
        self.max_cache_len, self.key, self.compiled = max_cache_len, key, compiled
        device = model.device
        head_config = draft_model.config
        self._allocate_caches(1)

        self.num_nodes = tree_size(total_tokens, depth, top_k)
        # The longest accepted path: the root plus one node per level.
        self.width = min(depth + 1, self.num_nodes)
        self.columns = torch.arange(max_cache_len, device=device)
        self.rows = torch.arange(self.width, device=device)
        self.length = torch.ones((), dtype=torch.long, device=device)
        self.num_new = torch.ones((), dtype=torch.long, device=device)
        self.head_tokens = torch.zeros(1, self.width, dtype=torch.long, device=device)
        self.head_features = torch.zeros(
            1, self.width, 3 * head_config.target_hidden_size, dtype=model.dtype, device=device
        )
        self.visited = torch.zeros(self.width, dtype=torch.long, device=device)
        self.emitted = torch.zeros(self.width, dtype=torch.long, device=device)
        self.num_kept = torch.ones((), dtype=torch.long, device=device)
        self._draft_step = StepFunction(self._draft, compiled)
        self._verify_step = StepFunction(self._verify, compiled)
        self._commit_step = StepFunction(self._commit, compiled)
        self._steps = (self._draft_step, self._verify_step, self._commit_step)
        # Sampling's acceptance, built by the first sampled step (greedy calls never need it): drawing from scores
        # processed eagerly, or processing inside the step (for the `step_processors` of settings `_step_settings`,
        # last looked up for the list `_step_processors_source`).
        self._sample_step: StepFunction | None = None
        self.sample_scores: torch.Tensor | None = None
        self._process_step: StepFunction | None = None
        self.step_processors: list = []
        self._step_settings: Any = None
        self._step_processors_source: LogitsProcessorList | None = None

        # Set per call by `begin`.
        self.capture: TargetFeatureCapture | None = None
        self.batched_greedy = False
        self.keep_logits = False

    def _warm_up_state(self) -> None:
        # One token before the root, one new token to encode.
        self.length.fill_(1)
        self.num_new.fill_(1)
        self.num_kept.fill_(1)
        set_cache_length(self.target_cache, 1)

    # ------------------------------------------------------------------ step functions (captured)
    def _visible(self, block: torch.BoolTensor) -> torch.BoolTensor:
        """`(q, max_cache_len)`: the first `length` positions, and `block` `(q, n)` placed right after them."""
        index = self.columns - self.length
        inside = (index >= 0) & (index < block.shape[1])
        return (index < 0) | (block[:, index.clamp(0, block.shape[1] - 1)] & inside)

    def _forward_level(
        self, level: int, tokens: torch.LongTensor, hidden: torch.Tensor, tree_mask: torch.BoolTensor
    ) -> Eagle3DraftOutput:
        return self.draft_model(
            input_ids=tokens[None],
            hidden_states=hidden[None],
            attention_mask=self._visible(tree_mask)[None, None],
            # A level-d node predicts its children at the position of its parent's successor: root + d - 1.
            position_ids=(self.length + (level - 1)).expand(1, self.top_k),
            past_key_values=self.head_cache,
            use_cache=True,
        )

    def _draft(self) -> tuple[DraftTree, torch.Tensor, torch.LongTensor]:
        """Encode last step's kept nodes in the head, grow the tree; the tree, its target mask and positions."""
        head = self.draft_model
        # The head encodes last step's kept nodes, with the embeddings of their successors, after what it holds.
        start = self.length - self.num_new
        set_cache_length(self.head_cache, start)
        positions = start + self.rows
        encoded = head(
            input_ids=self.head_tokens,
            target_hidden_states=self.head_features,
            attention_mask=(self.columns <= positions[:, None])[None, None],
            position_ids=positions[None],
            past_key_values=self.head_cache,
            use_cache=True,
        )
        # The padding rows' entries lie past the length: outside every mask, overwritten by the next writes.
        set_cache_length(self.head_cache, self.length)
        # The root is the last token emitted; the head's row before it predicts its children.
        last = (self.num_new - 1).view(1)
        tree = grow_draft_tree(
            head,
            self.head_tokens[0].index_select(0, last)[0],
            encoded.hidden_states[0].index_select(0, last)[0],
            encoded.logits[0].index_select(0, last)[0],
            self._forward_level,
            self.total_tokens,
            self.depth,
            self.top_k,
        )
        set_cache_length(self.head_cache, self.length)  # the tree levels are dropped
        mask = additive_mask(self._visible(tree.ancestors), self.model.dtype)
        return tree, mask, (self.length + tree.depths)[None]

    def _verify(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target over the tree: logits, features and the greedy path's length (the path goes to the buffers)."""
        tree, mask, position_ids = self._draft_step.outputs
        outputs = self.model(
            input_ids=tree.tokens[None],
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **cache_kwargs(self.target_cache),
        )
        features = self.capture.pop()
        logits = outputs.logits[0].float()
        num_visited, visited, emitted = greedy_path(logits, tree, self.width)
        self.visited.copy_(visited)
        self.emitted.copy_(emitted)
        return logits, features, num_visited

    def _draw(self, scores: torch.Tensor) -> torch.Tensor:
        """Draw the sampled path over the verified tree from its processed `scores` (the path goes to the buffers);
        its length."""
        tree = self._draft_step.outputs[0]
        num_visited, visited, emitted = sampled_path(scores, tree, self.width)
        self.visited.copy_(visited)
        self.emitted.copy_(emitted)
        return num_visited

    def _sample(self) -> torch.Tensor:
        """Draw the sampled path from the scores processed eagerly into `sample_scores`; its length."""
        return self._draw(self.sample_scores)

    def _process_and_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Process the verified logits with `step_processors` (sequence-free: they are given no sequence), then draw
        the sampled path; the processed scores and the path's length."""
        scores = self._verify_step.outputs[0]
        for processor in self.step_processors:
            scores = processor(None, scores)
        return scores, self._draw(scores)

    def _commit(self) -> None:
        """Keep the path in the target cache; its tokens and features become the head's next input block."""
        _, features, _ = self._verify_step.outputs
        keep_static_cache_positions(self.target_cache, self.length, self.visited, self.num_kept)
        self.head_tokens.copy_(self.emitted[None])
        self.head_features.copy_(features[:, self.visited])
        self.num_new.copy_(self.num_kept)
        self.length.add_(self.num_kept)

    # ------------------------------------------------------------------ the TreeDecoder interface
    def prefill(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Encode the prompt into both caches (its length varies from call to call: see `prompt_encoding`)."""
        prompt_length = input_ids.shape[1]
        positions = torch.arange(prompt_length, device=input_ids.device)
        causal = self.columns <= positions[:, None]
        logits, features = self._prompt_encoder()(input_ids, causal[None], positions[None], model_kwargs)
        self.head_features[:, :1].copy_(features[:, -1:])
        self.num_new.fill_(1)
        self.length.fill_(prompt_length)
        return logits

    def start(self, input_ids: torch.LongTensor) -> None:
        self.head_tokens[:, :1].copy_(input_ids[:, -1:])

    def draft(self, input_ids: torch.LongTensor) -> DraftTree:
        return self._draft_step()[0]

    def verify(self) -> tuple[torch.Tensor, TreePath]:
        logits, _, num_visited = self._verify_step()
        if self.keep_logits:
            # The scores and logits tuples keep rows of these; the next replay overwrites graph outputs.
            logits = logits.clone()
        return logits, (num_visited, self.visited, self.emitted)

    @torch.no_grad()
    def sampled_path(
        self,
        logits: torch.Tensor,
        logits_processor: LogitsProcessorList,
        process: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, TreePath]:
        """The processed scores and `acceptance.sampled_path` over the verified tree, as a step of its own: compiled
        with the others, and on CUDA captured (in a pool of its own, as greedy steps skip it) and replayed.

        Where every processor is `tree_processors.capturable`, they run inside the step (`_process_and_sample`),
        which is rebuilt when their settings change from call to call and reused while they do not. Others (those
        that read the sequence) run eagerly through `process`, and the step draws from their scores (`_sample`).
        Where the step cannot be compiled or captured, it runs eagerly (with a warning): the draws stay exact.
        """
        if capturable(logits_processor):
            processed, num_visited = self._processed_sample_step(logits_processor)()
            if self.keep_logits:
                processed = processed.clone()  # the scores tuple keeps rows of it; the next replay overwrites it
            return processed, (num_visited, self.visited, self.emitted)
        processed = process(logits)
        if self._sample_step is None:
            self._allocate_sample_scores(processed)
            self._sample_step = self._build_sample_step(self._sample)
        self.sample_scores.copy_(processed)
        return processed, (self._sample_step(), self.visited, self.emitted)

    def _processed_sample_step(self, logits_processor: LogitsProcessorList) -> StepFunction:
        """The step that runs `logits_processor` and draws: the one built for the same settings, else a new one
        (which keeps this list: equal settings process alike)."""
        if logits_processor is not self._step_processors_source:
            settings = processor_settings(list(logits_processor))
            if self._process_step is None or settings != self._step_settings:
                self._process_step = None  # free the old graph first
                self.step_processors = list(logits_processor)
                self._process_step = self._build_sample_step(self._process_and_sample)
                self._step_settings = settings
            self._step_processors_source = logits_processor
        return self._process_step

    # A normal tensor even when allocated inside `torch.inference_mode()`, like the other buffers.
    @torch.inference_mode(False)
    def _allocate_sample_scores(self, scores: torch.Tensor) -> None:
        self.sample_scores = torch.zeros_like(scores)

    def _build_sample_step(self, function: Callable[[], Any]) -> StepFunction:
        step = StepFunction(function, self.compiled)
        try:
            if self.length.device.type == "cuda":
                # A pool of its own: greedy steps never replay it.
                capture_steps(self.length.device, [step])
            elif self.compiled:
                step()  # compile now, so that a failure falls back here
        except RuntimeError as error:
            logger.warning_once(f"EAGLE-3 draws its sampled acceptance without a compiled or captured step: {error}")
            step = StepFunction(function, compiled=False)
        return step

    def commit(self, step: StepResult, visited: torch.LongTensor, input_ids: torch.LongTensor) -> None:
        num_new = len(step.tokens)
        if not self.batched_greedy:
            # The host walk or the sampled acceptance chose the path; the verification left the greedy one.
            self.visited[:num_new].copy_(visited)
            self.emitted[:num_new].copy_(input_ids[0, -num_new:])
        # Fewer than the path's nodes when generation stopped inside it.
        self.num_kept.fill_(num_new)
        self._commit_step()

    def copy_prefix_to(self, cache: DynamicCache, length: int) -> None:
        """Copy the target's first `length` positions into the call's own cache (the runner's serve the next call)."""
        for index, layer in enumerate(self.target_cache.layers):
            cache.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), index)


@dataclass
class _RunnerState:
    """What decoding keeps on a head between calls: its runner for single prompts, its runner for batches, and the
    `(runner key, reason)` of the last tree step that could not be captured (it would fail the same way every call)."""

    runner: GraphRunner | None = None
    batched: GraphRunner | None = None
    failure: tuple[tuple, str] | None = None


def _runner_state(draft_model: Eagle3DraftModel) -> _RunnerState:
    state = getattr(draft_model, RUNNER_STATE_ATTRIBUTE, None)
    if state is None:
        state = _RunnerState()
        setattr(draft_model, RUNNER_STATE_ATTRIBUTE, state)
    return state


def cached_runner(draft_model: Eagle3DraftModel, batched: bool = False) -> GraphRunner | None:
    """The runner `draft_model` keeps for later calls (on single prompts, or on `batched` ones), or None."""
    state = _runner_state(draft_model)
    return state.batched if batched else state.runner


def runner_key(model: PreTrainedModel, draft_model: Eagle3DraftModel, compiled: bool, *shape: int) -> tuple:
    """What a runner's caches and graphs were built for: `compiled`, the target, the head's tensors and settings,
    and `shape` (the tree knobs, and the batch size of a batch runner)."""
    return (
        compiled,
        id(model),
        # The graphs read the head's weights and vocabulary maps where they were captured: new tensors (another draft
        # vocabulary, weights loaded by assignment) need another runner.
        tuple(tensor.data_ptr() for tensor in itertools.chain(draft_model.parameters(), draft_model.buffers())),
        draft_model.config.draft_vocab_size,
        *shape,
        model.dtype,
        draft_model.dtype,
        model.device,
        model.config._attn_implementation,
        draft_model.config._attn_implementation,
    )


def bound_runner(
    draft_model: Eagle3DraftModel,
    batched: bool,
    key: tuple,
    max_cache_len: int,
    build: Callable[[int], GraphRunner],
    capture: TargetFeatureCapture,
    batched_greedy: bool,
    keep_logits: bool,
) -> GraphRunner:
    """The head's runner for `key` (its `batched` one or not) bound to this call; `build(max_cache_len)` makes a new
    one when the head has none for `key` or its caches are too short, which is then compiled (warmed up) and, on
    CUDA, captured. Raises `StaticTreeCaptureError` when that fails."""
    state = _runner_state(draft_model)
    if state.failure is not None and state.failure[0] == key:
        raise StaticTreeCaptureError(state.failure[1])
    runner = cached_runner(draft_model, batched)
    if runner is not None and runner.key == key and runner.max_cache_len >= max_cache_len:
        runner.begin(capture, batched_greedy, keep_logits)
        return runner
    # Free the old caches and graphs before allocating new ones.
    if batched:
        state.batched = runner = None
    else:
        state.runner = runner = None
    runner = build(max_cache_len)
    runner.begin(capture, batched_greedy, keep_logits)
    cuda = runner.length.device.type == "cuda"
    if cuda or runner.compiled:
        try:
            # Compilation happens on the first warm-up call: its failures surface here, before any decoding.
            if cuda:
                runner.capture_graphs()
            else:
                runner.warm_up()
        except RuntimeError as error:
            # Remembered per key: a forward that reads the host during capture, or that dynamo cannot trace whole,
            # fails the same way every call.
            done = ["compiled"] * runner.compiled + ["captured as CUDA graphs"] * cuda
            message = f"the tree step of {type(runner.model).__name__} could not be {' and '.join(done)} ({error})"
            state.failure = (key, message)
            raise StaticTreeCaptureError(message) from error
    if batched:
        state.batched = runner
    else:
        state.runner = runner
    return runner


def static_tree_runner(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    capture: TargetFeatureCapture,
    total_tokens: int,
    depth: int,
    top_k: int,
    max_length: int,
    batched_greedy: bool,
    keep_logits: bool,
    compiled: bool = False,
) -> StaticTreeRunner:
    """The head's runner for this target, tree shape and `compiled` (`eagle3_compile`), bound to this call; built when
    the head has none for them or its caches are too short for `max_length` (see `bound_runner`).

    The head keeps one runner (see `cached_runner`), and with it the target, alive between calls.
    """
    key = runner_key(model, draft_model, compiled, total_tokens, depth, top_k)
    # Past the length a step writes the tree into the target cache and the tree levels into the head's.
    largest_block = max(tree_size(total_tokens, depth, top_k), (depth - 1) * top_k)
    max_cache_len = runner_cache_length(max_length + largest_block, compiled)

    def build(max_cache_len: int) -> StaticTreeRunner:
        return StaticTreeRunner(model, draft_model, total_tokens, depth, top_k, max_cache_len, key, compiled)

    return bound_runner(draft_model, False, key, max_cache_len, build, capture, batched_greedy, keep_logits)


def static_runner(
    config: Eagle3DecodingConfig,
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    device: torch.device,
    model_kwargs: dict[str, Any],
    build: Callable[[], GraphRunner],
) -> GraphRunner | None:
    """The runner `build` makes or reuses where the static path applies to this call (`use_static_tree` with the
    call's knobs), or None for the dynamic path, saying why where the knobs asked for more: `eagle3_compile=True`
    without a static path warns, a runner that could not be compiled or captured is an error when the knobs insist
    on it and a warning otherwise."""
    static = use_static_tree(config.static_cache, model, draft_model, device, model_kwargs)
    if config.compile and not static:
        logger.warning_once(
            "eagle3_compile=True compiles the static-cache path, which this call does not take "
            "(eagle3_static_cache=None takes it on CUDA where it applies; pass eagle3_static_cache=True to insist, "
            "or to learn what stands in the way): it decodes uncompiled on the dynamic cache."
        )
    if not static:
        return None
    try:
        return build()
    except StaticTreeCaptureError as error:
        if config.compile:
            raise ValueError(
                f"eagle3_compile=True cannot be honoured: {error}. Pass eagle3_compile=False to decode on static "
                "caches without compiling."
            ) from error
        if config.static_cache:
            raise ValueError(
                f"eagle3_static_cache=True cannot be honoured: {error}. Pass eagle3_static_cache=False to decode "
                "with the dynamic cache."
            ) from error
        logger.warning_once(f"EAGLE-3 decodes with the dynamic cache instead: {error}.")
    return None


__all__ = [
    "GraphRunner",
    "StaticTreeCaptureError",
    "StaticTreeRunner",
    "bound_runner",
    "cached_runner",
    "runner_cache_length",
    "runner_key",
    "static_runner",
    "static_tree_problem",
    "static_tree_runner",
    "tree_size",
    "use_static_tree",
]
