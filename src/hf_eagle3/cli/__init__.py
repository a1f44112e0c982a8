"""`hf-eagle3` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Modules import lazily: `hf-eagle3 --help` stays fast
# and a subcommand only needs the dependencies of its own job.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("hf_eagle3.cli.demo", "main", "answer a few prompts with and without the shipped SmolLM2 head"),
    "convert": ("hf_eagle3.cli.convert", "main", "convert a draft head to another checkpoint layout"),
    "prepare-data": (
        "hf_eagle3.cli.prepare_data",
        "main",
        "tokenise chat data (or let the target write it) + draft vocab",
    ),
    "train": ("hf_eagle3.cli.train", "train", "train an EAGLE-3 head with training-time test (Eagle3Trainer)"),
    "prepare-features": (
        "hf_eagle3.cli.train",
        "prepare_features_main",
        "write target features for offline training",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = ["usage: hf-eagle3 <command> [options]", "", "commands:"]
        lines += [f"  {name:<18} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module_name, function_name, _ = COMMANDS[argv[0]]
    function = getattr(importlib.import_module(module_name), function_name)
    return function(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
