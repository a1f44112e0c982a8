"""Keep only the accepted path of a verified draft tree in a transformers KV cache.

transformers can only crop a cache from the end (`DynamicCache.crop`), which is all chain decoding
needs. A tree puts every node after the prefix, and the accepted path is a scattered subset of them,
so its entries are gathered to the front of the tree block first and the rest is cropped away.

Static caches (`StaticLayer`) keep their length in a device tensor (`cumulative_length`) that `update`
writes at and advances. Setting it directly crops or extends a static cache without a host round trip,
which is what lets the static tree path (`static_tree.py`) run as CUDA graphs.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer


def check_tree_cache(cache: Cache | None, max_length: int) -> None:
    """Raise unless `cache` is a `DynamicCache` whose layers tree decoding can compact.

    Full-attention layers always work. Sliding-window layers work while the whole sequence fits in the
    window: then they keep every position, and the tree mask (which knows no window) is exact for them.
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"EAGLE-3 tree decoding needs a DynamicCache (the default), got {type(cache).__name__}. Let `generate` "
            "create its default cache: drop `cache_implementation` and any cache object you passed."
        )
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            continue
        if type(layer) is DynamicSlidingWindowLayer:
            if max_length <= layer.sliding_window:
                continue
            raise ValueError(
                f"Layer {index} of the target uses sliding-window attention (window {layer.sliding_window}), which a "
                f"draft-tree mask cannot express beyond the window; this call may reach {max_length} tokens. Lower "
                "`max_length`/`max_new_tokens` to fit the window, or pass eagle3_mode='chain'."
            )
        raise ValueError(
            f"EAGLE-3 tree decoding cannot compact cache layer {index} of type {type(layer).__name__}; it supports "
            "full-attention DynamicCache layers. Pass eagle3_mode='chain' for this model."
        )


def keep_cache_positions(cache: DynamicCache, start: int, keep: torch.LongTensor) -> None:
    """Keep positions `[0, start)` and `start + keep` (in that order) of every layer; drop all later ones.

    `keep` indexes the block of positions after `start` (e.g. the accepted tree nodes, in path order): `(k,)` for
    every row, or `(batch, k)`, each row its own. Only `k` entries per row and layer are copied, so the cost does
    not grow with the prefix.
    """
    total = cache.get_seq_length()
    kept = start + keep.shape[-1]
    if kept > total:
        raise ValueError(f"Cannot keep {keep.shape[-1]} positions after {start}: the cache holds only {total}.")
    source = keep + start
    for layer in cache.layers:
        if not layer.is_initialized or not keep.numel():
            continue
        # Layers may live on different devices (`device_map`).
        source = source.to(layer.keys.device)
        # The source rows are read out before the destination is written, so overlapping them is safe.
        if source.dim() == 1:
            layer.keys[..., start:kept, :] = layer.keys[..., source, :]
            layer.values[..., start:kept, :] = layer.values[..., source, :]
        else:
            layer.keys[..., start:kept, :] = _gather_positions(layer.keys, source)
            layer.values[..., start:kept, :] = _gather_positions(layer.values, source)
    if kept < total:
        cache.crop(kept - total)


def _gather_positions(states: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """`states[b, :, positions[b]]` for every row `b`: `(batch, heads, k, dim)` from `(batch, heads, length, dim)`."""
    batch, heads, _, dim = states.shape
    index = positions[:, None, :, None].expand(batch, heads, positions.shape[1], dim)
    return states.gather(2, index)


def static_cache_problem(cache: Cache) -> str | None:
    """Why static tree decoding cannot use `cache`, or None when every layer is a full-attention `StaticLayer`
    whose length lives on the device."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is not StaticLayer:
            return (
                f"cache layer {index} of the target would be a {type(layer).__name__} (sliding-window, chunked or "
                "linear attention), whose entries a draft-tree mask cannot address"
            )
        if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            return (
                "this transformers release's StaticLayer keeps no device-side length (`cumulative_length`), which "
                "the static path sets to crop and extend the cache"
            )
    return None


def set_cache_length(cache: Cache, length: torch.Tensor | int) -> None:
    """Make every layer of a static cache hold its first `length` positions (a device scalar or an int).

    Later `update`s write from there; entries beyond it are left in place and must be masked by the caller.
    """
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def keep_static_cache_positions(
    cache: Cache, start: torch.Tensor, keep: torch.LongTensor, num_kept: torch.Tensor
) -> None:
    """`keep_cache_positions` for a static cache, all on the device: keep `[0, start)` and `start + keep[:num_kept]`.

    `start` and `num_kept` are device scalars (or ints) and `keep` has a fixed length, so the copies have fixed
    shapes; the rows of `keep` past `num_kept` are copied too and lie beyond the new length. `keep` is `(k,)` for
    every row, or `(batch, k)`, each row its own (written to the same `k` positions).
    """
    source = start + keep
    destination = start + torch.arange(keep.shape[-1], device=keep.device)
    for layer in cache.layers:
        # The rows are read out first, so overlapping source and destination is safe.
        for states in (layer.keys, layer.values):
            rows = states.index_select(2, source) if source.dim() == 1 else _gather_positions(states, source)
            states.index_copy_(2, destination, rows)
    set_cache_length(cache, start + num_kept)


__all__ = [
    "check_tree_cache",
    "keep_cache_positions",
    "keep_static_cache_positions",
    "set_cache_length",
    "static_cache_problem",
]
