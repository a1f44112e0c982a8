"""`hf-eagle3 prepare-features`: store target features to train from (`hf_eagle3.trainer.jobs.write_features`)."""

from __future__ import annotations

from ..trainer.jobs import PrepareFeaturesArguments, write_features
from ._parsing import parse_options


def main(argv: list[str]) -> int:
    parser, (args,) = parse_options(
        (PrepareFeaturesArguments,),
        argv,
        prog="hf-eagle3 prepare-features",
        description="Run the target once over tokenised data and write feature shards to train from.",
    )
    missing = [
        flag
        for flag, value in (("--target", args.target), ("--data", args.data), ("--output_dir", args.output_dir))
        if value is None
    ]
    if missing:
        parser.error(
            f"{', '.join(missing)} required: the target, the tokenised rows and the feature directory to write."
        )
    write_features(args)
    return 0
