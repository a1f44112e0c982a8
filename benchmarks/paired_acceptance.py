#!/usr/bin/env python
"""Tokens per verification step of two decoding runs on the same prompts, compared prompt by prompt.

Acceptance varies a lot between prompts (about 1.9 to 3.6 tokens per step on MT-bench), so two means over a few
prompts differ by chance; and in bf16 greedy texts differ between codes and paths from the first rounding flip on.
This pairs the runs per prompt: the mean difference with its standard error, and, where both runs kept their
outputs (`--save_outputs`), how many texts are identical and where the others first differ.

    python benchmarks/paired_acceptance.py official.json:official_eagenerate_t60_d7_k10 ours.json:eagle3_tree

Each argument is a results JSON (`run_benchmark.py measure` or `official_eagle.py`) and the method of its row; the
first is the reference. The rows need `per_prompt` (both scripts write it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_row(spec: str, task: str, temperature: float) -> dict:
    path, _, method = spec.rpartition(":")
    if not path:
        raise SystemExit(f"{spec!r}: give FILE.json:METHOD.")
    rows = json.loads(Path(path).read_text())["results"]
    for row in rows:
        if row["method"] == method and row["task"] == task and row["temperature"] == temperature:
            if "per_prompt" not in row:
                raise SystemExit(
                    f"{path}: the {method} row has no `per_prompt`; rerun with this version of the script."
                )
            return row
    raise SystemExit(f"{path} has no row for method {method!r}, task {task!r}, T={temperature:g}.")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Where two outputs first differ; None where one is a prefix of the other (the official loop finishes its last
    step past EOS and `max_new_tokens`, ours stops inside it)."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None


def compare(reference: dict, other: dict) -> dict:
    """Per-prompt tau difference (other - reference), its mean and standard error, and text agreement, over the
    prompts both runs made (the first ones of the same file: a run with a smaller --limit pairs with a prefix)."""
    n = min(len(reference["per_prompt"]), len(other["per_prompt"]))
    reference = {**reference, "per_prompt": reference["per_prompt"][:n], "outputs": reference.get("outputs", [])[:n]}
    other = {**other, "per_prompt": other["per_prompt"][:n], "outputs": other.get("outputs", [])[:n]}
    pairs = list(zip(reference["per_prompt"], other["per_prompt"], strict=True))
    differences = [b["tokens"] / b["steps"] - a["tokens"] / a["steps"] for a, b in pairs]
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0

    def pooled(row: dict) -> float:
        return sum(p["tokens"] for p in row["per_prompt"]) / sum(p["steps"] for p in row["per_prompt"])

    result = {
        "method": other["method"],
        "prompts": n,
        "tau_reference": round(pooled(reference), 4),
        "tau": round(pooled(other), 4),
        "mean_difference": round(mean, 4),
        "standard_error": round(math.sqrt(variance / n), 4),
    }
    if reference["outputs"] and other["outputs"]:
        firsts = [first_difference(a, b) for a, b in zip(reference["outputs"], other["outputs"], strict=True)]
        identical = [index for index, first in enumerate(firsts) if first is None]
        result["identical_texts"] = len(identical)
        # Prompts whose texts agree: there the two runs decoded the same tokens and only the drafting can differ.
        result["mean_difference_identical_texts"] = (
            round(sum(differences[i] for i in identical) / len(identical), 4) if identical else None
        )
        diverged = [first for first in firsts if first is not None]
        result["mean_first_difference"] = round(sum(diverged) / len(diverged), 1) if diverged else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="FILE.json:METHOD, the reference first")
    parser.add_argument("--task", default="mt_bench")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give a reference and at least one run to compare with it")
    reference = load_row(args.runs[0], args.task, args.temperature)
    for spec in args.runs[1:]:
        print(json.dumps(compare(reference, load_row(spec, args.task, args.temperature))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
