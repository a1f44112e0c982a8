"""Options of the dataclass-driven commands: flags, a YAML config, or a config overridden by flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_options(dataclass_types: Sequence[type], argv: list[str], prog: str, description: str | None = None):
    """Parse `argv` into instances of `dataclass_types` with TRL's `TrlParser`; returns the parser and them.

    Options come as flags (`--learning_rate 1e-4`, or dashed: `--learning-rate`), from a YAML file
    (`--config train.yaml`; a JSON file works too) whose values flags then override, or from the file alone as
    the only argument (`hf-eagle3 train train.yaml`).
    """
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog, description=description)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0], *argv[1:]]
    options: tuple[Any, ...] = parser.parse_args_and_config(argv)
    return parser, options
