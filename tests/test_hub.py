"""Hub side of a head: the rendered model card, the upload (stopped at the HTTP boundary) and hub downloads."""

import json
from unittest import mock

import pytest
import torch
from checkpoint_files import assert_same_logits, write_official
from conftest import make_head, make_target
from huggingface_hub import ModelCard, RepoUrl

from hf_eagle3 import Eagle3DraftModel, create_model_card


def test_model_card_names_target_usage_training_data_and_acceptance():
    head = make_head(make_target(), draft_vocab_size=40)
    head.config.target_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = create_model_card(
        head.config,
        "me/smollm2-eagle3",
        training_data="12k prompts written by the target itself, answered by the target.",
        datasets=["me/magpie-smollm2"],
        acceptance={"MT-bench": 3.14159, "GSM8K": 3.5},
        tags=["smollm2"],
    )
    metadata = ModelCard(str(card)).data  # what the hub will parse
    assert metadata.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata.library_name == "transformers"
    assert metadata.datasets == ["me/magpie-smollm2"]
    assert {"eagle3", "speculative-decoding", "smollm2"} <= set(metadata.tags)
    assert 'Eagle3DraftModel.from_pretrained("me/smollm2-eagle3")' in card.text
    assert "target.generate(**inputs, assistant_model=draft" in card.text
    assert "12k prompts written by the target itself" in card.text
    assert "| MT-bench | 3.14 |" in card.text and "| GSM8K | 3.50 |" in card.text
    assert "[2, 3, 3]" in card.text and "40 / 96" in card.text


def test_model_card_for_a_serving_layout_with_nothing_measured():
    head = make_head(make_target(), target_layer_ids=[1, 3, 5])
    head.config.target_name_or_path = "/models/local-target"  # a local path is not a hub base_model
    card = create_model_card(head.config, "me/head-sglang", format="sglang")
    assert ModelCard(str(card)).data.base_model is None
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path me/head-sglang" in card.text
    assert '"output of layer i") | [0, 2, 4]' in card.text
    assert "Not recorded." in card.text and "Not measured yet." in card.text
    vllm = create_model_card(head.config, "me/head-vllm", format="vllm")
    assert '"model": "me/head-vllm", "method": "eagle3"' in vllm.text


@pytest.mark.parametrize("format", ["hf-eagle3", "vllm"])
def test_push_to_hub_uploads_config_weights_and_card(format):
    head = make_head(make_target(), draft_vocab_size=40)
    head.config.target_name_or_path = "org/target"
    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        # The upload's files exist only during the push: read them as the hub would receive them.
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as file:
                uploaded[operation.path_in_repo] = file.read()
        uploaded["repo_id"], uploaded["message"] = repo_id, kwargs["commit_message"]
        return "commit-info"

    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value=RepoUrl("https://huggingface.co/me/head")),
        mock.patch("huggingface_hub.HfApi.create_commit", create_commit),
    ):
        result = head.push_to_hub(
            "head", format=format, acceptance={"MT-bench": 2.5}, target_max_position_embeddings=8192
        )
    assert result == "commit-info"
    assert set(uploaded) == {"config.json", "model.safetensors", "README.md", "repo_id", "message"}
    assert uploaded["repo_id"] == "me/head" and uploaded["message"] == "Upload EAGLE-3 draft head"
    config = json.loads(uploaded["config.json"])
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == "org/target" and "| MT-bench | 2.50 |" in card.text
    assert "| max positions | 8192 |" in card.text
    if format == "vllm":
        assert config["speculators_model_type"] == "eagle3"
        assert config["transformer_layer_config"]["max_position_embeddings"] == 8192
        assert "vllm serve org/target" in card.text
    else:
        assert config["model_type"] == "eagle3" and config["max_position_embeddings"] == 8192


def test_push_to_hub_refuses_an_unknown_format_before_creating_the_repo():
    head = make_head(make_target())
    with mock.patch("huggingface_hub.HfApi.create_repo") as create_repo:
        with pytest.raises(ValueError, match="Unknown checkpoint format 'onnx'"):
            head.push_to_hub("me/head", format="onnx")
    create_repo.assert_not_called()


def test_from_pretrained_reads_a_hub_repo_from_the_cache(tmp_path):
    """A repo id goes through `hf_hub_download`; here offline, from a cache laid out as the hub client writes it.
    The repo has no model.safetensors, so the loader must fall back to pytorch_model.bin."""
    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--eagle3-head"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_official(repo / "snapshots" / commit, head, weights_file="pytorch_model.bin")
    loaded = Eagle3DraftModel.from_pretrained("org/eagle3-head", cache_dir=tmp_path, local_files_only=True)
    assert_same_logits(loaded, head, target)
    torch.testing.assert_close(loaded.d2t, head.d2t)
