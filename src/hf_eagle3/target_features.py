"""Read the three feature layers EAGLE-3 needs out of a stock transformers target.

Forward pre-hooks on the decoder layers see the residual stream ENTERING layer `i` in every
transformers release and under PEFT wrappers, whereas `output_hidden_states` changes its
indexing between releases and materialises every layer. Index `i` here equals index `i` of
transformers' `hidden_states` tuple (see `Eagle3Config.target_layer_ids`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# sdpa kernels for batches padded to a new length nearly every call (training, stored features): cuDNN's attention,
# which sdpa may pick on recent GPUs, builds an execution plan on the host for each new shape, which can cost more
# than the step's arithmetic for a small target. These need no plan.
PADDED_BATCH_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def padded_batch_attention() -> contextlib.AbstractContextManager:
    """Context in which sdpa uses only kernels that cost nothing per new sequence length."""
    return sdpa_kernel(PADDED_BATCH_ATTENTION_BACKENDS)


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, looking through PEFT and multimodal wrappers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for candidate in (decoder, getattr(decoder, "language_model", None), getattr(model, "model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: EAGLE-3 needs a decoder-only causal LM whose "
        "layers live at `model.model.layers` (Llama, Qwen, Mistral, Gemma and most transformers LMs)."
    )


class TargetFeatureCapture:
    """Capture the inputs of the chosen target layers on every forward, concatenated as `(B, T, 3H)`.

    Use as a context manager around target forwards; `pop()` returns and clears the last capture.
    """

    def __init__(self, target: nn.Module, layer_ids: Sequence[int]):
        layers = get_decoder_layers(target)
        if any(not 0 <= i < len(layers) for i in layer_ids):
            raise ValueError(
                f"Target feature layers {list(layer_ids)} are out of range for a target with {len(layers)} decoder "
                "layers (each id is the input of a decoder layer, 0-based)."
            )
        self.layer_ids = list(layer_ids)
        self._layers = [layers[i] for i in self.layer_ids]
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, slot: int):
        def hook(module, args, kwargs):
            self._captured[slot] = args[0] if args else kwargs["hidden_states"]

        return hook

    def __enter__(self) -> TargetFeatureCapture:
        self._handles = [
            layer.register_forward_pre_hook(self._hook(slot), with_kwargs=True)
            for slot, layer in enumerate(self._layers)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = {}

    def pop(self) -> torch.Tensor:
        """The features of the last forward, `(batch, seq, 3 * hidden)`, low/mid/high in that order."""
        if len(self._captured) != len(self._layers):
            raise RuntimeError("No target forward ran since the last capture was taken.")
        features = torch.cat([self._captured[slot] for slot in range(len(self._layers))], dim=-1)
        self._captured = {}
        return features
