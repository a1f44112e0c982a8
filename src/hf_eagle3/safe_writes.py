"""Writing folders without destroying a user's files by surprise.

A destination that already holds files is refused unless the caller asks to overwrite it, and a folder is written
next to its destination first and moved into place only once complete: an interrupted or failed write leaves the
previous contents as they were, never a mixture of old and new files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_folder_destination(path: str | os.PathLike, overwrite: bool = True, flag: str = "overwrite=True") -> None:
    """Raise when `path` cannot receive a folder: it is a file, or (unless `overwrite`) a folder holding files.

    `flag` names how the caller asks for an overwrite (a command-line flag or an argument), for the message.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder: a checkpoint is a folder of files. Pass a folder path.")
    entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    if not overwrite and entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"{path} already holds files ({shown}). Pass {flag} to replace them, or pick another folder.")


@contextmanager
def staged_folder(
    destination: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True"
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `destination`; when the block completes, it becomes `destination`.

    An existing `destination` is refused unless `overwrite` (see `check_folder_destination`), and replaced as a
    whole when it is: files of an earlier save (another layout's shards, a stale index) do not survive next to the
    new ones. If the block raises, the temporary folder is removed and `destination` is untouched. The source of
    the write may be `destination` itself: it is only removed after the new folder is complete (a kill between the
    two renames that swap the folders leaves the old one in a `.NAME.replaced-*` folder beside it).
    """
    destination = Path(destination)
    check_folder_destination(destination, overwrite, flag)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination, so that the final move is a rename within one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.incomplete-", dir=destination.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = None
    if destination.exists():
        replaced = Path(tempfile.mkdtemp(prefix=f".{destination.name}.replaced-", dir=destination.parent))
        os.replace(destination, replaced / destination.name)
    os.replace(staging, destination)
    if replaced is not None:
        shutil.rmtree(replaced)


@contextmanager
def staged_files(destination: str | os.PathLike, replaced: re.Pattern[str]) -> Iterator[Path]:
    """Yield an empty temporary folder inside `destination`; when the block completes, its files move into
    `destination`, and files there matching `replaced` that the block did not write are removed.

    For a save into a folder that keeps other files (a training run's output folder): the files of an earlier save
    that this one no longer writes (a single weights file after shards, an index after a single file, a generation
    config the model no longer has) would otherwise be read together with the new ones. If the block raises, the
    earlier save is left as it was.
    """
    destination = Path(destination)
    check_folder_destination(destination)
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incomplete-save-", dir=destination))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = {entry.name for entry in staging.iterdir()}
    for name in written:
        target = destination / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    for entry in destination.iterdir():
        if entry.name not in written and entry.is_file() and replaced.fullmatch(entry.name):
            entry.unlink()


__all__ = ["check_folder_destination", "staged_files", "staged_folder"]
