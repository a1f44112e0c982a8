"""The automatic tree of a batch: shrinking per row as the batch grows, cached per batch size, decoding without
drafts where no tree pays, and lossless through `generate` either way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_head, make_target
from lossless import assert_rows_lossless, left_pad, make_friendly_pair, prompt_reaching_eos
from transformers import CompileConfig, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache, StaticCache
from tree_decoding import make_oracle_pair, prompt

from hf_eagle3._compat import CACHE_NAME
from hf_eagle3.decoding import batch_tree_shape, plain_decoding, tree_shape
from hf_eagle3.decoding.batch_tree_shape import choose_batch_shape, tune_batch_tree_shape
from hf_eagle3.decoding.calibration import CALIBRATION_REQUESTS, render_requests
from hf_eagle3.decoding.config import DEFAULT_EAGLE3_KNOBS, Eagle3DecodingConfig
from hf_eagle3.decoding.tree_shape import (
    ShapeGrid,
    StepTimeModel,
    StepTiming,
    TreeShape,
    choose_shape,
    timing_shapes,
)

# Small enough to measure in a few seconds on the tiny models; down to a root and one draft.
TINY_BATCH_GRID = ShapeGrid(total_tokens=(2, 3, 5), depths=(1, 2), top_ks=(2,), calibration_tokens=16, timing_tokens=6)
# What a device costs per step at a batch size: a fixed part, and a part per verified token (batch x nodes) and per
# drafted token (batch x top_k per level). A GPU runs small forwards at the fixed cost; a CPU pays for every token.
GPU = dict(fixed=0.004, per_token=2e-6, per_draft=1e-6)
CPU = dict(fixed=0.003, per_token=3e-5, per_draft=1e-5)
GRID = ShapeGrid(total_tokens=(2, 4, 8, 16, 32, 64, 128), depths=(1, 2, 4, 6, 8), top_ks=(4, 8))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EAGLE3_CACHE", str(tmp_path))
    monkeypatch.setattr(batch_tree_shape, "BATCH_CPU_GRID", TINY_BATCH_GRID)
    monkeypatch.setattr(tree_shape, "TIMING_ROUNDS", 1)
    monkeypatch.setattr(batch_tree_shape, "TIMING_ROUNDS", 1)
    return tmp_path / "tree_shapes"


def _tau(shape: TreeShape) -> float:
    """Acceptance that grows with the tree's nodes and depth, and less and less for each node added."""
    return 1 + min(shape.depth, 0.6 * shape.nodes**0.5 + 0.1 * shape.depth)


def _costs(device: dict, batch_size: int) -> tuple[StepTimeModel, float]:
    """The step-time model fitted to `device`'s step times at `batch_size`, and its step time without drafts."""

    def verify(nodes: int) -> float:
        return device["fixed"] + device["per_token"] * batch_size * nodes

    timings = [
        StepTiming(
            shape,
            shape.depth * (device["fixed"] / 4 + device["per_draft"] * batch_size * shape.top_k),
            verify(shape.nodes),
        )
        for shape in timing_shapes(GRID)
    ]
    return StepTimeModel(timings), verify(1)


@pytest.mark.parametrize("device", [GPU, CPU], ids=["gpu", "cpu"])
def test_trees_shrink_as_the_batch_grows(device):
    """The same acceptance per row; as the batch grows, verification costs more per node, so the chosen trees get
    smaller, and on the CPU-like device no tree beats decoding without drafts at the largest batches."""
    taus = {shape: _tau(shape) for shape in GRID.shapes()}
    chosen = {}
    for batch_size in (1, 2, 4, 8, 16, 32, 64):
        step_time, plain = _costs(device, batch_size)
        shape, table = choose_batch_shape(taus, step_time, plain)
        chosen[batch_size] = shape.nodes if shape is not None else 0
        best = table[0]
        assert best["tokens_per_s"] == pytest.approx(max(tau / step_time.step_seconds(s) for s, tau in taus.items()))
        assert (shape is None) == (best["tokens_per_s"] <= 1 / plain)
    sizes = list(chosen.values())
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], chosen
    if device is GPU:
        assert chosen[1] >= 32 and chosen[64] > 0, chosen
    else:
        assert chosen[1] <= 32 and chosen[16] > 0 and chosen[64] == 0, chosen


def test_a_batch_left_to_the_defaults_takes_the_automatic_tree():
    """Calls without a shape knob take the automatic tree, compiled too (measured uncompiled); a knob of the call or
    the head, or `eagle3_tree="fixed"`, keeps the given shape (per row in a batch)."""

    def resolve(head: GenerationConfig | None = None, **call) -> Eagle3DecodingConfig:
        return Eagle3DecodingConfig.resolve(GenerationConfig(**call), head)

    assert resolve().tree == "auto"
    assert resolve(eagle3_compile=True).tree == "auto"
    config = resolve(GenerationConfig(eagle3_top_k=3))
    assert config.tree == "fixed" and config.top_k == 3
    config = resolve(eagle3_tree="fixed")
    shape = (config.total_tokens, config.depth, config.top_k)
    assert config.tree == "fixed" and shape == tuple(
        DEFAULT_EAGLE3_KNOBS[f"eagle3_{name}"] for name in ("total_tokens", "depth", "top_k")
    )


def _batch(target, rows: int = 2):
    prompts = [prompt_reaching_eos(target, 40, length=5 + 2 * row) for row in range(rows)]
    return prompts, *left_pad(prompts, target.config.pad_token_id)


def _spy(monkeypatch) -> list[str]:
    """The measurements the batch tuning makes, in order."""
    calls = []
    for module, name in (
        (batch_tree_shape, "calibrate_acceptance"),
        (tree_shape, "time_shapes"),
        (batch_tree_shape, "time_plain_steps"),
    ):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_cache_per_batch_size_and_shared_acceptance(cache_dir, monkeypatch):
    """Acceptance is measured once for every batch size, step times once per batch size and path."""
    target, head = make_friendly_pair("llama")
    calls = _spy(monkeypatch)
    _, input_ids, attention_mask = _batch(target, rows=2)
    shape, record = tune_batch_tree_shape(target, head, input_ids, attention_mask)
    assert calls == ["calibrate_acceptance", "time_shapes", "time_plain_steps"]
    assert shape is None or shape in TINY_BATCH_GRID.shapes()
    assert record["key"]["batch_size"] == 2 and record["key"]["path"] == "dynamic"
    assert len(record["candidates"]) == len(TINY_BATCH_GRID.shapes()) and record["plain_step_ms"] > 0
    assert tune_batch_tree_shape(target, head, input_ids, attention_mask)[0] == shape
    assert len(calls) == 3, "a cache hit measures nothing"

    _, input_ids, attention_mask = _batch(target, rows=3)
    tune_batch_tree_shape(target, head, input_ids, attention_mask)
    assert calls[3:] == ["time_shapes", "time_plain_steps"], "another batch size times again, reusing acceptance"
    tune_batch_tree_shape(target, head, input_ids, attention_mask, static_cache=True)
    assert calls[5:] == ["time_shapes", "time_plain_steps"], "another path times again"
    stored = [json.loads(path.read_text()) for path in cache_dir.glob("*.json")]
    # Per batch size and path: the choice, the shapes' step times and plain decoding's.
    assert sorted(record["key"].get("batch_size", 0) for record in stored) == [0] + [2] * 3 + [3] * 6
    (acceptance,) = [record for record in stored if "taus" in record]
    assert {TreeShape(**entry["shape"]) for entry in acceptance["taus"]} == set(TINY_BATCH_GRID.shapes())

    # An unreadable choice is measured again; an unreadable acceptance record too.
    for path in cache_dir.glob("*.json"):
        path.write_text("{not json")
    tune_batch_tree_shape(target, head, input_ids, attention_mask)
    assert calls[7:] == ["calibrate_acceptance", "time_shapes", "time_plain_steps"]


@pytest.mark.parametrize(
    ("arch", "static_cache"),
    [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False), ("qwen3", True)],
)
def test_batch_with_the_automatic_tree_is_lossless(arch, static_cache, cache_dir, monkeypatch):
    """Where decoding without drafts is slower than every tree, the batch decodes with the chosen tree, each row as
    its prompt alone; the next call of that batch size reuses the choice."""
    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", lambda *args: float("inf"))
    target, head = make_friendly_pair(arch)
    prompts = [prompt_reaching_eos(target, 4, length=5), prompt_reaching_eos(target, 40, length=9)]
    prompts.append(prompt_reaching_eos(target, 13, length=3))
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=20, eagle3_static_cache=static_cache)
    stored = [json.loads(path.read_text()) for path in cache_dir.glob("*.json")]
    (choice,) = [record for record in stored if "batch_size" in record["key"] and "shape" in record]
    stats = output.eagle3_stats
    assert not stats.plain_fallback and stats.static_cache == static_cache
    assert stats.tree_shape == tuple(choice["shape"].values())
    assert [row.new_tokens + 1 for row in stats.rows] == [5, 20, 14]
    again = assert_rows_lossless(target, head, prompts[::-1], max_new_tokens=8, eagle3_static_cache=static_cache)
    assert again.eagle3_stats.tree_shape == stats.tree_shape


class StopAfter(StoppingCriteria):
    """Stops a row once it holds `token` (a criterion of the caller's own, per row)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_batch_that_no_tree_speeds_up_decodes_without_drafts(arch, static_cache, cache_dir, monkeypatch, caplog):
    """Where decoding without drafts is the fastest, the batch is the target's own decoding as `generate` without an
    assistant gives it: on the static path transformers' static-cache generate (which it compiles on CUDA), exactly,
    with the call's processors, stopping criteria, `max_new_tokens` and outputs; said in the log and the statistics.
    An explicit tree still decodes with drafts."""
    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", lambda *args: 0.0)
    target = make_target(arch)
    head = make_head(target)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (1, length), generator=generator).to(target.device) for length in (6, 11, 4)]
    input_ids, attention_mask = left_pad(prompts, target.config.pad_token_id)
    # A token the second row emits early on: it stops there.
    penalized = dict(do_sample=False, repetition_penalty=1.3)
    early = int(target.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, **penalized)[1, -1])
    call = dict(
        max_new_tokens=10,
        repetition_penalty=penalized["repetition_penalty"],
        stopping_criteria=StoppingCriteriaList([StopAfter(early)]),
        output_scores=True,
        output_logits=True,
        eagle3_static_cache=static_cache,
    )
    with caplog.at_level("WARNING"):
        output = assert_rows_lossless(target, head, prompts, **call)
    stats = output.eagle3_stats
    assert stats.plain_fallback and stats.tree_shape is None and stats.target_forwards == 0
    assert stats.static_cache == static_cache
    # (The warning of the call itself comes once per process.)
    assert "none (decoding without drafts)" in caplog.text
    cache = getattr(output, CACHE_NAME)
    assert isinstance(cache, StaticCache) == static_cache
    plain_call = {name: value for name, value in call.items() if not name.startswith("eagle3_")}
    if static_cache:
        plain_call["cache_implementation"] = "static"
    plain = target.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, return_dict_in_generate=True, **plain_call
    )
    assert torch.equal(output.sequences, plain.sequences)
    second = output.sequences[1, input_ids.shape[1] :]
    emitted = int((second != target.config.pad_token_id).sum())
    assert emitted <= 3 and int(second[emitted - 1]) == early
    for name in ("scores", "logits"):
        assert len(getattr(output, name)) == 10
        assert torch.equal(torch.stack(getattr(output, name)), torch.stack(getattr(plain, name)))
    knobs = dict(eagle3_total_tokens=4, eagle3_depth=2, eagle3_top_k=2, eagle3_static_cache=static_cache)
    output = assert_rows_lossless(target, head, prompts, max_new_tokens=12, **knobs)
    assert not output.eagle3_stats.plain_fallback and output.eagle3_stats.tree_shape == (4, 2, 2)


def test_decoding_without_drafts_compiles_where_transformers_would(cache_dir, monkeypatch):
    """The static path's fallback takes transformers' compiled decoding forward wherever transformers compiles it (on
    CUDA; on the CPU when a `compile_config` asks for every device) and stays token-identical."""
    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", lambda *args: 0.0)
    target, head = make_friendly_pair("llama")
    compile_config = CompileConfig(backend="eager", mode=None)
    compile_config._compile_all_devices = True
    compiled = []
    get_compiled_call = target.get_compiled_call
    monkeypatch.setattr(
        target, "get_compiled_call", lambda config: compiled.append(config) or get_compiled_call(config)
    )
    prompts = [prompt_reaching_eos(target, 3), prompt_reaching_eos(target, 30, length=7)]
    output = assert_rows_lossless(
        target, head, prompts, max_new_tokens=8, eagle3_static_cache=True, compile_config=compile_config
    )
    assert output.eagle3_stats.plain_fallback and compiled[0] is compile_config


def test_trees_are_compared_with_plain_decoding_on_their_path(cache_dir, monkeypatch):
    """Decoding without drafts is timed as the path would decode it (`generate` with `cache_implementation="static"`
    on the static path, the dynamic cache elsewhere), and each path's trees are compared with that path's time."""
    target, head = make_friendly_pair("llama")
    _, input_ids, attention_mask = _batch(target, rows=2)
    caches = []
    generate = target.generate

    def recording(*args, **kwargs):
        caches.append(kwargs.get("cache_implementation"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(target, "generate", recording)
    for static_cache in (False, True):
        del caches[:]
        plain_decoding.time_plain_steps(target, input_ids, attention_mask, 4, rounds=1, static_cache=static_cache)
        assert caches == ["static" if static_cache else None] * 2

    # The dynamic path's plain decoding is slower than any tree, the static path's faster than every one.
    plain_seconds = {False: float("inf"), True: 1e-9}
    timed = []

    def time_plain_steps(model, input_ids, attention_mask, new_tokens, rounds, static_cache):
        timed.append(static_cache)
        return plain_seconds[static_cache]

    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", time_plain_steps)
    dynamic, record = tune_batch_tree_shape(target, head, input_ids, attention_mask, static_cache=False)
    assert dynamic is not None and record["plain_step_ms"] == float("inf")
    static, record = tune_batch_tree_shape(target, head, input_ids, attention_mask, static_cache=True)
    assert static is None and record["plain_step_ms"] == pytest.approx(1e-6)
    assert timed == [False, True]


def test_compiled_batches_time_the_best_tree_compiled_before_giving_it_up(cache_dir, monkeypatch):
    """Trees are timed uncompiled, plain decoding as transformers compiles it: on the compiled path a best tree that
    loses uncompiled is compiled and timed once more, and kept where it wins compiled; choices are kept apart."""
    target, head = make_friendly_pair("llama")
    _, input_ids, attention_mask = _batch(target, rows=2)
    grid = TINY_BATCH_GRID.for_head(head)
    taus = {shape: _tau(shape) for shape in grid.shapes()}
    timings = [StepTiming(shape, 0.001 * shape.depth, 0.002 + 1e-4 * shape.nodes) for shape in timing_shapes(grid)]
    monkeypatch.setattr(batch_tree_shape, "batch_acceptance", lambda *args, **kwargs: taus)
    monkeypatch.setattr(batch_tree_shape, "step_times", lambda *args, **kwargs: timings)
    best_shape, table = choose_shape(taus, StepTimeModel(timings))
    step, tau = table[0]["step_ms"] / 1000, table[0]["tau"]
    # Plain decoding makes 1.25 tokens in the time the best tree makes its tau uncompiled.
    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", lambda *args: 0.8 * step / tau)
    speedup = {"compiled": 2.0}
    timed = []

    def time_shapes(model, draft_model, prompt, shapes, static_cache, compile, new_tokens, rounds, attention_mask):
        timed.append((shapes, static_cache, compile))
        return [StepTiming(shapes[0], 0.0, step / speedup["compiled"])]

    monkeypatch.setattr(batch_tree_shape, "time_shapes", time_shapes)
    tune = lambda **kwargs: tune_batch_tree_shape(target, head, input_ids, attention_mask, static_cache=True, **kwargs)  # noqa: E731
    shape, record = tune()
    assert shape is None and record["compiled_best_step_ms"] is None and timed == []
    shape, record = tune(compiled=True)
    assert shape == best_shape and timed == [([best_shape], True, True)]
    assert record["compiled_best_step_ms"] == pytest.approx(1000 * step / 2) and record["key"]["compiled"]
    # Both choices are cached, each under its own key.
    assert tune()[0] is None and tune(compiled=True)[0] == best_shape and len(timed) == 1
    # Compiled steps only 1.1x faster: the tree loses compiled too.
    speedup["compiled"] = 1.1
    assert tune(compiled=True, refresh=True)[0] is None and len(timed) == 2
    with pytest.raises(ValueError, match="static_cache=True"):
        tune_batch_tree_shape(target, head, input_ids, attention_mask, compiled=True)

    # `generate`'s resolution asks for the compiled check exactly where the call compiles static steps.
    asked = []
    monkeypatch.setattr(
        batch_tree_shape, "tune_batch_tree_shape", lambda *args, **kwargs: asked.append(kwargs) or (None, {})
    )
    for compile_steps in (False, True):
        config = Eagle3DecodingConfig(static_cache=True, compile=compile_steps)
        model_kwargs = {"attention_mask": attention_mask, CACHE_NAME: DynamicCache()}
        assert batch_tree_shape.resolve_batch_tree(target, head, config, input_ids, model_kwargs) is None
    assert [(kwargs["static_cache"], kwargs["compiled"]) for kwargs in asked] == [(True, False), (True, True)]


def test_sampled_batches_choose_from_sampled_acceptance(cache_dir, monkeypatch):
    """A sampling batch left to the automatic tree calibrates each row's acceptance under the call's own sampling
    (the single-prompt rule, `tree_shape.acceptance_rule`), in records of its own beside the greedy ones. The step
    times, of the shapes and of decoding without drafts, do not depend on the sampling: measured once for both."""
    monkeypatch.setattr(batch_tree_shape, "time_plain_steps", lambda *args: float("inf"))
    calls = _spy(monkeypatch)
    rules = []
    original = batch_tree_shape.calibrate_acceptance

    def recording(*args):
        rules.append(args[-1])
        return original(*args)

    monkeypatch.setattr(batch_tree_shape, "calibrate_acceptance", recording)
    target, head = make_friendly_pair("llama")
    _, input_ids, attention_mask = _batch(target, rows=2)
    target.generate(input_ids, attention_mask=attention_mask, assistant_model=head, do_sample=False, max_new_tokens=4)
    sampled = target.generate(
        input_ids,
        attention_mask=attention_mask,
        assistant_model=head,
        do_sample=True,
        temperature=0.7,
        top_k=5,
        max_new_tokens=4,
        return_dict_in_generate=True,
    )
    assert [rule.do_sample for rule in rules] == [False, True]
    assert {type(processor).__name__ for processor in rules[1].logits_processor} >= {"TemperatureLogitsWarper"}
    assert calls == ["calibrate_acceptance", "time_shapes", "time_plain_steps", "calibrate_acceptance"]
    stored = [json.loads(path.read_text()) for path in cache_dir.glob("*.json")]
    # An acceptance record and a batch-2 choice per rule; the step times of the shapes and without drafts for both.
    assert len(stored) == 6
    rules_stored = [json.dumps(record["key"]["acceptance"], sort_keys=True) for record in stored]
    assert sorted(rules_stored).count("null") == 2 and len(set(rules_stored)) == 3
    (choice,) = [r for r in stored if "shape" in r and r["key"]["acceptance"] and r["key"]["acceptance"]["do_sample"]]
    assert sampled.eagle3_stats.tree_shape == tuple(choice["shape"].values())


def test_batch_acceptance_is_calibrated_on_the_built_in_requests(chatml, cache_dir, monkeypatch):
    """With the target's tokenizer, a batch's acceptance comes from the built-in requests, not from its rows; without
    one, from its first rows."""
    target, head = make_oracle_pair("llama", context_weight=0.3, eos_token_id=None, vocab_size=len(chatml))
    calibrated = []
    calibrate = batch_tree_shape.calibrate_acceptance

    def spy(model, draft_model, prompts, *args):
        calibrated.append([ids.cpu() for ids in prompts])
        return calibrate(model, draft_model, prompts, *args)

    monkeypatch.setattr(batch_tree_shape, "calibrate_acceptance", spy)
    rows = [prompt(seed, length=4 + seed, vocab_size=len(chatml)) for seed in range(3)]
    input_ids, attention_mask = left_pad(rows, target.config.pad_token_id)
    _, record = tune_batch_tree_shape(target, head, input_ids, attention_mask, tokenizer=chatml)
    expected = render_requests(chatml, CALIBRATION_REQUESTS)
    assert len(calibrated[0]) == len(expected) and all(map(torch.equal, calibrated[0], expected))
    (acceptance,) = [json.loads(path.read_text()) for path in cache_dir.glob("*.json") if "taus" in path.read_text()]
    assert acceptance["calibration"]["prompts"] == f"the {len(CALIBRATION_REQUESTS)} built-in requests"

    tune_batch_tree_shape(target, head, input_ids, attention_mask, refresh=True)
    assert all(map(torch.equal, calibrated[1], [row.cpu() for row in rows[:2]]))
