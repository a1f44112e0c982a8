"""`hf-eagle3` command line: one subcommand per job, each a thin layer over a library function.

Subcommand modules import lazily, so `hf-eagle3 --help` loads neither torch nor transformers and a subcommand
only needs the dependencies of its own job.
"""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module, one-line help); each module has `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_eagle3.cli.demo", "answer a few prompts with and without the shipped SmolLM2 head"),
    "convert": ("hf_eagle3.cli.convert", "convert a draft head to another checkpoint layout"),
    "prepare-data": ("hf_eagle3.cli.prepare_data", "tokenise chat data (or let the target write it) + draft vocab"),
    "prepare-features": ("hf_eagle3.cli.prepare_features", "store target features to train from"),
    "train": ("hf_eagle3.cli.train", "train an EAGLE-3 head with training-time test (Eagle3Trainer)"),
}


def _usage() -> str:
    lines = ["usage: hf-eagle3 [--version] [-h] <command> [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`hf-eagle3 <command> --help` lists a command's options."]
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a message comes (it may be swapped after setup, e.g. in tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Show the library's progress messages (logger `hf_eagle3`, INFO) on stderr; results go to stdout."""
    logger = logging.getLogger("hf_eagle3")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from .. import __version__

        print(f"hf-eagle3 {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(_usage().splitlines()[0], file=sys.stderr)
        print(f"hf-eagle3: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    setup_logging()
    from .. import _install

    _install()  # every command works with heads and targets: register the head, install the generate hook
    module_name, _ = COMMANDS[argv[0]]
    return importlib.import_module(module_name).main(argv[1:]) or 0
