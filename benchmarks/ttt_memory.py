#!/usr/bin/env python
"""Peak GPU memory and tokens/s of one Eagle3Trainer training step at a given sequence length.

Runs the real training step (frozen bf16 target forward, draft-vocabulary restriction, TTT unroll,
backward, AdamW) on random tokens, for the head's attention backends side by side: `sdpa` (what
training uses; a float mask, no materialised scores) against `eager` (materialises
(batch, heads, T, (k+1)T) float scores per step), so the difference shows what the mask formulation saves.

    python benchmarks/ttt_memory.py --target smollm2 --seq_len 2048 --batch_size 1

`--target` takes whatever `hf_eagle3.load_target` takes; `--random_target` builds the target from its
config with random weights instead (same shapes and cost, no download).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hf_eagle3 import Eagle3Config, Eagle3DraftModel, load_target
from hf_eagle3.trainer import Eagle3DataCollator, Eagle3Trainer, Eagle3TrainingArguments


def measure(target, attn_implementation: str, args: argparse.Namespace) -> dict:
    vocab_size = target.config.vocab_size
    draft_vocab_size = min(args.draft_vocab_size, vocab_size)
    config = Eagle3Config.from_target_config(target.config, draft_vocab_size=draft_vocab_size)
    head = Eagle3DraftModel._from_config(config, attn_implementation=attn_implementation)
    ids = torch.randperm(vocab_size)[:draft_vocab_size].sort().values
    head.d2t.copy_(ids - torch.arange(draft_vocab_size))
    head.t2d.zero_()
    head.t2d[ids] = True
    head.attach_target(target)
    rows = [
        {"input_ids": torch.randint(0, vocab_size, (args.seq_len,)).tolist(), "loss_mask": [1] * args.seq_len}
        for _ in range(args.batch_size)
    ]
    training_args = Eagle3TrainingArguments(
        output_dir="/tmp/ttt_memory",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        ttt_steps=args.ttt_steps,
        max_length=args.seq_len,
        report_to="none",
    )
    trainer = Eagle3Trainer(model=head, target_model=target, args=training_args, train_dataset=rows)
    optimizer = trainer.create_optimizer()
    batch = trainer._prepare_inputs(Eagle3DataCollator(max_length=args.seq_len)(rows))
    model = trainer.accelerator.prepare_model(trainer.model)  # bf16 autocast, as in Trainer.train
    model.train()

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    on_gpu = torch.cuda.is_available()
    step()  # warm-up: allocator, kernels
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "attention": attn_implementation,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "ttt_steps": args.ttt_steps,
        "draft_vocab_size": draft_vocab_size,
        "tokens_per_s": round(args.steps * args.batch_size * args.seq_len / elapsed, 1),
        "step_s": round(elapsed / args.steps, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "loss": round(float(loss.detach()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--random_target", action="store_true", help="random weights from the target's config")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--ttt_steps", type=int, default=7)
    parser.add_argument("--draft_vocab_size", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, _ = load_target(args.target, dtype=torch.bfloat16, device=device)
    if args.random_target:
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_config(target.config, dtype=torch.bfloat16).to(device).eval()
    for attn_implementation in args.attention:
        try:
            print(json.dumps(measure(target, attn_implementation, args)), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps({"attention": attn_implementation, "error": "out of memory"}), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
