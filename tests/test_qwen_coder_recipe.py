"""benchmarks/train_qwen_coder.sh: the commands each stage runs (one prepare-data call synthesises, holds out and
tokenises), and what a rerun skips."""

import json
import os
import shutil
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
    (synthesis,) = run_stage(tmp_path, "data", **environment)
    assert synthesis[:6] == ["prepare-data", "--target", "qwen-coder", "--gguf", "a.part", "b.part"]
    assert option(synthesis, "--synthesize") == "10" and option(synthesis, "--prompt_first_paragraph") == "true"
    assert Path(option(synthesis, "--prompt_openers")).is_file()
    data = tmp_path / "run" / "data"
    assert option(synthesis, "--output_dir") == str(data) and option(synthesis, "--eval_size") == "3"
    assert option(synthesis, "--draft_vocab_size") == "8192" and option(synthesis, "--seed") == "42"
    assert (option(synthesis, "--device"), option(synthesis, "--num_proc")) == ("cpu", "1")  # DATA_ARGS come last
    # Done once: a rerun synthesises and tokenises nothing.
    assert run_stage(tmp_path, "data", **environment) == []
    # Synthesised but not tokenised (no summary yet): a rerun tokenises the written conversations, split alike.
    (data / "prepare_data_summary.json").unlink()
    (tokenising,) = run_stage(tmp_path, "data", **environment)
    assert "--synthesize" not in tokenising and option(tokenising, "--data") == str(data / "conversations.jsonl")
    assert tokenising[tokenising.index("--output_dir") :] == synthesis[synthesis.index("--output_dir") :]
    # Conversations brought along replace the synthesis; with SYNTHESIZE set, new ones are added to them.
    old = "old/conversations.jsonl.gz"
    shutil.rmtree(data)
    without_synthesis = {name: value for name, value in environment.items() if name != "SYNTHESIZE"}
    (given,) = run_stage(tmp_path, "data", CONVERSATIONS=old, **without_synthesis)
    assert "--synthesize" not in given and option(given, "--data") == old and option(given, "--eval_size") == "3"
    shutil.rmtree(data)
    (several,) = run_stage(tmp_path, "data", CONVERSATIONS=f"{old} new.jsonl", **without_synthesis)
    assert several[several.index("--data") + 1 : several.index("--data") + 3] == [old, "new.jsonl"]
    shutil.rmtree(data)
    (added,) = run_stage(tmp_path, "data", CONVERSATIONS=old, SEED="7", **environment)
    assert option(added, "--synthesize") == "10" and option(added, "--data") == old and option(added, "--seed") == "7"
    # Interrupted after writing them all: a rerun tokenises what was written, the old ones among them.
    (data / "prepare_data_summary.json").unlink()
    (again,) = run_stage(tmp_path, "data", CONVERSATIONS=old, SEED="7", **environment)
    assert "--synthesize" not in again and option(again, "--data") == str(data / "conversations.jsonl")

    (first,) = run_stage(tmp_path, "train", TRAIN_ARGS="--max_steps 2")
    assert first[0] == "train" and option(first, "--data") == str(data)
    assert option(first, "--eval_data") == str(data / "eval") and option(first, "--eval_strategy") == "epoch"
    assert option(first, "--head_intermediate_size") == "768" and option(first, "--max_steps") == "2"
    assert "--resume_from_checkpoint" not in first
    (second,) = run_stage(tmp_path, "train")
    assert option(second, "--resume_from_checkpoint") == "latest"
