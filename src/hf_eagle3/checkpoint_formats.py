"""The EAGLE-3 checkpoint layouts users meet, and conversion between them and ours.

Four layouts hold the same one-layer head under different configs, key names and layer numbering:

- ``hf-eagle3``: this library's own `save_pretrained` (config `model_type: eagle3`).
- ``eagle3``: the official EAGLE-3 releases: a `LlamaConfig` (`LlamaForCausalLM`) plus `draft_vocab_size`;
  the feature layers are implied (2, L//2, L-3) and not stored.
- ``specforge`` (also what SGLang reads): `LlamaForCausalLMEagle3` with
  `eagle_config.eagle_aux_hidden_state_layer_ids` numbered as "output of layer i", i.e. ours minus one.
- ``speculators`` (what vLLM reads best): `Eagle3Speculator` with `speculators_config`, the layer's
  `LlamaConfig` as `transformer_layer_config`, `layers.0.` instead of `midlayer.`, `embed_tokens.weight` saved and
  layer ids in our numbering.

vLLM's own `Eagle3LlamaForCausalLM` config (SpecForge's keys, layer ids numbered as ours) is read too, never written:
exports for vLLM use the speculators layout.

Serving engines skip keys they do not know, so a wrong export starts fine and drafts badly; this module therefore
loads strictly and names every mismatch. Weights are read from safetensors, or from `.bin` with
`torch.load(weights_only=True)`: nothing in a checkpoint is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import hf_hub_download, save_torch_state_dict
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig

from .configuration_eagle3 import Eagle3Config, default_target_layer_ids
from .json_files import read_json

if TYPE_CHECKING:
    from .modeling_eagle3 import Eagle3DraftModel

NATIVE_LAYOUT = "hf-eagle3"
OFFICIAL_LAYOUT = "eagle3"
SPECFORGE_LAYOUT = "specforge"
SPECULATORS_LAYOUT = "speculators"
# vLLM's own name for the SpecForge-style layout, whose layer ids vLLM reads as "input of layer"; read only.
VLLM_LLAMA_LAYOUT = "vllm-llama"

# Names accepted by `save_pretrained(format=...)` and `hf-eagle3 convert --to`, mapped to the layout they write.
# SGLang reads SpecForge's layout; vLLM reads several, but only the speculators one carries layer ids in a numbering
# vLLM and this library share (vLLM reads `eagle_config` ids as "input of layer", SGLang as "output of layer").
FORMATS: dict[str, str] = {
    NATIVE_LAYOUT: NATIVE_LAYOUT,
    OFFICIAL_LAYOUT: OFFICIAL_LAYOUT,
    SPECFORGE_LAYOUT: SPECFORGE_LAYOUT,
    "sglang": SPECFORGE_LAYOUT,
    "vllm": SPECULATORS_LAYOUT,
    SPECULATORS_LAYOUT: SPECULATORS_LAYOUT,
}

SPECFORGE_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
OFFICIAL_ARCHITECTURE = "LlamaForCausalLM"
VLLM_ARCHITECTURE = "Eagle3LlamaForCausalLM"

# Keyword arguments of `from_pretrained` that say where to find files, passed on to `hf_hub_download`.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")

# Norm switches of EAGLE-3.1-style heads. speculators and vLLM name and mean them as Eagle3Config does. SpecForge's
# draft class reads `fc_norm` alike but its `norm_output` (default true) means "norm before lm_head", which is our
# `norm_before_lm_head`; it reads no other switch. The official EAGLE code reads none. Some switches add no tensors,
# so strict loading alone would not notice a switch read wrong.
SPECULATORS_SWITCHES = ("norm_before_fc", "fc_norm", "norm_before_residual", "norm_output")
SPECFORGE_SWITCHES = ("fc_norm", "norm_before_lm_head")

# Weight files in the order they are looked for: safetensors first.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Buffers a checkpoint may leave out when the draft vocabulary is the whole target vocabulary.
OPTIONAL_KEYS = ("d2t", "t2d")
EMBEDDING_KEY = "embed_tokens.weight"


def checkpoint_layout(format: str) -> str:
    """The layout written for a user-facing format name, with a clear error for unknown names."""
    if format not in FORMATS:
        raise ValueError(f"Unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}.")
    return FORMATS[format]


def detect_layout(config: dict[str, Any], source: str = "the checkpoint") -> str:
    """Tell the layout of a checkpoint from its `config.json` contents."""
    architectures = config.get("architectures") or []
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise ValueError(
                f"{source} is a speculators {config['speculators_model_type']!r} model, not an EAGLE-3 head; "
                "only `speculators_model_type: eagle3` checkpoints can be loaded as Eagle3DraftModel."
            )
        return SPECULATORS_LAYOUT
    if config.get("model_type") == Eagle3Config.model_type:
        return NATIVE_LAYOUT
    if VLLM_ARCHITECTURE in architectures:
        return VLLM_LLAMA_LAYOUT
    if SPECFORGE_ARCHITECTURE in architectures or "eagle_config" in config:
        return SPECFORGE_LAYOUT
    if OFFICIAL_ARCHITECTURE in architectures and "draft_vocab_size" in config:
        return OFFICIAL_LAYOUT
    raise ValueError(
        f"{source} is not a recognised EAGLE-3 checkpoint (model_type={config.get('model_type')!r}, "
        f"architectures={architectures}). Supported layouts: this library's (`model_type: eagle3`), official EAGLE-3 "
        f"(`{OFFICIAL_ARCHITECTURE}` with `draft_vocab_size`), SpecForge/SGLang (`{SPECFORGE_ARCHITECTURE}`) and "
        f"speculators/vLLM (`{SPECULATORS_ARCHITECTURE}`). A full language model is a target, not a draft head."
    )


# ---------------------------------------------------------------------------------------------------- configs
def _head_dimensions(layer_config: dict[str, Any]) -> dict[str, Any]:
    """Eagle3Config fields read from a Llama-style config of the head's layer.

    Parsed by transformers' `LlamaConfig` so that legacy `rope_theta`/`rope_scaling` and the newer
    `rope_parameters` land in the same place; a config without any gets the default base 10000, as the released
    heads were trained with.
    """
    llama = LlamaConfig(**{key: value for key, value in layer_config.items() if key != "model_type"})
    return {
        "vocab_size": llama.vocab_size,
        "hidden_size": llama.hidden_size,
        "intermediate_size": llama.intermediate_size,
        "num_attention_heads": llama.num_attention_heads,
        "num_key_value_heads": llama.num_key_value_heads,
        "head_dim": llama.head_dim,
        "hidden_act": llama.hidden_act,
        "rms_norm_eps": llama.rms_norm_eps,
        "max_position_embeddings": llama.max_position_embeddings,
        "rope_parameters": dict(llama.rope_parameters),
        "attention_bias": llama.attention_bias,
        "mlp_bias": llama.mlp_bias,
        "pad_token_id": llama.pad_token_id,
        "bos_token_id": llama.bos_token_id,
        "eos_token_id": llama.eos_token_id,
    }


def config_from_checkpoint(config: dict[str, Any], layout: str, **overrides) -> Eagle3Config:
    """Build our config from a foreign `config.json`, translating the layer ids and norm switches into ours."""
    if layout == SPECULATORS_LAYOUT:
        if config.get("embed_requires_grad"):
            raise ValueError(
                "This speculators head trained its own token embedding (`embed_requires_grad: true`); this library "
                "always uses the target's frozen embedding, which would change the head's outputs."
            )
        layer_config = config.get("transformer_layer_config") or {}
        if layer_config.get("num_hidden_layers", 1) != 1:
            raise ValueError(
                f"This speculators head has {layer_config['num_hidden_layers']} decoder layers; an EAGLE-3 head "
                "as released, and as this library runs it, has exactly one."
            )
        verifier = (config.get("speculators_config") or {}).get("verifier") or {}
        values = _head_dimensions(layer_config)
        values["target_layer_ids"] = config.get("eagle_aux_hidden_state_layer_ids")
        values["target_name_or_path"] = verifier.get("name_or_path")
        values["target_architectures"] = verifier.get("architectures") or None
    else:
        # The official and SpecForge configs are the head's LlamaConfig itself. One official release says
        # `num_hidden_layers: 40` and is still a one-layer head, so that field is not read; the weights decide.
        values = _head_dimensions(config)
        eagle_config = config.get("eagle_config") or {}
        if eagle_config.get("use_aux_hidden_state") is False:
            raise ValueError(
                "This head sets `eagle_config.use_aux_hidden_state: false`: it reads the target's last layer only "
                "(EAGLE-1/2 style), not the three feature layers of EAGLE-3."
            )
        values["target_layer_ids"] = None
        if layout == SPECFORGE_LAYOUT:
            # SpecForge/SGLang number "output of layer i", which is the input of layer i + 1 (ours).
            output_ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
            values["target_layer_ids"] = [i + 1 for i in output_ids] if output_ids else None
        elif layout == VLLM_LLAMA_LAYOUT:
            # vLLM reads them at the top level or in `eagle_config`, numbered as ours.
            values["target_layer_ids"] = config.get("eagle_aux_hidden_state_layer_ids") or eagle_config.get(
                "eagle_aux_hidden_state_layer_ids"
            )
    values.update(_switches_from_checkpoint(config, layout))
    values["draft_vocab_size"] = config.get("draft_vocab_size")
    values["target_hidden_size"] = config.get("target_hidden_size")
    known = {field.name for field in dataclasses.fields(Eagle3Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"Unexpected keyword arguments {unknown}: neither loading options nor Eagle3Config fields.")
    values.update(overrides)
    return Eagle3Config(**values)


def _switches_from_checkpoint(config: dict[str, Any], layout: str) -> dict[str, bool]:
    """The head's norm switches, each key read with the meaning its layout's own loader gives it."""
    if layout in (SPECULATORS_LAYOUT, VLLM_LLAMA_LAYOUT):
        # vLLM also takes `norm_before_fc` from `eagle_config`, before the top level.
        eagle_config = config.get("eagle_config") or {}
        switches = {name: bool(eagle_config.get(name, config.get(name, False))) for name in SPECULATORS_SWITCHES}
        if layout == SPECULATORS_LAYOUT and switches["norm_before_fc"] and switches["fc_norm"]:
            raise ValueError(
                "This speculators head sets both `norm_before_fc` and `fc_norm`, which speculators itself refuses as "
                "mutually exclusive; the config was edited or written by another tool."
            )
        return switches
    if layout == SPECFORGE_LAYOUT:
        ignored = sorted(name for name in ("norm_before_fc", "norm_before_residual") if config.get(name))
        if ignored:
            raise ValueError(
                f"This SpecForge/SGLang head sets {ignored}, which SpecForge's draft class does not read, so a head it "
                "trained never used them and one written elsewhere means a computation this layout does not define. "
                "Export it in the speculators/vLLM layout, which defines them."
            )
        return {
            "fc_norm": bool(config.get("fc_norm", False)),
            "norm_before_lm_head": bool(config.get("norm_output", True)),
        }
    set_switches = sorted(name for name in SPECULATORS_SWITCHES if config.get(name))
    if set_switches:
        raise ValueError(
            f"This head sets {set_switches} but is in the official EAGLE-3 layout, whose code reads none of them, so "
            "their meaning is unknown. Load the head from the layout of the tool that trained it (speculators/vLLM or "
            "SpecForge), which says what they mean."
        )
    return {}


def _check_switches_fit(config: Eagle3Config, layout: str) -> None:
    """Refuse an export whose readers would silently ignore or misread one of the head's norm switches."""
    switches = config.variant_switches
    if layout == OFFICIAL_LAYOUT:
        carried: tuple[str, ...] = ()
        reader = "the official EAGLE-3 code"
    elif layout == SPECFORGE_LAYOUT:
        carried, reader = SPECFORGE_SWITCHES, "SpecForge's draft class"
    else:
        carried, reader = SPECULATORS_SWITCHES, "speculators and vLLM"
    lost = sorted(set(switches) - set(carried))
    if lost:
        formats = [
            name
            for name, switches_there in (("speculators", SPECULATORS_SWITCHES), ("specforge", SPECFORGE_SWITCHES))
            if set(switches) <= set(switches_there)
        ]
        where = f"; export to {' or '.join(repr(f) for f in formats)} instead" if formats else ""
        raise ValueError(
            f"This head sets {', '.join(f'{name}={switches[name]}' for name in lost)}, which {reader} does not "
            f"implement: the exported head would run a different computation{where}."
        )
    if layout == SPECULATORS_LAYOUT and config.norm_before_fc and config.fc_norm:
        raise ValueError(
            "This head sets both `norm_before_fc` and `fc_norm`, which speculators' config refuses as mutually "
            "exclusive, so it has no speculators/vLLM export. Train the head with one of them."
        )


def _legacy_llama_fields(config: Eagle3Config, max_position_embeddings: int, dtype: torch.dtype) -> dict[str, Any]:
    """The head's layer as a Llama config dict.

    RoPE is written as `rope_theta`/`rope_scaling`: every transformers release reads those (v5 converts them),
    and so do the serving engines, while older readers ignore v5's `rope_parameters`.
    """
    rope = dict(config.rope_parameters or {})
    rope_theta = rope.pop("rope_theta", 10000.0)
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": config.vocab_size,
        "rope_theta": rope_theta,
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": False,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def verifier_name_or_path(target_name_or_path: str | None) -> str | None:
    """What a speculators config names as its verifier: something speculators and vLLM can resolve.

    speculators loads the verifier at load time and vLLM serves it, from any working directory: a local
    directory is written as an absolute path, and the short name of a target this library registers offline
    (e.g. "smollm2-135m-instruct") as the Hub id of the model it was converted from.
    """
    if not target_name_or_path:
        return None
    if os.path.isdir(target_name_or_path):
        return os.path.abspath(target_name_or_path)
    from .offline_models import get_offline_target

    registered = get_offline_target(target_name_or_path)
    return registered.original_id if registered is not None else target_name_or_path


def _layer_ids_are_default(config: Eagle3Config) -> bool:
    ids = config.target_layer_ids
    if ids is None:
        return True
    layers = config.target_num_hidden_layers
    return layers is not None and list(ids) == default_target_layer_ids(layers)


def checkpoint_config(
    config: Eagle3Config, layout: str, dtype: torch.dtype, target_max_position_embeddings: int | None = None
) -> dict[str, Any]:
    """The `config.json` of a foreign layout, with layer ids in that layout's numbering."""
    _check_switches_fit(config, layout)
    max_positions = max(config.max_position_embeddings, target_max_position_embeddings or 0)
    llama = _legacy_llama_fields(config, max_positions, dtype)
    eagle = {"draft_vocab_size": config.draft_vocab_size, "target_hidden_size": config.target_hidden_size}
    ids = config.target_layer_ids
    if layout == OFFICIAL_LAYOUT:
        if not _layer_ids_are_default(config):
            raise ValueError(
                f"The official EAGLE-3 layout cannot store target layer ids; readers assume [2, L//2, L-3], but this "
                f"head reads {ids} of a {config.target_num_hidden_layers or 'unknown'}-layer target. Export to "
                "'specforge'/'sglang' or 'vllm'/'speculators', which store the ids."
            )
        # The official loader reads the target's embedding only when the config has no `target_hidden_size` (its
        # releases never carry the embedding), and loads weights non-strictly: with the key, it would run silently
        # on a randomly initialised embedding.
        if config.target_hidden_size != config.hidden_size:
            raise ValueError(
                f"The official EAGLE-3 code loads the target's embedding only for heads as wide as the target; this "
                f"head is {config.hidden_size} wide for a {config.target_hidden_size}-wide target. Export to "
                "'specforge'/'sglang' or 'vllm'/'speculators'."
            )
        return {"architectures": [OFFICIAL_ARCHITECTURE], **llama, "draft_vocab_size": config.draft_vocab_size}
    if layout == SPECFORGE_LAYOUT:
        eagle_config: dict[str, Any] = {"use_aux_hidden_state": True}
        if ids is not None:
            if min(ids) < 1:
                raise ValueError(
                    f"Target layer ids {ids} include 0 (the embedding output), which SpecForge/SGLang's 'output of "
                    "layer' numbering cannot express. Export to 'vllm'/'speculators' instead."
                )
            eagle_config["eagle_aux_hidden_state_layer_ids"] = [i - 1 for i in ids]
        values = {"architectures": [SPECFORGE_ARCHITECTURE], **llama, **eagle, "eagle_config": eagle_config}
        if config.fc_norm:
            values["fc_norm"] = True
        if not config.norm_before_lm_head:
            # SpecForge's `norm_output` (default true) is "norm before lm_head". Written only when false: vLLM and
            # TensorRT-LLM read the same key on this architecture as "feed the post-norm state back", so a `true`
            # here would change how they run a released head.
            values["norm_output"] = False
        return values
    if layout == SPECULATORS_LAYOUT:
        values = {
            "architectures": [SPECULATORS_ARCHITECTURE],
            "speculators_model_type": "eagle3",
            **eagle,
            # All written explicitly: some vLLM versions assumed `norm_before_residual` true when it was absent.
            **{name: getattr(config, name) for name in SPECULATORS_SWITCHES},
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [
                    {
                        "proposal_type": "greedy",
                        "speculative_tokens": 3,
                        "verifier_accept_k": 1,
                        "accept_tolerance": 0.0,
                    }
                ],
                "verifier": {
                    "name_or_path": verifier_name_or_path(config.target_name_or_path),
                    "architectures": config.target_architectures or [],
                },
            },
            "transformer_layer_config": llama,
            "torch_dtype": llama["torch_dtype"],
        }
        if ids is not None:
            values["eagle_aux_hidden_state_layer_ids"] = list(ids)
        return values
    raise ValueError(f"{layout!r} is not a foreign layout; the native one is written by `save_pretrained`.")


# ---------------------------------------------------------------------------------------------------- weights
def state_dict_to_native(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a foreign layout's keys to ours. A saved `embed_tokens.weight` is dropped: the head uses the
    target's embedding, attached at run time."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key == EMBEDDING_KEY:
            continue
        if layout == SPECULATORS_LAYOUT and key.startswith("layers.0."):
            key = "midlayer." + key.removeprefix("layers.0.")
        renamed[key] = tensor
    return renamed


def state_dict_from_native(model: Eagle3DraftModel, layout: str) -> dict[str, torch.Tensor]:
    """Our weights under a foreign layout's keys. Only speculators saves the (target's) embedding, and only when one
    is attached; vLLM falls back to the target's own when it is absent."""
    exported = {}
    for key, tensor in model.state_dict().items():
        if key == EMBEDDING_KEY:
            if layout == SPECULATORS_LAYOUT and model.has_target_embeddings:
                exported[key] = tensor
            continue
        if layout == SPECULATORS_LAYOUT and key.startswith("midlayer."):
            key = "layers.0." + key.removeprefix("midlayer.")
        exported[key] = tensor
    return exported


@contextmanager
def explaining_corrupt_safetensors(source: str) -> Iterator[None]:
    """Turn safetensors' bare header error into one that says what probably happened and what to do."""
    try:
        yield
    except SafetensorError as error:
        raise ValueError(
            f"{source}: a safetensors file is not readable ({error}). It is probably truncated or corrupt, e.g. an "
            "interrupted download or copy: delete it and download or save it again."
        ) from error


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        with explaining_corrupt_safetensors(path):
            return load_file(path)
    try:
        # weights_only: a pickle may run arbitrary code; this refuses anything but tensors and plain containers.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} could not be read as a PyTorch weights file with weights_only=True ({error}). It is corrupt, "
            "or it holds more than tensors; this library never unpickles code from a checkpoint."
        ) from error


class CheckpointFiles:
    """Finds a checkpoint's files in a local directory or a hub repository (downloaded, never executed)."""

    def __init__(self, name_or_path: str | os.PathLike, **hub_kwargs):
        self.name_or_path = os.fspath(name_or_path)
        self.subfolder = hub_kwargs.pop("subfolder", "") or ""
        self.hub_kwargs = hub_kwargs

    def get(self, filename: str) -> str | None:
        """The local path of `filename`, or None when the checkpoint has no such file."""
        if os.path.isdir(self.name_or_path):
            path = os.path.join(self.name_or_path, self.subfolder, filename)
            return path if os.path.isfile(path) else None
        try:
            return hf_hub_download(self.name_or_path, filename, subfolder=self.subfolder or None, **self.hub_kwargs)
        except EntryNotFoundError:  # not in the repo, or (offline) not in the local cache
            return None
        except HFValidationError as error:
            raise ValueError(
                f"{self.name_or_path} is neither a local directory nor a hub repo id ('namespace/name')."
            ) from error

    def read_config(self) -> dict[str, Any]:
        path = self.get("config.json")
        if path is None:
            raise ValueError(
                f"{self.name_or_path} has no config.json: it is not a model checkpoint (or, offline, it is not in "
                "the local cache)."
            )
        return read_json(path)

    def read_state_dict(self) -> dict[str, torch.Tensor]:
        for filename in WEIGHT_FILES:
            path = self.get(filename)
            if path is None:
                continue
            if not filename.endswith(".index.json"):
                return _load_weight_file(path)
            shards = sorted(set(read_json(path)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                shard_path = self.get(shard)
                if shard_path is None:
                    raise ValueError(f"{self.name_or_path}: shard {shard} named in {filename} is missing.")
                state_dict.update(_load_weight_file(shard_path))
            return state_dict
        raise ValueError(f"{self.name_or_path} has no weights: none of {', '.join(WEIGHT_FILES)} was found.")


def load_state_dict_strictly(model: Eagle3DraftModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor the head has, and name any tensor missing, extra or of the wrong shape.

    `load_state_dict(strict=True)` would stop at the first problem with a PyTorch message; a head that loads
    partially would draft garbage without failing. Vocab maps may be absent only when they would be the identity,
    which `check_vocab_maps` verifies.
    """
    expected = {key: tensor for key, tensor in model.state_dict().items() if key != EMBEDDING_KEY}
    missing = sorted(set(expected) - set(state_dict) - set(OPTIONAL_KEYS))
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source} holds tensors an EAGLE-3 head does not have: {unexpected}. It is a different model or an "
            "EAGLE-3 variant (extra norms or layers) that this library does not implement."
        )
    if missing:
        raise ValueError(f"{source} lacks tensors of the EAGLE-3 head: {missing}. The checkpoint is incomplete.")
    wrong_shapes = [
        f"{key} is {tuple(tensor.shape)}, the config implies {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong_shapes:
        raise ValueError(
            f"{source}: tensors do not match the shapes its config.json describes: {'; '.join(wrong_shapes)}. The "
            "config and the weights belong to different heads, or the config was edited."
        )
    model.load_state_dict(state_dict, strict=False)
    model.check_vocab_maps()


def check_loading_info(loading_info: dict[str, Any], source: str) -> None:
    """Raise on the tensors transformers' loader reported missing or unexpected in one of our own saves."""
    missing = sorted(set(loading_info["missing_keys"]) - set(OPTIONAL_KEYS))
    unexpected = sorted(loading_info["unexpected_keys"])
    if missing:
        raise ValueError(f"{source} lacks tensors of the EAGLE-3 head: {missing}. The checkpoint is incomplete.")
    if unexpected:
        raise ValueError(
            f"{source} holds tensors an EAGLE-3 head does not have: {unexpected}. It was saved by a different model "
            "or an incompatible version of this library."
        )


def load_converted(
    model_class: type[Eagle3DraftModel],
    name_or_path: str | os.PathLike,
    layout: str,
    files: CheckpointFiles,
    config: dict[str, Any],
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device_map: str | torch.device | int | None = None,
    **overrides,
) -> Eagle3DraftModel:
    """Build an Eagle3DraftModel from a foreign checkpoint (see `Eagle3DraftModel.from_pretrained`)."""
    source = os.fspath(name_or_path)
    head_config = config_from_checkpoint(config, layout, **overrides)
    state_dict = state_dict_to_native(files.read_state_dict(), layout)
    if dtype in (None, "auto"):
        # Like transformers' dtype="auto": keep the precision the head was saved in.
        dtype = state_dict["fc.weight"].dtype if "fc.weight" in state_dict else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = model_class._from_config(head_config, dtype=dtype, **kwargs)
    load_state_dict_strictly(model, state_dict, source)
    if device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError(
                "A dict `device_map` is not supported for a one-layer head; pass one device, e.g. 'cuda'."
            )
        if device_map == "auto":  # one layer: the whole head goes on the accelerator when there is one
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device_map)
    model.config.name_or_path = source
    return model.eval()


def split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the `from_pretrained` keyword arguments that locate files."""
    return {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}


# ---------------------------------------------------------------------------------------------------- export
@contextmanager
def covering_max_positions(config: Eagle3Config, target_max_position_embeddings: int | None) -> Iterator[None]:
    """Temporarily raise `max_position_embeddings` to the target's, for a save. Serving engines stop drafting
    beyond the head's max positions; the head's own (default) RoPE has no such limit, so the model is unchanged."""
    saved = config.max_position_embeddings
    config.max_position_embeddings = max(saved, target_max_position_embeddings or 0)
    try:
        yield
    finally:
        config.max_position_embeddings = saved


def _check_speculators_loadable(model: Eagle3DraftModel, config: dict[str, Any]) -> None:
    """speculators loads its verifier (the target) when it loads a head, and takes the token embedding from the
    checkpoint: a head naming no target does not load, and one without the embedding runs on a blank one."""
    if config["speculators_config"]["verifier"]["name_or_path"] is None:
        raise ValueError(
            "Cannot write the speculators/vLLM layout: the head does not name its target, which speculators loads as "
            "the verifier. Set `head.config.target_name_or_path` to the target's Hub id or directory, or pass "
            "`--target` to `hf-eagle3 convert`."
        )
    if not model.has_target_embeddings:
        raise ValueError(
            "Cannot write the speculators/vLLM layout: it stores the target's token embedding (speculators reads it "
            "from the checkpoint), and none is attached. Call `head.attach_target(target)` before "
            "`save_pretrained(format='speculators')`, or pass `--target` to `hf-eagle3 convert`."
        )


def _embedding_from_file(path: str, name: str | None = None) -> torch.Tensor | None:
    """The tensor `name` (default: the shortest name ending in `embed_tokens.weight`) of one weight file."""
    if path.endswith(".safetensors"):
        with explaining_corrupt_safetensors(path), safe_open(path, framework="pt") as file:
            names = [name] if name else [key for key in file.keys() if key.endswith(EMBEDDING_KEY)]
            return file.get_tensor(min(names, key=len)) if names else None
    state_dict = _load_weight_file(path)
    names = [name] if name else [key for key in state_dict if key.endswith(EMBEDDING_KEY)]
    return state_dict[min(names, key=len)] if names else None


def read_target_embedding(files: CheckpointFiles) -> torch.Tensor:
    """The input embedding table alone from a target's checkpoint, without building the model.

    A full target can be far larger than memory allows for a conversion; safetensors files are read tensor by
    tensor. The table is the tensor named `...embed_tokens.weight` (`model.` for causal LMs, deeper for
    multimodal ones; the shortest such name when several match).
    """
    for filename in WEIGHT_FILES:
        path = files.get(filename)
        if path is None:
            continue
        embedding = None
        if filename.endswith(".index.json"):
            weight_map = read_json(path)["weight_map"]
            names = [name for name in weight_map if name.endswith(EMBEDDING_KEY)]
            if names:
                name = min(names, key=len)
                shard = files.get(weight_map[name])
                if shard is None:
                    raise ValueError(f"{files.name_or_path}: shard {weight_map[name]} named in {filename} is missing.")
                embedding = _embedding_from_file(shard, name)
        else:
            embedding = _embedding_from_file(path)
        if embedding is None:
            raise ValueError(f"{files.name_or_path}: no `{EMBEDDING_KEY}` tensor was found in {filename}.")
        return embedding
    raise ValueError(
        f"{files.name_or_path} has no weights ({', '.join(WEIGHT_FILES)}), so the target's token embedding cannot be "
        "read from it; pass the target's checkpoint directory or Hub id."
    )


def save_converted(
    model: Eagle3DraftModel,
    save_directory: str | os.PathLike,
    layout: str,
    target_max_position_embeddings: int | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write `model` in a foreign layout: `config.json` plus safetensors (sharded with an index when large)."""
    config = checkpoint_config(model.config, layout, model.dtype, target_max_position_embeddings)
    if layout == SPECULATORS_LAYOUT:
        _check_speculators_loadable(model, config)
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")
    save_torch_state_dict(state_dict_from_native(model, layout), save_directory, max_shard_size=max_shard_size)


def load_target_embedding(name_or_path: str | os.PathLike) -> torch.Tensor:
    """The target's input embedding table: read alone from its checkpoint (a full target may not fit in memory),
    or from a registered offline target's GGUF file, which has no tensor to read alone."""
    from .offline_models import load_target, resolve_offline_target

    if resolve_offline_target(name_or_path) is not None or str(name_or_path).endswith(".gguf"):
        model, _ = load_target(name_or_path, load_tokenizer=False)
        return model.get_input_embeddings().weight.detach()
    return read_target_embedding(CheckpointFiles(str(name_or_path)))


__all__ = [
    "FORMATS",
    "CheckpointFiles",
    "checkpoint_config",
    "checkpoint_layout",
    "config_from_checkpoint",
    "detect_layout",
    "load_converted",
    "save_converted",
    "state_dict_from_native",
    "state_dict_to_native",
]
