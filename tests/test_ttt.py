import math

import pytest
import torch
from conftest import make_head, make_target
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_eagle3.target_features import TargetFeatureCapture
from hf_eagle3.trainer.ttt import (
    simulated_acceptance_length,
    target_distribution_from_logits,
    training_time_test,
    unroll_draft,
)


def naive_unroll(head, features, input_ids, num_steps):
    """TTT written out by hand: per step, per position, per head, one explicit softmax over the allowed keys.

    Allowed at step k for query t: step-0 keys of positions 0..t, and the key of position t of steps 1..k.
    """
    layer, attn = head.midlayer, head.midlayer.self_attn
    batch_size, seq_len = input_ids.shape
    num_heads, num_kv_heads = head.config.num_attention_heads, head.config.num_key_value_heads
    head_dim = head.config.head_dim
    keys, values, per_step = [], [], []
    hidden = head.fc(features)
    for step in range(num_steps):
        ids = torch.cat([input_ids[:, step + 1 :], input_ids.new_zeros(batch_size, step + 1)], 1)[:, :seq_len]
        x = torch.cat([layer.input_layernorm(head.embed_tokens(ids)), layer.hidden_norm(hidden)], -1)
        q = attn.q_proj(x).view(batch_size, seq_len, num_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch_size, seq_len, num_kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch_size, seq_len, num_kv_heads, head_dim).transpose(1, 2)
        positions = torch.arange(seq_len).expand(batch_size, -1) + step
        cos, sin = head.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.append(k)
        values.append(v)
        attended = torch.zeros(batch_size, num_heads, seq_len, head_dim)
        for b in range(batch_size):
            for t in range(seq_len):
                for h in range(num_heads):
                    kv = h // (num_heads // num_kv_heads)
                    allowed_k = [keys[0][b, kv, : t + 1]] + [keys[j][b, kv, t : t + 1] for j in range(1, step + 1)]
                    allowed_v = [values[0][b, kv, : t + 1]] + [values[j][b, kv, t : t + 1] for j in range(1, step + 1)]
                    scores = torch.cat(allowed_k) @ q[b, h, t] / math.sqrt(head_dim)
                    attended[b, h, t] = scores.softmax(-1) @ torch.cat(allowed_v)
        out = hidden + attn.o_proj(attended.transpose(1, 2).reshape(batch_size, seq_len, -1))
        hidden = out + layer.mlp(layer.post_attention_layernorm(out))
        per_step.append((hidden, head.compute_logits(hidden)))
    return per_step


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_ttt_attention_equals_naive_unroll(attn_implementation):
    target = make_target("qwen3")  # head_dim differs from hidden/heads; GQA 4:2
    head = make_head(target, draft_vocab_size=40)
    head.config._attn_implementation = attn_implementation
    features = torch.randn(2, 6, 3 * 64)
    input_ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        expected = naive_unroll(head, features, input_ids, num_steps=4)
        got = list(unroll_draft(head, features, input_ids, torch.ones_like(input_ids), num_steps=4))
    for (hidden, logits), output in zip(expected, got, strict=True):
        torch.testing.assert_close(output.hidden_states, hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.logits, logits, atol=1e-5, rtol=1e-4)


def test_ttt_attention_runs_on_a_fused_sdpa_kernel():
    """The TTT mask must not force sdpa onto its math fallback, which materialises the full score matrix.

    On CPU the fused flash kernel takes arbitrary float masks (on CUDA the memory-efficient kernel does).
    """
    head = make_head(make_target(), draft_vocab_size=40)
    features, input_ids = torch.randn(2, 16, 3 * 64), torch.randint(3, 96, (2, 16))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = list(unroll_draft(head, features, input_ids, mask, num_steps=3))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fused = list(unroll_draft(head, features, input_ids, mask, num_steps=3))
    for a, b in zip(fused, expected, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)


def test_right_padding_does_not_change_real_positions():
    head = make_head(make_target(), draft_vocab_size=40)
    features, input_ids = torch.randn(1, 5, 3 * 64), torch.randint(3, 96, (1, 5))
    padded_features = torch.cat([features, torch.randn(1, 3, 3 * 64)], 1)
    padded_ids = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        short = list(unroll_draft(head, features, input_ids, torch.ones_like(input_ids), num_steps=3))
        padded = list(unroll_draft(head, padded_features, padded_ids, mask, num_steps=3))
    for step, (a, b) in enumerate(zip(short, padded, strict=True)):
        # The last real positions read ids beyond the sequence; only those before it are comparable.
        keep = 5 - step - 1
        torch.testing.assert_close(b.logits[:, :keep], a.logits[:, :keep], atol=1e-5, rtol=1e-4)


def test_target_distribution_is_restricted_and_renormalised():
    head = make_head(make_target(), draft_vocab_size=40)
    logits = torch.randn(2, 5, 96)
    target = target_distribution_from_logits(head, logits, chunk_size=3)
    draft_ids = head.draft_to_target_ids(torch.arange(40))
    torch.testing.assert_close(target.probs, logits[..., draft_ids].softmax(-1))
    in_draft = head.t2d[logits.argmax(-1)]
    assert torch.equal(target.draft_argmax >= 0, in_draft)
    assert torch.equal(draft_ids[target.draft_argmax[in_draft]], logits.argmax(-1)[in_draft])


def test_loss_mask_and_targets_shift_with_each_step():
    """Step k at position t predicts token t+k+2 from the target's distribution at t+k+1, scored iff loss_mask[t+k+2]."""
    head = make_head(make_target())  # full vocabulary: every target argmax is learnable
    input_ids = torch.randint(3, 96, (1, 8))
    features = torch.randn(1, 8, 3 * 64)
    logits = torch.randn(1, 8, 96)
    loss_mask = torch.zeros(1, 8)
    loss_mask[0, 6] = 1  # only token 6 is learnt
    result = training_time_test(
        head, features, input_ids, loss_mask, target_distribution_from_logits(head, logits), num_steps=3
    )
    assert result.step_counts.tolist() == [1, 1, 1]
    with torch.no_grad():
        outputs = list(unroll_draft(head, features, input_ids, torch.ones_like(input_ids), num_steps=3))
    for step, output in enumerate(outputs):
        position = 6 - step - 2
        expected = -(logits[0, 5].softmax(-1) * output.logits[0, position].log_softmax(-1)).sum()
        torch.testing.assert_close(result.step_loss_sums[step], expected)
    expected_loss = sum(0.8**k * result.step_loss_sums[k] for k in range(3))
    torch.testing.assert_close(result.loss.detach(), expected_loss)


def test_simulated_acceptance_length():
    # Step 0 right half the time, step 1 right (given step 0) half the time: 1 + 0.5 + 0.25.
    assert simulated_acceptance_length(torch.tensor([5.0, 2.0]), torch.tensor([10.0, 4.0])) == 1.75


def test_loss_falls_and_accuracy_rises_on_learnable_target():
    """A target with a tiny vocabulary and strong structure: a few dozen Adam steps teach the head every step."""
    torch.manual_seed(0)
    target = make_target(vocab_size=16, num_hidden_layers=4)
    with torch.no_grad():  # near-deterministic next token: a sharp, learnable target
        target.lm_head.weight.mul_(8)
    head = make_head(target)
    head.train()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    input_ids = torch.randint(3, 16, (4, 24))
    with torch.no_grad(), TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        logits = target(input_ids).logits
        features = capture.pop()
    distribution = target_distribution_from_logits(head, logits)
    loss_mask = torch.ones_like(input_ids)
    history = []
    for _ in range(40):
        result = training_time_test(head, features, input_ids, loss_mask, distribution, num_steps=3)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        history.append(result)
    first, last = history[0], history[-1]
    # Soft cross-entropy has the target's entropy as its floor, so it cannot fall to zero.
    assert last.loss < 0.8 * first.loss
    first_acc = first.step_correct / first.step_counts
    last_acc = last.step_correct / last.step_counts
    assert (last_acc > first_acc + 0.3).all(), (first_acc, last_acc)
    assert simulated_acceptance_length(last.chain_correct, last.chain_counts) > 2.0
