"""`hf-eagle3 prepare-data`: chat data to a tokenised training set and a draft vocabulary
(`hf_eagle3.data.preparation.prepare_data`)."""

from __future__ import annotations

import os

from ..data.preparation import PrepareDataArguments, prepare_data
from ._parsing import parse_options


def main(argv: list[str]) -> int:
    _, (args,) = parse_options(
        (PrepareDataArguments,),
        argv,
        prog="hf-eagle3 prepare-data",
        description="Tokenise chat data (or have the target write it) and build the draft vocabulary.",
    )
    summary = prepare_data(args)
    print(
        f"Kept {summary['kept']} of {summary['conversations']} conversations ({summary['dropped_too_long']} too "
        f"long, {summary['dropped_no_loss_tokens']} without assistant tokens after truncation): {summary['tokens']} "
        f"tokens, {summary['loss_tokens']} to learn."
    )
    vocabulary = f"Draft vocabulary: {summary['draft_vocab_size']} of {summary['vocab_size']} ids cover "
    by_size = summary["coverage_by_size"]
    if "split" not in summary:
        print(f"{vocabulary}{summary['coverage']:.2%} of the tokens to learn. Saved to {args.output_dir}.")
        sizes = ", ".join(f"{size}: {share:.2%}" for size, share in by_size["train"].items())
        print(f"Coverage by draft vocabulary size (--draft_vocab_size): {sizes}.")
        return 0
    split = summary["split"]
    print(
        f"Held out {split['eval']} conversations in {os.path.join(args.output_dir, split['eval_folder'])} (train "
        f"--eval_data), {split['train']} left to train on in {args.output_dir}."
    )
    print(
        f"{vocabulary}{summary['coverage']:.2%} of the training tokens to learn (chosen on them) and "
        f"{summary['eval_coverage']:.2%} of the held-out ones."
    )
    sizes = ", ".join(f"{size}: {share:.2%} / {by_size['eval'][size]:.2%}" for size, share in by_size["train"].items())
    print(f"Coverage by draft vocabulary size (--draft_vocab_size), training / held-out: {sizes}.")
    return 0
