"""EAGLE-3.1 heads: the norm switches of speculators' and vLLM's configs (`norm_before_fc`, `fc_norm`,
`norm_before_residual`, `norm_output`) and SpecForge's `norm_output: false` (`norm_before_lm_head=False` here).

Each switch is checked against a reference forward written here from the peers' documented semantics (plain torch,
none of the head's modules), decodes losslessly on every path, trains, and goes through every checkpoint layout
that can carry it (and is refused by the others). Fixtures for the peers' layouts are written by hand in their key
names; `benchmarks/interop/check_interop.py` runs the peers' own code on the same switches.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_head, make_target
from huggingface_hub.errors import StrictDataclassClassValidationError
from lossless import _make_successor_target, _train_head, assert_greedy_lossless, prompt_reaching_eos
from safetensors.torch import load_file, save_file

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.configuration_eagle3 import VARIANT_DEFAULTS
from hf_eagle3.target_features import TargetFeatureCapture
from hf_eagle3.trainer.ttt import target_distribution_from_logits, training_time_test

SWITCHES = [
    {"norm_before_fc": True},
    {"fc_norm": True},
    {"norm_before_residual": True},
    {"norm_output": True},
    {"norm_before_lm_head": False},
    {"fc_norm": True, "norm_output": True, "norm_before_residual": True},
]
IDS = pytest.mark.parametrize("switches", SWITCHES, ids=lambda switches: "+".join(switches))


def variant_head(target, switches, seed=0, **overrides) -> Eagle3DraftModel:
    """A random head with the switches on and every norm weight drawn away from one, so each switch shows."""
    head = make_head(target, seed=seed, **switches, **overrides)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in head.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return head


# ------------------------------------------------------------------------------------------------ reference
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE on `(heads, T, dim)`: pairs (i, i + dim/2) rotated by position / theta^(2i/dim)."""
    dim = x.shape[-1]
    angles = positions[:, None].double() / theta ** (torch.arange(0, dim, 2).double() / dim)[None]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-second, first], -1) * sin


def reference_forward(weights, config, embeds, hidden, positions):
    """One causal pass of the head over a single sequence, as speculators and vLLM describe it.

    Returns the draft logits and the state fed to the next draft step: the pre-norm layer output, or the output
    of the final norm under `norm_output`; logits read the final norm unless `norm_before_lm_head` is off
    (SpecForge's `norm_output: false`).
    """
    eps, heads, kv_heads, dim = (
        config.rms_norm_eps,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    normed = rms_norm(hidden, weights["midlayer.hidden_norm.weight"], eps)
    residual = normed if config.norm_before_residual else hidden
    x = torch.cat([rms_norm(embeds, weights["midlayer.input_layernorm.weight"], eps), normed], -1)
    length = x.shape[0]
    q = (x @ weights["midlayer.self_attn.q_proj.weight"].T).view(length, heads, dim).transpose(0, 1)
    k = (x @ weights["midlayer.self_attn.k_proj.weight"].T).view(length, kv_heads, dim).transpose(0, 1)
    v = (x @ weights["midlayer.self_attn.v_proj.weight"].T).view(length, kv_heads, dim).transpose(0, 1)
    q, k = rotate(q, positions, 10000.0), rotate(k, positions, 10000.0)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(dim)
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, heads * dim)
    h = residual + attended @ weights["midlayer.self_attn.o_proj.weight"].T
    m = rms_norm(h, weights["midlayer.post_attention_layernorm.weight"], eps)
    gate, up = m @ weights["midlayer.mlp.gate_proj.weight"].T, m @ weights["midlayer.mlp.up_proj.weight"].T
    h = h + (torch.nn.functional.silu(gate) * up) @ weights["midlayer.mlp.down_proj.weight"].T
    final = rms_norm(h, weights["norm.weight"], eps)
    logits = (final if config.norm_before_lm_head else h) @ weights["lm_head.weight"].T
    return logits, final if config.norm_output else h


def reference_fuse(weights, config, features):
    """`fc` over the three target layers: one norm over their concatenation (`norm_before_fc`, `input_norm`) or
    one per layer (`fc_norm`)."""
    eps = config.rms_norm_eps
    if config.norm_before_fc:
        features = rms_norm(features, weights["input_norm.weight"], eps)
    if config.fc_norm:
        chunks = features.chunk(3, -1)
        features = torch.cat([rms_norm(c, weights[f"fc_norm.{i}.weight"], eps) for i, c in enumerate(chunks)], -1)
    return features @ weights["fc.weight"].T


@IDS
@torch.no_grad()
def test_forward_and_next_draft_step_match_the_reference(switches):
    """Step 0 over a prompt's features, then one more draft step fed the head's own state, as decoding runs it."""
    target = make_target()
    head = variant_head(target, switches)
    weights = head.state_dict()
    features = torch.randn(1, 6, 3 * 64, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    out = head(ids[:, :6], target_hidden_states=features, use_cache=True)
    step = head(ids[:, 6:], hidden_states=out.hidden_states[:, -1:], past_key_values=out.cache)

    embeds = weights["embed_tokens.weight"][ids[0]]
    fused = reference_fuse(weights, head.config, features[0])
    logits, fed_back = reference_forward(weights, head.config, embeds[:6], fused, torch.arange(6))
    torch.testing.assert_close(out.logits[0], logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden_states[0], fed_back, atol=1e-5, rtol=1e-5)
    hidden = torch.cat([fused, fed_back[-1:]])
    logits, _ = reference_forward(weights, head.config, embeds, hidden, torch.arange(7))
    torch.testing.assert_close(step.logits[0], logits[-1:], atol=1e-4, rtol=1e-4)
    # Each switch matters: with the same weights, the released head returns other logits or another state.
    config = copy.deepcopy(head.config)
    for name in switches:
        setattr(config, name, VARIANT_DEFAULTS[name])
    released = Eagle3DraftModel(config).eval()
    released.load_state_dict(weights, strict=False)
    plain = released.attach_target(target)(ids[:, :6], target_hidden_states=features)
    assert not (torch.allclose(plain.logits, out.logits) and torch.allclose(plain.hidden_states, out.hidden_states))


def test_switch_checks():
    target = make_target()
    with pytest.raises(StrictDataclassClassValidationError, match="cannot be combined with norm_before_lm_head=False"):
        make_head(target, norm_output=True, norm_before_lm_head=False)
    head = make_head(target, fc_norm=True, norm_before_fc=True)
    assert [name for name, _ in head.named_parameters() if "norm" in name][:5] == [
        "input_norm.weight",
        "fc_norm.0.weight",
        "fc_norm.1.weight",
        "fc_norm.2.weight",
        "midlayer.hidden_norm.weight",
    ]
    assert head.input_norm.weight.shape == (3 * 64,) and head.fc_norm[2].weight.shape == (64,)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.fixture(scope="module")
def trained_heads():
    """Per switch set, a head trained (with the TTT unroll decoding relies on) on a successor target's text."""
    target = _make_successor_target("llama", seed=0)
    heads = {}
    for switches in SWITCHES:
        torch.manual_seed(0)
        config = Eagle3Config.from_target_config(target.config, **switches)
        head = Eagle3DraftModel(config).attach_target(target)
        _train_head(target, head, steps=40, unroll=3)
        heads["+".join(switches)] = head
    return target, heads


@IDS
@pytest.mark.parametrize(
    "mode",
    [
        {"eagle3_mode": "chain"},
        {"eagle3_static_cache": False},
        {"eagle3_static_cache": True},
    ],
    ids=["chain", "tree", "static-tree"],
)
def test_trained_variant_heads_decode_losslessly_and_draft_well(trained_heads, switches, mode):
    """A head trained with a switch drafts the text it learnt on each path (so decoding feeds back the state
    training did), and the output is the target's own."""
    target, heads = trained_heads
    head = heads["+".join(switches)]
    output = assert_greedy_lossless(target, head, prompt_reaching_eos(target, 30), max_new_tokens=24, **mode)
    assert output.eagle3_stats.mean_accept_len > 2.5, output.eagle3_stats.mean_accept_len
    if mode.get("eagle3_static_cache"):
        assert output.eagle3_stats.static_cache


def test_compiled_static_tree_runs_every_switch(trained_heads, aot_eager):
    target, heads = trained_heads
    head = heads["fc_norm+norm_output+norm_before_residual"]
    output = assert_greedy_lossless(
        target, head, prompt_reaching_eos(target, 30), max_new_tokens=24, eagle3_static_cache=True, eagle3_compile=True
    )
    assert output.eagle3_stats.compiled and output.eagle3_stats.mean_accept_len > 2.5


# ------------------------------------------------------------------------------------------------ training
@IDS
def test_training_time_test_trains_the_switch_norms(switches):
    target = make_target(vocab_size=16, num_hidden_layers=4)
    head = variant_head(target, switches).train()
    input_ids = torch.randint(3, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        logits = target(input_ids).logits
        features = capture.pop()
    distribution = target_distribution_from_logits(head, logits)
    result = training_time_test(head, features, input_ids, torch.ones_like(input_ids), distribution, num_steps=3)
    result.loss.backward()
    # Every trainable parameter gets a gradient (DDP runs without its unused-parameter search); `norm` is frozen
    # where nothing reads it.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.requires_grad)
    assert head.norm.weight.requires_grad == head.config.norm_before_lm_head
    added = {"norm_before_fc": "input_norm.weight", "fc_norm": "fc_norm.0.weight"}
    trainable = {name for name, parameter in head.named_parameters() if parameter.requires_grad}
    assert {added[name] for name in switches if name in added} <= trainable


# ------------------------------------------------------------------------------------------------ checkpoints
LAYOUT_CARRIES = {
    "hf-eagle3": {"norm_before_fc", "fc_norm", "norm_before_residual", "norm_output", "norm_before_lm_head"},
    "vllm": {"norm_before_fc", "fc_norm", "norm_before_residual", "norm_output"},
    "specforge": {"fc_norm", "norm_before_lm_head"},
    "eagle3": set(),
}


@IDS
@pytest.mark.parametrize("format", list(LAYOUT_CARRIES))
def test_every_layout_that_carries_a_switch_round_trips_it_and_the_others_refuse(tmp_path, switches, format):
    target = make_target()
    head = variant_head(target, switches, target_name_or_path="org/target")
    if not set(switches) <= LAYOUT_CARRIES[format]:
        with pytest.raises(ValueError, match="does not implement"):
            head.save_pretrained(tmp_path, format=format)
        return
    head.save_pretrained(tmp_path, format=format)
    config = json.loads((tmp_path / "config.json").read_text())
    if format == "specforge":  # SpecForge's own key and meaning, written only when not its default (true)
        assert config.get("norm_output", True) is head.config.norm_before_lm_head
    elif format == "vllm":
        assert all(config[name] is getattr(head.config, name) for name in LAYOUT_CARRIES["vllm"])
    loaded = Eagle3DraftModel.from_pretrained(tmp_path).attach_target(target)
    assert loaded.config.variant_switches == head.config.variant_switches
    features = torch.randn(1, 5, 3 * 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, target_hidden_states=features).logits, head(ids, target_hidden_states=features).logits
        )


def test_peer_layout_fixtures_load_with_their_meaning(tmp_path):
    """Checkpoints written by hand in each peer's layout: speculators' `norm_output` feeds the post-norm state
    back; SpecForge's `norm_output: false` drops the norm before lm_head, and its `fc_norm` keys load as ours."""
    target = make_target()
    head = variant_head(target, {"fc_norm": True, "norm_before_lm_head": False})
    weights = {key: tensor for key, tensor in head.state_dict().items() if key != "embed_tokens.weight"}
    assert {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"} <= set(weights)
    (tmp_path / "specforge").mkdir()
    save_file(weights, tmp_path / "specforge" / "model.safetensors")
    layer = json.loads(json.dumps(head.config.to_dict()))
    llama = {key: layer[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size")}  # fmt: skip
    specforge = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", **llama, "num_hidden_layers": 1,
                 "draft_vocab_size": 96, "fc_norm": True, "norm_output": False}  # fmt: skip
    (tmp_path / "specforge" / "config.json").write_text(json.dumps(specforge))
    loaded = Eagle3DraftModel.from_pretrained(tmp_path / "specforge").attach_target(target)
    assert loaded.config.variant_switches == {"fc_norm": True, "norm_before_lm_head": False}

    speculator = variant_head(target, {"norm_before_fc": True, "norm_output": True})
    weights = {key.replace("midlayer.", "layers.0."): tensor for key, tensor in speculator.state_dict().items()}
    (tmp_path / "speculators").mkdir()
    save_file(weights, tmp_path / "speculators" / "model.safetensors")
    config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 96,
              "norm_before_fc": True, "norm_output": True, "norm_before_residual": False,
              "speculators_config": {"verifier": {"name_or_path": "org/target"}},
              "transformer_layer_config": {"model_type": "llama", **llama, "num_hidden_layers": 1}}  # fmt: skip
    (tmp_path / "speculators" / "config.json").write_text(json.dumps(config))
    assert "input_norm.weight" in load_file(tmp_path / "speculators" / "model.safetensors")
    loaded_speculator = Eagle3DraftModel.from_pretrained(tmp_path / "speculators").attach_target(target)
    features = torch.randn(1, 5, 3 * 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mine, theirs in ((loaded, head), (loaded_speculator, speculator)):
            out, expected = mine(ids, target_hidden_states=features), theirs(ids, target_hidden_states=features)
            torch.testing.assert_close(out.logits, expected.logits)
            torch.testing.assert_close(out.hidden_states, expected.hidden_states)


def test_vllm_llama_config_reads_switches_where_vllm_does(tmp_path):
    """vLLM's own `Eagle3LlamaForCausalLM` config: `norm_before_fc` may sit in `eagle_config`, the rest on top."""
    target = make_target()
    head = variant_head(target, {"norm_before_fc": True, "norm_output": True})
    (tmp_path / "model").mkdir()
    save_file(
        {key: tensor for key, tensor in head.state_dict().items() if key != "embed_tokens.weight"},
        tmp_path / "model" / "model.safetensors",
    )
    layer = head.config
    config = {
        "architectures": ["Eagle3LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": layer.intermediate_size, "num_attention_heads": layer.num_attention_heads,
        "num_key_value_heads": layer.num_key_value_heads, "head_dim": layer.head_dim,
        "rms_norm_eps": layer.rms_norm_eps, "vocab_size": 96, "draft_vocab_size": 96, "norm_output": True,
        "eagle_config": {"norm_before_fc": True, "eagle_aux_hidden_state_layer_ids": layer.target_layer_ids},
    }  # fmt: skip
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    loaded = Eagle3DraftModel.from_pretrained(tmp_path / "model").attach_target(target)
    assert loaded.config.variant_switches == {"norm_before_fc": True, "norm_output": True}
    features = torch.randn(1, 5, 3 * 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, expected = loaded(ids, target_hidden_states=features), head(ids, target_hidden_states=features)
    torch.testing.assert_close(out.hidden_states, expected.hidden_states)
