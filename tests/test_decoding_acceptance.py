"""Acceptance rules: sampling through draft candidates and the acceptance walk are exact."""

from __future__ import annotations

import torch
from transformers.generation import (
    LogitsProcessorList,
    MaxLengthCriteria,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)
from tree_decoding import chi_square_p_value

from hf_eagle3.decoding.acceptance import accept, sample_with_candidates


def test_sample_with_candidates_is_exact():
    """Chi-square: tokens drawn through candidate acceptance follow p exactly, whatever the candidates."""
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    draws = 3000
    for candidates in ([4, 1], [2, 5, 3], [0], []):
        candidates = torch.tensor(candidates, dtype=torch.long)
        counts = torch.zeros(6)
        for _ in range(draws):
            token, hit = sample_with_candidates(probs, candidates)
            counts[token] += 1
            assert (hit is None) or int(candidates[hit]) == token
        assert chi_square_p_value(counts, probs) > 1e-4, (candidates.tolist(), counts.tolist())


def test_acceptance_walk_samples_the_processed_target_distribution():
    """Chi-square on the first two tokens one verified tree emits, against the exact processed distributions.

    The second token is drawn at the accepted child, whose processors must see the child's token (repetition
    penalty) and whose logits are that node's: any slip shows in the joint distribution.
    """
    vocab = 6
    torch.manual_seed(0)
    logits = torch.randn(4, vocab) * 1.5
    children, tokens = [[1, 2], [3], [], []], [0, 3, 1, 4]
    prefix = torch.tensor([[5, 3, 2]])
    processors = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(2.0), TemperatureLogitsWarper(0.7), TopKLogitsWarper(4)]
    )
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=20)])

    def probs(node: int, context: list[int]) -> torch.Tensor:
        sequence = torch.cat([prefix, torch.tensor([context], dtype=torch.long)], dim=1)
        return processors(sequence, logits[node : node + 1])[0].softmax(-1)

    # Cell (a, b) for a drafted child a followed by b; cell (a, vocab) when a ended the step.
    exact = torch.zeros(vocab, vocab + 1)
    root = probs(0, [])
    for token in range(vocab):
        exact[token, vocab] = root[token]
    for child in children[0]:
        exact[tokens[child], vocab] = 0
        exact[tokens[child], :vocab] = root[tokens[child]] * probs(child, [tokens[child]])

    counts = torch.zeros(vocab, vocab + 1)
    for _ in range(2000):
        step, _, _, _ = accept(logits, torch.tensor(tokens), children, prefix, processors, criteria, True, None, None)
        second = step.tokens[1] if len(step.tokens) > 1 else vocab
        counts[step.tokens[0], second] += 1
        assert step.num_accepted == len(step.tokens) - 1 and step.visited[0] == 0
    assert chi_square_p_value(counts.flatten(), exact.flatten()) > 1e-4
