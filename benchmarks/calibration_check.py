#!/usr/bin/env python
"""What the automatic tree's acceptance calibration expects, and which tree it chooses, on different prompts.

Every shape of a grid (`tree_shape.CPU_GRID` or `ACCELERATOR_GRID`, `--top_ks` to keep some branchings only) is
calibrated (`tree_shape.calibrate_acceptance`, greedy) on three sets of prompts:

- `built-in`: the built-in requests (`calibration.CALIBRATION_REQUESTS`), the grid's tokens each: what
  `eagle3_tree="auto"` calibrates on;
- `first prompt`: one prompt alone, the longest of `--first_limit` task prompts every `--first_stride` (what
  `run_benchmark.py measure` warms up on), `--first_tokens` tokens: what the automatic tree calibrated on when it took
  the first call's prompt;
- `reference`: the task's prompts (`--limit`, `--stride`, `--offset`), `--reference_tokens` each: the workload's own
  expected tau.

Each set's choice under one step-time model (timed here on the path `generate` takes by default, or read from a tree
cache's step-time file with `--step_times`, e.g. one recorded on a GPU) is reported with its expected tau, its reference tau and the tokens/s
the reference predicts for it, beside the reference's own best shape. `--decode_tokens N` also decodes the reference
prompts with each chosen shape: the tau and tokens/s actually seen.

    python benchmarks/calibration_check.py --target smollm2 --device cpu --dtype float32 --threads 1 \
        --limit 8 --stride 10 --offset 3 --reference_tokens 32 --decode_tokens 32 --name smollm2-cpu-calibration
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from hf_eagle3 import Eagle3DraftModel
from hf_eagle3.decoding import tree_shape
from hf_eagle3.decoding.calibration import CALIBRATION_REQUESTS, render_requests
from hf_eagle3.offline_models import load_target, shipped_head_path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
from run_benchmark import DATA_DIR, RESULTS_DIR, encode_prompt, load_prompts  # noqa: E402  (the harness's prompts)

GRIDS = {"cpu": tree_shape.CPU_GRID, "accelerator": tree_shape.ACCELERATOR_GRID}


def calibration_sets(tokenizer, grid: tree_shape.ShapeGrid, args: argparse.Namespace) -> dict[str, tuple[list, int]]:
    """Each set's prompts (`(1, length)` ids) and new tokens per prompt."""

    def encode(texts: list[str]) -> list[torch.LongTensor]:
        return [encode_prompt(tokenizer, text, "cpu")["input_ids"] for text in texts]

    first = max(encode(load_prompts(args.prompts, args.first_limit, args.first_stride)), key=lambda ids: ids.shape[1])
    reference = encode(load_prompts(args.prompts, args.limit, args.stride, args.offset))
    return {
        "built-in": (render_requests(tokenizer, CALIBRATION_REQUESTS), grid.calibration_tokens),
        "first prompt": ([first], args.first_tokens),
        "reference": (reference, args.reference_tokens),
    }


def decode_rate(target, head, prompts: list[torch.LongTensor], shape: tree_shape.TreeShape, tokens: int) -> dict:
    """Greedy decoding of `prompts` with `shape`: tokens per target forward, and tokens/s."""
    new_tokens = forwards = 0
    seconds = 0.0
    for ids in prompts:
        ids = ids.to(target.device)
        start = time.perf_counter()
        target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=head,
            do_sample=False,
            max_new_tokens=tokens,
            **shape.generate_kwargs(),
        )
        seconds += time.perf_counter() - start
        new_tokens += head.last_generation_stats.new_tokens
        forwards += head.last_generation_stats.target_forwards
    return {"tau": new_tokens / forwards, "tokens_per_s": new_tokens / seconds}


def check(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device, verbose=False)
    head_path = args.head or shipped_head_path(args.target)
    head = Eagle3DraftModel.from_pretrained(head_path, dtype=target.dtype).to(target.device).eval()
    head.attach_target(target)
    grid = GRIDS[args.grid].for_head(head)
    if args.top_ks:
        grid = replace(grid, top_ks=tuple(k for k in grid.top_ks if k in args.top_ks))
    shapes = grid.shapes()
    sets = calibration_sets(tokenizer, grid, args)

    calibrated = {}
    for name, (prompts, tokens) in sets.items():
        print(f"calibrating on {name}: {len(prompts)} prompts x {tokens} tokens ...", flush=True)
        start = time.perf_counter()
        device_prompts = [ids.to(target.device) for ids in prompts]
        taus = tree_shape.calibrate_acceptance(target, head, device_prompts, shapes, tokens)
        calibrated[name] = {"taus": taus, "seconds": time.perf_counter() - start, "prompts": len(prompts)}
        calibrated[name]["prompt_tokens"] = [ids.shape[1] for ids in prompts]
        calibrated[name]["new_tokens"] = tokens
    if args.step_times:
        timings = tree_shape.timings_of_record(json.loads(args.step_times.read_text()))
    else:
        built_in = sets["built-in"][0][0].to(target.device)
        timed = tree_shape.timing_shapes(grid)
        # The path `generate` takes by default: static caches (CUDA graphs) on CUDA, else the dynamic cache.
        static = target.device.type == "cuda"
        timings = tree_shape.time_shapes(target, head, built_in, timed, static, False, grid.timing_tokens)
    step_time = tree_shape.StepTimeModel(timings)

    reference = calibrated["reference"]["taus"]

    def predicted(shape: tree_shape.TreeShape) -> float:
        return reference[shape] / step_time.step_seconds(shape)

    best, _ = tree_shape.choose_shape(reference, step_time)
    decoded: dict[tree_shape.TreeShape, dict] = {}
    rows = []
    for name, result in calibrated.items():
        shape, _ = tree_shape.choose_shape(result["taus"], step_time)
        row = {
            "calibration": name,
            "prompts": result["prompts"],
            "prompt_tokens": result["prompt_tokens"],
            "new_tokens": result["new_tokens"],
            "seconds": round(result["seconds"], 1),
            "chose": str(shape),
            "expected_tau": round(result["taus"][shape], 3),
            "reference_tau": round(reference[shape], 3),
            "step_ms": round(1000 * step_time.step_seconds(shape), 3),
            "predicted_tokens_per_s": round(predicted(shape), 2),
            "of_best": round(predicted(shape) / predicted(best), 3),
        }
        if args.decode_tokens:
            if shape not in decoded:
                decoded[shape] = decode_rate(target, head, sets["reference"][0], shape, args.decode_tokens)
            rate = decoded[shape]
            row.update(decoded_tau=round(rate["tau"], 3), decoded_tokens_per_s=round(rate["tokens_per_s"], 2))
        rows.append(row)
        print(f"    {row}", flush=True)
    return {
        "settings": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
        "device": tree_shape.device_name(target.device),
        "grid": asdict(grid),
        "step_times": tree_shape.timing_rows(timings),
        "best_by_reference": str(best),
        "rows": rows,
        "taus": {
            name: {str(s): round(t, 4) for s, t in result["taus"].items()} for name, result in calibrated.items()
        },
    }


def markdown_table(payload: dict) -> str:
    lines = [
        "| calibrated on | prompts x tokens | seconds | chose | expected tau | reference tau | predicted tokens/s | "
        "of best | decoded tau | decoded tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['calibration']} | {row['prompts']} x {row['new_tokens']} | {row['seconds']} | {row['chose']} | "
            f"{row['expected_tau']:.2f} | {row['reference_tau']:.2f} | {row['predicted_tokens_per_s']:.1f} | "
            f"{row['of_best']:.3f} | {row.get('decoded_tau', '-')} | {row.get('decoded_tokens_per_s', '-')} |"
        )
    return "\n".join(lines) + f"\n\nBest shape by the reference: {payload['best_by_reference']}.\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--head", type=Path, help="default: the head shipped for --target")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--threads", type=int, help="intra-op threads (default torch's)")
    parser.add_argument("--prompts", type=Path, default=DATA_DIR / "mt_bench" / "question.jsonl")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--offset", type=int, default=3)
    parser.add_argument("--reference_tokens", type=int, default=64)
    parser.add_argument("--first_limit", type=int, default=24, help="the first-prompt set: the longest of these")
    parser.add_argument("--first_stride", type=int, default=3)
    parser.add_argument("--first_tokens", type=int, default=256)
    parser.add_argument("--grid", choices=sorted(GRIDS), help="default: the device's")
    parser.add_argument("--top_ks", type=int, nargs="+", help="keep these branchings of the grid only")
    parser.add_argument("--step_times", type=Path, help="a tree cache's step-time file instead of timing here")
    parser.add_argument("--decode_tokens", type=int, default=0, help="decode the reference with each choice")
    parser.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="calibration-check")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.grid is None:
        args.grid = "cpu" if torch.device(args.device).type == "cpu" else "accelerator"
    payload = check(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.output_dir / f"{args.name}.md").write_text(markdown_table(payload))
    print(markdown_table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
