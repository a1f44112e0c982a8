"""Stopping decisions over several new tokens at once, without one host-device synchronisation per token.

`_sample` calls the stopping criteria after every token and reads the answer on the host (`bool(... .any())`);
on an accelerator each read waits for every kernel launched so far. EAGLE-3 emits or drafts several tokens per
step, so it decides them together: transformers' own max-length and EOS criteria from the token ids it already
holds on the host, any other criterion by calling it on every prefix and reading all answers in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

# `(max_length, eos_ids)`: what transformers' max-length and EOS criteria stop at.
HostStopRule = tuple[float, frozenset[int]]


def host_stop_rule(stopping_criteria: StoppingCriteriaList) -> HostStopRule | None:
    """The rule of `stopping_criteria` when it holds only transformers' max-length and EOS criteria, else None.

    Read once per `generate` call (it reads the EOS ids from the device).
    """
    max_length, eos_ids = float("inf"), set()
    for criterion in stopping_criteria:
        if type(criterion) is MaxLengthCriteria:
            max_length = min(max_length, criterion.max_length)
        elif type(criterion) is EosTokenCriteria:
            eos_ids.update(criterion.eos_token_id.flatten().tolist())
        else:
            return None
    return max_length, frozenset(eos_ids)


def host_stop(stop_rule: HostStopRule, length: int, new_tokens: Sequence[int]) -> int | None:
    """Index of the first of `new_tokens`, following a sequence of `length` tokens, that `stop_rule` stops at."""
    max_length, eos_ids = stop_rule
    for index, token in enumerate(new_tokens):
        if length + index + 1 >= max_length or token in eos_ids:
            return index
    return None


def first_stop(
    stopping_criteria: StoppingCriteriaList,
    stop_rule: HostStopRule | None,
    input_ids: torch.LongTensor,
    new_ids: torch.LongTensor,
    new_tokens: Sequence[int],
    scores: tuple | None = None,
    new_scores: Sequence[torch.Tensor] = (),
) -> int | None:
    """Index of the first of the tokens following `input_ids` after which generation stops, or None.

    Args:
        stop_rule: `host_stop_rule(stopping_criteria)`.
        new_ids: the new tokens on the device, `(1, k)`; new_tokens: the same on the host.
        scores / new_scores: the scores tuple `_sample` would pass before the first new token and the processed
            scores of each new token (only read by criteria that look at scores).
    """
    if stop_rule is not None:
        return host_stop(stop_rule, input_ids.shape[1], new_tokens)
    done = []
    for index in range(len(new_tokens)):
        if scores is not None:
            scores += (new_scores[index],)
        done.append(stopping_criteria(torch.cat([input_ids, new_ids[:, : index + 1]], dim=-1), scores))
    stops = torch.cat(done).tolist() if done else []
    return stops.index(True) if True in stops else None


__all__ = ["HostStopRule", "first_stop", "host_stop", "host_stop_rule"]
