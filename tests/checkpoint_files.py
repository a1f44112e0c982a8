"""EAGLE-3 checkpoints written by hand in each tool's published layout, and the logits check that they load right.

The layouts follow each tool's own code (config fields and key names), not this library's exporter, so import and
export are checked independently.
"""

import json

import torch
from safetensors.torch import save_file

from hf_eagle3 import Eagle3DraftModel

FEATURES = torch.randn(1, 5, 3 * 64, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))


def assert_same_logits(loaded: Eagle3DraftModel, head: Eagle3DraftModel, target) -> None:
    loaded.attach_target(target)
    assert isinstance(loaded, Eagle3DraftModel)
    torch.testing.assert_close(
        loaded(IDS, target_hidden_states=FEATURES).logits, head(IDS, target_hidden_states=FEATURES).logits
    )


def llama_config(head: Eagle3DraftModel, **extra) -> dict:
    """The head's layer as the LlamaConfig dict the official and SpecForge releases ship."""
    config = head.config
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": 2048,
        "vocab_size": config.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        # Fields the releases carry that mean nothing to the head.
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "transformers_version": "4.28.1",
        "use_cache": True,
        **extra,
    }


def published_weights(head: Eagle3DraftModel, with_maps: bool = True) -> dict[str, torch.Tensor]:
    """The released keys: `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`; no `embed_tokens`."""
    skipped = {"embed_tokens.weight"} | (set() if with_maps else {"d2t", "t2d"})
    return {key: tensor.clone() for key, tensor in head.state_dict().items() if key not in skipped}


def write(directory, config: dict, weights: dict[str, torch.Tensor], weights_file: str = "model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights_file.endswith(".safetensors"):
        save_file(weights, directory / weights_file)
    else:
        torch.save(weights, directory / weights_file)
    return directory


def write_official(directory, head, weights_file="model.safetensors", with_maps=True):
    # One official release says num_hidden_layers 40 and is still a one-layer head.
    config = llama_config(
        head,
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=40,
        draft_vocab_size=head.config.draft_vocab_size,
        target_hidden_size=head.config.target_hidden_size,
    )
    return write(directory, config, published_weights(head, with_maps), weights_file)


def write_specforge(directory, head, output_layer_ids):
    config = llama_config(
        head,
        architectures=["LlamaForCausalLMEagle3"],
        num_hidden_layers=1,
        draft_vocab_size=head.config.draft_vocab_size,
        eagle_config={"eagle_aux_hidden_state_layer_ids": output_layer_ids, "use_aux_hidden_state": True},
    )
    return write(directory, config, published_weights(head))


def write_speculators(directory, head, layer_ids, **extra):
    weights = {key.replace("midlayer.", "layers.0."): tensor for key, tensor in published_weights(head).items()}
    weights["embed_tokens.weight"] = head.embed_tokens.weight.detach().clone()
    config = {
        "architectures": ["Eagle3Speculator"],
        "auto_map": {"": "config.Eagle3SpeculatorConfig"},  # remote code: never imported
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "draft_vocab_size": head.config.draft_vocab_size,
        "norm_before_residual": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": layer_ids,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
            "verifier": {"name_or_path": "org/target", "architectures": ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": llama_config(head, num_hidden_layers=1),
        **extra,
    }
    write(directory, config, weights)
    (directory / "config.py").write_text("raise RuntimeError('code from a checkpoint was executed')\n")
    return directory
