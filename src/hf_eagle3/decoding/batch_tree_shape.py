"""The draft tree of a batch: each row's tree shrinks as the batch grows, by the device's measured costs.

A batch verifies every row's tree in one target forward over batch x nodes tokens: where one prompt verifies hundreds
of nodes about as fast as one, a batch of 32 may not, and on a small CPU no tree may pay at all. What a step emits per
row does not depend on the batch (each row accepts exactly what it would alone), so the acceptance (tau) of every shape
of the batch grid, greedy or under the call's sampling (`tree_shape.acceptance_rule`), is measured once per device,
target, head, dtype and acceptance rule (`tree_shape.calibrate_acceptance`, on the same requests as a single prompt's,
see `calibration`) and kept for every batch size. What depends on the batch is the step time: it is measured once per
batch size and path, by short greedy decodes of the call's batch with a few shapes (`tree_shape.step_times`, fitted by
`tree_shape.StepTimeModel`), and shared by every acceptance rule as for one prompt. The batch decodes with the shape of
most expected tokens/s per row, tau / step seconds.

The target decoding alone is timed on the same batch and path, once per batch size and path too: as `generate`
decodes it without an assistant (`plain_decoding`), transformers' static-cache generate on the static path (compiled
by transformers on CUDA), the dynamic cache elsewhere. Where no tree is expected to beat it, the batch is decoded that
way (`plain_decoding.decode_without_drafts`): lossless by construction, logged, and flagged in
`Eagle3GenerationStats.plain_fallback`.

The compiled path (`eagle3_compile=True`) is timed on the uncompiled static path (CUDA graphs on CUDA): compiling
every timed shape at every batch size would cost minutes, and the choice among trees assumes that compilation speeds
the shapes' steps up alike. Against plain decoding, which transformers compiles too, uncompiled step times would lean
towards decoding without drafts; so where the best tree loses uncompiled, it is compiled and timed once more
(`compiled_step_seconds`: one compilation more, once per batch size), and kept if it wins compiled. Choices are
cached on disk beside the single-prompt ones (`tree_shape.tree_shape_cache_dir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .calibration import calibration_prompts, requests_key
from .plain_decoding import time_plain_steps
from .static_tree import use_static_tree
from .tree_shape import (
    GREEDY,
    TIMING_ROUNDS,
    AcceptanceRule,
    ShapeGrid,
    StepTimeModel,
    TreeShape,
    acceptance_rule,
    cache_key,
    calibrate_acceptance,
    check_shape,
    choose_shape,
    read_cached_record,
    step_times,
    step_times_key,
    time_shapes,
    timing_rows,
    timing_shapes,
    tree_shape_cache_dir,
    unpadded_first_rows,
    write_cached_shape,
)

if TYPE_CHECKING:
    from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig

logger = logging.get_logger(__name__)

# The single-prompt grids (`tree_shape.CPU_GRID`, `ACCELERATOR_GRID`) reach down to smaller, shallower trees, which
# larger batches need: a root and one draft on a CPU, a few nodes a row on an accelerator.
BATCH_CPU_GRID = ShapeGrid(
    total_tokens=(2, 3, 4, 5, 6, 8, 10, 12, 16), depths=(1, 2, 3, 4, 5), top_ks=(2, 3, 4), calibration_tokens=24
)
BATCH_ACCELERATOR_GRID = ShapeGrid(
    total_tokens=(4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
    depths=(2, 3, 4, 6, 8, 10),
    top_ks=(4, 8, 16),
    calibration_tokens=64,
    timing_tokens=64,
)
# Rows of the batch whose prompts calibrate the acceptance where no tokenizer can encode the built-in requests: each
# costs one decode per top_k (on a CPU, minutes).
CALIBRATION_ROWS = 2


def default_batch_grid(device: torch.device) -> ShapeGrid:
    return BATCH_CPU_GRID if device.type == "cpu" else BATCH_ACCELERATOR_GRID


def _check_acceptance(record: dict[str, Any]) -> None:
    for entry in record["taus"]:
        check_shape(entry["shape"])
        if not isinstance(entry["tau"], float) or entry["tau"] < 1:
            raise ValueError(f"its tau {entry['tau']!r} is not a number of at least 1")


def _check_choice(record: dict[str, Any]) -> None:
    if record["shape"] is not None:
        check_shape(record["shape"])


def batch_acceptance(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    calibration: Callable[[], tuple[list[torch.LongTensor], str]],
    grid: ShapeGrid,
    refresh: bool = False,
    rule: AcceptanceRule = GREEDY,
    requests: str | None = None,
) -> dict[TreeShape, float]:
    """Tau per row of every shape of `grid` under the acceptance `rule`, measured on the prompts `calibration()`
    gives (`(1, length)` each, and what they are) unless cached; one record per device, target, head, dtype, rule and
    calibration `requests` (as `tree_shape.cache_key` takes them), whatever the batch size and path."""
    key = {**cache_key(model, draft_model, "any", grid, rule, requests), "record": "batch acceptance"}
    record = None if refresh else read_cached_record(key, _check_acceptance)
    if record is None:
        prompts, calibrated_on = calibration()
        prompts = [prompt.to(model.device) for prompt in prompts]
        taus = calibrate_acceptance(model, draft_model, prompts, grid.shapes(), grid.calibration_tokens, rule)
        record = {
            "calibration": {"prompts": calibrated_on, "prompt_tokens": [prompt.shape[1] for prompt in prompts]},
            "taus": [{"shape": asdict(shape), "tau": tau} for shape, tau in taus.items()],
        }
        write_cached_shape(key, record)
    return {TreeShape(**entry["shape"]): entry["tau"] for entry in record["taus"]}


def _check_plain_steps(record: dict[str, Any]) -> None:
    if not isinstance(record["plain_step_ms"], float) or record["plain_step_ms"] <= 0:
        raise ValueError(f"its step time {record['plain_step_ms']!r} is not a positive number")


def plain_step_seconds(
    model: PreTrainedModel,
    key: dict[str, Any],
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    static_cache: bool,
    new_tokens: int,
    refresh: bool,
) -> float:
    """Seconds per step of the batch decoded without drafts on the path of `key` (`plain_decoding.time_plain_steps`):
    cached beside the shapes' step times, shared by every acceptance rule."""
    plain_key = {**step_times_key(key), "record": "plain steps"}
    record = None if refresh else read_cached_record(plain_key, _check_plain_steps)
    if record is None:
        seconds = time_plain_steps(model, input_ids, attention_mask, new_tokens, TIMING_ROUNDS, static_cache)
        record = {"plain_step_ms": 1000 * seconds}
        write_cached_shape(plain_key, record)
    return record["plain_step_ms"] / 1000


def _check_compiled_step(record: dict[str, Any]) -> None:
    check_shape(record["shape"])
    if not isinstance(record["step_ms"], float) or record["step_ms"] <= 0:
        raise ValueError(f"its step time {record['step_ms']!r} is not a positive number")


def compiled_step_seconds(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    key: dict[str, Any],
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    shape: TreeShape,
    new_tokens: int,
    refresh: bool,
) -> float:
    """Seconds per step of the batch decoded with `shape`'s compiled static steps (draft and verify, the fastest of a
    few decodes after the one that compiles): cached per shape beside the uncompiled step times."""
    compiled_key = {**step_times_key(key), "record": "compiled step", "shape": asdict(shape)}
    record = None if refresh else read_cached_record(compiled_key, _check_compiled_step)
    if record is None:
        (timing,) = time_shapes(
            model,
            draft_model,
            input_ids,
            [shape],
            static_cache=True,
            compile=True,
            new_tokens=new_tokens,
            rounds=TIMING_ROUNDS,
            attention_mask=attention_mask,
        )
        record = {"shape": asdict(shape), "step_ms": 1000 * (timing.draft + timing.verify)}
        write_cached_shape(compiled_key, record)
    return record["step_ms"] / 1000


def beats_plain(tokens_per_s: float, plain_step_seconds: float) -> bool:
    """Whether a tree's expected tokens/s per row beats plain decoding's one token per `plain_step_seconds`."""
    return tokens_per_s > 1 / max(plain_step_seconds, 1e-9)


def choose_batch_shape(
    taus: dict[TreeShape, float], step_time: StepTimeModel, plain_step_seconds: float
) -> tuple[TreeShape | None, list[dict]]:
    """The shape of most expected tokens/s per row (see `tree_shape.choose_shape`), or None where none beats plain
    decoding's one token per `plain_step_seconds`; and the table of every shape's figures, best first."""
    shape, table = choose_shape(taus, step_time)
    if not beats_plain(table[0]["tokens_per_s"], plain_step_seconds):
        return None, table
    return shape, table


def tune_batch_tree_shape(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    static_cache: bool = False,
    grid: ShapeGrid | None = None,
    refresh: bool = False,
    rule: AcceptanceRule = GREEDY,
    prompts: list[torch.LongTensor] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    requests: Sequence[str] | None = None,
    compiled: bool = False,
) -> tuple[TreeShape | None, dict[str, Any]]:
    """The shape a batch of `input_ids.shape[0]` rows decodes with on this path under the acceptance `rule` (None:
    without drafts), and the cache record (step times, plain decoding's, every shape's figures). Unless cached for its
    size: step times measured on this left-padded batch, acceptance (once for every batch size) on `prompts`
    (`(1, length)` ids each), by default on the `requests` (text; default the built-in ones) rendered with `tokenizer`
    (by default the target's own; without one, the batch's first rows). `compiled` (static path only): the batch
    decodes with compiled steps, so a best tree that loses to plain decoding uncompiled is timed compiled before it
    is given up. Then cached: call it before `generate` to measure on a batch and prompts of your choosing; `refresh`
    measures again."""
    batch_size = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if compiled and not static_cache:
        raise ValueError("Compiled steps are static-path steps: pass static_cache=True with compiled=True.")
    grid = (grid or default_batch_grid(model.device)).for_head(draft_model)
    path = "static" if static_cache else "dynamic"
    # Step times are the uncompiled path's, shared by both choices; the choice itself is kept per compilation.
    key = {**cache_key(model, draft_model, path, grid, rule, requests_key(requests)), "batch_size": batch_size}
    choice_key = {**key, "compiled": True} if compiled else key
    record = None if refresh else read_cached_record(choice_key, _check_choice)
    if record is not None:
        return (TreeShape(**record["shape"]) if record["shape"] else None), record
    timed = timing_shapes(grid)
    plain_path = "transformers' static-cache generate" if static_cache else "the dynamic cache"
    logger.warning(
        f"EAGLE-3 is measuring which draft tree fits a batch of {batch_size} on {key['device']} ({key['path']} "
        f"path): step time of {len(timed)} shapes and of decoding without drafts ({plain_path}; once for this "
        f"batch size and path), and acceptance of {len(grid.shapes())} shapes (once, for every batch size and path), "
        f"unless measured already. The choice, per batch size, device, target, head, path and sampling settings, is "
        f"kept in {tree_shape_cache_dir()}."
    )
    start = time.perf_counter()

    def calibration() -> tuple[list[torch.LongTensor], str]:
        if prompts is not None:
            return list(prompts), "the prompts given to tune_batch_tree_shape"
        first_rows = partial(unpadded_first_rows, input_ids, attention_mask, CALIBRATION_ROWS)
        return calibration_prompts(model, requests, tokenizer, first_rows)

    taus = batch_acceptance(model, draft_model, calibration, grid, refresh, rule, requests_key(requests))
    timings = step_times(
        model, draft_model, key, input_ids, timed, static_cache, grid.timing_tokens, refresh, attention_mask
    )
    plain = plain_step_seconds(model, key, input_ids, attention_mask, static_cache, grid.timing_tokens, refresh)
    shape, table = choose_batch_shape(taus, StepTimeModel(timings), plain)
    best = table[0]
    compiled_step = None
    if compiled and shape is None:
        best_shape = TreeShape(**best["shape"])
        compiled_step = compiled_step_seconds(
            model, draft_model, key, input_ids, attention_mask, best_shape, grid.timing_tokens, refresh
        )
        if beats_plain(best["tau"] / compiled_step, plain):
            shape = best_shape
    record = {
        "shape": asdict(shape) if shape is not None else None,
        "seconds": round(time.perf_counter() - start, 2),
        "plain_step_ms": 1000 * plain,
        "compiled_best_step_ms": 1000 * compiled_step if compiled_step is not None else None,
        "timings": timing_rows(timings),
        "candidates": table,
    }
    path = write_cached_shape(choice_key, record)
    compiled_part = "" if compiled_step is None else f", {1000 * compiled_step:.1f} ms compiled"
    logger.warning(
        f"EAGLE-3 tree for a batch of {batch_size}: {shape or 'none (decoding without drafts)'} (best tree "
        f"{TreeShape(**best['shape'])}: expected tau {best['tau']:.2f} per row, {best['step_ms']:.1f} ms per step"
        f"{compiled_part}; without drafts {1000 * plain:.1f} ms per token), measured in {record['seconds']:.0f} s, "
        f"kept in {path}."
    )
    return shape, {"key": choice_key, **record}


def resolve_batch_tree(
    model: PreTrainedModel,
    draft_model: Eagle3DraftModel,
    config: Eagle3DecodingConfig,
    input_ids: torch.LongTensor,
    model_kwargs: dict[str, Any],
    do_sample: bool = False,
    logits_processor: LogitsProcessorList | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Eagle3DecodingConfig | None:
    """`config` with the shape `tune_batch_tree_shape` gives for this batch on this call's path and acceptance
    (`do_sample` and the call's `logits_processor`), measured the first time on the call's batch and calibration
    requests (`eagle3_calibration_prompts` or the built-in ones, rendered with `tokenizer`, else the target's own), or
    None where the batch decodes faster without drafts."""
    static = use_static_tree(config.static_cache, model, draft_model, input_ids.device, model_kwargs)
    rule = acceptance_rule(do_sample, logits_processor)
    shape, _ = tune_batch_tree_shape(
        model,
        draft_model,
        input_ids,
        model_kwargs.get("attention_mask"),
        static_cache=static,
        rule=rule,
        tokenizer=tokenizer,
        requests=config.calibration_prompts,
        compiled=static and config.compile,
    )
    if shape is None:
        return None
    return replace(config, total_tokens=shape.total_tokens, depth=shape.depth, top_k=shape.top_k)


__all__ = [
    "BATCH_ACCELERATOR_GRID",
    "BATCH_CPU_GRID",
    "batch_acceptance",
    "choose_batch_shape",
    "resolve_batch_tree",
    "tune_batch_tree_shape",
]
