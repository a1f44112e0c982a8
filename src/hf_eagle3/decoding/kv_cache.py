"""Keep only the accepted path of a verified draft tree in a transformers `DynamicCache`.

transformers can only crop a cache from the end (`DynamicCache.crop`), which is all chain decoding
needs. A tree puts every node after the prefix, and the accepted path is a scattered subset of them,
so its entries are gathered to the front of the tree block first and the rest is cropped away.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


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

    `keep` indexes the block of positions after `start` (e.g. the accepted tree nodes, in path order).
    Only `len(keep)` entries per layer are copied, so the cost does not grow with the prefix.
    """
    total = cache.get_seq_length()
    kept = start + keep.numel()
    if kept > total:
        raise ValueError(f"Cannot keep {keep.numel()} positions after {start}: the cache holds only {total}.")
    source = keep + start
    for layer in cache.layers:
        if not layer.is_initialized or not keep.numel():
            continue
        # Layers may live on different devices (`device_map`).
        source = source.to(layer.keys.device)
        # Advanced indexing on the right copies the rows first, so overlapping source/destination is safe.
        layer.keys[..., start:kept, :] = layer.keys[..., source, :]
        layer.values[..., start:kept, :] = layer.values[..., source, :]
    if kept < total:
        cache.crop(kept - total)


__all__ = ["check_tree_cache", "keep_cache_positions"]
