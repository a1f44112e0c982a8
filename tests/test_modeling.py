import pytest
import torch
from conftest import make_head, make_target
from transformers import AutoConfig, AutoModel

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.target_features import TargetFeatureCapture


def test_config_from_target_copies_dimensions(arch):
    target = make_target(arch)
    config = Eagle3Config.from_target_config(target.config, draft_vocab_size=50)
    assert config.target_layer_ids == [2, 3, 3]
    assert config.num_key_value_heads == target.config.num_key_value_heads
    assert config.head_dim == (24 if arch == "qwen3" else 16)
    assert config.vocab_size == 96 and config.draft_vocab_size == 50
    assert config.max_position_embeddings == target.config.max_position_embeddings


def test_published_parameter_names():
    head = make_head(make_target(), draft_vocab_size=50)
    names = set(head.state_dict())
    expected = {
        "fc.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
        "midlayer.hidden_norm.weight",
        "midlayer.input_layernorm.weight",
        "midlayer.post_attention_layernorm.weight",
        *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    assert expected <= names
    assert head.midlayer.self_attn.q_proj.in_features == 2 * head.config.hidden_size


def test_cache_matches_full_forward_and_attention_backends(arch):
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=40)
    eager = Eagle3DraftModel._from_config(head.config, attn_implementation="eager").eval()
    eager.load_state_dict(head.state_dict())
    eager.attach_target(target)
    features = torch.randn(2, 7, 3 * 64)
    ids = torch.randint(0, 96, (2, 7))
    full = head(ids, target_hidden_states=features)
    first = head(ids[:, :4], target_hidden_states=features[:, :4], use_cache=True)
    rest = head(ids[:, 4:], target_hidden_states=features[:, 4:], past_key_values=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits)
    torch.testing.assert_close(eager(ids, target_hidden_states=features).logits, full.logits)


def test_save_load_round_trip_without_embedding(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    head.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert "embed_tokens.weight" not in load_file(tmp_path / "model.safetensors")
    assert AutoConfig.from_pretrained(tmp_path).model_type == "eagle3"
    loaded = AutoModel.from_pretrained(tmp_path).eval().attach_target(target)
    assert isinstance(loaded, Eagle3DraftModel)
    features, ids = torch.randn(1, 5, 192), torch.randint(0, 96, (1, 5))
    torch.testing.assert_close(
        loaded(ids, target_hidden_states=features).logits, head(ids, target_hidden_states=features).logits
    )
    torch.testing.assert_close(loaded.d2t, head.d2t)


def test_vocab_maps_invert():
    head = make_head(make_target(), draft_vocab_size=40)
    draft_ids = torch.arange(40)
    target_ids = head.draft_to_target_ids(draft_ids)
    assert head.t2d[target_ids].all() and int(head.t2d.sum()) == 40
    assert torch.equal(head.target_to_draft_ids(target_ids), draft_ids)
    full = head.draft_logits_to_target_vocab(torch.randn(3, 40))
    assert torch.isinf(full[:, ~head.t2d]).all() and torch.isfinite(full[:, head.t2d]).all()


def test_switching_the_draft_vocabulary_carries_shared_rows(tmp_path):
    from hf_eagle3.data.vocab import build_vocab_maps

    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    old_weight, old_targets = head.lm_head.weight.detach().clone(), head.draft_vocab_target_ids
    counts = torch.zeros(96, dtype=torch.long)
    counts[old_targets[:20]] = 5  # half the old ids stay, 30 come new: 50 in all
    counts[[i for i in range(96) if i not in old_targets.tolist()][:30]] = 3
    d2t, t2d, _ = build_vocab_maps(counts, 50, 96)
    assert head.set_draft_vocab(d2t, t2d) is head
    head.check_vocab_maps()
    assert head.config.draft_vocab_size == 50 and head.lm_head.weight.shape == (50, 64)
    new_targets = head.draft_vocab_target_ids
    for row, target_id in enumerate(new_targets.tolist()):
        old_row = (old_targets == target_id).nonzero()
        expected = old_weight[old_row.item()] if len(old_row) else old_weight[:20].mean(0)
        torch.testing.assert_close(head.lm_head.weight[row], expected.reshape(-1))
    head.save_pretrained(tmp_path)
    loaded = Eagle3DraftModel.from_pretrained(tmp_path).attach_target(target)
    assert torch.equal(loaded.d2t, d2t) and torch.equal(loaded.lm_head.weight, head.lm_head.weight)
    with pytest.raises(ValueError, match="inconsistent"):
        head.set_draft_vocab(d2t, ~t2d)
    with pytest.raises(ValueError, match="inconsistent"):
        head.set_draft_vocab(d2t.reshape(5, 10), t2d)


def test_feature_capture_equals_hidden_states(arch):
    target = make_target(arch)
    ids = torch.randint(0, 96, (1, 6))
    with TargetFeatureCapture(target, [2, 3, 4]) as capture:
        out = target(ids, output_hidden_states=True)
        features = capture.pop()
    torch.testing.assert_close(features, torch.cat([out.hidden_states[i] for i in (2, 3, 4)], -1))


def test_wrong_target_is_named():
    head = make_head(make_target(), draft_vocab_size=40)
    with pytest.raises(ValueError, match="hidden size"):
        head.attach_target(make_target(hidden_size=32, head_dim=8))
    with pytest.raises(ValueError, match="vocabulary"):
        head.attach_target(make_target(vocab_size=100))
    with pytest.raises(ValueError, match="layers"):
        make_head(make_target(num_hidden_layers=8)).attach_target(make_target(num_hidden_layers=4))


def test_missing_vocab_maps_and_embedding():
    target = make_target()
    config = Eagle3Config.from_target_config(target.config, draft_vocab_size=40)
    head = Eagle3DraftModel(config).eval()
    with pytest.raises(ValueError, match="attach_target"):
        head(torch.zeros(1, 2, dtype=torch.long), target_hidden_states=torch.randn(1, 2, 192))
    with pytest.raises(ValueError, match="d2t/t2d"):
        head.check_vocab_maps()


def test_loaded_head_keeps_the_embedding_frozen(tmp_path):
    make_head(make_target(), draft_vocab_size=40).save_pretrained(tmp_path)
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    trainable = {name for name, parameter in loaded.named_parameters() if parameter.requires_grad}
    assert "embed_tokens.weight" not in trainable and "fc.weight" in trainable
