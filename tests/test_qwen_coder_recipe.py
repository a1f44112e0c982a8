"""benchmarks/train_qwen_coder.sh: the commands each stage runs, the held-out split, and what a rerun skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "benchmarks" / "train_qwen_coder.sh"
# Stands in for run_benchmark.py: records each command line; prepare-data fills its folder as the real one would
# (the conversations it synthesised, its summary, the vocabulary map), train leaves a checkpoint.
RECORDER = """
import json, os, sys
with open(os.environ["CALLS"], "a") as file:
    file.write(json.dumps(sys.argv[1:]) + "\\n")
output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(output_dir, exist_ok=True)
if sys.argv[1] == "train":
    os.makedirs(os.path.join(output_dir, "checkpoint-200"), exist_ok=True)
    sys.exit()
if "--synthesize" in sys.argv:
    with open(os.path.join(output_dir, "conversations.jsonl"), "w") as file:
        for i in range(int(sys.argv[sys.argv.index("--synthesize") + 1])):
            file.write(json.dumps({"messages": [{"role": "user", "content": f"P{i}"}]}) + "\\n")
open(os.path.join(output_dir, "vocab_map.safetensors"), "w").close()
open(os.path.join(output_dir, "prepare_data_summary.json"), "w").close()
"""


def run_stage(tmp_path, stage: str, **environment) -> list[list[str]]:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    env = {"PATH": os.environ["PATH"], "BENCH": f"{sys.executable} {recorder}", "CALLS": str(calls), **environment}
    subprocess.run(["bash", str(RECIPE), stage, str(tmp_path / "run")], check=True, env=env, capture_output=True)
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def option(call: list[str], name: str) -> str:
    return call[len(call) - 1 - call[::-1].index(name) + 1]  # the last occurrence: the one argparse keeps


def test_qwen_coder_recipe_stages(tmp_path):
    environment = dict(SYNTHESIZE="10", EVAL_HOLDOUT="3", DATA_ARGS="--device cpu --num_proc 1", GGUF="a.part b.part")
    synthesis, evaluation, training = run_stage(tmp_path, "data", **environment)
    assert synthesis[:6] == ["prepare-data", "--target", "qwen-coder", "--gguf", "a.part", "b.part"]
    assert option(synthesis, "--synthesize") == "10" and option(synthesis, "--prompt_first_paragraph") == "true"
    assert Path(option(synthesis, "--prompt_openers")).is_file()
    assert (option(synthesis, "--device"), option(synthesis, "--num_proc")) == ("cpu", "1")  # DATA_ARGS come last
    run = tmp_path / "run"
    split = {name: (run / f"{name}_conversations.jsonl").read_text().splitlines() for name in ("train", "eval")}
    prompts = {name: [json.loads(line)["messages"][0]["content"] for line in rows] for name, rows in split.items()}
    assert prompts == {"train": [f"P{i}" for i in range(7)], "eval": ["P7", "P8", "P9"]}
    assert option(evaluation, "--output_dir") == str(run / "eval_data") and option(training, "--output_dir") == str(
        run / "data"
    )
    assert option(training, "--data") == str(run / "train_conversations.jsonl")
    assert option(training, "--draft_vocab_size") == "8192" and option(training, "--device") == "cpu"
    # Done once: a rerun synthesises and tokenises nothing.
    assert run_stage(tmp_path, "data", **environment) == []

    (first,) = run_stage(tmp_path, "train", TRAIN_ARGS="--max_steps 2")
    assert first[0] == "train" and option(first, "--eval_data") == str(run / "eval_data")
    assert option(first, "--head_intermediate_size") == "768" and option(first, "--max_steps") == "2"
    assert "--resume_from_checkpoint" not in first
    (second,) = run_stage(tmp_path, "train")
    assert option(second, "--resume_from_checkpoint") == "latest"


def test_qwen_coder_recipe_needs_a_held_out_set(tmp_path):
    result = subprocess.run(
        ["bash", str(RECIPE), "data", str(tmp_path / "run")],
        env={"PATH": os.environ["PATH"], "EVAL_HOLDOUT": "0"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "EVAL_HOLDOUT must be at least 1" in result.stderr
