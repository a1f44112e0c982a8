"""The command line's manners and the package's import weight: what a user meets before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_eagle3.cli import COMMANDS, main
from hf_eagle3.cli.demo import parse_args as parse_demo_args

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "trl")


def _run_python(code: str, **env_vars: str) -> str:
    """Run `code` in a fresh interpreter on this checkout (with `env_vars` set) and return what it printed."""
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", **env_vars}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_and_help_load_no_heavy_library():
    loaded = _run_python(
        "import sys, hf_eagle3; from hf_eagle3.cli import main; main(['--help']); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    ).splitlines()[-1]
    assert loaded == "[]"


def test_using_the_head_loads_neither_trainer_nor_data_libraries():
    # accelerate is left out: transformers' modeling_utils imports it for any model.
    loaded = _run_python(
        "import sys, hf_eagle3; hf_eagle3.Eagle3DraftModel; "
        "print(sorted(m for m in ('transformers.trainer', 'datasets', 'peft', 'trl') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_help_is_quick():
    # Loose bound: the command line imports nothing heavy, so even a loaded machine answers at once.
    code = "import time; t = time.perf_counter(); from hf_eagle3.cli import main; main(['--help']); "
    code += "print(time.perf_counter() - t)"
    assert float(_run_python(code).splitlines()[-1]) < 2.0


def test_first_name_installs_the_generate_hook():
    installed = _run_python(
        "import hf_eagle3; from hf_eagle3.decoding.dispatch import is_eagle3_generation_enabled as on; "
        "before = on(); hf_eagle3.Eagle3Config; print(before, on())"
    )
    assert installed == "False True"


def test_a_head_built_through_submodule_imports_drafts(tmp_path):
    """No name taken from `hf_eagle3` itself: building the head installs the hook, and generate uses it (the
    automatic tree measured into a cache of the test's own, on seeded weights)."""
    output = _run_python(
        "import torch; from transformers import LlamaConfig, LlamaForCausalLM; torch.manual_seed(0); "
        "from hf_eagle3.configuration_eagle3 import Eagle3Config; from hf_eagle3.modeling_eagle3 import Eagle3DraftModel; "
        "config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, "
        "num_attention_heads=4, num_key_value_heads=2); target = LlamaForCausalLM(config).eval(); "
        "head = Eagle3DraftModel(Eagle3Config.from_target_config(config)).eval().attach_target(target); "
        "ids = torch.tensor([[5, 6, 7]]); plain = target.generate(ids, max_new_tokens=6, do_sample=False); "
        "out = target.generate(ids, assistant_model=head, max_new_tokens=6, do_sample=False, return_dict_in_generate=True); "
        "print(torch.equal(out.sequences, plain), out.eagle3_stats.target_forwards > 0)",
        HF_EAGLE3_CACHE=str(tmp_path),
    )
    assert output.splitlines()[-1] == "True True"


def test_unknown_command_and_version(capsys):
    assert main(["bogus"]) == 2
    error = capsys.readouterr().err
    assert "unknown command 'bogus'" in error and "prepare-data" in error
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hf-eagle3 0.")
    assert main([]) == 2 and "usage: hf-eagle3" in capsys.readouterr().err
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)


def test_train_without_target_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--output_dir", str(tmp_path / "head")])
    assert exit_info.value.code == 2
    assert "--target is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--output_dir", str(tmp_path / "head")])
    assert "--data is required" in capsys.readouterr().err


def test_yaml_config_with_overriding_flags(tmp_path):
    from hf_eagle3.cli._parsing import parse_options
    from hf_eagle3.trainer import Eagle3TrainingArguments
    from hf_eagle3.trainer.jobs import TrainScriptArguments

    config = tmp_path / "train.yaml"
    config.write_text("target: smollm2\ndata: data\noutput_dir: head\nlearning_rate: 3.0e-4\nttt_steps: 3\n")
    types = (TrainScriptArguments, Eagle3TrainingArguments)
    for argv in (["--config", str(config), "--ttt-steps", "5"], [str(config), "--ttt_steps", "5"]):
        _, (script_args, training_args) = parse_options(types, argv, prog="hf-eagle3 train")
        assert script_args.target == "smollm2" and training_args.learning_rate == 3e-4
        assert training_args.ttt_steps == 5  # the flag wins over the file
    with pytest.raises(ValueError, match="Unknown arguments"):
        config.write_text("target: smollm2\nlearning_rat: 1.0\n")
        parse_options(types, ["--config", str(config)], prog="hf-eagle3 train")


def test_flags_take_underscores_and_dashes():
    underscored = parse_demo_args(["--max_new_tokens", "5", "--top_k", "3", "--num_assistant_tokens", "2"])
    dashed = parse_demo_args(["--max-new-tokens", "5", "--top-k", "3", "--num-assistant-tokens", "2"])
    assert underscored == dashed and underscored.max_new_tokens == 5
