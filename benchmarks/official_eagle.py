#!/usr/bin/env python
"""The official EAGLE code's `EaModel.eagenerate` on the benchmark prompts, reported like `run_benchmark.py measure`.

A comparison point for issue 17, not part of the library: it needs the SafeAILab/EAGLE package (`eagle.model`)
importable (installed, or its checkout given with `--eagle_repo`) in its own environment, typically
transformers 4.53, so it imports nothing from hf_eagle3. What it needs on disk:

- the target as a plain HF folder: `config.json` with `rope_theta` at the top level (transformers 4.x reads no
  `rope_parameters`), `model.safetensors` plus a `model.safetensors.index.json` naming the file that holds
  `model.embed_tokens.weight` (the official loader reads the draft embedding from it), and a tokenizer whose eos is
  the chat's end-of-turn token (`<|im_end|>` for SmolLM2) that loads with `use_fast=False`;
- the head in the official layout (`hf-eagle3 convert HEAD DST --to eagle3`) WITHOUT `target_hidden_size` in its
  `config.json`: with that key the official loader leaves the draft embedding untrained-random.

Knobs: the official `total_token` counts the verified nodes with the root (as our `eagle3_total_tokens` does) and its
`depth` counts the head forwards after the first one, so a path holds at most `depth + 1` drafts: official
`total_token=T, depth=D, top_k=K` is our `eagle3_total_tokens=T, eagle3_depth=D + 1, eagle3_top_k=K`.

Tokens per verification step (`mean_accept_len`) counts as the official code does: each step adds its accepted
drafts plus the target's token, the prefill's token is counted, and the step that crosses `max_new_tokens` or holds
EOS counts whole (the loop runs at least one token past `max_new_tokens`). `mean_accept_len_as_harness` and
`per_prompt` count as `run_benchmark.py` counts ours: the tokens after the first, up to EOS or `max_new_tokens`.
Compare ours with those: at 128 new tokens the official count is about 3% higher for the same decoding.

Example (CPU, float32):

    python benchmarks/official_eagle.py --eagle_repo /path/to/EAGLE --target /path/target --head /path/head \
        --limit 8 --stride 10 --max_new_tokens 128 --dtype float32 --output official.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The harness's prompt files and pick; it imports nothing from hf_eagle3 at module level, so it loads here too.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_benchmark import DATA_DIR, load_prompts  # noqa: E402


def check_inputs(target: Path, head: Path) -> None:
    """Clear errors for the folder problems that make the official loader fail or decode silently wrong."""
    head_config = json.loads((head / "config.json").read_text())
    if "target_hidden_size" in head_config:
        raise ValueError(
            f"{head / 'config.json'} has `target_hidden_size`: the official loader then skips loading the target's "
            "embedding into the head and drafts from a random one. Delete the key (the hidden sizes are equal)."
        )
    if not (head / "model.safetensors").is_file() and not (head / "pytorch_model.bin").is_file():
        raise ValueError(
            f"{head} has neither model.safetensors nor pytorch_model.bin: export it with "
            "`hf-eagle3 convert HEAD DST --to eagle3`."
        )
    target_config = json.loads((target / "config.json").read_text())
    if "rope_theta" not in target_config:
        raise ValueError(
            f"{target / 'config.json'} has no top-level `rope_theta`; transformers 4.x would use 10000. Copy it from "
            "`rope_parameters`."
        )
    index = target / "model.safetensors.index.json"
    if not index.is_file() and not (target / "pytorch_model.bin.index.json").is_file():
        raise ValueError(
            f"{target} has no model.safetensors.index.json: the official loader finds the embedding through it. Write "
            '{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}} there.'
        )


class StepLog:
    """Accepted drafts of every verification step, and optionally each step's draft tree (what `--trace` writes)."""

    def __init__(self, trace: bool):
        self.trace = trace
        self.accepted: list[int] = []
        self.trees: list[dict] = []

    def wrap(self, ea_model_module, ea_layer) -> None:
        """Record through the official functions' existing seams: the posterior and the tree builder."""
        evaluate_posterior = ea_model_module.evaluate_posterior

        def recording_posterior(logits, candidates, logits_processor):
            best, accept_length, sample_p = evaluate_posterior(logits, candidates, logits_processor)
            self.accepted.append(int(accept_length))
            if self.trace and self.trees:
                self.trees[-1]["accepted"] = candidates[best, 1 : int(accept_length) + 1].tolist()
            return best, accept_length, sample_p

        ea_model_module.evaluate_posterior = recording_posterior
        if not self.trace:
            return
        build = ea_layer.topK_genrate

        def recording_build(hidden_states, input_ids, head, logits_processor):
            draft_tokens, retrieve_indices, tree_mask, position_ids = build(
                hidden_states, input_ids, head, logits_processor
            )
            mask = tree_mask[0, 0].bool()
            # The parent of node i is its deepest strict ancestor: the one whose own ancestor count is one less.
            depth = mask.sum(-1) - 1
            parents = [0] + [
                int((mask[i, :i] & (depth[:i] == depth[i] - 1)).nonzero()[0]) for i in range(1, len(mask))
            ]
            self.trees.append(
                {
                    "prefix": input_ids[0].tolist(),
                    "tokens": draft_tokens[0].tolist(),
                    "parents": parents,
                    "depths": position_ids.tolist(),
                }
            )
            return draft_tokens, retrieve_indices, tree_mask, position_ids

        ea_layer.topK_genrate = recording_build

    def reset(self) -> None:
        self.accepted.clear()


def harness_count(output: list[int], eos_token_id: int, max_new_tokens: int) -> int:
    """The tokens after the first that our loop would count for an official output: ours stops inside a step at
    EOS or at `max_new_tokens`, while the official loop finishes the step (and runs one past `max_new_tokens`)."""
    length = len(output)
    if eos_token_id in output:
        length = min(length, output.index(eos_token_id) + 1)
    return min(length, max_new_tokens) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eagle_repo", type=Path, help="checkout of SafeAILab/EAGLE (else `eagle` must be installed)")
    parser.add_argument("--target", type=Path, required=True, help="the target as a plain HF folder")
    parser.add_argument("--head", type=Path, required=True, help="the head in the official layout")
    parser.add_argument("--tasks", nargs="+", default=["mt_bench"], help="task folders under benchmarks/data")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--total_token", type=int, default=60, help="official knob: verified nodes, root included")
    parser.add_argument("--depth", type=int, default=7, help="official knob: head forwards after the first")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup_tokens", type=int, default=16, help="untimed generation before the timed prompts")
    parser.add_argument("--output", type=Path, help="write the JSON here (else print it)")
    parser.add_argument("--save_outputs", action="store_true", help="keep every prompt's new token ids in the JSON")
    parser.add_argument("--trace", type=Path, help="also write every step's draft tree and output, as JSON lines")
    args = parser.parse_args(argv)

    if args.eagle_repo is not None:
        sys.path.insert(0, str(args.eagle_repo))
    try:
        import eagle.model.ea_model as ea_model_module
    except ImportError as error:
        raise SystemExit(
            f"The official EAGLE code is not importable ({error}): pass --eagle_repo or install it."
        ) from error
    import transformers
    from transformers import AutoTokenizer

    check_inputs(args.target, args.head)
    device = torch.device(args.device)
    model = ea_model_module.EaModel.from_pretrained(
        base_model_path=str(args.target),
        ea_model_path=str(args.head),
        total_token=args.total_token,
        depth=args.depth,
        top_k=args.top_k,
        torch_dtype=DTYPES[args.dtype],
        device_map={"": str(device)},
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    log = StepLog(trace=args.trace is not None)
    log.wrap(ea_model_module, model.ea_layer)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate(prompt: str, max_new_tokens: int) -> tuple[list[int], int]:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(device)
        output, _, _ = model.eagenerate(
            ids, temperature=args.temperature, max_new_tokens=max_new_tokens, max_length=4096, log=True
        )
        return output[0, ids.shape[1] :].tolist(), ids.shape[1]

    results, trace_rows = [], []
    for task in args.tasks:
        prompts = load_prompts(DATA_DIR / task / "question.jsonl", args.limit, args.stride, args.offset)
        generate(prompts[0], args.warmup_tokens)
        log.trees.clear()
        accepted, new_tokens, seconds, per_prompt = [], 0, 0.0, []
        for index, prompt in enumerate(prompts):
            torch.manual_seed(args.seed + index)
            log.reset()
            synchronize()
            start = time.perf_counter()
            output, prompt_length = generate(prompt, args.max_new_tokens)
            synchronize()
            seconds += time.perf_counter() - start
            new_tokens += len(output)
            accepted += log.accepted
            per_prompt.append(
                {
                    "tokens": harness_count(output, tokenizer.eos_token_id, args.max_new_tokens),
                    "steps": len(log.accepted),
                    "official_tokens": sum(a + 1 for a in log.accepted),
                    "output": output,
                }
            )
            if log.trace:
                trace_rows.append({"task": task, "prompt": index, "output": output, "accepted": list(log.accepted)})
                trace_rows += [{"task": task, "prompt": index, **tree} for tree in log.trees]
                log.trees.clear()
        steps = len(accepted)
        most = max(accepted, default=0)
        results.append(
            {
                "method": f"official_eagenerate_t{args.total_token}_d{args.depth}_k{args.top_k}",
                "task": task,
                "temperature": args.temperature,
                "prompts": len(prompts),
                "new_tokens": new_tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(new_tokens / seconds, 3),
                "mean_accept_len": round(sum(a + 1 for a in accepted) / steps, 4) if steps else None,
                # Counted as run_benchmark.py counts ours (tokens up to EOS or max_new_tokens, the first excluded):
                # what a comparison with our rows must use, `per_prompt` too.
                "mean_accept_len_as_harness": round(sum(row["tokens"] for row in per_prompt) / steps, 4)
                if steps
                else None,
                "acceptance_rate_per_depth": [round(sum(a > d for a in accepted) / steps, 4) for d in range(most)],
                "ms_per_step": round(1000 * seconds / steps, 3) if steps else None,
                "official_knobs": {"total_token": args.total_token, "depth": args.depth, "top_k": args.top_k},
                "generate_kwargs": {
                    "eagle3_mode": "tree",
                    "eagle3_total_tokens": args.total_token,
                    "eagle3_depth": args.depth + 1,
                    "eagle3_top_k": args.top_k,
                },
                "per_prompt": [
                    {key: row[key] for key in ("tokens", "steps", "official_tokens")} for row in per_prompt
                ],
                **({"outputs": [row["output"] for row in per_prompt]} if args.save_outputs else {}),
            }
        )
    payload = {
        "target": str(args.target),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": shlex.join(["official_eagle.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": 1,
            "limit": args.limit,
            "stride": args.stride,
            "offset": args.offset,
            "seed": args.seed,
            "head": str(args.head),
            "chat_template": True,
        },
        "results": results,
    }
    text = json.dumps(payload, indent=2) + "\n"
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    if args.trace is not None:
        args.trace.write_text("".join(json.dumps(row) + "\n" for row in trace_rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
