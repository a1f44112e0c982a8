"""`eagle3_tree="auto"`: exact acceptance of every shape from one decode, the step-time model, the choice, the cache,
the knob and the automatic tree end to end through `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lossless import assert_greedy_lossless, make_friendly_pair, prompt_reaching_eos
from transformers.cache_utils import DynamicCache
from tree_decoding import (
    PLAIN_SAMPLING,
    RecordingStats,
    assert_sampling_matches_target_distribution,
    hand_built_tree,
    make_oracle_pair,
    prompt,
    sampling_processors,
    tree_generate,
)

from hf_eagle3._compat import CACHE_NAME
from hf_eagle3.decoding import static_tree, tree_shape
from hf_eagle3.decoding.acceptance import greedy_path
from hf_eagle3.decoding.calibration import CALIBRATION_REQUESTS, render_requests
from hf_eagle3.decoding.config import Eagle3DecodingConfig
from hf_eagle3.decoding.stats import Eagle3GenerationStats
from hf_eagle3.decoding.tree_shape import (
    GREEDY,
    AcceptanceRule,
    ShapeGrid,
    StepTimeModel,
    StepTiming,
    TreeShape,
    acceptance_rule,
    calibrate_acceptance,
    calibration_seed,
    choose_shape,
    expansion_size,
    reach_probabilities,
    tune_tree_shape,
    union_step,
    union_steps,
)
from hf_eagle3.target_features import TargetFeatureCapture

# A grid small enough to measure in a second or two on the tiny models.
TINY_GRID = ShapeGrid(total_tokens=(3, 4, 6), depths=(2, 3), top_ks=(2,))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EAGLE3_CACHE", str(tmp_path))
    monkeypatch.setattr(tree_shape, "CPU_GRID", TINY_GRID)
    return tmp_path / "tree_shapes"


@pytest.fixture(scope="module")
def pair():
    """A target that rejects some drafts (context matters) and a head that mostly agrees with it, without EOS."""
    return make_oracle_pair("llama", context_weight=0.3, eos_token_id=None)


def _steps_of_generate(target, head, input_ids, shape: TreeShape, new_tokens: int, monkeypatch) -> dict[int, int]:
    """Drafts accepted at each step of `generate` with a fixed `shape`, by the number of tokens emitted before it."""
    recorded = []
    original = Eagle3GenerationStats.record

    def record(self, num_accepted, num_emitted):
        recorded.append((num_accepted, num_emitted))
        original(self, num_accepted, num_emitted)

    monkeypatch.setattr(Eagle3GenerationStats, "record", record)
    target.generate(
        input_ids, assistant_model=head, do_sample=False, max_new_tokens=new_tokens, **shape.generate_kwargs()
    )
    monkeypatch.undo()
    steps, emitted = {}, 1  # the prefill emits the first token
    for num_accepted, num_emitted in recorded[:-1]:  # the last step may stop inside its accepted run
        steps[emitted] = num_accepted
        emitted += num_emitted
    return steps


def test_every_smaller_tree_accepts_what_the_union_tree_predicts(pair, monkeypatch):
    """The claim `auto` rests on: from the same root, the tree of (T, D, k) accepts exactly the prefix of the union
    tree's greedy path that lies among its T - 1 best candidates of levels <= D."""
    target, head = pair
    top_k, depths = 3, (2, 3, 4, 5)
    shapes = [TreeShape(16, 5, 3), TreeShape(10, 4, 3), TreeShape(6, 3, 3), TreeShape(4, 2, 3), TreeShape(12, 2, 3)]
    input_ids, new_tokens = prompt(3), 40
    predicted, emitted = {shape: {} for shape in shapes}, 1
    for num_emitted, accepted in union_steps(
        target, head, input_ids, new_tokens, expansion_size(5, top_k), depths, top_k, 16, shapes
    ):
        for shape in shapes:
            predicted[shape][emitted] = accepted[shape]
        emitted += num_emitted
    for shape in shapes:
        actual = _steps_of_generate(target, head, input_ids, shape, new_tokens, monkeypatch)
        common = sorted(predicted[shape].keys() & actual.keys())
        assert len(common) >= 5, f"{shape}: too few common roots to compare ({common})"
        assert [predicted[shape][p] for p in common] == [actual[p] for p in common], shape
    # Not a vacuous comparison: the shapes accept different amounts, some of them more than nothing.
    assert len({sum(steps.values()) for steps in predicted.values()}) > 1
    assert max(max(steps.values()) for steps in predicted.values()) >= 2


def _linear_timings(draft_base, draft_level, verify_per_node, verify_base, shapes):
    return [
        StepTiming(
            shape,
            draft_base[shape.top_k] + draft_level[shape.top_k] * (shape.depth - 1),
            verify_base + verify_per_node * shape.nodes,
        )
        for shape in shapes
    ]


def test_step_time_model_recovers_linear_costs():
    grid = ShapeGrid(total_tokens=(3, 4, 6, 8, 12, 16, 24), depths=(2, 3, 4, 6), top_ks=(2, 3, 4))
    base, level = {2: 0.010, 3: 0.012, 4: 0.015}, {2: 0.002, 3: 0.003, 4: 0.004}
    model = StepTimeModel(_linear_timings(base, level, 0.001, 0.005, tree_shape.timing_shapes(grid)))
    for shape in grid.shapes():
        expected = base[shape.top_k] + level[shape.top_k] * (shape.depth - 1) + 0.005 + 0.001 * shape.nodes
        assert model.step_seconds(shape) == pytest.approx(expected)
    with pytest.raises(ValueError, match="top_k=5"):
        model.step_seconds(TreeShape(8, 3, 5))


def test_timing_shapes_cover_two_depths_per_top_k_and_the_range_of_sizes():
    grid = tree_shape.CPU_GRID
    shapes = tree_shape.timing_shapes(grid)
    assert {(shape.depth, shape.top_k) for shape in shapes} == {(d, k) for d in (2, 6) for k in (2, 3, 4)}
    nodes = sorted(shape.nodes for shape in shapes)
    assert nodes[0] == min(grid.total_tokens) and nodes[-1] == max(grid.total_tokens)
    assert all(shape.nodes == shape.total_tokens for shape in shapes)


def test_choice_follows_the_device_costs():
    """The same acceptance, two devices: where each verified token costs, a small tree wins; where verification is
    flat in the tree size, the large one."""
    taus = {TreeShape(4, 2, 2): 1.8, TreeShape(8, 3, 2): 2.3, TreeShape(24, 6, 4): 2.9}
    timed = [TreeShape(4, 2, 2), TreeShape(8, 6, 2), TreeShape(6, 2, 4), TreeShape(24, 6, 4)]
    level = {2: 0.001, 4: 0.001}
    cpu = StepTimeModel(_linear_timings({2: 0.002, 4: 0.002}, level, 0.010, 0.0, timed))
    gpu = StepTimeModel(_linear_timings({2: 0.002, 4: 0.002}, level, 0.0, 0.010, timed))
    assert choose_shape(taus, cpu)[0] == TreeShape(4, 2, 2)
    shape, table = choose_shape(taus, gpu)
    assert shape == TreeShape(24, 6, 4)
    assert [row["tokens_per_s"] for row in table] == sorted((row["tokens_per_s"] for row in table), reverse=True)
    expected = {s: tau / gpu.step_seconds(s) for s, tau in taus.items()}
    assert table[0]["tokens_per_s"] == pytest.approx(max(expected.values()))


def test_tie_goes_to_the_smaller_tree():
    timed = [TreeShape(4, 2, 2), TreeShape(8, 3, 2)]
    costs = StepTimeModel(_linear_timings({2: 0.0}, {2: 0.0}, 0.0, 0.01, timed))
    assert choose_shape({TreeShape(8, 3, 2): 2.0, TreeShape(4, 2, 2): 2.0}, costs)[0] == TreeShape(4, 2, 2)


def _measurements(monkeypatch) -> list[str]:
    """Spy on the measurements `tune_tree_shape` makes: "calibrate" per acceptance calibration, "time" per timing."""
    calls = []
    calibrate, time_shapes = tree_shape.calibrate_acceptance, tree_shape.time_shapes

    def spy_calibrate(*args, **kwargs):
        calls.append("calibrate")
        return calibrate(*args, **kwargs)

    def spy_time(*args, **kwargs):
        calls.append("time")
        return time_shapes(*args, **kwargs)

    monkeypatch.setattr(tree_shape, "calibrate_acceptance", spy_calibrate)
    monkeypatch.setattr(tree_shape, "time_shapes", spy_time)
    return calls


def _cached(cache_dir) -> tuple[dict[Path, dict], dict[Path, dict]]:
    """The cache's files: the choices, and the step times (shared by the acceptance rules), by path."""
    records = {path: json.loads(path.read_text()) for path in cache_dir.glob("*.json")}
    choices = {path: record for path, record in records.items() if record["key"]["acceptance"] is not None}
    return choices, {path: record for path, record in records.items() if path not in choices}


def test_cache_hit_miss_and_corruption(pair, cache_dir, monkeypatch, caplog):
    target, head = pair
    calls = _measurements(monkeypatch)
    prompts = [prompt(1)]
    shape, record = tune_tree_shape(target, head, prompts)
    assert calls == ["calibrate", "time"] and shape in TINY_GRID.shapes()
    choices, timings = _cached(cache_dir)
    assert len(choices) == len(timings) == 1
    (file,), (stored,) = choices.keys(), choices.values()
    assert stored["shape"] == record["shape"] and stored["key"]["path"] == "dynamic"
    assert len(stored["candidates"]) == len(TINY_GRID.shapes())
    (timing_file,), (stored_timings,) = timings.keys(), timings.values()
    assert stored_timings["timings"] == stored["timings"]

    assert tune_tree_shape(target, head, prompts)[0] == shape  # hit: nothing measured
    assert calls == ["calibrate", "time"]

    # Another path is another entry.
    tune_tree_shape(target, head, prompts, static_cache=True)
    assert calls == ["calibrate", "time"] * 2 and len(list(cache_dir.glob("*.json"))) == 4

    for broken in ("{not json", json.dumps({"key": stored["key"], "shape": {"total_tokens": "x"}}), "[]"):
        file.write_text(broken)
        with caplog.at_level("WARNING"):
            assert tune_tree_shape(target, head, prompts)[0] in TINY_GRID.shapes()
        assert "is unreadable" in caplog.text and "measuring it again" in caplog.text
        caplog.clear()
        assert json.loads(file.read_text())["key"] == stored["key"]  # rewritten whole
    assert calls == ["calibrate", "time"] * 2 + ["calibrate"] * 3  # the step times were still cached
    timing_file.write_text(json.dumps({"key": stored_timings["key"], "timings": []}))
    file.unlink()
    with caplog.at_level("WARNING"):
        tune_tree_shape(target, head, prompts)
    assert "holds no step times" in caplog.text and calls[-2:] == ["calibrate", "time"]


def test_other_weights_are_measured_again(pair, cache_dir, monkeypatch):
    target, head = pair
    calls = _measurements(monkeypatch)
    tune_tree_shape(target, head, [prompt(1)])
    with torch.no_grad():
        head.fc.weight.mul_(1.0)  # an in-place update: the fingerprint is computed again, and is the same
    tune_tree_shape(target, head, [prompt(1)])
    assert calls == ["calibrate", "time"]
    original = head.fc.weight.detach().clone()
    try:
        with torch.no_grad():
            head.fc.weight.add_(1e-3)
        tune_tree_shape(target, head, [prompt(1)])
        assert calls == ["calibrate", "time"] * 2
    finally:
        with torch.no_grad():
            head.fc.weight.copy_(original)


@pytest.mark.parametrize("static_cache", [False, True])
def test_auto_is_the_default_and_lossless(pair, cache_dir, static_cache):
    target, head = pair
    input_ids = prompt(5)
    output = assert_greedy_lossless(
        target, head, input_ids, max_new_tokens=24, eagle3_tree="auto", eagle3_static_cache=static_cache
    )
    (stored,) = _cached(cache_dir)[0].values()
    assert stored["key"]["path"] == ("static" if static_cache else "dynamic")
    chosen = tuple(stored["shape"].values())
    assert output.eagle3_stats.tree_shape == chosen
    # Without any tree knob the call decodes with the cached choice (of its path: on the CPU the default is dynamic).
    output = target.generate(
        input_ids,
        assistant_model=head,
        do_sample=False,
        max_new_tokens=8,
        eagle3_static_cache=static_cache,
        return_dict_in_generate=True,
    )
    assert output.eagle3_stats.tree_shape == chosen
    # A shape knob fixes the tree.
    output = target.generate(
        input_ids,
        assistant_model=head,
        do_sample=False,
        max_new_tokens=8,
        eagle3_total_tokens=5,
        eagle3_static_cache=static_cache,
        return_dict_in_generate=True,
    )
    assert output.eagle3_stats.tree_shape == (5, 8, 10)


def _first_step_expectations(target, head, input_ids, shapes, rule) -> dict[int, dict[TreeShape, float]]:
    """For every first token `t` the prefill may emit: the drafts each shape accepts in expectation at the first tree
    step, from the union tree rooted at `t`, as the calibration computes them."""
    top_k, depths = shapes[0].top_k, tuple(sorted({shape.depth for shape in shapes}))
    max_total = max(shape.total_tokens for shape in shapes)
    expectations = {}
    for token in range(target.config.vocab_size):
        model_kwargs = {CACHE_NAME: DynamicCache(config=target.config), "attention_mask": None, "use_cache": True}
        with TargetFeatureCapture(target, head.config.target_layer_ids) as capture, torch.no_grad():
            decoder = tree_shape._UnionTreeDecoder(
                target,
                head,
                capture,
                expansion_size(depths[-1], top_k),
                depths[-1],
                top_k,
                model_kwargs,
                depths=depths,
                max_total_tokens=max_total,
            )
            decoder.prefill(input_ids, model_kwargs)
            rooted = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
            decoder.start(rooted)
            tree = decoder.draft(rooted)
            logits, _ = decoder.verify()
            expectations[token] = union_step(logits, tree, rooted, rule, depths[-1], shapes)[1]
    return expectations


# Warpers and a penalty that change acceptance far beyond the test's noise (0.75 drafts per step at T=1, 1.3 here).
SHARP_SAMPLING = dict(temperature=0.5, top_k=3, top_p=1.0, repetition_penalty=1.5)


@pytest.mark.parametrize("sampling", [PLAIN_SAMPLING, SHARP_SAMPLING], ids=["plain", "processed"])
def test_expected_acceptance_matches_sampled_decodes(sampling):
    """The claim sampled calibration rests on: a tree accepts, in expectation, the sum over its drafts of the product
    of the target's processed probabilities along their paths. Checked against the first tree step of many sampled
    `generate` calls with each shape, conditioned on the first token (the step's root)."""
    target, head = make_oracle_pair("llama", 0.1, vocab_size=8, eos_token_id=None, num_hidden_layers=4)
    with torch.no_grad():
        target.lm_head.weight.mul_(6)  # peaked enough that deeper drafts are accepted too
    input_ids = torch.tensor([[3, 5, 4, 6]], device=target.device)
    shapes = [TreeShape(6, 3, 2), TreeShape(4, 2, 2)]
    rule = AcceptanceRule(do_sample=True, logits_processor=sampling_processors(**sampling))
    expectations = _first_step_expectations(target, head, input_ids, shapes, rule)
    torch.manual_seed(0)
    for shape in shapes:
        differences = []
        for _ in range(300):
            stats = RecordingStats()
            output = tree_generate(
                target,
                head,
                input_ids,
                (shape.total_tokens, shape.depth, shape.top_k),
                stats,
                # The prefill's token and the first step's whole path: the step is never cut short.
                max_new_tokens=shape.depth + 2,
                do_sample=True,
                **sampling,
            )
            root = int(output[0, input_ids.shape[1]])
            differences.append(stats.steps[0][0] - expectations[root][shape])
        differences = torch.tensor(differences, dtype=torch.float64)
        mean, standard_error = float(differences.mean()), float(differences.std() / len(differences) ** 0.5)
        assert abs(mean) < 4 * standard_error, (shape, mean, standard_error)
        # Not vacuous: the step accepts some drafts but not all, with some spread.
        expected = [expectations[token][shape] for token in expectations]
        assert 0.5 < sum(expected) / len(expected) < shape.depth - 0.5 and standard_error > 0.01


def test_greedy_reach_is_the_greedy_path():
    """Greedy reach probabilities are 1 on the path greedy acceptance keeps and 0 elsewhere."""

    tree = hand_built_tree()
    logits = torch.randn(len(tree), 16, generator=torch.Generator().manual_seed(0))
    # Make the path root -> first child -> its first child the argmax.
    children = tree.children()
    first, second = children[0][0], children[children[0][0]][0]
    logits[0, tree.tokens[first]] = logits[first, tree.tokens[second]] = 100.0
    num_visited, visited, _ = greedy_path(logits, tree, len(tree))
    on_path = torch.zeros(len(tree))
    on_path[visited[: int(num_visited)]] = 1
    assert torch.equal(reach_probabilities(logits, tree, do_sample=False), on_path)
    assert int(num_visited) >= 3


def test_sampling_settings_get_choices_of_their_own(pair, cache_dir, monkeypatch):
    """Greedy and sampled calls (and sampled ones with other warpers) are calibrated and cached apart; each again hits
    its own entry."""
    target, head = pair
    calls = _measurements(monkeypatch)
    hot = sampling_processors(**PLAIN_SAMPLING)
    cool = sampling_processors(temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.0)
    rules = [GREEDY, acceptance_rule(True, hot), acceptance_rule(True, cool), acceptance_rule(False, cool)]
    keys = [tune_tree_shape(target, head, [prompt(1)], rule=rule)[1]["key"] for rule in rules]
    # One timing for all: the step times do not depend on the acceptance rule.
    assert calls == ["calibrate", "time"] + ["calibrate"] * 3 and len(_cached(cache_dir)[0]) == 4
    for rule, key in zip(rules, keys, strict=True):
        assert tune_tree_shape(target, head, [prompt(1)], rule=rule)[1]["key"] == key
    assert calls == ["calibrate", "time"] + ["calibrate"] * 3
    assert [key["acceptance"]["do_sample"] for key in keys] == [False, True, True, False]
    warpers = keys[2]["acceptance"]["processors"]
    assert [warper["type"] for warper in warpers] == ["TemperatureLogitsWarper", "TopKLogitsWarper"]
    assert warpers[0]["temperature"] == 0.7 and warpers[1]["top_k"] == 5


def test_processors_a_tree_cannot_take_calibrate_greedily():
    from transformers.generation import LogitsProcessor, LogitsProcessorList

    class Custom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    assert acceptance_rule(True, LogitsProcessorList([Custom()])) == GREEDY
    assert acceptance_rule(False, None) == GREEDY


def test_sampling_calls_choose_from_sampled_acceptance(pair, cache_dir):
    """Through `generate`: a sampled call measures its own tree (the calibration leaves the call's random stream
    alone), a greedy one the greedy tree."""
    target, head = pair
    greedy = target.generate(
        prompt(2), assistant_model=head, do_sample=False, max_new_tokens=4, return_dict_in_generate=True
    )
    torch.manual_seed(3)
    sampled = target.generate(prompt(2), assistant_model=head, do_sample=True, max_new_tokens=6, temperature=1.0)
    stored = list(_cached(cache_dir)[0].values())
    assert sorted(record["key"]["acceptance"]["do_sample"] for record in stored) == [False, True]
    (greedy_record,) = [record for record in stored if not record["key"]["acceptance"]["do_sample"]]
    assert greedy.eagle3_stats.tree_shape == tuple(greedy_record["shape"].values())
    # Sampled taus are expectations, greedy ones counts; the sampled call decodes with its own choice.
    (sampled_record,) = [record for record in stored if record["key"]["acceptance"]["do_sample"]]
    assert head.last_generation_stats.tree_shape == tuple(sampled_record["shape"].values())
    torch.manual_seed(3)
    again = target.generate(prompt(2), assistant_model=head, do_sample=True, max_new_tokens=6, temperature=1.0)
    assert torch.equal(sampled, again)  # cached now: the same draws as the measuring call made


@pytest.mark.parametrize("static_cache", [False, True])
def test_auto_sampling_matches_target_distribution(cache_dir, static_cache):
    assert_sampling_matches_target_distribution(static_cache=static_cache, auto_tree=True)
    (stored,) = _cached(cache_dir)[0].values()
    assert stored["key"]["acceptance"]["do_sample"]


def test_tree_knob_validation():
    with pytest.raises(ValueError, match="eagle3_tree must be one of"):
        Eagle3DecodingConfig(tree="best")
    from transformers import GenerationConfig

    def resolve(call: dict, head: dict | None = None):
        config = GenerationConfig()
        for name, value in call.items():
            setattr(config, name, value)
        head_config = None
        if head is not None:
            head_config = GenerationConfig()
            for name, value in head.items():
                setattr(head_config, name, value)
        return Eagle3DecodingConfig.resolve(config, head_config)

    assert resolve({}).tree == "auto"
    assert resolve({"eagle3_depth": 4}).tree == "fixed"
    assert resolve({}, {"eagle3_top_k": 4}).tree == "fixed"
    assert resolve({"eagle3_tree": "auto"}, {"eagle3_top_k": 4}).tree == "auto"  # the call before the head
    assert resolve({"eagle3_tree": "fixed"}).tree == "fixed"
    with pytest.raises(ValueError, match=r"eagle3_tree='auto' chooses the tree shape.*\['eagle3_total_tokens'\]"):
        resolve({"eagle3_tree": "auto", "eagle3_total_tokens": 32})


def test_auto_with_shape_knobs_in_generate_is_an_error(pair):
    target, head = pair
    with pytest.raises(ValueError, match="eagle3_tree='auto' chooses the tree shape"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_tree="auto", eagle3_top_k=2)
    with pytest.raises(ValueError, match="eagle3_tree must be one of"):
        target.generate(prompt(0), assistant_model=head, max_new_tokens=4, eagle3_tree="big")


def test_auto_is_the_default_with_compile_too():
    """The compiled path measures no compiled step (it takes the static path's choice): auto is its default too."""
    from transformers import GenerationConfig

    assert Eagle3DecodingConfig.resolve(GenerationConfig(), None).tree == "auto"
    assert Eagle3DecodingConfig.resolve(GenerationConfig(eagle3_compile=True), None).tree == "auto"
    fixed = GenerationConfig(eagle3_compile=True, eagle3_total_tokens=32)
    assert Eagle3DecodingConfig.resolve(fixed, None).tree == "fixed"


@pytest.mark.slow
def test_compiled_path_compiles_only_the_chosen_shape(pair, cache_dir, aot_eager, monkeypatch):
    """On the compiled path the step times come from uncompiled static decodes, shared with the static path's choice,
    and only the shape decoded with is compiled."""
    target, head = pair
    built = []

    class RecordingRunner(static_tree.StaticTreeRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(((self.total_tokens, self.depth, self.top_k), self.compiled))

    monkeypatch.setattr(static_tree, "StaticTreeRunner", RecordingRunner)
    output = assert_greedy_lossless(
        target, head, prompt(4), max_new_tokens=12, eagle3_static_cache=True, eagle3_compile=True
    )
    (stored,) = _cached(cache_dir)[0].values()
    chosen = tuple(stored["shape"].values())
    assert stored["key"]["path"] == "static" and output.eagle3_stats.compiled
    assert output.eagle3_stats.tree_shape == chosen
    assert [shape for shape, compiled in built if compiled] == [chosen]
    assert len(built) > 1  # the timed shapes, uncompiled
    # The static path decodes with the same choice, measuring nothing.
    built.clear()
    output = target.generate(
        prompt(4), assistant_model=head, max_new_tokens=8, eagle3_static_cache=True, return_dict_in_generate=True
    )
    assert output.eagle3_stats.tree_shape == chosen and built == [(chosen, False)]


def test_demo_decodes_with_the_automatic_tree(tmp_path, cache_dir, capsys):
    from conftest import save_chat_checkpoint

    from hf_eagle3.cli import main as cli_main

    save_chat_checkpoint(tmp_path)
    argv = ["demo", "--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--device", "cpu"]
    assert cli_main([*argv, "--prompt", "w5 w6 w7 w5 w6", "--max-new-tokens", "8"]) == 0
    output = capsys.readouterr().out
    (stored,) = _cached(cache_dir)[0].values()
    shape = "/".join(str(value) for value in stored["shape"].values())
    assert f"(tree, tree {shape} (total tokens/depth/top-k))" in output and "identical text: yes" in output


# ------------------------------------------------------------------------------ what acceptance is calibrated on
@pytest.fixture
def chat_pair(chatml):
    """An oracle pair over the chat tokenizer's vocabulary; built from configs, it has no tokenizer of its own."""
    return make_oracle_pair("llama", context_weight=0.3, eos_token_id=None, vocab_size=len(chatml))


def _steps_of_calibration(target, head, input_ids, shapes, new_tokens, rule) -> int:
    """The steps of a prompt's calibration decode (one top_k), drawn as `calibrate_acceptance` draws them."""
    depths = tuple(sorted({shape.depth for shape in shapes}))
    top_k, max_total = shapes[0].top_k, max(shape.total_tokens for shape in shapes)
    torch.manual_seed(calibration_seed(input_ids))
    steps = union_steps(
        target, head, input_ids, new_tokens, expansion_size(depths[-1], top_k), depths, top_k, max_total, shapes, rule
    )
    with torch.no_grad():
        return sum(1 for _ in steps)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_calibration_pools_every_prompt_by_its_steps(pair, sampled):
    """Several prompts give every shape the mean of each prompt's own acceptance weighted by the steps its decode took
    (every step counts once), whatever the prompts beside it."""
    target, head = pair
    rule = acceptance_rule(True, sampling_processors(**PLAIN_SAMPLING)) if sampled else GREEDY
    shapes, new_tokens = TINY_GRID.shapes(), 20
    prompts = [prompt(1), prompt(2, length=12), prompt(3, length=4)]
    pooled = calibrate_acceptance(target, head, prompts, shapes, new_tokens, rule)
    alone = [calibrate_acceptance(target, head, [ids], shapes, new_tokens, rule) for ids in prompts]
    steps = [_steps_of_calibration(target, head, ids, shapes, new_tokens, rule) for ids in prompts]
    for shape in shapes:
        weighted = sum(count * (taus[shape] - 1) for count, taus in zip(steps, alone, strict=True)) / sum(steps)
        assert pooled[shape] == pytest.approx(1 + weighted, rel=1e-6), shape
    # The same prompts in another order: the same figures.
    assert calibrate_acceptance(target, head, prompts[::-1], shapes, new_tokens, rule) == pytest.approx(pooled)
    # Not vacuous: the prompts' acceptance and steps differ.
    largest = max(shapes, key=lambda shape: shape.total_tokens)
    assert len({round(taus[largest], 6) for taus in alone}) > 1 and len(set(steps)) > 1


def _spy_calibration(monkeypatch) -> list[tuple[list[torch.LongTensor], AcceptanceRule]]:
    """The prompts and rule of every acceptance calibration `tune_tree_shape` makes."""
    calls = []
    calibrate = tree_shape.calibrate_acceptance

    def spy(model, draft_model, prompts, shapes, new_tokens, rule=GREEDY):
        calls.append(([ids.clone() for ids in prompts], rule))
        return calibrate(model, draft_model, prompts, shapes, new_tokens, rule)

    monkeypatch.setattr(tree_shape, "calibrate_acceptance", spy)
    return calls


def _steady_step_times(monkeypatch) -> None:
    """Step times free of the machine's load (linear in depth and nodes): the choice then follows acceptance."""

    def time_shapes(model, draft_model, input_ids, shapes, *args, **kwargs):
        return _linear_timings({2: 0.002}, {2: 0.001}, 0.0005, 0.004, shapes)

    monkeypatch.setattr(tree_shape, "time_shapes", time_shapes)


def _same_prompts(got: list[torch.LongTensor], expected: list[torch.LongTensor]) -> bool:
    return len(got) == len(expected) and all(torch.equal(a.cpu(), b) for a, b in zip(got, expected, strict=True))


def test_the_choice_does_not_depend_on_the_calls_prompt(chat_pair, chatml, tmp_path, monkeypatch):
    """With the target's tokenizer, the first call calibrates on the built-in requests, whatever its own prompt:
    measured from two different first prompts (with empty caches), acceptance and choice are the same; both calls
    lossless."""
    target, head = chat_pair
    monkeypatch.setattr(tree_shape, "CPU_GRID", TINY_GRID)
    calls = _spy_calibration(monkeypatch)
    _steady_step_times(monkeypatch)
    requests = render_requests(chatml, CALIBRATION_REQUESTS)
    records = []
    for index, length in enumerate((5, 40)):
        monkeypatch.setenv("HF_EAGLE3_CACHE", str(tmp_path / str(index)))
        call_prompt = prompt(index, length=length, vocab_size=len(chatml))
        output = assert_greedy_lossless(target, head, call_prompt, max_new_tokens=16, tokenizer=chatml)
        (record,) = _cached(tree_shape.tree_shape_cache_dir())[0].values()
        assert output.eagle3_stats.tree_shape == tuple(record["shape"].values())
        records.append(record)
    assert len(calls) == 2 and all(_same_prompts(prompts, requests) for prompts, _ in calls)
    first, second = records
    assert first["calibration"] == second["calibration"]
    assert first["calibration"]["prompts"] == f"the {len(CALIBRATION_REQUESTS)} built-in requests"
    assert [row["tau"] for row in first["candidates"]] == [row["tau"] for row in second["candidates"]]
    assert first["shape"] == second["shape"]
    # Not vacuous: the first call's own prompt gives other figures.
    own = calibrate_acceptance(
        target, head, [prompt(0, length=5, vocab_size=len(chatml))], TINY_GRID.shapes(), TINY_GRID.calibration_tokens
    )
    assert [own[TreeShape(**row["shape"])] for row in first["candidates"]] != [
        row["tau"] for row in first["candidates"]
    ]


def test_the_cache_serves_every_prompt_and_a_calls_own_requests_get_their_own(
    chat_pair, chatml, cache_dir, monkeypatch
):
    """Once measured, a choice serves every later call, prompt and tokenizer or none; `eagle3_calibration_prompts`
    are calibrated on (rendered with the tokenizer) and kept apart, per set of requests."""
    target, head = chat_pair
    calls = _spy_calibration(monkeypatch)
    _steady_step_times(monkeypatch)
    vocab = len(chatml)

    def generate(input_ids, **kwargs):
        output = target.generate(
            input_ids, assistant_model=head, do_sample=False, max_new_tokens=6, return_dict_in_generate=True, **kwargs
        )
        return output.eagle3_stats.tree_shape

    chosen = generate(prompt(1, vocab_size=vocab), tokenizer=chatml)
    assert generate(prompt(2, length=30, vocab_size=vocab), tokenizer=chatml) == chosen
    assert generate(prompt(3, vocab_size=vocab)) == chosen  # no tokenizer: the cached choice all the same
    assert len(calls) == 1 and len(_cached(cache_dir)[0]) == 1

    requests = ["Explain how tides work.", "Write a haiku about rain."]
    generate(prompt(1, vocab_size=vocab), tokenizer=chatml, eagle3_calibration_prompts=requests)
    assert len(calls) == 2 and _same_prompts(calls[-1][0], render_requests(chatml, requests))
    choices = _cached(cache_dir)[0].values()
    assert sorted(record["key"]["calibration_requests"] is None for record in choices) == [False, True]
    (own,) = [record for record in choices if record["key"]["calibration_requests"] is not None]
    assert own["calibration"]["prompts"] == "the requests of eagle3_calibration_prompts"
    generate(prompt(4, vocab_size=vocab), tokenizer=chatml, eagle3_calibration_prompts=requests)
    generate(prompt(4, vocab_size=vocab), eagle3_calibration_prompts=requests)  # cached: no tokenizer needed
    assert len(calls) == 2
    with pytest.raises(ValueError, match="eagle3_calibration_prompts are text, and no tokenizer of the target"):
        generate(prompt(4, vocab_size=vocab), eagle3_calibration_prompts=requests[:1])


def test_without_a_tokenizer_the_calls_prompt_stands_in(pair, cache_dir, monkeypatch, caplog):
    """A target whose tokenizer is nowhere to be found calibrates on the first call's prompt, and says so."""
    target, head = pair
    calls = _spy_calibration(monkeypatch)
    input_ids = prompt(5)
    with caplog.at_level("WARNING"):
        target.generate(input_ids, assistant_model=head, do_sample=False, max_new_tokens=4)
    assert "found no tokenizer of the target" in caplog.text and "tokenizer=" in caplog.text
    assert len(calls) == 1 and _same_prompts(calls[0][0], [input_ids.cpu()])
    (record,) = _cached(cache_dir)[0].values()
    assert record["calibration"] == {
        "prompts": "the prompt of the call that measured it (no tokenizer found)",
        "prompt_tokens": [input_ids.shape[1]],
    }


def test_sampled_calls_calibrate_on_the_built_in_requests_under_their_rule(chat_pair, chatml, cache_dir, monkeypatch):
    """A sampled call's own choice is calibrated on the same requests, under its sampling rule and warpers."""
    target, head = chat_pair
    calls = _spy_calibration(monkeypatch)
    _steady_step_times(monkeypatch)
    target.generate(
        prompt(1, vocab_size=len(chatml)),
        assistant_model=head,
        do_sample=True,
        temperature=0.7,
        top_k=5,
        max_new_tokens=4,
        tokenizer=chatml,
    )
    ((prompts, rule),) = calls
    assert _same_prompts(prompts, render_requests(chatml, CALIBRATION_REQUESTS)) and rule.do_sample
    assert [type(processor).__name__ for processor in rule.logits_processor] == [
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
    ]
    (record,) = _cached(cache_dir)[0].values()
    assert record["key"]["acceptance"]["do_sample"] and record["calibration"]["prompts"].endswith("built-in requests")


def test_tune_tree_shape_calibrates_on_the_built_in_requests_by_default(chat_pair, chatml, cache_dir, monkeypatch):
    target, head = chat_pair
    calls = _spy_calibration(monkeypatch)
    _steady_step_times(monkeypatch)
    with pytest.raises(ValueError, match="tune_tree_shape without prompts .* pass `tokenizer=` or `prompts=`"):
        tune_tree_shape(target, head)
    shape, record = tune_tree_shape(target, head, tokenizer=chatml)
    assert _same_prompts(calls[0][0], render_requests(chatml, CALIBRATION_REQUESTS))
    assert record["calibration"]["prompts"] == f"the {len(CALIBRATION_REQUESTS)} built-in requests"
    # Prompts of one's own, ahead of time, make the choice later calls take.
    given = [prompt(7, vocab_size=len(chatml))]
    mine, record = tune_tree_shape(target, head, given, refresh=True)
    assert (
        _same_prompts(calls[1][0], [given[0].cpu()])
        and record["calibration"]["prompts"] == "the prompts given to tune_tree_shape"
    )
    output = target.generate(
        prompt(8, vocab_size=len(chatml)), assistant_model=head, max_new_tokens=4, return_dict_in_generate=True
    )
    assert output.eagle3_stats.tree_shape == (mine.total_tokens, mine.depth, mine.top_k) and len(calls) == 2


def test_built_in_requests_render_as_one_user_turn(chatml):
    """Each request is one user turn of the chat template, ready for the answer; without a template, its text."""
    (ids,) = render_requests(chatml, CALIBRATION_REQUESTS[:1])
    text = chatml.decode(ids[0])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{CALIBRATION_REQUESTS[0]}<|im_end|>" in text
    chatml.chat_template = None
    (plain,) = render_requests(chatml, CALIBRATION_REQUESTS[:1])
    assert chatml.decode(plain[0]) == CALIBRATION_REQUESTS[0]
    assert 6 <= len(CALIBRATION_REQUESTS) <= 8 and len(set(CALIBRATION_REQUESTS)) == len(CALIBRATION_REQUESTS)


def test_a_prompt_that_ends_the_text_at_once_is_timed_on_a_prefix():
    """The automatic tree may time on the call's own prompt: where its first new token is EOS, a prefix stands in
    (a step's time does not depend on the prompt); a one-token prompt that ends at once is a clear error."""
    target, head = make_friendly_pair("llama")
    ending = prompt_reaching_eos(target, 0, length=6)
    assert int(target.generate(ending, max_new_tokens=2, do_sample=False)[0, -1]) == target.config.eos_token_id
    shapes = [TreeShape(4, 2, 2), TreeShape(6, 3, 2)]
    timings = tree_shape.time_shapes(target, head, ending, shapes, static_cache=False, compile=False, new_tokens=8)
    assert [timing.shape for timing in timings] == shapes and all(timing.verify > 0 for timing in timings)
    with pytest.raises(RuntimeError, match="ends the text at once"):
        tree_shape.time_shapes(target, head, ending[:, -1:], shapes, static_cache=False, compile=False, new_tokens=8)
