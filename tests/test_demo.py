"""`hf-eagle3 demo` on a tiny saved target and random head; and its message when no head is shipped."""

from __future__ import annotations

import pytest
from conftest import save_chat_checkpoint

from hf_eagle3.cli import main as cli_main
from hf_eagle3.offline_models import SHIPPED_HEADS_DIR, shipped_head_path


def test_shipped_head_location():
    assert shipped_head_path("smollm2") == SHIPPED_HEADS_DIR / "smollm2-135m-instruct"
    assert shipped_head_path("SmolLM2-135M-Instruct") == shipped_head_path("smollm2")
    assert shipped_head_path("/some/checkpoint") is None  # never the target's own folder


def test_no_head_for_an_unregistered_target(tmp_path, capsys):
    assert cli_main(["demo", "--target", str(tmp_path)]) == 1
    assert f"The package ships no head for {tmp_path} (yet)." in capsys.readouterr().err


def test_missing_head_says_how_to_get_one(tmp_path, capsys):
    assert cli_main(["demo", "--head", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert f"No EAGLE-3 head at {tmp_path}" in message and "benchmarks/README.md" in message


def test_demo_compares_text_and_speed(tmp_path, capsys):
    save_chat_checkpoint(tmp_path)
    argv = ["demo", "--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--device", "cpu"]
    argv += ["--prompt", "w5 w6 w7 w5 w6", "--prompt", "w9 w10 w9 w10", "--max-new-tokens", "8"]
    argv += ["--total-tokens", "8", "--depth", "3", "--top-k", "2"]
    assert cli_main(argv) == 0
    output = capsys.readouterr().out
    assert output.count("--- identical text: yes") == 2
    assert "mean acceptance length" in output and "Summary on cpu" in output and "identical text on 2/2" in output


def test_demo_knobs_reach_eagle3_decoding(tmp_path):
    save_chat_checkpoint(tmp_path)
    argv = ["demo", "--target", str(tmp_path / "target"), "--head", str(tmp_path / "head"), "--device", "cpu"]
    with pytest.raises(ValueError, match="eagle3_depth must be a positive integer, got 0"):
        cli_main([*argv, "--prompt", "w5 w6", "--max-new-tokens", "4", "--depth", "0"])
