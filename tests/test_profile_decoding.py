"""benchmarks/profile_decoding.py on its tiny overhead-proxy target: the breakdown it reports is the one expected."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decoding.py"
spec = importlib.util.spec_from_file_location("profile_decoding", SCRIPT)
profile_decoding = importlib.util.module_from_spec(spec)
sys.modules["profile_decoding"] = profile_decoding  # dataclasses look their module up there
spec.loader.exec_module(profile_decoding)


def test_breakdown_of_plain_tree_and_chain(tmp_path, capsys, monkeypatch):
    # The flag replaces the tree loop's device rule for the rest of the process: restored after the test.
    from hf_eagle3.decoding import tree_loop

    monkeypatch.setattr(tree_loop, "uses_batched_greedy", tree_loop.uses_batched_greedy)
    output = tmp_path / "profile.json"
    argv = ["--prompts", "1", "--max_new_tokens", "10", "--tree", "8", "3", "2", "--chain_length", "3"]
    assert profile_decoding.main([*argv, "--accelerator_paths", "--json", str(output)]) == 0
    table = capsys.readouterr().out
    assert "| tree |" in table and "syncs per step by source line" in table
    results = {row["mode"]: row for row in json.loads(output.read_text())["results"]}
    assert set(results) == {"plain", "tree", "chain"}
    for mode, row in results.items():
        assert row["steps"] > 0 and row["same_text_as_plain"], mode
        assert row["ops_per_step"]["verification"] > 0
    tree_row = results["tree"]
    # Per step: the head re-encodes the accepted tokens, then one forward per further tree level (depth 3).
    assert tree_row["head_forwards_per_step"] == 3
    assert set(tree_row["ms_per_step"]) == {"drafting", "verification", "bookkeeping"}
    # Greedy acceptance on the accelerator path reads the device once per step (plus once after the prefill).
    steps = tree_row["steps"]
    assert tree_row["syncs_per_step"]["hf_eagle3"] * steps <= steps + 2
