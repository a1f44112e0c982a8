"""benchmarks/run_benchmark.py end to end on a tiny random target and head: CPU, 2 prompts, 8 tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_head, make_rows, make_target, save_chat_checkpoint
from transformers import AutoModelForCausalLM, GenerationMixin

from hf_eagle3 import Eagle3DraftModel
from hf_eagle3.decoding import cuda_graphs, static_tree, tree_shape
from hf_eagle3.offline_models import default_cache_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmark.py"
spec = importlib.util.spec_from_file_location("run_benchmark", SCRIPT)
run_benchmark = importlib.util.module_from_spec(spec)
sys.modules["run_benchmark"] = run_benchmark  # dataclasses look their module up there
spec.loader.exec_module(run_benchmark)

ROW_KEYS = {"method", "task", "temperature", "tokens_per_s", "speedup", "mean_accept_len", "greedy_identical"}
PHASE_KEYS = ("draft_ms", "verify_ms", "accept_ms")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny chat target and random head (conftest.save_chat_checkpoint), and a prompt file."""
    root = tmp_path_factory.mktemp("tiny")
    save_chat_checkpoint(root)
    prompts = root / "tiny_task.jsonl"
    rows = [{"turns": ["w5 w6 w7 w8 w5 w6 w7"]}, {"prompt": "w9 w10 w11 w9 w10"}, {"turns": ["unused"]}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, prompts


def measure(tiny, output_dir: Path, *extra: str) -> dict:
    root, prompts = tiny
    argv = ["measure", "--target", str(root / "target"), "--head", str(root / "head"), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--max_new_tokens", "8", "--device", "cpu", "--output_dir", str(output_dir), *extra]
    assert run_benchmark.main(argv) == 0
    return json.loads((output_dir / "target.json").read_text())


METHODS = [
    "plain",
    "plain_compiled",
    "prompt_lookup",
    "eagle3_chain_n3",
    "eagle3_tree_t8_d3_k2",
    "eagle3_tree_graph_t8_d3_k2",
]
# Tokens of the tiny task's longest prompt, chat template included ("w1 <7 words> w3"); warm-up length of the
# methods that compile nothing, shorter than the test's 8 new tokens so that the two warm-ups tell apart.
LONGEST_PROMPT = 9
EAGER_WARMUP_TOKENS = 2


def static_cache_path_available() -> bool:
    """Whether `generate` takes `eagle3_static_cache` yet: issue 6's static-cache path lands separately."""
    target = make_target("llama")
    try:
        target.generate(
            torch.tensor([[5, 6, 7]]), assistant_model=make_head(target), max_new_tokens=2, eagle3_static_cache=False
        )
    except ValueError as error:
        if "eagle3_static_cache" in str(error):
            return False
        raise
    return True


# Arguments of `generate` the recording leaves out (tensors and models).
NOT_RECORDED = {"attention_mask", "assistant_model"}


@pytest.fixture(scope="module")
def generate_calls():
    """Every `generate` call's arguments (the prompt as its length). Where the library does not take
    `eagle3_static_cache` yet, the wrapper records it and drops it: the graph methods then run the eager path, and
    only their arguments are checked."""
    static_path = static_cache_path_available()
    original = GenerationMixin.generate
    calls = []

    def generate(self, input_ids=None, **kwargs):
        calls.append(
            {"prompt_length": input_ids.shape[1], **{k: v for k, v in kwargs.items() if k not in NOT_RECORDED}}
        )
        if not static_path:
            kwargs.pop("eagle3_static_cache", None)
        return original(self, input_ids, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", generate)
        yield calls


@pytest.fixture(scope="module")
def full_run(tiny, generate_calls, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("results")
    # Listed after other methods, plain and then plain_compiled still run first: the others are compared with them.
    methods = [*METHODS[2:4], METHODS[1], METHODS[0], *METHODS[4:]]
    generate_calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_benchmark, "EAGER_WARMUP_TOKENS", EAGER_WARMUP_TOKENS)
        payload = measure(tiny, output_dir, "--methods", *methods, "--temperatures", "0", "1", "--no_plot")
    return output_dir, payload, list(generate_calls)


def test_measure_writes_json_and_table(full_run):
    output_dir, payload, _ = full_run
    assert {"target", "device", "versions", "command", "date", "results"} <= set(payload)
    assert payload["target"] == "target" and payload["versions"]["transformers"]
    rows = payload["results"]
    assert [(row["method"], row["temperature"]) for row in rows] == [(m, t) for t in (0.0, 1.0) for m in METHODS]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["task"] == "tiny_task" and row["prompts"] == 2
        assert row["prompt_tokens"]["max"] == LONGEST_PROMPT and row["prompt_tokens"]["min"] < LONGEST_PROMPT
        assert row["tokens_per_s"] > 0 and row["speedup"] > 0 and row["warmup_s"] > 0
        # Compiled plain is measured after plain, before the others.
        assert (
            row["speedup_vs_plain_compiled"] is None
            if row["method"] == "plain"
            else row["speedup_vs_plain_compiled"] > 0
        )
    greedy = {row["method"]: row for row in rows if row["temperature"] == 0}
    # Plain generate makes one token per forward; EAGLE-3 is lossless even with a random head.
    assert greedy["plain"]["mean_accept_len"] == 1.0 and greedy["plain"]["speedup"] == 1.0
    assert (
        greedy["plain_compiled"]["mean_accept_len"] == 1.0
        and greedy["plain_compiled"]["speedup_vs_plain_compiled"] == 1.0
    )
    assert all(row["greedy_identical"] for row in greedy.values())
    assert greedy["eagle3_tree_t8_d3_k2"]["generate_kwargs"] == {
        "eagle3_mode": "tree",
        "eagle3_static_cache": False,
        "eagle3_total_tokens": 8,
        "eagle3_depth": 3,
        "eagle3_top_k": 2,
    }
    assert greedy["eagle3_tree_graph_t8_d3_k2"]["generate_kwargs"] == {
        "eagle3_mode": "tree",
        "eagle3_static_cache": True,
        "eagle3_total_tokens": 8,
        "eagle3_depth": 3,
        "eagle3_top_k": 2,
    }
    # One static cache for the whole run: the longest prompt and every new token.
    assert greedy["plain_compiled"]["generate_kwargs"] == {
        "cache_implementation": "static",
        "max_cache_len": LONGEST_PROMPT + 8,
    }
    # Nothing compiles on the CPU, so nothing recompiles inside the timed calls either.
    assert all(row["recompilations"] == 0 for row in rows)
    assert greedy["eagle3_tree_t8_d3_k2"]["mean_accept_len"] >= 1.0
    # A tree of depth 3 takes up to 3 head forwards per step (plus the re-encoding of accepted tokens).
    assert 1.0 <= greedy["eagle3_tree_t8_d3_k2"]["draft_forwards_per_step"] <= 4.0
    assert greedy["plain"]["draft_forwards_per_step"] is None and greedy["plain"]["ms_per_step"] > 0
    # No hook on a method that may compile or replay graphs.
    assert greedy["eagle3_tree_graph_t8_d3_k2"]["draft_forwards_per_step"] is None
    # Only tree decoding may time its phases: all three, or none where it records none.
    for row in rows:
        phases = [row[key] for key in PHASE_KEYS]
        if row["method"].startswith("eagle3_tree"):
            assert phases == [None] * 3 or all(ms >= 0 for ms in phases)
        else:
            assert phases == [None] * 3
    assert all(row["greedy_identical"] is None for row in rows if row["temperature"] == 1)
    table = (output_dir / "target.md").read_text()
    lengths = rows[0]["prompt_tokens"]
    prompt_tokens = f"{lengths['mean']:.0f} ({lengths['min']}-{LONGEST_PROMPT})"
    assert f"| 0 | tiny_task | eagle3_chain_n3 | 2 | {prompt_tokens} |" in table and "| ms/step | warm-up |" in table
    tree = next(row for row in rows if row["method"] == "eagle3_tree_t8_d3_k2" and row["temperature"] == 1)
    breakdown = f"| 1 | tiny_task | eagle3_tree_t8_d3_k2 | {tree['mean_accept_len']:.2f} | {tree['ms_per_step']:.1f} |"
    assert "## Where one step's time goes" in table and breakdown in table


def test_each_method_warms_up_right_before_its_timed_calls(full_run):
    calls = full_run[2]
    # Per method and temperature: one untimed call on the longest prompt (full length for the methods that compile or
    # capture graphs, a few tokens for the others), then its timed calls: 2 prompts.
    per_method = 2 * (1 + 2)
    assert len(calls) == per_method * len(METHODS)
    compiled = {"plain_compiled", "eagle3_tree_graph_t8_d3_k2"}
    modes = []
    for index, method in enumerate(METHODS):
        own = calls[index * per_method : (index + 1) * per_method]
        warm_ups, timed = own[::3], own[1:3] + own[4:6]
        assert all(call["prompt_length"] == LONGEST_PROMPT for call in warm_ups)
        assert [call["max_new_tokens"] for call in warm_ups] == [8 if method in compiled else EAGER_WARMUP_TOKENS] * 2
        assert [call["do_sample"] for call in warm_ups] == [False, True]
        assert [call["do_sample"] for call in timed] == [False, False, True, True]
        assert all(call["max_new_tokens"] == 8 for call in timed)
        modes.append({(call.get("eagle3_mode"), call.get("eagle3_static_cache")) for call in timed})
    # The tree keeps the eager path, the graph method forces the static-cache path, the chain is left alone.
    assert modes == [{(None, None)}] * 3 + [{("chain", None)}, {("tree", False)}, {("tree", True)}]


def test_warm_up_on_every_prompt(tiny, generate_calls, tmp_path):
    """`--warm_up every_prompt`: after the longest prompt, an untimed call on each prompt of the run, then the timed
    ones, so that costs paid once per input shape fall outside the timing for every method alike."""
    generate_calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_benchmark, "EAGER_WARMUP_TOKENS", EAGER_WARMUP_TOKENS)
        payload = measure(
            tiny, tmp_path, "--methods", "plain", "--temperatures", "0", "--no_plot", "--warm_up", "every_prompt"
        )
    lengths = [call["prompt_length"] for call in generate_calls]
    tokens = [call["max_new_tokens"] for call in generate_calls]
    timed = lengths[-2:]
    assert lengths == [LONGEST_PROMPT, *timed, *timed] and LONGEST_PROMPT in timed
    assert tokens == [EAGER_WARMUP_TOKENS] * 3 + [8, 8]
    assert payload["settings"]["warm_up"] == "every_prompt" and payload["results"][0]["warmup_s"] > 0


def test_step_breakdown_from_phase_times(full_run):
    method = run_benchmark.parse_method("eagle3_tree_graph")
    outputs = [torch.zeros(15, dtype=torch.long)] * 2
    tally = run_benchmark.Tally(new_tokens=30, seconds=0.5, decode_tokens=28, decode_forwards=10, outputs=outputs)
    for _ in outputs:
        tally.add_phases({"setup": 0.0001, "prefill": 0.0049, "draft": 0.01, "verify": 0.02, "accept": 0.005})
    row = run_benchmark.result_row(method, "task", 0.0, tally, plain=None, warmup_s=3.0)
    # Per verification step: 10 steps over both prompts; ms/step counts the 2 prefills as well.
    assert [row[key] for key in PHASE_KEYS] == [2.0, 4.0, 1.0] and row["setup_s"] == 0.0002
    assert row["prefill_s"] == 0.0098
    assert row["ms_per_step"] == 41.667 and row["warmup_s"] == 3.0 and row["draft_forwards_per_step"] is None
    # A call without phase times leaves the breakdown empty rather than wrong.
    tally.add_phases({})
    tally.outputs = [*outputs, outputs[0]]
    assert [run_benchmark.result_row(method, "task", 0.0, tally, None)[key] for key in PHASE_KEYS] == [None] * 3
    # Rows of earlier runs, without the newer keys, still make a table with the new rows.
    _, payload, _ = full_run
    newer = {*PHASE_KEYS, "setup_s", "prefill_s", "warmup_s", "speedup_vs_plain_compiled", "prompt_tokens"}
    old = {key: value for key, value in payload["results"][0].items() if key not in newer}
    table = run_benchmark.markdown_table({**payload, "results": [old, row]})
    # prefill: 10 ms of prefills and setup over 10 verification steps; rest: 500 ms over them, less the 8 ms of the
    # phases and the prefill.
    assert "| 0 | task | eagle3_tree_graph | 2.80 | 41.7 | 2.00 | 4.00 | 1.00 | 1.00 | 42.00 |" in table
    assert f"| {old['ms_per_step']:.1f} | - |" in table and f"| {old['prompts']} | - |" in table


def test_plot(full_run, tmp_path):
    pytest.importorskip("matplotlib")
    run_benchmark.plot_results(full_run[1], tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_plot_without_matplotlib_is_explained(full_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="The plot needs matplotlib: `pip install matplotlib`.* or pass --no_plot"):
        run_benchmark.plot_results(full_run[1], tmp_path / "speedup.png")


def test_partial_runs_merge(tiny, full_run, tmp_path):
    output_dir, first, _ = full_run
    second = measure(tiny, tmp_path / "b", "--methods", "plain", "--temperatures", "0", "--no_plot", "--seed", "1")
    argv = ["merge", str(output_dir / "target.json"), str(tmp_path / "b" / "target.json")]
    assert run_benchmark.main([*argv, "--output_dir", str(tmp_path / "merged"), "--no_plot"]) == 0
    merged = json.loads((tmp_path / "merged" / "target.json").read_text())
    # The later run's row replaces the earlier one for the same (method, task, temperature).
    assert merged["results"] == [second["results"][0], *first["results"][1:]]
    assert merged["command"] == f"{first['command']} ; {second['command']}"
    assert len(merged["merged_runs"]) == 2


def test_compiled_tree_method(tiny, tmp_path, monkeypatch):
    """`eagle3_tree_compiled` compiles the static path's steps in its untimed warm-up (dynamo and AOT autograd only
    here: inductor's C++ would take a minute), then decodes losslessly without building anything in the timed
    calls."""
    assert "eagle3_tree_compiled" in run_benchmark.DEFAULT_METHODS
    method = run_benchmark.parse_method("eagle3_tree_compiled_t8_d3_k2")
    assert method.compiled and method.uses_head
    assert method.generate_kwargs == {
        "eagle3_mode": "tree",
        "eagle3_static_cache": True,
        "eagle3_compile": True,
        "eagle3_total_tokens": 8,
        "eagle3_depth": 3,
        "eagle3_top_k": 2,
    }
    monkeypatch.setitem(cuda_graphs.COMPILE_OPTIONS, "backend", "aot_eager")
    payload = measure(tiny, tmp_path, "--methods", "plain", method.name, "--temperatures", "0", "--no_plot")
    row = payload["results"][1]
    assert row["method"] == method.name and row["greedy_identical"] and row["warmup_s"] > 0
    assert row["setup_s"] < row["warmup_s"] / 10 and all(row[key] >= 0 for key in PHASE_KEYS)
    # The warm-up compiled what the timed calls run: torch.compile compiled nothing more.
    assert row["recompilations"] == 0


def test_recompilations_inside_timed_calls_are_counted(tiny, tmp_path, monkeypatch):
    """A compiled method whose timed calls compile again (here: torch.compile forgets its graphs and the head its
    runner after the warm-up) reports it."""
    monkeypatch.setitem(cuda_graphs.COMPILE_OPTIONS, "backend", "aot_eager")
    warm_up = run_benchmark.run_method
    calls = []

    def forgetting_warm_up(target, tokenizer, head, method, prompts, temperature, args):
        tally = warm_up(target, tokenizer, head, method, prompts, temperature, args)
        calls.append(len(prompts))
        if len(calls) == 1:
            torch._dynamo.reset()
            if hasattr(head, static_tree.RUNNER_STATE_ATTRIBUTE):
                delattr(head, static_tree.RUNNER_STATE_ATTRIBUTE)
        return tally

    monkeypatch.setattr(run_benchmark, "run_method", forgetting_warm_up)
    payload = measure(tiny, tmp_path, "--methods", "eagle3_tree_compiled_t8_d3_k2", "--temperatures", "0", "--no_plot")
    assert calls == [1, 2] and payload["results"][0]["recompilations"] > 0


def test_bad_requests_are_explained(tiny, tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'eagle3_tree_x4'"):
        run_benchmark.parse_method("eagle3_tree_x4")
    with pytest.raises(ValueError, match="Unknown method 'plain_static': use plain, plain_compiled"):
        run_benchmark.parse_method("plain_static")
    root, prompts = tiny
    with pytest.raises(SystemExit, match="need a trained head, and there is none at"):
        argv = ["measure", "--target", str(root / "target"), "--head", str(tmp_path), "--prompts", str(prompts)]
        run_benchmark.main([*argv, "--methods", "plain", "eagle3_chain"])
    with pytest.raises(SystemExit, match="'nope' is not a registered offline target"):
        run_benchmark.main(["materialize", "--target", "nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no turns"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 has neither a `turns` list nor a `prompt` string"):
        run_benchmark.load_prompts(bad, limit=None)
    with pytest.raises(ValueError, match="--stride must be at least 1"):
        run_benchmark.load_prompts(bad, limit=None, stride=0)


def test_prompts_spread_by_stride_and_offset(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"turns": [f"q{index}", "second turn"]}) + "\n" for index in range(20)))
    assert run_benchmark.load_prompts(path, limit=3) == ["q0", "q1", "q2"]
    assert run_benchmark.load_prompts(path, limit=3, stride=5, offset=2) == ["q2", "q7", "q12"]
    assert run_benchmark.load_prompts(path, limit=None, stride=10) == ["q0", "q10"]
    with pytest.raises(ValueError, match="holds no prompts \\(from offset 30, every 1\\)"):
        run_benchmark.load_prompts(path, limit=None, offset=30)


def test_library_commands_get_the_materialised_target(monkeypatch, tmp_path):
    import hf_eagle3.cli
    import hf_eagle3.offline_models

    calls = []
    monkeypatch.setattr(hf_eagle3.cli, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(hf_eagle3.offline_models, "materialize_gguf", lambda target, gguf_path: tmp_path / "m.gguf")
    assert run_benchmark.main(["train", "--target", "smollm2", "--data", "d", "--target_dtype", "bfloat16"]) == 0
    assert run_benchmark.main(["prepare-data", "--target", "my/model", "--synthesize", "3"]) == 0
    assert calls == [
        ["train", "--target", str(tmp_path / "m.gguf"), "--data", "d", "--target_dtype", "bfloat16"],
        ["prepare-data", "--target", "my/model", "--synthesize", "3"],
    ]


class OutOfTime(Exception):
    pass


def test_a_run_cut_short_keeps_its_finished_rows(tiny, monkeypatch, tmp_path):
    run_method = run_benchmark.run_method

    def out_of_time(target, tokenizer, head, method, prompts, *args):
        if method.name == "prompt_lookup" and len(prompts) == 2:
            raise OutOfTime  # a step's time limit, as the second method's timed calls begin
        return run_method(target, tokenizer, head, method, prompts, *args)

    monkeypatch.setattr(run_benchmark, "run_method", out_of_time)
    with pytest.raises(OutOfTime):
        measure(tiny, tmp_path, "--methods", "plain", "prompt_lookup", "--temperatures", "0", "--no_plot")
    rows = json.loads((tmp_path / "target.json").read_text())["results"]
    assert [row["method"] for row in rows] == ["plain"]
    assert "| 0 | tiny_task | plain | 2 |" in (tmp_path / "target.md").read_text()


def test_ship_a_head_with_its_card(tiny, full_run, tmp_path):
    root, _ = tiny
    output_dir, _, _ = full_run
    argv = ["ship", "--head", str(root / "head"), "--output_dir", str(tmp_path / "shipped")]
    argv += ["--results", str(output_dir / "target.json"), "--method", "eagle3_chain_n3", "--max_shard_size", "40KB"]
    assert run_benchmark.main([*argv, "--training_data", "Two tiny prompts."]) == 0
    shipped = Eagle3DraftModel.from_pretrained(tmp_path / "shipped")
    assert shipped.dtype == torch.bfloat16 and len(list((tmp_path / "shipped").glob("*.safetensors"))) > 1
    original = Eagle3DraftModel.from_pretrained(root / "head")
    assert torch.equal(shipped.d2t, original.d2t) and torch.equal(shipped.t2d, original.t2d)
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "Two tiny prompts." in card
    assert "| tiny_task, greedy, `eagle3_mode='chain', num_assistant_tokens=3` (" in card


def test_card_names_a_method_by_its_generate_arguments():
    assert run_benchmark.generate_arguments("eagle3_tree") == "`eagle3_static_cache=False, eagle3_tree='fixed'`"
    assert run_benchmark.generate_arguments("eagle3_tree_graph") == "`eagle3_tree='fixed'`"
    assert run_benchmark.generate_arguments("eagle3_tree_compiled_t512_d14_k32") == (
        "`eagle3_compile=True, eagle3_total_tokens=512, eagle3_depth=14, eagle3_top_k=32`"
    )


def test_automatic_tree_against_fixed_shapes(tiny, tmp_path, monkeypatch):
    """`eagle3_tree_auto` measures the tree in its warm-up (an empty --tree_cache), reports the tree it chose and how
    it compares with the fastest fixed shape of its path; the cache folder is the run's only."""

    grid = tree_shape.ShapeGrid(total_tokens=(3, 4), depths=(2, 3), top_ks=(2,))
    monkeypatch.setattr(tree_shape, "CPU_GRID", grid)
    method = run_benchmark.parse_method("eagle3_tree_graph_auto")
    assert method.generate_kwargs == {"eagle3_mode": "tree", "eagle3_static_cache": True, "eagle3_tree": "auto"}
    with pytest.raises(ValueError, match="chain mode has none"):
        run_benchmark.parse_method("eagle3_chain_auto")
    methods = ["plain", "eagle3_tree_auto", "eagle3_tree_t3_d2_k2", "eagle3_tree_t4_d3_k2"]
    cache = tmp_path / "tree_cache"
    payload = measure(
        tiny, tmp_path, "--methods", *methods, "--temperatures", "0", "--no_plot", "--tree_cache", str(cache)
    )
    rows = {row["method"]: row for row in payload["results"]}
    auto = rows["eagle3_tree_auto"]
    (chosen,) = auto["tree_shapes"]
    assert chosen in {"3/2/2", "4/2/2", "3/3/2", "4/3/2"} and auto["greedy_identical"]
    assert rows["eagle3_tree_t3_d2_k2"]["tree_shapes"] == ["3/2/2"]
    assert len(list((cache / "tree_shapes").glob("*.json"))) == 2  # the choice, and the step times behind it
    table = (tmp_path / "target.md").read_text()
    best = max((rows[name] for name in methods[2:]), key=lambda row: row["tokens_per_s"])
    ratio = auto["tokens_per_s"] / best["tokens_per_s"]
    assert f"| 0 | tiny_task | eagle3_tree_auto | {chosen} | {auto['tokens_per_s']:.1f} | {best['method']} |" in table
    assert f"| {ratio:.3f} | 2 |" in table
    # Only the tree shapes moved, and only meanwhile: the targets' files stay in the usual cache.
    assert os.environ.get("HF_EAGLE3_TREE_CACHE") != str(cache / "tree_shapes")
    with run_benchmark.tree_cache(cache):
        assert tree_shape.tree_shape_cache_dir() == cache / "tree_shapes"
        assert cache not in default_cache_dir().parents


def test_measure_batch_times_each_batch_size(tiny, tmp_path, monkeypatch):
    """`measure-batch`: every method at every batch size, rows cycled over the prompts, greedy rows identical; the
    trees each batch size decoded with, the library's default one measured in its warm-up."""
    from hf_eagle3.decoding import batch_tree_shape
    from hf_eagle3.decoding.config import DEFAULT_EAGLE3_KNOBS

    monkeypatch.setitem(DEFAULT_EAGLE3_KNOBS, "eagle3_tree", "auto")
    monkeypatch.setattr(tree_shape, "CPU_GRID", tree_shape.ShapeGrid(total_tokens=(3, 4), depths=(2,), top_ks=(2,)))
    batch_grid = tree_shape.ShapeGrid(total_tokens=(2, 3), depths=(1, 2), top_ks=(2,), calibration_tokens=8)
    monkeypatch.setattr(batch_tree_shape, "BATCH_CPU_GRID", batch_grid)
    assert run_benchmark.parse_method("eagle3_tree_compiled_default").generate_kwargs == {
        "eagle3_mode": "tree",
        "eagle3_static_cache": True,
        "eagle3_compile": True,
    }
    root, prompts = tiny
    argv = ["measure-batch", "--target", str(root / "target"), "--head", str(root / "head"), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--max_new_tokens", "6", "--device", "cpu", "--output_dir", str(tmp_path)]
    methods = ["plain_compiled", "eagle3_tree_t8_d3_k2", "eagle3_tree_graph_t8_d3_k2", "eagle3_tree_default"]
    argv += ["--batch_sizes", "1", "3", "--methods", *methods, "--tree_cache", str(tmp_path / "trees")]
    assert run_benchmark.main(argv) == 0
    payload = json.loads((tmp_path / "target_batch.json").read_text())
    rows = {(row["batch_size"], row["method"]): row for row in payload["results"]}
    assert sorted(rows) == sorted((batch_size, method) for batch_size in (1, 3) for method in methods)
    for (batch_size, method), row in rows.items():
        assert row["rows"] == batch_size and row["tokens_per_s"] > 0 and row["greedy_identical"] is True
        no_drafts = row["tree_shapes"] == ["no drafts"]
        assert (row["mean_accept_len_per_row"] is None) == (method == "plain_compiled" or no_drafts)
        static = {"plain_compiled": None, methods[1]: False, methods[2]: True, methods[3]: False}[method]
        assert row["static_cache"] == static
        # Nothing compiles on the CPU, so nothing recompiles inside the timed calls either.
        assert row["recompilations"] == 0 and row["warmup_s"] > 0
        assert row["rows_identical"] == batch_size and row["greedy_prefix_match"] == 1.0
        if method in methods[1:3]:
            assert row["tree_shapes"] == ["8/3/2"]
            # Where a call's time went: its steps, their time, the prefill and what lies outside every phase.
            assert row["steps_per_call"] > 0 and row["step_ms"] > 0 and row["outside_phases_ms_per_call"] >= 0
            assert {"prefill", "draft", "verify", "accept"} <= set(row["phase_ms_per_call"])
        if method == "plain_compiled":
            assert row["steps_per_call"] is None and row["step_ms"] is None and row["phase_ms_per_call"] == {}
    assert rows[(1, methods[3])]["tree_shapes"][0] in {"3/2/2", "4/2/2"}
    assert rows[(3, methods[3])]["tree_shapes"][0] in {"2/1/2", "3/1/2", "2/2/2", "3/2/2", "no drafts"}
    assert rows[(3, "plain_compiled")]["speedup"] == 1.0 and rows[(3, "plain_compiled")]["tree_shapes"] == []
    # Batch 1: the choice and step times; batch 3: the choice, the step times of the shapes and without drafts; and
    # the batch acceptance.
    assert len(list((tmp_path / "trees" / "tree_shapes").glob("*.json"))) == 6
    table = (tmp_path / "target_batch.md").read_text()
    assert "| 3 | eagle3_tree_t8_d3_k2 | 3 |" in table and " | 8/3/2 | 3/3 | 1.00 | " in table


def test_batch_rows_cycle_the_prompts_into_whole_batches():
    assert run_benchmark.batch_rows(["a", "b", "c"], 2, 3) == [["a", "b"], ["c", "a"]]
    assert run_benchmark.batch_rows(["a", "b", "c"], 4, 1) == [["a", "b", "c", "a"]]
    assert run_benchmark.batch_rows(["a"], 1, 2) == [["a"], ["a"]]


def test_measure_batch_decodes_the_same_rows_at_every_size(tiny, tmp_path):
    """`--rows N`: every batch size decodes N rows in whole batches, so sizes compare the same work."""
    root, prompts = tiny
    argv = ["measure-batch", "--target", str(root / "target"), "--head", str(root / "head"), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--max_new_tokens", "4", "--device", "cpu", "--output_dir", str(tmp_path)]
    argv += ["--batch_sizes", "1", "2", "--rows", "2", "--methods", "plain_compiled", "eagle3_tree_t8_d3_k2"]
    assert run_benchmark.main(argv) == 0
    payload = json.loads((tmp_path / "target_batch.json").read_text())
    assert payload["settings"]["rows_per_size"] == 2
    assert {row["rows"] for row in payload["results"]} == {2}
    assert all(row["greedy_identical"] for row in payload["results"])


def test_compiled_baseline_measures_batches(tiny, tmp_path):
    """`compiled_baseline.py --batch_sizes`: left-padded batches of the prompts, each row counted to its EOS."""
    script = SCRIPT.parent / "compiled_baseline.py"
    baseline_spec = importlib.util.spec_from_file_location("compiled_baseline", script)
    compiled_baseline = importlib.util.module_from_spec(baseline_spec)
    baseline_spec.loader.exec_module(compiled_baseline)
    root, prompts = tiny
    output = tmp_path / "baseline.json"
    argv = ["--target", str(root / "target"), "--prompts", str(prompts), "--limit", "2", "--stride", "1"]
    argv += ["--max_new_tokens", "5", "--device", "cpu", "--dtype", "float32", "--output", str(output)]
    argv += ["--batch_sizes", "1", "2", "--configs", "shared:default", "shared:default:forced"]
    assert compiled_baseline.main(argv) == 0
    rows = json.loads(output.read_text())["results"]
    assert [(row["batch_size"], row["calls"]) for row in rows] == [(1, 2), (1, 2), (2, 1), (2, 1)]
    for row in rows:
        forced = row["configuration"].endswith(":forced")
        # Forced calls make every row's tokens; the others count each row to its EOS, never more.
        assert (row["new_tokens"] == 2 * 5) if forced else (0 < row["new_tokens"] <= 2 * 5)
        assert row["compiled_graphs_in_timed_calls"] == 0 and row["decode_ms_per_token"] > 0


def test_measure_batch_warms_up_on_the_widest_batch(tiny, tmp_path, monkeypatch):
    """A compiled runner sized by its warm-up must hold every timed batch: the warm-up decodes the widest one."""
    root, _ = tiny
    prompts = tmp_path / "short_then_long.jsonl"  # the first batch is the narrower one
    prompts.write_text(json.dumps({"prompt": "w9 w10"}) + "\n" + json.dumps({"prompt": "w5 w6 w7 w8 w5 w6 w7"}) + "\n")
    calls = []
    original = run_benchmark.run_batches

    def recording(target, tokenizer, head, method, batches, args):
        calls.append([run_benchmark.encode_batch(tokenizer, batch, "cpu")["input_ids"].shape[1] for batch in batches])
        return original(target, tokenizer, head, method, batches, args)

    monkeypatch.setattr(run_benchmark, "run_batches", recording)
    argv = ["measure-batch", "--target", str(root / "target"), "--head", str(root / "head"), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--max_new_tokens", "4", "--device", "cpu", "--output_dir", str(tmp_path)]
    argv += ["--batch_sizes", "1", "--rows", "2", "--methods", "plain_compiled", "eagle3_tree_t8_d3_k2"]
    assert run_benchmark.main(argv) == 0
    timed = calls[1]
    assert len(timed) == 2 and timed[0] < timed[1]
    # Per method: the warm-up (the widest batch alone), then the timed batches.
    assert calls == [[max(timed)], timed, [max(timed)], timed]
    # `--warm_up every_prompt`: the widest batch, then every timed batch untimed, then the timed ones.
    calls.clear()
    assert run_benchmark.main([*argv, "--warm_up", "every_prompt"]) == 0
    assert calls == [[max(timed)], timed, timed] * 2


def test_calibration_check_compares_what_each_set_of_prompts_chooses(tiny, tmp_path, monkeypatch):
    """`calibration_check.py`: every set's choice under one step-time model (here a cached file's), its expected and
    reference tau, the tokens/s the reference predicts for it against the reference's best, and its decoded tau."""
    spec = importlib.util.spec_from_file_location("calibration_check", SCRIPT.parent / "calibration_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    grid = tree_shape.ShapeGrid(total_tokens=(3, 4, 6), depths=(2, 3), top_ks=(2, 3), calibration_tokens=6)
    monkeypatch.setitem(check.GRIDS, "cpu", grid)
    timings = [tree_shape.StepTiming(shape, 0.001 * shape.depth, 0.002 * shape.nodes) for shape in grid.shapes()]
    step_times = tmp_path / "step_times.json"
    step_times.write_text(json.dumps({"timings": tree_shape.timing_rows(timings)}))
    root, prompts = tiny
    argv = ["--target", str(root / "target"), "--head", str(root / "head"), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--stride", "1", "--offset", "0", "--first_limit", "3", "--first_stride", "1"]
    argv += ["--first_tokens", "8", "--reference_tokens", "6", "--decode_tokens", "4", "--device", "cpu"]
    argv += ["--top_ks", "2", "--step_times", str(step_times), "--output_dir", str(tmp_path), "--name", "check"]
    assert check.main(argv) == 0
    payload = json.loads((tmp_path / "check.json").read_text())
    rows = {row["calibration"]: row for row in payload["rows"]}
    assert list(rows) == ["built-in", "first prompt", "reference"]
    assert rows["built-in"]["prompts"] == len(check.CALIBRATION_REQUESTS) and rows["built-in"]["new_tokens"] == 6
    assert rows["first prompt"]["prompts"] == 1 and rows["reference"]["prompts"] == 2
    shapes = {str(shape) for shape in grid.shapes() if shape.top_k == 2}
    assert set(payload["taus"]["reference"]) == shapes and payload["best_by_reference"] in shapes
    assert rows["reference"]["chose"] == payload["best_by_reference"] and rows["reference"]["of_best"] == 1
    for row in rows.values():
        assert row["chose"] in shapes and row["of_best"] <= 1 and row["decoded_tau"] >= 1
        assert row["expected_tau"] == round(payload["taus"][row["calibration"]][row["chose"]], 3)
        assert row["reference_tau"] == round(payload["taus"]["reference"][row["chose"]], 3)
    table = (tmp_path / "check.md").read_text()
    assert f"| built-in | {len(check.CALIBRATION_REQUESTS)} x 6 |" in table


def test_held_out_heads_scores_every_head_on_the_same_tokens(tiny, tmp_path):
    """`held_out_heads.py`: each head's TTT metrics on each prepared set; a head scored twice scores the same, and the
    table gives each head's difference against the first."""
    spec = importlib.util.spec_from_file_location("held_out_heads", SCRIPT.parent / "held_out_heads.py")
    held_out = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(held_out)
    root, _ = tiny
    target = AutoModelForCausalLM.from_pretrained(root / "target")
    make_head(target, draft_vocab_size=64, seed=1).save_pretrained(tmp_path / "other")
    sets = {}
    for name, seed in (("chat", 0), ("long", 1)):
        sets[name] = tmp_path / name
        sets[name].mkdir()
        rows = make_rows(4, length=10 + 6 * seed, seed=seed)
        (sets[name] / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--target", str(root / "target"), "--heads", f"first={root / 'head'}", f"again={root / 'head'}"]
    argv += [f"other={tmp_path / 'other'}", "--data", *(f"{name}={path}" for name, path in sets.items())]
    argv += ["--output_dir", str(tmp_path), "--name", "held"]
    assert held_out.main(argv) == 0
    result = json.loads((tmp_path / "held.json").read_text())
    assert list(result["metrics"]) == ["first", "again", "other"] and result["tokens"] == {"chat": 37, "long": 61}
    for name in sets:
        assert result["metrics"]["again"][name] == result["metrics"]["first"][name]
        assert result["metrics"]["other"][name] != result["metrics"]["first"][name]
        assert result["metrics"]["first"][name]["eval_acceptance_length"] >= 1
    table = (tmp_path / "held.md").read_text()
    assert "| set | tokens | first | again | other | again - first | other - first |" in table
    assert table.count("| +0.000 |") == 2
    with pytest.raises(SystemExit, match="--heads 'first': give NAME=PATH"):
        held_out.main(["--target", "t", "--heads", "first", "--data", "a=b", "--name", "x"])
