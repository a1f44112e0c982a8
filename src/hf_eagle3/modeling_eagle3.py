"""The EAGLE-3 draft head as a transformers model.

One decoder layer reads the fused features of three target layers (`fc`), or its own previous
output when it drafts further ahead, together with the embedding of the next token, and predicts
the token after that over a (possibly reduced) draft vocabulary. Parameter and buffer names equal
the keys of published EAGLE-3 checkpoints (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so
official, SpecForge and SGLang heads load without renaming.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import GENERATION_CONFIG_NAME, ModelOutput

from . import checkpoint_formats
from .configuration_eagle3 import Eagle3Config, default_target_layer_ids
from .safe_writes import check_folder_destination, staged_files
from .vocab_maps import vocab_maps_consistent

# Files a save writes that a later save may not: weights (single or sharded, with their index) and the generation
# config. Those of an earlier save that the new one does not rewrite are removed with it.
SAVED_FILE_PATTERN = re.compile(
    r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?|generation_config\.json"
)


@dataclass
class Eagle3DraftOutput(ModelOutput):
    """Output of one draft step.

    Args:
        logits: draft-vocabulary logits, `(batch, seq, draft_vocab_size)`.
        hidden_states: the output of the decoder layer, `(batch, seq, hidden_size)`, pre-norm (or after the
            final norm when `config.norm_output`); this is what the next draft step reads as its hidden input.
        cache: the head's KV cache, when one was passed or `use_cache` was set. (Named `cache` as in
            transformers >= 5.24, whose outputs also answer to `past_key_values`.)
    """

    logits: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    cache: Cache | None = None


def expand_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """Turn any mask the head accepts into the additive float 4D mask `(batch, 1, q, past + q)`.

    - 4D float: used as is (trees and training build their own).
    - 4D bool: True means "may attend"; converted, because eager attention would add it as 0/1.
    - 2D `(batch, past + q)` padding mask or None: causal over the query block, padding masked.
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                ~attention_mask, min_value
            )
        return attention_mask.to(dtype)
    kv_length = past_length + query_length
    query_positions = torch.arange(past_length, kv_length, device=device)
    key_positions = torch.arange(kv_length, device=device)
    allowed = key_positions[None, :] <= query_positions[:, None]
    allowed = allowed[None, None].expand(batch_size, 1, query_length, kv_length)
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"2D attention_mask has length {attention_mask.shape[-1]}, expected past + current = {kv_length}."
            )
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, min_value)


class Eagle3Attention(nn.Module):
    """Llama attention whose projections read `[embedding ; hidden]`, i.e. `2 * hidden_size` features."""

    def __init__(self, config: Eagle3Config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        in_features = 2 * config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(in_features, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_features, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_features, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output)


class Eagle3DecoderLayer(nn.Module):
    """The head's single layer: normalise hidden and embedding apart, attend over both, then a SwiGLU MLP."""

    def __init__(self, config: Eagle3Config, layer_idx: int = 0):
        super().__init__()
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.norm_before_residual = config.norm_before_residual

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        normed = self.hidden_norm(hidden_states)
        residual = normed if self.norm_before_residual else hidden_states
        # Embedding first, then hidden: the released heads were trained with this order.
        attn_input = torch.cat([self.input_layernorm(inputs_embeds), normed], dim=-1)
        hidden_states = residual + self.self_attn(attn_input, position_embeddings, attention_mask, past_key_values)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class Eagle3PreTrainedModel(PreTrainedModel):
    config: Eagle3Config
    config_class = Eagle3Config
    base_model_prefix = "eagle3"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Eagle3DecoderLayer"]
    # Trees and training-time test need arbitrary 4D masks: flash attention cannot take them, and
    # flex attention would need a BlockMask of its own.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # The frozen input embedding is the target's: attached at run time, not saved, not expected on load.
    _keys_to_ignore_on_save = ["embed_tokens.weight"]
    _keys_to_ignore_on_load_missing = [r"embed_tokens\.weight"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Eagle3DraftModel):
            module.d2t.zero_()
            module.t2d.fill_(module.config.draft_vocab_size == module.config.vocab_size)


class Eagle3DraftModel(Eagle3PreTrainedModel):
    """EAGLE-3 draft head.

    Inputs are aligned as in the released heads: at position `t` the head combines the target
    features of position `t` with the embedding of token `t + 1` and predicts token `t + 2`.
    Call `attach_target(target)` before use: it checks the head fits the target and shares the
    target's input embedding.
    """

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_tokens.weight.requires_grad_(False)
        features = 3 * config.target_hidden_size
        # EAGLE-3.1 norms of the target features: over all three at once, or one per layer (see Eagle3Config).
        self.input_norm = LlamaRMSNorm(features, eps=config.rms_norm_eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(LlamaRMSNorm(config.target_hidden_size, eps=config.rms_norm_eps) for _ in range(3))
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(features, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self._freeze_unused_parameters()
        # d2t[i] = target_id(i) - i; t2d[j] = whether target id j is in the draft vocabulary.
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        self.has_target_embeddings = False
        # Decoding knobs for `generate(assistant_model=head)` (`eagle3_total_tokens`, ...), under the call's own
        # kwargs; saved and loaded with the head as `generation_config.json`.
        self.generation_config: GenerationConfig | None = None
        # Set by each `target.generate(..., assistant_model=head)` call: an `Eagle3GenerationStats`.
        self.last_generation_stats = None
        self.post_init()
        # A head drafts only through the package's `generate` hook, which the first name taken from `hf_eagle3`
        # installs; a head reached another way (a submodule import) installs it here, once. Looked up at run time:
        # the hook's own module imports this one.
        importlib.import_module(__package__)._install()

    def _freeze_unused_parameters(self) -> None:
        """Freeze the target's embedding, and `norm` when nothing reads it (`norm_before_lm_head=False`): DDP
        expects a gradient for every trainable parameter."""
        self.embed_tokens.weight.requires_grad_(False)
        self.norm.weight.requires_grad_(self.config.norm_before_lm_head)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ------------------------------------------------------------------ target
    def check_target(self, target: PreTrainedModel | PreTrainedConfig) -> None:
        """Raise a clear error when this head was not made for `target` (a model or its config)."""
        target_config = target if isinstance(target, PreTrainedConfig) else target.config
        text_config = target_config.get_text_config()
        name = getattr(target_config, "_name_or_path", "") or text_config.model_type
        problems = []
        if text_config.hidden_size != self.config.target_hidden_size:
            problems.append(
                f"hidden size: the head's fc expects 3 x {self.config.target_hidden_size} target features, "
                f"the target has hidden_size {text_config.hidden_size}"
            )
        if text_config.vocab_size != self.config.vocab_size:
            problems.append(
                f"vocabulary: the head has vocab_size {self.config.vocab_size}, the target {text_config.vocab_size}"
            )
        if text_config.hidden_size != self.config.hidden_size:
            problems.append(
                f"embedding width: the head embeds tokens with the target's table, which is {text_config.hidden_size} "
                f"wide, but the head's hidden_size is {self.config.hidden_size}"
            )
        layer_ids = self.config.target_layer_ids or []
        if layer_ids and max(layer_ids) >= text_config.num_hidden_layers:
            problems.append(
                f"layers: the head reads target layers {layer_ids}, the target has only {text_config.num_hidden_layers}"
            )
        if problems:
            made_for = self.config.target_name_or_path or "another target"
            raise ValueError(
                f"This EAGLE-3 head (made for {made_for}) does not fit the target {name}: "
                + "; ".join(problems)
                + ". Load the head trained for this target, or train one with `hf-eagle3 train`."
            )

    def attach_target(self, target: PreTrainedModel) -> Eagle3DraftModel:
        """Check the head fits `target`, then share the target's frozen input embedding.

        The head needs the target's token embedding; published heads do not store it. Sharing avoids
        a second copy of the largest tensor; it is copied only when device or dtype differ.
        """
        self.check_target(target)
        if self.config.target_layer_ids is None:
            self.config.target_layer_ids = default_target_layer_ids(target.config.get_text_config().num_hidden_layers)
        if self.config.target_num_hidden_layers is None:
            self.config.target_num_hidden_layers = target.config.get_text_config().num_hidden_layers
        # Published heads often do not say which target they were made for; exports name it (speculators, vLLM).
        if self.config.target_name_or_path is None:
            self.config.target_name_or_path = getattr(target.config, "_name_or_path", None) or None
        return self.set_target_embeddings(target.get_input_embeddings().weight)

    def set_target_embeddings(self, weight: torch.Tensor) -> Eagle3DraftModel:
        """Use `weight`, the target's input embedding table, as the head's frozen token embedding.

        `attach_target` calls this; a converter that only has the target's checkpoint passes the tensor read from it.
        """
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"The target's embedding is {tuple(weight.shape)}, the head expects "
                f"{tuple(self.embed_tokens.weight.shape)} (target vocabulary x hidden size)."
            )
        mine = self.embed_tokens.weight
        if weight.device == mine.device and weight.dtype == mine.dtype:
            shared = isinstance(weight, nn.Parameter) and not weight.requires_grad
            self.embed_tokens.weight = weight if shared else nn.Parameter(weight.detach(), requires_grad=False)
        else:
            with torch.no_grad():
                mine.copy_(weight.to(device=mine.device, dtype=mine.dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.has_target_embeddings = True
        return self

    # ------------------------------------------------------------------ vocabularies
    def draft_to_target_ids(self, draft_ids: torch.LongTensor) -> torch.LongTensor:
        """Map draft-vocabulary ids to target ids (`target = draft + d2t[draft]`)."""
        return draft_ids + self.d2t[draft_ids]

    @property
    def draft_vocab_target_ids(self) -> torch.LongTensor:
        """The target id of every draft id, in draft order (`d2t` holds offsets, not ids)."""
        return self.draft_to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))

    def target_to_draft_ids(self, target_ids: torch.LongTensor) -> torch.LongTensor:
        """Map target ids to draft ids; ids outside the draft vocabulary become -1."""
        inverse = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        inverse[self.draft_vocab_target_ids] = torch.arange(self.config.draft_vocab_size, device=self.d2t.device)
        return inverse[target_ids]

    def draft_logits_to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocabulary logits into the full target vocabulary, `-inf` elsewhere."""
        if not self.config.uses_draft_vocab:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab_target_ids.to(logits.device), logits)

    def check_vocab_maps(self) -> None:
        """Raise when a reduced draft vocabulary has no valid `d2t`/`t2d` maps (e.g. they were never loaded)."""
        if not self.config.uses_draft_vocab:
            return
        if not vocab_maps_consistent(self.d2t, self.t2d):
            raise ValueError(
                f"The head predicts over a draft vocabulary of {self.config.draft_vocab_size} ids (target vocabulary "
                f"{self.config.vocab_size}) but its d2t/t2d maps are missing or inconsistent. Load a checkpoint that "
                "contains them, or build them with `hf_eagle3.build_vocab_maps` from your training data."
            )

    @torch.no_grad()
    def set_draft_vocab(self, d2t: torch.LongTensor, t2d: torch.BoolTensor) -> Eagle3DraftModel:
        """Switch the head to another draft vocabulary, e.g. one drawn from the data it will be trained on next.

        A head can only propose the ids its vocabulary keeps, so continuing it on text whose frequent tokens
        differ wants the new data's vocabulary. The `lm_head` rows of target ids both vocabularies keep are
        carried over; ids new to the head start from the mean of those rows (an average logit, which training
        then corrects). The size may change. Returns the head.
        """
        d2t = torch.as_tensor(d2t, dtype=torch.long).to(self.d2t.device)
        t2d = torch.as_tensor(t2d, dtype=torch.bool).to(self.t2d.device)
        size = d2t.numel()
        if t2d.shape != (self.config.vocab_size,) or not vocab_maps_consistent(d2t, t2d):
            raise ValueError(
                f"The new d2t/t2d maps are inconsistent: d2t must give {size} distinct target ids below "
                f"{self.config.vocab_size} and t2d must mark exactly those. Build them with "
                "`hf_eagle3.build_vocab_maps` (or `hf-eagle3 prepare-data`)."
            )
        old_rows = self.target_to_draft_ids(torch.arange(size, device=d2t.device) + d2t)
        carried = old_rows >= 0
        weight = self.lm_head.weight
        rows = weight[old_rows[carried]]
        new_weight = (rows if len(rows) else weight).mean(dim=0, keepdim=True).repeat(size, 1)
        new_weight[carried] = rows
        self.lm_head = nn.Linear(self.config.hidden_size, size, bias=False, device=weight.device, dtype=weight.dtype)
        self.lm_head.weight.copy_(new_weight)
        self.d2t = d2t.clone()
        self.t2d = t2d.clone()
        self.config.draft_vocab_size = size
        return self

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a head from a local directory or hub repo, in this library's layout or a published one.

        Official EAGLE-3, SpecForge/SGLang and speculators/vLLM checkpoints are detected from their config and
        converted on load (layer ids translated, keys renamed, loaded strictly); this library's own saves go to
        transformers' loader. Foreign layouts take `dtype` (default: as saved), `attn_implementation`, one-device
        `device_map`, the hub options and Eagle3Config fields as overrides (e.g. `target_layer_ids`).
        """
        source = str(pretrained_model_name_or_path)
        files = None
        if pretrained_model_name_or_path is not None:
            hub_kwargs = checkpoint_formats.split_hub_kwargs(kwargs)
            files = checkpoint_formats.CheckpointFiles(pretrained_model_name_or_path, **hub_kwargs)
            config = files.read_config()
            layout = checkpoint_formats.detect_layout(config, source)
            if layout != checkpoint_formats.NATIVE_LAYOUT:
                if kwargs.get("config") is not None:
                    raise ValueError(
                        f"{source} is a {layout} checkpoint, converted from its own config: pass Eagle3Config "
                        "fields as keyword overrides instead of `config`."
                    )
                return checkpoint_formats.load_converted(
                    cls, pretrained_model_name_or_path, layout, files, config, **kwargs
                )
            kwargs.update(hub_kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        with checkpoint_formats.explaining_corrupt_safetensors(source):
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        # transformers only warns about missing or unexpected tensors and initialises the missing ones at random;
        # a head loaded that way drafts garbage, so refuse it (missing d2t/t2d are judged by check_vocab_maps).
        checkpoint_formats.check_loading_info(loading_info, source)
        model.check_vocab_maps()
        # transformers loads a generation config only for models that generate; a head's holds the decoding knobs
        # it was tuned with (`eagle3_total_tokens`, ...), which `generate(assistant_model=head)` reads.
        generation_config_file = files.get(GENERATION_CONFIG_NAME) if files is not None else None
        if generation_config_file is not None:
            model.generation_config = GenerationConfig.from_pretrained(os.path.dirname(generation_config_file))
        # The loader re-creates parameters, trainable by default.
        model._freeze_unused_parameters()
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(
        self,
        save_directory,
        *args,
        format: str = checkpoint_formats.NATIVE_LAYOUT,
        target_max_position_embeddings: int | None = None,
        **kwargs,
    ):
        """Save the head, in this library's layout or one another tool reads.

        Args:
            format: "hf-eagle3" (this library, transformers' saver), "eagle3" (official EAGLE-3 releases),
                "specforge" / "sglang" (layer ids written as "output of layer", ours minus one) or "vllm" /
                "speculators" (`Eagle3Speculator`). Foreign layouts take `max_shard_size` as their only option.
            target_max_position_embeddings: the target's context length; the saved `max_position_embeddings` is
                raised to cover it, because serving engines stop drafting beyond the head's.
        """
        checkpoint_formats.checkpoint_layout(format)  # an unknown name fails before anything is written
        check_folder_destination(save_directory)  # transformers only logs an error for a file, and writes nothing
        if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
            return self._save_in_layout(save_directory, format, target_max_position_embeddings, *args, **kwargs)
        # Written aside and moved in when complete, dropping the files of an earlier save this one does not replace.
        with staged_files(save_directory, SAVED_FILE_PATTERN) as staging:
            return self._save_in_layout(staging, format, target_max_position_embeddings, *args, **kwargs)

    def _save_in_layout(
        self, save_directory, format: str, target_max_position_embeddings: int | None, *args, **kwargs
    ):
        layout = checkpoint_formats.checkpoint_layout(format)
        if layout == checkpoint_formats.NATIVE_LAYOUT:
            with checkpoint_formats.covering_max_positions(self.config, target_max_position_embeddings):
                saved = super().save_pretrained(save_directory, *args, **kwargs)
            # Saved beside the config, as transformers does for generative models (see from_pretrained).
            if self.generation_config is not None and kwargs.get("is_main_process", True):
                self.generation_config.save_pretrained(save_directory)
            return saved
        if args:
            raise TypeError(f"save_pretrained(format={format!r}) takes options by keyword only.")
        return checkpoint_formats.save_converted(
            self, save_directory, layout, target_max_position_embeddings, **kwargs
        )

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the head and a model card rendered for it (target, usage, training data, acceptance).

        Takes `format`, `target_max_position_embeddings`, the card fields (`base_model`, `training_data`,
        `datasets`, `acceptance`, `license`, `tags`) and the usual commit options; see `hf_eagle3.hub.push_to_hub`.
        """
        from .hub import push_to_hub  # the card template machinery (jinja2) is needed only when publishing

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ forward
    def project_target_features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Fuse the concatenated (low, mid, high) target features into the head's width."""
        expected = 3 * self.config.target_hidden_size
        if target_hidden_states.shape[-1] != expected:
            raise ValueError(
                f"Target features have width {target_hidden_states.shape[-1]}, the head expects 3 x "
                f"{self.config.target_hidden_size} = {expected} (the three target layers concatenated)."
            )
        features = target_hidden_states.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            chunks = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(features)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from the states `forward` returns (already normed under `norm_output`)."""
        if self.config.norm_output or not self.config.norm_before_lm_head:
            return self.lm_head(hidden_states)
        return self.lm_head(self.norm(hidden_states))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        hidden_states: torch.Tensor | None = None,
        target_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Eagle3DraftOutput:
        r"""Run one draft step over many positions at once.

        Args:
            input_ids: target-vocabulary ids of the NEXT tokens (one ahead of the features).
            hidden_states: the head's own previous outputs (`Eagle3DraftOutput.hidden_states`), width `hidden_size`.
            target_hidden_states: concatenated target features, width `3 * target_hidden_size`; fused by `fc`.
                Pass exactly one of `hidden_states` and `target_hidden_states`.
            attention_mask: a 2D padding mask over past + current positions, or a 4D mask
                `(batch, 1, q, past + q)`, additive float (0 / dtype min) or boolean (True = attend).
            position_ids: real token positions; default: continue after the cache.
            logits_to_keep: if > 0, compute logits for the last that many positions only.
        """
        if (hidden_states is None) == (target_hidden_states is None):
            raise ValueError(
                "Pass exactly one of `hidden_states` (head width) and `target_hidden_states` (3 target layers)."
            )
        if target_hidden_states is not None:
            hidden_states = self.project_target_features(target_hidden_states)
        elif hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`hidden_states` must have the head's width {self.config.hidden_size}, got {hidden_states.shape[-1]}; "
                "pass concatenated target features as `target_hidden_states` instead."
            )
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` (or `inputs_embeds`).")
            if not self.has_target_embeddings:
                raise ValueError(
                    "The head has no token embedding yet: published EAGLE-3 heads reuse the target's. "
                    "Call `draft.attach_target(target)` first."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds = inputs_embeds.to(hidden_states.dtype)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        batch_size, query_length = hidden_states.shape[:2]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=hidden_states.device)
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
        mask = expand_attention_mask(
            attention_mask, query_length, past_length, hidden_states.dtype, hidden_states.device, batch_size
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.midlayer(inputs_embeds, hidden_states, position_embeddings, mask, past_key_values)
        if self.config.norm_output:
            hidden_states = self.norm(hidden_states)
        kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        return Eagle3DraftOutput(logits=self.compute_logits(kept), hidden_states=hidden_states, cache=past_key_values)


__all__ = ["Eagle3DraftModel", "Eagle3DraftOutput", "Eagle3PreTrainedModel", "expand_attention_mask"]
