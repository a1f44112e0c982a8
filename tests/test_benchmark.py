"""benchmarks/run_benchmark.py end to end on a tiny random target and head: CPU, 2 prompts, 8 tokens."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_chat_checkpoint

from hf_eagle3 import Eagle3DraftModel

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmark.py"
spec = importlib.util.spec_from_file_location("run_benchmark", SCRIPT)
run_benchmark = importlib.util.module_from_spec(spec)
sys.modules["run_benchmark"] = run_benchmark  # dataclasses look their module up there
spec.loader.exec_module(run_benchmark)

ROW_KEYS = {"method", "task", "temperature", "tokens_per_s", "speedup", "mean_accept_len", "greedy_identical"}


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


METHODS = ["plain", "prompt_lookup", "eagle3_chain_n3", "eagle3_tree_t8_d3_k2"]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("results")
    # Listed after another method, plain still runs first: the others are compared with it.
    methods = [*METHODS[1:3], METHODS[0], *METHODS[3:]]
    return output_dir, measure(tiny, output_dir, "--methods", *methods, "--temperatures", "0", "1", "--no_plot")


def test_measure_writes_json_and_table(full_run):
    output_dir, payload = full_run
    assert {"target", "device", "versions", "command", "date", "results"} <= set(payload)
    assert payload["target"] == "target" and payload["versions"]["transformers"]
    rows = payload["results"]
    assert [(row["method"], row["temperature"]) for row in rows] == [(m, t) for t in (0.0, 1.0) for m in METHODS]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["task"] == "tiny_task" and row["prompts"] == 2
        assert row["tokens_per_s"] > 0 and row["speedup"] > 0
    greedy = {row["method"]: row for row in rows if row["temperature"] == 0}
    # Plain generate makes one token per forward; EAGLE-3 is lossless even with a random head.
    assert greedy["plain"]["mean_accept_len"] == 1.0 and greedy["plain"]["speedup"] == 1.0
    assert all(row["greedy_identical"] for row in greedy.values())
    assert greedy["eagle3_tree_t8_d3_k2"]["generate_kwargs"] == {
        "eagle3_mode": "tree",
        "eagle3_total_tokens": 8,
        "eagle3_depth": 3,
        "eagle3_top_k": 2,
    }
    assert greedy["eagle3_tree_t8_d3_k2"]["mean_accept_len"] >= 1.0
    # A tree of depth 3 takes up to 3 head forwards per step (plus the re-encoding of accepted tokens).
    assert 1.0 <= greedy["eagle3_tree_t8_d3_k2"]["draft_forwards_per_step"] <= 4.0
    assert greedy["plain"]["draft_forwards_per_step"] is None and greedy["plain"]["ms_per_step"] > 0
    assert all(row["greedy_identical"] is None for row in rows if row["temperature"] == 1)
    table = (output_dir / "target.md").read_text()
    assert "| 0 | tiny_task | eagle3_chain_n3 | 2 |" in table and "| ms/step |" in table


def test_plot(full_run, tmp_path):
    pytest.importorskip("matplotlib")
    run_benchmark.plot_results(full_run[1], tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_plot_without_matplotlib_is_explained(full_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="The plot needs matplotlib: `pip install matplotlib`.* or pass --no_plot"):
        run_benchmark.plot_results(full_run[1], tmp_path / "speedup.png")


def test_partial_runs_merge(tiny, full_run, tmp_path):
    output_dir, first = full_run
    second = measure(tiny, tmp_path / "b", "--methods", "plain", "--temperatures", "0", "--no_plot", "--seed", "1")
    argv = ["merge", str(output_dir / "target.json"), str(tmp_path / "b" / "target.json")]
    assert run_benchmark.main([*argv, "--output_dir", str(tmp_path / "merged"), "--no_plot"]) == 0
    merged = json.loads((tmp_path / "merged" / "target.json").read_text())
    # The later run's row replaces the earlier one for the same (method, task, temperature).
    assert merged["results"] == [second["results"][0], *first["results"][1:]]
    assert merged["command"] == f"{first['command']} ; {second['command']}"
    assert len(merged["merged_runs"]) == 2


def test_bad_requests_are_explained(tiny, tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'eagle3_tree_x4'"):
        run_benchmark.parse_method("eagle3_tree_x4")
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


def test_ship_a_head_with_its_card(tiny, full_run, tmp_path):
    root, _ = tiny
    output_dir, _ = full_run
    argv = ["ship", "--head", str(root / "head"), "--output_dir", str(tmp_path / "shipped")]
    argv += ["--results", str(output_dir / "target.json"), "--method", "eagle3_chain_n3", "--max_shard_size", "40KB"]
    assert run_benchmark.main([*argv, "--training_data", "Two tiny prompts."]) == 0
    shipped = Eagle3DraftModel.from_pretrained(tmp_path / "shipped")
    assert shipped.dtype == torch.bfloat16 and len(list((tmp_path / "shipped").glob("*.safetensors"))) > 1
    original = Eagle3DraftModel.from_pretrained(root / "head")
    assert torch.equal(shipped.d2t, original.d2t) and torch.equal(shipped.t2d, original.t2d)
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "Two tiny prompts." in card and "| tiny_task, greedy, eagle3_chain_n3 (" in card
