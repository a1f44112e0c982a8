"""The draft vocabulary: the target ids a head may propose, chosen by frequency in the training data.

A head with a reduced vocabulary (EAGLE-3's default is 32000 ids) has a smaller `lm_head` and drafts
faster; it can only ever propose the ids it keeps, so they are the ids the target writes most often
in the assistant turns it is trained on. The maps use the layout of published EAGLE-3 checkpoints:
`d2t[i] = target_id(i) - i` (int64, one per draft id) and `t2d[j]` = whether target id j is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..vocab_maps import vocab_maps_consistent

VOCAB_MAP_NAME = "vocab_map.safetensors"


def _token_batches(dataset: Iterable[Mapping[str, list[int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids, loss_mask)` as flat int64 / bool tensors, many rows at a time where the data allows."""
    datasets = sys.modules.get("datasets")  # a `datasets.Dataset` exists only once `datasets` is imported
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        import pyarrow.compute as pc

        # Arrow batches instead of rows: converting each row to Python lists is ~1000x slower.
        columns = dataset.select_columns(["input_ids", "loss_mask"]).with_format("arrow")
        for table in columns.iter(batch_size=1024):
            input_ids = pc.list_flatten(table["input_ids"]).to_numpy().astype(np.int64)
            loss_mask = pc.list_flatten(table["loss_mask"]).to_numpy().astype(bool)
            yield torch.from_numpy(input_ids), torch.from_numpy(loss_mask)
        return
    for example in dataset:
        yield (
            torch.as_tensor(example["input_ids"], dtype=torch.long),
            torch.as_tensor(example["loss_mask"], dtype=torch.bool),
        )


def count_loss_tokens(dataset: Iterable[Mapping[str, list[int]]], vocab_size: int) -> torch.Tensor:
    """How often each target id occurs at positions with `loss_mask == 1`, as int64 `[vocab_size]`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for input_ids, loss_mask in _token_batches(dataset):
        if input_ids.shape != loss_mask.shape:
            raise ValueError("Every row's `loss_mask` must be as long as its `input_ids`.")
        learned = input_ids[loss_mask]
        if learned.numel() and int(learned.max()) >= vocab_size:
            raise ValueError(
                f"Token id {int(learned.max())} is outside the target vocabulary ({vocab_size} ids): the data was "
                "tokenised with a tokenizer that does not belong to this target."
            )
        counts += torch.bincount(learned, minlength=vocab_size)
    return counts


def build_vocab_maps(
    token_counts: torch.Tensor | Mapping[int, int] | Iterable[Mapping[str, list[int]]],
    draft_vocab_size: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The `draft_vocab_size` most frequent target ids as EAGLE-3 `d2t`/`t2d` maps.

    Args:
        token_counts: counts per target id (a `[vocab_size]` tensor or an `{id: count}` mapping), or a
            tokenised dataset whose loss-masked tokens are counted.
        draft_vocab_size: how many ids the head keeps.
        vocab_size: the target's vocabulary size (its embedding rows, `config.vocab_size`).

    Returns:
        `d2t` int64 `[draft_vocab_size]`, `t2d` bool `[vocab_size]` and the coverage: the share of
        counted tokens whose id is kept. Kept ids are sorted ascending; when fewer ids than
        `draft_vocab_size` occur, the rest is filled with unused ids (lowest first).
    """
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} must be between 1 and the target's vocab_size ({vocab_size})."
        )
    if isinstance(token_counts, torch.Tensor):
        counts = token_counts.to(torch.long)
        if counts.shape != (vocab_size,):
            raise ValueError(f"token_counts has shape {tuple(counts.shape)}, expected ({vocab_size},).")
    elif isinstance(token_counts, Mapping):
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for token_id, count in token_counts.items():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"Token id {token_id} is outside the target vocabulary ({vocab_size} ids).")
            counts[token_id] = count
    else:
        counts = count_loss_tokens(token_counts, vocab_size)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("No loss-masked tokens were counted: the draft vocabulary would be arbitrary.")
    # A stable sort keeps ties (and the zero-count padding ids) in ascending id order.
    kept = torch.sort(torch.argsort(-counts, stable=True)[:draft_vocab_size]).values
    d2t = kept - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[kept] = True
    coverage = int(counts[kept].sum()) / total
    return d2t, t2d, coverage


def vocab_coverage(dataset: torch.Tensor | Iterable[Mapping[str, list[int]]], t2d: torch.Tensor) -> float:
    """The share of a dataset's loss-masked tokens (or of tokens counted per id, `count_loss_tokens`) whose id the
    draft vocabulary `t2d` keeps: measured on data the vocabulary was not chosen on, the figure a head will meet."""
    counts = dataset if isinstance(dataset, torch.Tensor) else count_loss_tokens(dataset, t2d.numel())
    total = int(counts.sum())
    if total == 0:
        raise ValueError("No loss-masked tokens were counted: coverage is undefined.")
    return int(counts[t2d].sum()) / total


def coverage_by_size(
    counts: torch.Tensor, sizes: Iterable[int], measured_counts: torch.Tensor | None = None
) -> dict[int, float]:
    """For each size `n`: the share of `measured_counts`' tokens (default `counts`' own) that the `n` ids most frequent
    in `counts` keep, as `build_vocab_maps` would choose them; how coverage grows with the draft vocabulary, each
    extra id costing a row of the head's output layer."""
    ranked = torch.argsort(-counts, stable=True)
    measured = counts if measured_counts is None else measured_counts
    cumulative = measured[ranked].cumsum(0)
    total = int(cumulative[-1])
    if total == 0:
        raise ValueError("No loss-masked tokens were counted: coverage is undefined.")
    return {size: int(cumulative[min(size, ranked.numel()) - 1]) / total for size in sizes}


def _vocab_map_file(path: str | os.PathLike) -> str:
    return os.path.join(path, VOCAB_MAP_NAME) if os.path.isdir(path) else os.fspath(path)


def save_vocab_map(path: str | os.PathLike, d2t: torch.Tensor, t2d: torch.Tensor) -> str:
    """Write the maps as safetensors (keys `d2t`, `t2d`); a folder gets `vocab_map.safetensors`. Returns the file."""
    file = _vocab_map_file(path)
    save_file({"d2t": d2t.to(torch.long).contiguous(), "t2d": t2d.to(torch.bool).contiguous()}, file)
    return file


def load_vocab_map(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(d2t, t2d)` written by `save_vocab_map` (a file, or a folder holding `vocab_map.safetensors`)."""
    file = _vocab_map_file(path)
    tensors = load_file(file)
    if set(tensors) != {"d2t", "t2d"}:
        raise ValueError(f"{file} holds {sorted(tensors)}; a vocabulary map holds exactly 'd2t' and 't2d'.")
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    target_ids = d2t + torch.arange(d2t.numel())
    # Written maps keep their ids ascending (`build_vocab_maps`); a head only needs them distinct.
    if not (bool((target_ids[1:] > target_ids[:-1]).all()) and vocab_maps_consistent(d2t, t2d)):
        raise ValueError(f"{file}: d2t and t2d do not describe the same draft vocabulary.")
    return d2t, t2d
