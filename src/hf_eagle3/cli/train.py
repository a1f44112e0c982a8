"""`hf-eagle3 train`: train an EAGLE-3 head (`hf_eagle3.trainer.jobs.train_head`)."""

from __future__ import annotations

from ..trainer.jobs import TrainScriptArguments, is_feature_directory, train_head
from ..trainer.training_args import Eagle3TrainingArguments
from ._parsing import parse_options


def main(argv: list[str]) -> int:
    parser, (script_args, training_args) = parse_options(
        (TrainScriptArguments, Eagle3TrainingArguments),
        argv,
        prog="hf-eagle3 train",
        description="Train an EAGLE-3 draft head with training-time test; the final head lands in --output_dir.",
    )
    if script_args.data is None:
        parser.error("--data is required: the output of `hf-eagle3 prepare-data` or of `hf-eagle3 prepare-features`.")
    if script_args.target is None and not is_feature_directory(script_args.data):
        parser.error(
            f"--target is required: {script_args.data} holds tokenised rows, and online training runs the target on "
            "every batch (a registered offline target such as smollm2, a local checkpoint or a Hub id)."
        )
    final_dir = train_head(script_args, training_args)
    print(f"Saved the trained head to {final_dir}")
    return 0
