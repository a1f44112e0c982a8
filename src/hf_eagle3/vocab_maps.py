"""The draft-vocabulary maps' layout, shared by the model (which checks them) and the data tools (which build them).

`d2t[i] = target_id(i) - i` (int64, one per draft id) and `t2d[j]` = whether target id j is in the draft vocabulary,
as published EAGLE-3 checkpoints store them.
"""

from __future__ import annotations

import torch


def vocab_maps_consistent(d2t: torch.Tensor, t2d: torch.Tensor) -> bool:
    """Whether `d2t` names distinct target ids within the vocabulary of `t2d` and `t2d` marks exactly those."""
    if d2t.dim() != 1 or t2d.dim() != 1:  # before the arithmetic below, which would broadcast or fail on them
        return False
    target_ids = d2t + torch.arange(d2t.numel(), device=d2t.device)
    vocab_size = t2d.numel()
    return (
        target_ids.unique().numel() == d2t.numel()
        and int(t2d.sum()) == d2t.numel()
        and bool((target_ids >= 0).all() and (target_ids < vocab_size).all())
        and bool(t2d[target_ids.clamp(0, vocab_size - 1)].all())
    )


__all__ = ["vocab_maps_consistent"]
