"""Configuration of the EAGLE-3 draft head."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


def default_target_layer_ids(num_hidden_layers: int) -> list[int]:
    """The low, middle and high feature layers EAGLE-3 reads: inputs of layers 2, L//2 and L-3."""
    if num_hidden_layers < 4:
        raise ValueError(
            f"EAGLE-3 reads three distinct target layers (2, L//2, L-3) and needs a target with at least 4 decoder "
            f"layers; this one has {num_hidden_layers}. Pass `target_layer_ids` explicitly for such a small target."
        )
    return [2, num_hidden_layers // 2, num_hidden_layers - 3]


# The released head's value of every norm switch that EAGLE-3.1-style heads change (see Eagle3Config).
VARIANT_DEFAULTS: dict[str, bool] = {
    "norm_before_fc": False,
    "fc_norm": False,
    "norm_before_residual": False,
    "norm_output": False,
    "norm_before_lm_head": True,
}


@strict
class Eagle3Config(PreTrainedConfig):
    r"""
    Configuration of an EAGLE-3 draft head: one decoder layer that reads a fusion of three target layers.

    The head's own dimensions mirror a Llama decoder layer. Its attention input is `2 * hidden_size` wide
    (token embedding and hidden state side by side), which the modeling file handles.

    Args:
        vocab_size: size of the TARGET's vocabulary (the frozen input embedding is the target's).
        draft_vocab_size: size of the head's output vocabulary; equal to `vocab_size` when no reduced
            vocabulary is used. `d2t`/`t2d` map between the two.
        target_hidden_size: hidden size of the target; `fc` maps `3 * target_hidden_size` to `hidden_size`.
        target_layer_ids: the three target feature layers, as indices into transformers' `hidden_states`
            tuple: index `i` is the residual stream ENTERING decoder layer `i` (index 0 is the embedding
            output). This is vLLM's convention; SpecForge and SGLang number the same tensors `i - 1`
            ("output of layer"). Export code translates.
        target_num_hidden_layers: the target's number of decoder layers, checked when a target is attached.
        target_model_type / target_architectures / target_name_or_path: what the head was made for.
        norm_before_fc: EAGLE-3.1 switch (speculators/vLLM): one RMSNorm (`input_norm`) over the three
            concatenated target features before `fc`.
        fc_norm: EAGLE-3.1 switch (speculators/vLLM/SpecForge): an RMSNorm per target feature layer
            (`fc_norm.0/1/2`) before concatenation and `fc`.
        norm_before_residual: speculators/vLLM switch: the decoder layer's residual is the hidden state after
            `hidden_norm` instead of before it.
        norm_output: EAGLE-3.1 switch (speculators/vLLM meaning): the state fed back to the next draft step is
            the output of the final `norm`, not the pre-norm state. Logits are unchanged.
        norm_before_lm_head: apply the final `norm` before `lm_head` (SpecForge writes this as its own
            `norm_output`, default true); false only for SpecForge heads trained without it.
    """

    model_type = "eagle3"

    vocab_size: int = 32000
    draft_vocab_size: int | None = None
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    target_hidden_size: int | None = None
    target_layer_ids: list[int] | None = None
    target_num_hidden_layers: int | None = None
    target_model_type: str | None = None
    target_architectures: list[str] | None = None
    target_name_or_path: str | None = None
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_before_residual: bool = False
    norm_output: bool = False
    norm_before_lm_head: bool = True

    def __post_init__(self, **kwargs):
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if self.target_layer_ids is None and self.target_num_hidden_layers is not None:
            self.target_layer_ids = default_target_layer_ids(self.target_num_hidden_layers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked by `@strict` on construction and on load."""
        if self.num_hidden_layers != 1:
            raise ValueError(
                f"An EAGLE-3 head has exactly one decoder layer, got num_hidden_layers={self.num_hidden_layers}."
            )
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size ({self.draft_vocab_size}) is larger than the target vocabulary ({self.vocab_size}); "
                "the draft vocabulary must be a subset of the target's."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.norm_output and not self.norm_before_lm_head:
            raise ValueError(
                "norm_output feeds the output of the final norm back, which lm_head then reads; it cannot be combined "
                "with norm_before_lm_head=False (no final norm before lm_head)."
            )
        if self.target_layer_ids is not None:
            if len(self.target_layer_ids) != 3:
                raise ValueError(
                    f"target_layer_ids must name three layers (low, middle, high), got {self.target_layer_ids}."
                )
            if self.target_num_hidden_layers is not None and not all(
                0 <= i < self.target_num_hidden_layers for i in self.target_layer_ids
            ):
                raise ValueError(
                    f"target_layer_ids {self.target_layer_ids} name inputs of target decoder layers "
                    f"(0..{self.target_num_hidden_layers - 1}), but the target has only {self.target_num_hidden_layers} "
                    "layers. Use ids made for this target, e.g. Eagle3Config.from_target_config(target.config)."
                )

    @property
    def variant_switches(self) -> dict[str, bool]:
        """The switches that differ from the released EAGLE-3 head, by field name (empty for a released head)."""
        return {
            name: getattr(self, name) for name, default in VARIANT_DEFAULTS.items() if getattr(self, name) != default
        }

    @property
    def uses_draft_vocab(self) -> bool:
        """Whether the head predicts over a reduced vocabulary (and so needs `d2t`/`t2d`)."""
        return self.draft_vocab_size != self.vocab_size

    @classmethod
    def from_target_config(
        cls,
        target_config: PreTrainedConfig,
        draft_vocab_size: int | None = None,
        target_layer_ids: list[int] | None = None,
        **kwargs,
    ) -> Eagle3Config:
        """Build a head config matching a target: same width, heads, GQA, head_dim and MLP size.

        The layer ids default to [2, L//2, L-3]; positions must cover the target's context, so
        `max_position_embeddings` is copied too. Any head dimension can be overridden by kwargs.
        """
        text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        num_layers = text_config.num_hidden_layers
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        values = {
            "vocab_size": text_config.vocab_size,
            "draft_vocab_size": draft_vocab_size,
            "hidden_size": text_config.hidden_size,
            "intermediate_size": text_config.intermediate_size,
            "num_attention_heads": text_config.num_attention_heads,
            "num_key_value_heads": getattr(text_config, "num_key_value_heads", None)
            or text_config.num_attention_heads,
            "head_dim": head_dim,
            "hidden_act": getattr(text_config, "hidden_act", "silu"),
            "rms_norm_eps": getattr(text_config, "rms_norm_eps", 1e-5),
            "max_position_embeddings": text_config.max_position_embeddings,
            "target_hidden_size": text_config.hidden_size,
            "target_num_hidden_layers": num_layers,
            "target_layer_ids": list(target_layer_ids) if target_layer_ids else default_target_layer_ids(num_layers),
            "target_model_type": text_config.model_type,
            "target_architectures": getattr(target_config, "architectures", None),
            "target_name_or_path": getattr(target_config, "_name_or_path", None) or None,
            "pad_token_id": getattr(text_config, "pad_token_id", None),
            "bos_token_id": getattr(text_config, "bos_token_id", None),
            "eos_token_id": getattr(text_config, "eos_token_id", None),
        }
        values.update(kwargs)
        return cls(**values)


__all__ = ["VARIANT_DEFAULTS", "Eagle3Config", "default_target_layer_ids"]
