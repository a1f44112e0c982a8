#!/usr/bin/env python
"""Our tree decoding against the official EAGLE code's, tree by tree, on the same prompts and head.

`official_eagle.py --trace FILE` records every step's draft tree (the prefix it grew from, its tokens, parents and
depths) and each prompt's output and accepted drafts per step. `trace` here decodes the same prompts with
`target.generate(assistant_model=head)` on the eager (dynamic cache) or static-cache path and writes the same
records; `compare` takes two such traces and compares the trees wherever both grew one from the same prefix:
identical (same nodes in the same order), the same node set in another order, or different (with examples). Run in
float32, where greedy decoding is exact, so both see the same text and differences come from the tree rules alone.

    python benchmarks/compare_official_trees.py trace --total_tokens 60 --depth 8 --top_k 10 --limit 8 --stride 10 \
        --max_new_tokens 128 --output ours.trace.jsonl
    python benchmarks/compare_official_trees.py compare ours.trace.jsonl official.trace.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hf_eagle3.decoding.static_tree as static_tree
from hf_eagle3 import Eagle3DraftModel
from hf_eagle3.decoding.dynamic_tree import DynamicTreeDecoder
from hf_eagle3.decoding.stats import Eagle3GenerationStats
from hf_eagle3.offline_models import load_target, shipped_head_path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
from official_eagle import load_prompts  # noqa: E402  (the same prompt pick on both sides)


def paths(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    """Every node as the token path from the root to it: what identifies a node across codes."""
    result: list[tuple[int, ...]] = []
    for node, token in enumerate(tokens):
        result.append((token,) if node == 0 else (*result[parents[node]], token))
    return result


def compare_trees(ours: dict, official: dict) -> dict:
    """How two trees grown from the same prefix differ."""
    ours_paths, official_paths = paths(ours["tokens"], ours["parents"]), paths(official["tokens"], official["parents"])
    if ours_paths == official_paths and ours["depths"] == official["depths"]:
        return {"same": "identical"}
    only_ours, only_official = set(ours_paths) - set(official_paths), set(official_paths) - set(ours_paths)
    if not only_ours and not only_official:
        return {"same": "node set"}
    return {
        "same": "no",
        "nodes": [len(ours_paths), len(official_paths)],
        "only_ours": sorted(only_ours, key=len)[:3],
        "only_official": sorted(only_official, key=len)[:3],
        "max_depth": [max(ours["depths"]), max(official["depths"])],
    }


def record_steps(log: list[dict], accepted: list[int]) -> None:
    """Record every tree our decoders grow, with the prefix (root last) it grew from, and every step's accepted drafts."""
    record = Eagle3GenerationStats.record

    def recording_record(self, num_accepted: int, num_emitted: int) -> None:
        record(self, num_accepted, num_emitted)
        accepted.append(num_accepted)

    Eagle3GenerationStats.record = recording_record

    def wrap(decoder_class) -> None:
        draft = decoder_class.draft

        def recording_draft(self, input_ids):
            tree = draft(self, input_ids)
            log.append(
                {
                    "prefix": input_ids[0].tolist(),
                    "tokens": tree.tokens.tolist(),
                    "parents": tree.parents.tolist(),
                    "depths": tree.depths.tolist(),
                }
            )
            return tree

        decoder_class.draft = recording_draft

    wrap(DynamicTreeDecoder)
    wrap(static_tree.StaticTreeRunner)


def tau(prefixes: list[list[int]]) -> float | None:
    """Tokens per verification step over every step but the last (which stopping may cut short in either code),
    from the prefixes the steps' trees grew from."""
    steps = len(prefixes) - 1
    return (len(prefixes[-1]) - len(prefixes[0])) / steps if steps > 0 else None


def trace(args: argparse.Namespace) -> None:
    target, tokenizer = load_target(args.target, dtype=torch.float32, verbose=False, attn_implementation="sdpa")
    head = Eagle3DraftModel.from_pretrained(args.head or shipped_head_path(args.target), dtype=torch.float32).eval()
    head.attach_target(target)
    trees: list[dict] = []
    accepted: list[int] = []
    record_steps(trees, accepted)
    knobs = {
        "eagle3_mode": "tree",
        "eagle3_total_tokens": args.total_tokens,
        "eagle3_depth": args.depth,
        "eagle3_top_k": args.top_k,
        "eagle3_static_cache": args.static,
    }
    args.output.write_text("", encoding="utf-8")
    prompts = load_prompts(
        BENCHMARKS_DIR / "data" / args.task / "question.jsonl", args.limit, args.stride, args.offset
    )
    for index, prompt in enumerate(prompts):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        trees.clear()
        accepted.clear()
        output = target.generate(
            **inputs, assistant_model=head, do_sample=False, max_new_tokens=args.max_new_tokens, **knobs
        )
        output = output[0, inputs["input_ids"].shape[1] :].tolist()
        rows = [{"task": args.task, "prompt": index, "output": output, "accepted": list(accepted), "knobs": knobs}]
        rows += [{"task": args.task, "prompt": index, **tree} for tree in trees]
        with args.output.open("a", encoding="utf-8") as file:  # prompt by prompt: a long run leaves what it did
            file.write("".join(json.dumps(row) + "\n" for row in rows))
        print(
            f"prompt {index}: {len(accepted)} steps, tau {head.last_generation_stats.mean_accept_len:.3f}", flush=True
        )


def read_trace(path: Path) -> tuple[dict, dict]:
    """Runs by (task, prompt), and trees by (task, prompt, prefix length)."""
    runs, trees = {}, {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        key = (row["task"], row["prompt"])
        if "output" in row:
            runs[key] = row
        else:
            trees.setdefault(key, []).append(row)
    return runs, trees


def compare(args: argparse.Namespace) -> None:
    runs_a, trees_a = read_trace(args.a)
    runs_b, trees_b = read_trace(args.b)
    counts = {"identical": 0, "node set": 0, "no": 0}
    prompts, examples = [], []
    totals = {"a": [0, 0], "b": [0, 0]}
    for key in sorted(runs_a.keys() & runs_b.keys()):
        by_prefix = {len(tree["prefix"]): tree for tree in trees_b[key]}
        for tree in trees_a[key]:
            other = by_prefix.get(len(tree["prefix"]))
            if other is not None and other["prefix"] == tree["prefix"]:
                result = compare_trees(tree, other)
                counts[result["same"]] += 1
                if result["same"] == "no" and len(examples) < 5:
                    examples.append({"prompt": key, "prefix_length": len(tree["prefix"]), **result})
        row = {"prompt": key}
        for name, runs, trees in (("a", runs_a, trees_a), ("b", runs_b, trees_b)):
            # A code may grow one more tree after its last verification: trees past the steps taken are not steps.
            prefixes = [tree["prefix"] for tree in trees[key]][: len(runs[key]["accepted"])]
            row[f"tau_{name}"] = tau(prefixes)
            totals[name][0] += len(prefixes[-1]) - len(prefixes[0])
            totals[name][1] += len(prefixes) - 1
        length = min(len(runs_a[key]["output"]), len(runs_b[key]["output"]))
        row["same_text"] = runs_a[key]["output"][:length] == runs_b[key]["output"][:length]
        prompts.append(row)
    summary = {
        "trees_from_the_same_prefix": counts,
        "tau_a_full_steps": round(totals["a"][0] / totals["a"][1], 4) if totals["a"][1] else None,
        "tau_b_full_steps": round(totals["b"][0] / totals["b"][1], 4) if totals["b"][1] else None,
        "steps": [totals["a"][1], totals["b"][1]],
        "same_text": all(row["same_text"] for row in prompts),
    }
    report = {"a": str(args.a), "b": str(args.b), "summary": summary, "prompts": prompts, "examples": examples}
    text = json.dumps(report, indent=1, default=str)
    print(json.dumps(summary))
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("trace", help="decode with our tree and record every step")
    run.add_argument("--head", type=Path, default=None, help="our head (default: the shipped head of --target)")
    run.add_argument("--target", default="smollm2")
    run.add_argument("--task", default="mt_bench")
    run.add_argument("--limit", type=int, default=8)
    run.add_argument("--stride", type=int, default=10)
    run.add_argument("--offset", type=int, default=0)
    run.add_argument("--total_tokens", type=int, default=60)
    run.add_argument("--depth", type=int, default=8)
    run.add_argument("--top_k", type=int, default=10)
    run.add_argument("--static", action="store_true", help="decode on the static-cache path (no graphs off CUDA)")
    run.add_argument("--max_new_tokens", type=int, default=128)
    run.add_argument("--output", type=Path, required=True)
    check = commands.add_parser("compare", help="compare two traces tree by tree")
    check.add_argument("a", type=Path)
    check.add_argument("b", type=Path)
    check.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    (trace if args.command == "trace" else compare)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
