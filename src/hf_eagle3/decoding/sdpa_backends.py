"""Which scaled-dot-product-attention kernels the eager decoding paths let PyTorch choose from.

On CUDA, PyTorch may run `scaled_dot_product_attention` through cuDNN, which builds an execution plan for each new
combination of input shapes and keeps it for reuse. Plain decoding meets a few shapes; the eager EAGLE-3 paths meet new
ones at almost every forward (the dynamic cache grows by a different number of tokens each step, and the head's tree
levels and the verified tree change width), so the plans are built again and again, and the time goes into planning
rather than attention. Flash and memory-efficient attention need no plan per shape. The static-cache path keeps fixed
shapes in its captured steps, which are left alone; its eager prompt encoding meets a new length at almost every call,
and runs in this context too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

# Every backend but cuDNN's; the math kernel stays as the fallback for inputs the fused kernels reject.
SHAPE_STABLE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def shape_stable_attention() -> AbstractContextManager:
    """A context in which `scaled_dot_product_attention` picks among kernels that plan nothing per input shape."""
    return sdpa_kernel(list(SHAPE_STABLE_BACKENDS))


__all__ = ["SHAPE_STABLE_BACKENDS", "shape_stable_attention"]
