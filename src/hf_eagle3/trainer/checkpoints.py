"""What a run may do with its output folder, and which of its checkpoints can be resumed.

transformers' `Trainer` writes into `output_dir` whatever it holds (since v5, without an `overwrite_output_dir`
switch) and resumes `resume_from_checkpoint=True` from the highest-numbered `checkpoint-N` folder, complete or not.
A run started over a trained head would replace it, and a later resume would pick up the older run's checkpoints; a
process killed during a save leaves a `checkpoint-N` that cannot be loaded. Here a fresh run refuses a folder that
holds files unless asked to overwrite it, and a resume takes the newest complete checkpoint.

A checkpoint is complete when its `trainer_state.json` reads back: `Trainer` writes that file last, after the
weights, optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Files of which a checkpoint holds at least one: the head (sharded or not), a PEFT adapter, an FSDP state dict.
WEIGHT_FILE_PATTERN = re.compile(
    r"^(model\.safetensors(\.index\.json)?|pytorch_model\.bin(\.index\.json)?|adapter_model\.(safetensors|bin)"
    r"|pytorch_model_fsdp.*)$"
)
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "not a folder"
    state = checkpoint / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}, which Trainer writes last: the save was interrupted"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE_NAME} is truncated or unreadable: the save was interrupted"
    if not any(WEIGHT_FILE_PATTERN.match(entry.name) for entry in checkpoint.iterdir()):
        return "no model weights"
    return None


def checkpoints_newest_first(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, highest N first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    numbered = [
        (int(match[1]), entry) for entry in output_dir.iterdir() if (match := _CHECKPOINT_PATTERN.match(entry.name))
    ]
    return [entry for _, entry in sorted(numbered, reverse=True) if entry.is_dir()]


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path, list[Path]]:
    """The newest complete checkpoint of `output_dir`, and the incomplete ones newer than it (logged as skipped)."""
    skipped: list[tuple[Path, str]] = []
    for checkpoint in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if skipped:
                logger.warning(
                    f"Skipping incomplete checkpoint(s) {'; '.join(f'{path.name}: {why}' for path, why in skipped)}. "
                    f"Resuming from {checkpoint}, the newest complete one; the skipped ones are removed, as this run "
                    "saves those steps again."
                )
            return checkpoint, [path for path, _ in skipped]
        skipped.append((checkpoint, problem))
    if skipped:
        raise ValueError(
            f"No complete checkpoint in {output_dir} to resume from: "
            f"{'; '.join(f'{path.name}: {why}' for path, why in skipped)}. Start the run afresh with "
            "`overwrite_output_dir=True` (`--overwrite_output_dir`), which deletes them."
        )
    raise ValueError(
        f"There is no checkpoint-N folder in {output_dir} to resume from. Drop `resume_from_checkpoint` to start a "
        "run (checkpoints are saved every `save_steps` steps), or point it at a checkpoint folder."
    )


def prepare_output_dir(
    output_dir: str, overwrite_output_dir: bool, resume_from_checkpoint: str | bool | None
) -> tuple[str | None, list[Path]]:
    """Check what a run is about to do with `output_dir`: returns the checkpoint to resume from (None for a fresh run)
    and the folders to delete before it starts (by the main process, once every process has checked).

    - A fresh run needs an empty or new `output_dir`; with `overwrite_output_dir` it starts over in it, and the older
      run's `checkpoint-N` folders go (a later resume would pick them up, and this run's saves would mix with them).
    - `resume_from_checkpoint=True` takes the newest complete checkpoint; incomplete ones newer than it go (this run
      writes those steps again).
    - A checkpoint path must be complete; the error names what is missing.
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file; a run writes a folder. Pass a folder path.")
    if resume_from_checkpoint is True:
        checkpoint, skipped = last_complete_checkpoint(output)
        return str(checkpoint), skipped
    if resume_from_checkpoint:
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem is not None:
            siblings = checkpoints_newest_first(Path(resume_from_checkpoint).parent)
            newest = next((path for path in siblings if checkpoint_problem(path) is None), None)
            hint = f" The newest complete checkpoint beside it is {newest}." if newest is not None else ""
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.{hint}")
        return str(resume_from_checkpoint), []
    entries = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
    if not entries:
        return None, []
    if not overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"output_dir {output_dir} already holds files ({shown}): a new run would overwrite the head and "
            "checkpoints saved there. Resume that run with `resume_from_checkpoint=True` (`--resume_from_checkpoint "
            "latest`), start over in it with `overwrite_output_dir=True` (`--overwrite_output_dir`), or pick "
            "another folder."
        )
    stale = checkpoints_newest_first(output)
    if stale:
        logger.warning(
            f"overwrite_output_dir: deleting the earlier run's {', '.join(p.name for p in stale)} in {output}."
        )
    return None, stale


__all__ = ["checkpoint_problem", "checkpoints_newest_first", "last_complete_checkpoint", "prepare_output_dir"]
