#!/usr/bin/env python
"""Held-out training-time-test metrics of several heads on the same prepared sets, teacher-forced.

Decoding compares heads on texts that differ once a near-tie flips (bf16) and on few prompts; this scores every
head on the same tokens: `Eagle3Trainer.evaluate` (per-step accuracy and the simulated acceptance length) on each
`--data` folder of `prepare-data` (e.g. held-out conversations of each kind a head was trained on), one target forward
per batch shared by nothing but the head. The first head is the reference of the differences.

    python benchmarks/held_out_heads.py --target smollm2 --device cpu --dtype float32 \\
        --heads shipped=src/hf_eagle3/heads/smollm2-135m-instruct new=runs/long/head \\
        --data chat=eval/chat sampled=eval/sampled long=eval/long --name smollm2-long-head-held-out
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from hf_eagle3 import Eagle3DraftModel, Eagle3Trainer, Eagle3TrainingArguments
from hf_eagle3.offline_models import load_target
from hf_eagle3.trainer.jobs import load_training_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import RESULTS_DIR, environment  # noqa: E402  (the harness's header fields)

KEPT = ("eval_acceptance_length", "eval_acc_step_0", "eval_acc_step_6", "eval_loss")


def named_paths(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{option} {value!r}: give NAME=PATH.")
        pairs[name] = path
    return pairs


def evaluate(head: Eagle3DraftModel, target, rows, batch_size: int, use_cpu: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as output_dir:
        args = Eagle3TrainingArguments(
            output_dir=output_dir, per_device_eval_batch_size=batch_size, report_to="none", use_cpu=use_cpu
        )
        metrics = Eagle3Trainer(model=head, target_model=target, args=args, eval_dataset=rows).evaluate()
    return {key: round(value, 4) for key, value in metrics.items() if key.startswith(("eval_acc", "eval_loss"))}


def markdown(result: dict, heads: list[str], sets: list[str]) -> str:
    reference = heads[0]
    lines = [
        f"# {result['name']}",
        "",
        f"{result['device']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f"; {result['dtype']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Simulated acceptance length (accuracy at TTT step 0 / step 6) on the same held-out tokens, teacher-forced;",
        f"difference against `{reference}`.",
        "",
        "| set | tokens | " + " | ".join(heads) + " | " + " | ".join(f"{h} - {reference}" for h in heads[1:]) + " |",
        "|---" * (2 + 2 * len(heads) - 1) + "|",
    ]
    for name in sets:
        cells = []
        for head in heads:
            m = result["metrics"][head][name]
            cells.append(
                f"{m['eval_acceptance_length']:.3f} ({m['eval_acc_step_0']:.3f} / {m['eval_acc_step_6']:.3f})"
            )
        base = result["metrics"][reference][name]["eval_acceptance_length"]
        diffs = [f"{result['metrics'][h][name]['eval_acceptance_length'] - base:+.3f}" for h in heads[1:]]
        lines.append(f"| {name} | {result['tokens'][name]} | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="registered offline target, Hub id or path")
    parser.add_argument("--heads", nargs="+", required=True, help="NAME=DIR, the reference first")
    parser.add_argument("--data", nargs="+", required=True, help="NAME=DIR of `prepare-data` output")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", required=True, help="output file name without extension")
    parser.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    heads, sets = named_paths(args.heads, "--heads"), named_paths(args.data, "--data")

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    target, _ = load_target(args.target, dtype=dtype, device=args.device)
    rows = {name: load_training_rows(path) for name, path in sets.items()}
    result = {
        "name": args.name,
        **environment(),
        "dtype": args.dtype,
        "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "heads": heads,
        "data": sets,
        "tokens": {name: sum(len(ids) for ids in data["input_ids"]) for name, data in rows.items()},
        "metrics": {},
    }
    for head_name, path in heads.items():
        head = Eagle3DraftModel.from_pretrained(path, dtype=dtype).to(args.device)
        head.attach_target(target)
        result["metrics"][head_name] = {}
        for set_name, data in rows.items():
            metrics = evaluate(head, target, data, args.batch_size, use_cpu=args.device == "cpu")
            result["metrics"][head_name][set_name] = metrics
            print(f"{head_name} on {set_name}: " + ", ".join(f"{k} {metrics[k]}" for k in KEPT), flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.output_dir / f"{args.name}.md").write_text(markdown(result, list(heads), list(sets)), encoding="utf-8")
    print(f"Wrote {args.output_dir / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
