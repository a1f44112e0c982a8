"""Training-time test (TTT): unroll the draft head on its own outputs and score every step.

Alignment (the released heads' convention): at step `k` the query at position `t` reads the target features
of `t` (step 0) or the head's own pre-norm output of step `k - 1` at `t` (steps >= 1), embeds token
`t + k + 1` and predicts token `t + k + 2`. Its target is the target model's distribution at position
`t + k + 1` and its loss-mask entry is `loss_mask[t + k + 2]`, the mask of the token it predicts: ids,
targets and loss mask all move one position further left per step, step 0 included.

Attention at step `k`: causal over the step-0 keys/values, plus the same-position key/value of each
earlier step 1..k, under one softmax. The head's own attention module does it: a `DynamicCache` holds
the earlier steps' keys/values and a 4D mask `[causal | diagonal | ... | diagonal]` selects them. sdpa
runs that on a fused kernel (flash on CPU, memory-efficient on CUDA; tests check the CPU case) that never
materialises the `(batch, heads, T, (k + 1) T)` scores; the only quadratic tensor is the mask itself,
`(batch, 1, T, (k + 1) T)` in the model dtype, shared by all heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from ..modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput


@dataclass
class TargetDistribution:
    """What the TTT loss needs of the target's logits, restricted to the draft vocabulary.

    Args:
        probs: the target's next-token distribution over the draft vocabulary, renormalised, float32,
            `(batch, seq, draft_vocab_size)`; `probs[:, s]` predicts token `s + 1`.
        draft_argmax: the target's argmax at each position as a draft id, or -1 when that argmax lies
            outside the draft vocabulary (such positions cannot be learnt and are masked), `(batch, seq)`.
    """

    probs: torch.Tensor
    draft_argmax: torch.LongTensor


@torch.no_grad()
def target_distribution_from_logits(
    draft: Eagle3DraftModel, logits: torch.Tensor, chunk_size: int = 1024
) -> TargetDistribution:
    """Restrict full-vocabulary target logits to the draft vocabulary, a chunk of positions at a time.

    Only one chunk is ever upcast to float32: full-vocabulary float32 logits for a whole batch of long
    sequences are the largest tensor a naive implementation keeps (about 1 GB per 2048-token sample at a
    128k vocabulary).
    """
    draft_to_target = draft.draft_vocab_target_ids.to(logits.device)
    target_to_draft = draft.target_to_draft_ids(torch.arange(draft.config.vocab_size, device=draft.d2t.device))
    target_to_draft = target_to_draft.to(logits.device)
    flat = logits.flatten(0, -2)
    probs = torch.empty(flat.shape[0], draft_to_target.numel(), dtype=torch.float32, device=logits.device)
    draft_argmax = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].float()
        draft_argmax[start : start + chunk_size] = target_to_draft[chunk.argmax(-1)]
        probs[start : start + chunk_size] = chunk.index_select(-1, draft_to_target).softmax(-1)
    return TargetDistribution(
        probs=probs.view(*logits.shape[:-1], -1), draft_argmax=draft_argmax.view(logits.shape[:-1])
    )


def shift_left(tensor: torch.Tensor, shift: int, fill_value: float | int | bool = 0) -> torch.Tensor:
    """`out[:, t] = tensor[:, t + shift]`, filling the last `shift` positions with `fill_value`."""
    if shift == 0:
        return tensor
    fill = tensor.new_full((tensor.shape[0], min(shift, tensor.shape[1]), *tensor.shape[2:]), fill_value)
    return torch.cat([tensor[:, shift:], fill], dim=1)


def ttt_attention_mask(attention_mask: torch.Tensor, step: int) -> torch.BoolTensor:
    """The boolean mask `(batch, 1, T, (step + 1) * T)` of TTT step `step` (True = may attend).

    Keys are laid out as the cache holds them: step 0's T positions, then step 1's, ... then this step's.
    Block 0 is causal and hides padding; every later block is the identity (same position only).
    """
    batch_size, seq_len = attention_mask.shape
    positions = torch.arange(seq_len, device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]
    causal = causal[None] & attention_mask[:, None, :].bool()
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=attention_mask.device).expand(batch_size, -1, -1)
    return torch.cat([causal, *([diagonal] * step)], dim=-1).unsqueeze(1)


def unroll_draft(
    draft: nn.Module,
    target_hidden_states: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    num_steps: int,
    position_ids: torch.LongTensor | None = None,
) -> Iterator[Eagle3DraftOutput]:
    """Yield the head's output of each TTT step; `draft` may be wrapped (DDP, FSDP, PEFT): it is only called.

    Logits of step `k` at position `t` predict token `t + k + 2`.
    """
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    hidden_states = None
    for step in range(num_steps):
        inputs = {"target_hidden_states": target_hidden_states} if step == 0 else {"hidden_states": hidden_states}
        output = draft(
            input_ids=shift_left(input_ids, step + 1),
            attention_mask=ttt_attention_mask(attention_mask, step),
            position_ids=position_ids + step,
            past_key_values=cache,
            **inputs,
        )
        hidden_states = output.hidden_states
        yield output


@dataclass
class TTTOutput:
    """Loss and per-step statistics of one TTT unroll. Statistics are detached sums, ready to aggregate.

    Args:
        loss: `sum_k decay**k * mean soft cross-entropy of step k`, with gradients.
        step_loss_sums / step_counts: per-step summed cross-entropy and number of scored positions.
        step_correct: per step, positions where the head's argmax equals the target's.
        chain_counts / chain_correct: per step, scored positions where every earlier step was right (the
            draft would still be running there), and how many of those step k gets right too; their ratio
            is the conditional acceptance rate of step k.
    """

    loss: torch.Tensor
    step_loss_sums: torch.Tensor
    step_counts: torch.Tensor
    step_correct: torch.Tensor
    chain_counts: torch.Tensor
    chain_correct: torch.Tensor


def training_time_test(
    draft: nn.Module,
    target_hidden_states: torch.Tensor,
    input_ids: torch.LongTensor,
    loss_mask: torch.Tensor,
    target: TargetDistribution,
    attention_mask: torch.Tensor | None = None,
    num_steps: int = 7,
    step_loss_decay: float = 0.8,
    position_ids: torch.LongTensor | None = None,
) -> TTTOutput:
    """Unroll the head `num_steps` times and compute the EAGLE-3 loss.

    Step k's loss is the soft cross-entropy between the head's draft-vocabulary log-probs and the target's
    renormalised draft-vocabulary distribution, averaged over positions whose predicted token has
    `loss_mask` 1 and whose target argmax lies in the draft vocabulary; it is weighted `decay**k`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.bool()
    token_mask = loss_mask.bool() & attention_mask
    stats = torch.zeros(5, num_steps, device=input_ids.device)
    loss = target_hidden_states.new_zeros((), dtype=torch.float32)
    seq_len = input_ids.shape[1]
    chain_alive = attention_mask.clone()
    for step, output in enumerate(
        unroll_draft(draft, target_hidden_states, input_ids, attention_mask, num_steps, position_ids)
    ):
        # Query t predicts token t + step + 2 from the target's distribution at t + step + 1. Slices are views:
        # autograd then keeps no per-step copy of the (batch, T, draft vocab) target distribution.
        length = max(seq_len - step - 2, 0)
        target_probs = target.probs[:, step + 1 : step + 1 + length]
        target_argmax = target.draft_argmax[:, step + 1 : step + 1 + length]
        scored = attention_mask[:, :length] & token_mask[:, step + 2 :] & (target_argmax >= 0)
        logits = output.logits[:, :length]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        cross_entropy = -(target_probs * log_probs).sum(-1)
        step_loss_sum = (cross_entropy * scored).sum()
        count = scored.sum()
        loss = loss + step_loss_decay**step * step_loss_sum / count.clamp(min=1)
        correct = (logits.argmax(-1) == target_argmax) & scored
        chain_scored = chain_alive[:, :length] & scored
        chain_alive = chain_scored & correct
        stats[:, step] = torch.stack(
            [step_loss_sum.detach(), count, correct.sum(), chain_scored.sum(), chain_alive.sum()]
        ).float()
    return TTTOutput(loss, *stats.unbind(0))


def simulated_acceptance_length(chain_correct: torch.Tensor, chain_counts: torch.Tensor) -> float:
    """Mean tokens per target forward of a chain draft: `1 + sum_k prod_{j<=k} a_j`, `a_j` the conditional
    acceptance rate of step j (right, given every earlier step was right)."""
    rates = chain_correct.double() / chain_counts.double().clamp(min=1)
    return float(1 + rates.cumprod(0).sum())


__all__ = [
    "TTTOutput",
    "TargetDistribution",
    "simulated_acceptance_length",
    "shift_left",
    "target_distribution_from_logits",
    "training_time_test",
    "ttt_attention_mask",
    "unroll_draft",
]
