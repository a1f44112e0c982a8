"""JSON and JSON Lines files read with errors that name the file, the line and the fix.

`json.load` reports a position but not the file; `datasets` reports an empty JSON Lines file as a bare
`StopIteration`, and loads bytes that are not UTF-8 without a word, to fail when the row is read with a pyarrow error
naming neither file nor row.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any


def _not_utf8(path: str | os.PathLike, data: bytes, error: UnicodeDecodeError, first_line: int = 1) -> str:
    """The message for a byte of `data` (which starts at line `first_line` of `path`) that is not UTF-8."""
    line = first_line + data.count(b"\n", 0, error.start)
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return (
        f"{path}, line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8 ({error.reason}). "
        "JSON files are UTF-8: re-encode it (e.g. `iconv -f latin1 -t utf-8`), or restore it if it is corrupt."
    )


def check_utf8(path: str | os.PathLike) -> None:
    """Raise a ValueError naming the line of the first byte of `path` (optionally `.gz`) that is not UTF-8.

    pyarrow's JSON reader, under `datasets`, loads such bytes without a word and fails only when the row is read.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(_not_utf8(path, line, error, first_line=number)) from error


def read_json(path: str | os.PathLike) -> Any:
    """The contents of a JSON file; a ValueError names the file and where it stops being UTF-8 JSON."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(_not_utf8(path, data, error)) from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. It was truncated "
            "or edited by hand: fix it, or restore or re-download it."
        ) from error


def json_rows_problem(path: str | os.PathLike) -> str | None:
    """What keeps a `.json`/`.jsonl` (optionally `.gz`) data file from holding rows, or None when it reads fine.

    A `.json` file may hold one JSON document (a list of rows) or JSON Lines, as `datasets` accepts; each row must be
    an object. Meant for explaining a failed `datasets.load_dataset`, so it reads the whole file.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    text = data.decode("utf-8", errors="replace")  # `check_utf8` judges the encoding
    if not text.strip():
        return f'{path} is empty (or blank): it holds no rows. Write one JSON object per line, e.g. {{"messages": [...]}}.'
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # JSON Lines, read line by line below
    if isinstance(document, list):
        if not document:
            return f"{path} holds an empty list: there are no rows."
        wrong = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None)
        if wrong is not None:
            return f"{path}, row {wrong}: a {type(document[wrong]).__name__}, not an object (a row is a JSON object)."
        return None
    if isinstance(document, dict):
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return (
                f"{path}, line {number}: not a JSON object ({error.msg} at column {error.colno}). JSON Lines hold one "
                "complete object per line: fix or remove that line."
            )
        if not isinstance(row, dict):
            return f"{path}, line {number}: a {type(row).__name__}, not an object (each line must be one JSON object)."
    return None


__all__ = ["check_utf8", "json_rows_problem", "read_json"]
