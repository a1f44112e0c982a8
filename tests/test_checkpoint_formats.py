"""Every published EAGLE-3 layout loads with the native model's logits, and every export loads back equal.

The checkpoints are written by hand in each tool's own layout (`checkpoint_files`), not by this library's exporter,
so import and export are checked independently.
"""

import json

import pytest
import torch
from checkpoint_files import (
    assert_same_logits,
    llama_config,
    published_weights,
    write,
    write_official,
    write_specforge,
    write_speculators,
)
from conftest import make_head, make_target
from safetensors.torch import load_file, save_file

from hf_eagle3 import Eagle3DraftModel
from hf_eagle3.checkpoint_formats import FORMATS
from hf_eagle3.cli import main as cli_main


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_official_release_loads(tmp_path, arch, weights_file):
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=40)
    loaded = Eagle3DraftModel.from_pretrained(write_official(tmp_path, head, weights_file))
    assert loaded.config.target_layer_ids is None  # implied by the target: filled in on attach
    assert_same_logits(loaded, head, target)
    assert loaded.config.target_layer_ids == head.config.target_layer_ids == [2, 3, 3]
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)


def test_a_published_head_exports_for_vllm_once_attached_to_a_named_target(tmp_path):
    """Official configs do not name the target; the attached one is named, so the export's verifier resolves."""
    target = make_target()
    target.save_pretrained(tmp_path / "target")
    target = type(target).from_pretrained(tmp_path / "target")
    head = make_head(target, draft_vocab_size=40)
    loaded = Eagle3DraftModel.from_pretrained(write_official(tmp_path / "official", head)).attach_target(target)
    loaded.save_pretrained(tmp_path / "vllm", format="vllm")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(tmp_path / "target")


def test_official_release_without_maps_loads_when_vocabularies_are_equal(tmp_path):
    target = make_target()
    head = make_head(target)
    assert_same_logits(Eagle3DraftModel.from_pretrained(write_official(tmp_path, head, with_maps=False)), head, target)


def test_specforge_head_loads_with_layer_ids_shifted(tmp_path, arch):
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=40, target_layer_ids=[1, 3, 5])
    loaded = Eagle3DraftModel.from_pretrained(write_specforge(tmp_path, head, output_layer_ids=[0, 2, 4]))
    assert loaded.config.target_layer_ids == [1, 3, 5]
    assert_same_logits(loaded, head, target)


def test_vllm_llama_config_loads_with_layer_ids_as_they_are(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=40, target_layer_ids=[1, 3, 5])
    config = llama_config(
        head, architectures=["Eagle3LlamaForCausalLM"], draft_vocab_size=40, eagle_aux_hidden_state_layer_ids=[1, 3, 5]
    )
    loaded = Eagle3DraftModel.from_pretrained(write(tmp_path, config, published_weights(head)))
    assert loaded.config.target_layer_ids == [1, 3, 5]
    assert_same_logits(loaded, head, target)


def test_foreign_checkpoint_keeps_its_dtype_unless_told(tmp_path):
    head = make_head(make_target(), draft_vocab_size=40).to(torch.bfloat16)
    directory = write_official(tmp_path, head)
    assert Eagle3DraftModel.from_pretrained(directory).dtype == torch.bfloat16
    assert Eagle3DraftModel.from_pretrained(directory, dtype=torch.float32).fc.weight.dtype == torch.float32


def test_speculators_head_loads(tmp_path, arch):
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=40, target_layer_ids=[1, 3, 5])
    loaded = Eagle3DraftModel.from_pretrained(write_speculators(tmp_path, head, layer_ids=[1, 3, 5]))
    assert loaded.config.target_layer_ids == [1, 3, 5]
    assert loaded.config.target_name_or_path == "org/target"
    assert_same_logits(loaded, head, target)


@pytest.mark.parametrize("format", list(FORMATS))
def test_every_export_loads_back_equal(tmp_path, format):
    target = make_target(arch := "qwen3")
    layer_ids = {} if format == "eagle3" else {"target_layer_ids": [1, 3, 5]}
    head = make_head(target, draft_vocab_size=40, target_name_or_path="org/target", **layer_ids)
    head.save_pretrained(tmp_path, format=format, target_max_position_embeddings=4096)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = load_file(tmp_path / "model.safetensors")
    layout = FORMATS[format]
    if layout == "speculators":
        assert config["architectures"] == ["Eagle3Speculator"] and config["norm_before_residual"] is False
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
        assert config["transformer_layer_config"]["max_position_embeddings"] == 4096
        assert config["speculators_config"]["verifier"]["name_or_path"] == "org/target"
        # speculators takes the embedding from the checkpoint, not from the verifier: it must be the target's.
        assert "layers.0.self_attn.q_proj.weight" in weights
        assert torch.equal(weights["embed_tokens.weight"], target.get_input_embeddings().weight)
    else:
        assert config["max_position_embeddings"] == 4096
        assert "midlayer.self_attn.q_proj.weight" in weights and "embed_tokens.weight" not in weights
    if layout == "specforge":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]
        # SpecForge reads an absent `norm_output` as true (norm before lm_head); vLLM reads a present `true` as
        # "feed the post-norm state back": a released head writes neither switch.
        assert "norm_output" not in config and "fc_norm" not in config
    if layout == "eagle3":
        assert config["architectures"] == ["LlamaForCausalLM"] and config["draft_vocab_size"] == 40
        # The official loader takes the target's embedding only when this key is absent (else it stays random).
        assert "target_hidden_size" not in config
    assert head.config.max_position_embeddings == 512  # the model itself is unchanged
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert_same_logits(loaded, head, target)
    assert loaded.config.target_layer_ids == head.config.target_layer_ids, arch
    assert loaded.config.max_position_embeddings == 4096


def test_sharded_export_loads_back(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    head.save_pretrained(tmp_path, format="sglang", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(Eagle3DraftModel.from_pretrained(tmp_path), head, target)


def test_export_refuses_layer_ids_the_format_cannot_hold(tmp_path):
    head = make_head(make_target(), target_layer_ids=[0, 3, 5])
    with pytest.raises(ValueError, match="official EAGLE-3 layout cannot store target layer ids"):
        head.save_pretrained(tmp_path, format="eagle3")
    with pytest.raises(ValueError, match="include 0"):
        head.save_pretrained(tmp_path, format="sglang")
    with pytest.raises(ValueError, match="Unknown checkpoint format 'gguf'"):
        head.save_pretrained(tmp_path, format="gguf")


def test_native_round_trip_covers_target_positions(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    head.save_pretrained(tmp_path, target_max_position_embeddings=8192)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 8192
    assert head.config.max_position_embeddings == 512
    assert_same_logits(Eagle3DraftModel.from_pretrained(tmp_path), head, target)


def test_convert_cli_translates_and_covers_the_target(tmp_path, capsys):
    target = make_target(max_position_embeddings=1024)
    target.save_pretrained(tmp_path / "target")
    head = make_head(target, draft_vocab_size=40)
    write_official(tmp_path / "official", head)
    assert cli_main(["convert", str(tmp_path / "official"), str(tmp_path / "sglang"), "--to", "sglang",
                     "--target", str(tmp_path / "target")]) == 0  # fmt: skip
    assert "[1, 2, 2]" in capsys.readouterr().out
    config = json.loads((tmp_path / "sglang" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]  # [2, 3, 3] minus one
    assert config["max_position_embeddings"] == 2048  # the head's own already covers the target's 1024
    cli_main(["convert", str(tmp_path / "official"), str(tmp_path / "eagle3"), "--to", "eagle3",
              "--target-max-position-embeddings", "32768"])  # fmt: skip
    config = json.loads((tmp_path / "eagle3" / "config.json").read_text())
    assert "target_hidden_size" not in config and config["max_position_embeddings"] == 32768
    assert_same_logits(Eagle3DraftModel.from_pretrained(tmp_path / "eagle3"), head, target)


def test_convert_cli_to_speculators_names_the_given_target_and_stores_its_embedding(tmp_path, monkeypatch):
    target = make_target().to(torch.float64)
    target.save_pretrained(tmp_path / "target")
    head = make_head(make_target(), draft_vocab_size=40, target_name_or_path="a-short-name")
    head.save_pretrained(tmp_path / "native")
    monkeypatch.chdir(tmp_path)  # a relative --target, as a user would type it
    cli_main(["convert", "native", "vllm", "--to", "vllm", "--target", "target"])
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # speculators and vLLM load the verifier from any working directory: the path is made absolute.
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(tmp_path / "target")
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    # The target's own table at its own precision, read from its checkpoint alone.
    embedding = load_file(tmp_path / "vllm" / "model.safetensors")["embed_tokens.weight"]
    assert embedding.dtype == torch.float64 and torch.equal(embedding, target.get_input_embeddings().weight)
    assert_same_logits(Eagle3DraftModel.from_pretrained(tmp_path / "vllm", dtype=torch.float32), head, make_target())


def test_speculators_export_resolves_registered_targets_and_refuses_what_speculators_cannot_load(tmp_path):
    target = make_target()
    head = make_head(target, target_name_or_path="smollm2-135m-instruct")
    head.save_pretrained(tmp_path / "registered", format="speculators")
    config = json.loads((tmp_path / "registered" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    head.config.target_name_or_path = None
    with pytest.raises(ValueError, match="does not name its target"):
        head.save_pretrained(tmp_path / "unnamed", format="speculators")
    unattached = Eagle3DraftModel(make_head(target, target_name_or_path="org/target").config)
    with pytest.raises(ValueError, match="none is attached"):
        unattached.save_pretrained(tmp_path / "no-embedding", format="vllm")
    with pytest.raises(ValueError, match="none is attached"):
        cli_main(["convert", str(tmp_path / "registered"), str(tmp_path / "again"), "--to", "speculators"])


@pytest.mark.real_model
@pytest.mark.slow
def test_convert_takes_a_registered_offline_target(tmp_path, capsys):
    from hf_eagle3.offline_models import shipped_head_path

    source = shipped_head_path("smollm2")
    assert cli_main(["convert", str(source), str(tmp_path / "vllm"), "--to", "vllm", "--target", "smollm2"]) == 0
    assert "max_position_embeddings: 8192" in capsys.readouterr().out  # SmolLM2's context, read from its GGUF
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_vocab_maps_with_a_reduced_vocabulary_raise(tmp_path):
    head = make_head(make_target(), draft_vocab_size=40)
    with pytest.raises(ValueError, match="d2t/t2d maps are missing"):
        Eagle3DraftModel.from_pretrained(write_official(tmp_path / "official", head, with_maps=False))
    head.save_pretrained(tmp_path / "native")
    weights = load_file(tmp_path / "native" / "model.safetensors")
    del weights["d2t"], weights["t2d"]
    save_file(weights, tmp_path / "native" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="d2t/t2d maps are missing"):
        Eagle3DraftModel.from_pretrained(tmp_path / "native")


def test_tensor_of_wrong_shape_raises(tmp_path):
    head = make_head(make_target(), draft_vocab_size=40)
    directory = write_official(tmp_path, head)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"midlayer\.mlp\.down_proj\.weight is \(64, 96\), the config implies"):
        Eagle3DraftModel.from_pretrained(directory)


def test_missing_and_unknown_tensors_raise(tmp_path):
    head = make_head(make_target())
    weights = published_weights(head)
    del weights["fc.weight"]
    write(
        tmp_path / "incomplete", llama_config(head, architectures=["LlamaForCausalLM"], draft_vocab_size=96), weights
    )
    with pytest.raises(ValueError, match=r"lacks tensors of the EAGLE-3 head: \['fc.weight'\]"):
        Eagle3DraftModel.from_pretrained(tmp_path / "incomplete")
    weights = published_weights(head) | {"fc_norm.weight": torch.ones(64)}
    write(tmp_path / "variant", llama_config(head, architectures=["LlamaForCausalLM"], draft_vocab_size=96), weights)
    with pytest.raises(ValueError, match=r"does not have: \['fc_norm.weight'\]"):
        Eagle3DraftModel.from_pretrained(tmp_path / "variant")


def test_native_save_missing_or_extra_tensors_raise(tmp_path):
    head = make_head(make_target())
    head.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "fc_norm.weight": torch.ones(64)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not have: \['fc_norm.weight'\]"):
        Eagle3DraftModel.from_pretrained(tmp_path)
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors of the EAGLE-3 head: \['lm_head.weight'\]"):
        Eagle3DraftModel.from_pretrained(tmp_path)


def test_norm_switches_are_read_with_each_layout_meaning(tmp_path):
    """SpecForge's `norm_output` (default true) is "norm before lm_head"; speculators' and vLLM's is "feed the
    post-norm state back"; the official code reads no switch, so one set in that layout has no known meaning."""
    head = make_head(make_target())
    specforge = write_specforge(tmp_path / "specforge", head, output_layer_ids=[1, 2, 2])
    config = json.loads((specforge / "config.json").read_text())
    for value, norm_before_lm_head in ((True, True), (False, False)):
        (specforge / "config.json").write_text(json.dumps({**config, "norm_output": value}))
        loaded = Eagle3DraftModel.from_pretrained(specforge).config
        assert (loaded.norm_before_lm_head, loaded.norm_output) == (norm_before_lm_head, False)
    (specforge / "config.json").write_text(json.dumps({**config, "norm_before_fc": True}))
    with pytest.raises(ValueError, match=r"sets \['norm_before_fc'\], which SpecForge's draft class does not read"):
        Eagle3DraftModel.from_pretrained(specforge)
    loaded = Eagle3DraftModel.from_pretrained(write_speculators(tmp_path / "a", head, None, norm_output=True)).config
    assert (loaded.norm_output, loaded.norm_before_lm_head) == (True, True)
    official = write_official(tmp_path / "official", head)
    config = json.loads((official / "config.json").read_text())
    (official / "config.json").write_text(json.dumps({**config, "norm_output": True}))
    with pytest.raises(ValueError, match=r"sets \['norm_output'\] but is in the official EAGLE-3 layout"):
        Eagle3DraftModel.from_pretrained(official)
    with pytest.raises(ValueError, match="trained its own token embedding"):
        Eagle3DraftModel.from_pretrained(write_speculators(tmp_path / "b", head, None, embed_requires_grad=True))


def test_unrecognised_layout_raises(tmp_path):
    target = make_target()
    target.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a recognised EAGLE-3 checkpoint"):
        Eagle3DraftModel.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        Eagle3DraftModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a local directory nor a hub repo id"):
        Eagle3DraftModel.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("layout", ["official", "native"])
def test_truncated_safetensors_raise(tmp_path, layout):
    head = make_head(make_target())
    if layout == "official":
        write_official(tmp_path, head)
    else:
        head.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Eagle3DraftModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("saved", ["sharded", "bin", "config only"])
def test_target_embedding_is_read_alone_from_the_targets_checkpoint(tmp_path, saved):
    from hf_eagle3.checkpoint_formats import CheckpointFiles, read_target_embedding

    target = make_target()
    if saved == "config only":
        target.config.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="has no weights"):
            read_target_embedding(CheckpointFiles(tmp_path))
        return
    if saved == "sharded":
        target.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        torch.save(target.state_dict(), tmp_path / "pytorch_model.bin")
    assert torch.equal(read_target_embedding(CheckpointFiles(tmp_path)), target.get_input_embeddings().weight)
