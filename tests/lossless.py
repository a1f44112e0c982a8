"""Lossless-decoding harness shared by the chain and tree tests.

API:
- `assert_greedy_lossless(target, head, input_ids, **generate_kwargs)`: greedy `target.generate` with and without
  `assistant_model=head` must agree token by token (float32); returns the EAGLE-3 output
  (`return_dict_in_generate=True`, so `.sequences` and `.eagle3_stats`).
- `assert_rows_lossless(target, head, prompts, **generate_kwargs)`: the same for a left-padded batch of `(1, n)`
  prompts (`left_pad`): equal to plain batched `generate`, every row equal to its prompt generated alone.
- `make_friendly_pair(arch)`: a target whose greedy next token is a fixed function of the current token (a
  single cycle through every id but pad, so its text always reaches EOS) and a head trained on that text
  until it drafts it almost perfectly: long accepted runs, EOS and `max_new_tokens` inside a run. Built and
  trained on the CPU, then moved to `TEST_DEVICE`, once per architecture and cached: do not modify the returned
  models.
- `prompt_reaching_eos(target, tokens_before_eos, length=5)`: a prompt for a friendly target whose greedy
  continuation emits exactly `tokens_before_eos` tokens and then EOS.
- `exact_continuation_probs(target, input_ids, max_new_tokens, temperature=1.0, top_k=None)`: the exact
  probability of every continuation `target.generate(do_sample=True, ...)` can return (tuples of new ids,
  shorter when EOS came first). Keep the vocabulary tiny: it enumerates them.
- `chi_square_p_value(samples, probs)`: goodness-of-fit p-value of sampled continuations against those
  probabilities (bins expected fewer than 5 times are pooled).
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from conftest import make_target, move_pair
from transformers.cache_utils import DynamicCache

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.target_features import TargetFeatureCapture, get_decoder_layers


def assert_greedy_lossless(target, head, input_ids: torch.LongTensor, **generate_kwargs):
    """Compare greedy decoding with and without the head; raise at the first differing token."""
    kwargs = dict(do_sample=False, **generate_kwargs)
    # The target alone takes no EAGLE-3 knobs (they are an error without an EAGLE-3 assistant).
    reference = target.generate(
        input_ids, **{name: value for name, value in kwargs.items() if not name.startswith("eagle3_")}
    )
    output = target.generate(input_ids, assistant_model=head, return_dict_in_generate=True, **kwargs)
    expected, got = reference[0].tolist(), output.sequences[0].tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    assert mismatch is None and len(expected) == len(got), (
        f"EAGLE-3 output differs from the target's own greedy decoding at position {mismatch} "
        f"(lengths {len(got)} vs {len(expected)}):\n  target: {expected}\n  eagle3: {got}"
    )
    return output


def left_pad(prompts: list[torch.LongTensor], pad_token_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(1, length)` prompts as one left-padded batch: input ids and attention mask."""
    length = max(prompt.shape[1] for prompt in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, device=prompts[0].device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - prompt.shape[1] :] = prompt[0]
        attention_mask[row, length - prompt.shape[1] :] = 1
    return input_ids, attention_mask


def assert_rows_lossless(target, head, prompts: list[torch.LongTensor], **generate_kwargs):
    """Greedy EAGLE-3 on the padded batch: equal to plain batched `generate` (pads included), and every row's
    tokens equal to its prompt generated alone, followed by pads. Returns the EAGLE-3 output."""
    kwargs = dict(do_sample=False, **generate_kwargs)
    plain_kwargs = {name: value for name, value in kwargs.items() if not name.startswith("eagle3_")}
    pad = target.config.pad_token_id
    input_ids, attention_mask = left_pad(prompts, pad)
    output = target.generate(
        input_ids, attention_mask=attention_mask, assistant_model=head, return_dict_in_generate=True, **kwargs
    )
    plain = target.generate(input_ids, attention_mask=attention_mask, **plain_kwargs)
    assert torch.equal(output.sequences, plain), f"\n  plain:  {plain.tolist()}\n  eagle3: {output.sequences.tolist()}"
    for row, prompt in enumerate(prompts):
        alone = target.generate(prompt, **plain_kwargs)[0, prompt.shape[1] :]
        got = output.sequences[row, input_ids.shape[1] :]
        assert torch.equal(got[: len(alone)], alone), (row, alone.tolist(), got.tolist())
        assert bool((got[len(alone) :] == pad).all()), (row, got.tolist())
    return output


# ---------------------------------------------------------------------------------------------- friendly pairs
def _make_successor_target(arch: str, seed: int):
    """A tiny target whose logits depend on the current token only: `argmax = successor[token]`.

    Every decoder layer writes nothing into the residual stream (zero output projections), so the final hidden
    state is the token's embedding, and the unembedding row of `successor[x]` is the embedding of `x`.
    """
    target = make_target(arch, seed=seed, device="cpu")
    vocab_size = target.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    # One cycle through every id but pad (whose embedding row is zero): greedy text always reaches EOS.
    order = torch.randperm(vocab_size - 1, generator=generator) + 1
    successor = torch.zeros(vocab_size, dtype=torch.long)
    successor[order] = order.roll(-1)
    with torch.no_grad():
        for layer in get_decoder_layers(target):
            for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
        embeddings = target.get_input_embeddings().weight
        unembedding = torch.zeros_like(target.lm_head.weight)
        unembedding[successor[order]] = embeddings[order]
        target.lm_head.weight.copy_(unembedding)
        predicted = target(order[:, None]).logits[:, 0].argmax(-1)
    assert torch.equal(predicted, successor[order]), "successor target construction failed; try another seed"
    target.successor = successor
    return target


def _train_head(target, head: Eagle3DraftModel, steps: int, unroll: int, length: int = 10, lr: float = 2e-2) -> None:
    """Training-time test on the target's own greedy text: a short walk from every token."""
    successor = target.successor
    columns = [successor.nonzero().squeeze(1)]
    for _ in range(length - 1):
        columns.append(successor[columns[-1]])
    sequences = torch.stack(columns, dim=1)
    with torch.no_grad(), TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        target(sequences)
        features = capture.pop()
    queries = length - unroll - 1
    # Step k's query at t sees the step-0 entries up to t and its own position in every later step.
    causal = torch.ones(queries, queries).tril().bool()
    diagonal = torch.eye(queries).bool()
    min_value = torch.finfo(torch.float32).min
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    head.train()
    for _ in range(steps):
        cache = DynamicCache()
        output = head(
            input_ids=sequences[:, 1 : queries + 1],
            target_hidden_states=features[:, :queries],
            position_ids=torch.arange(queries)[None],
            past_key_values=cache,
        )
        loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), sequences[:, 2 : queries + 2].flatten())
        for step in range(1, unroll):
            allowed = torch.cat([causal] + [diagonal] * step, dim=1)
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, min_value)[None, None]
            output = head(
                input_ids=sequences[:, step + 1 : queries + step + 1],
                hidden_states=output.hidden_states,
                position_ids=torch.arange(queries)[None] + step,
                attention_mask=mask,
                past_key_values=cache,
            )
            step_loss = torch.nn.functional.cross_entropy(
                output.logits.flatten(0, 1), sequences[:, step + 2 : queries + step + 2].flatten()
            )
            loss = loss + 0.8**step * step_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()


@functools.cache
def make_friendly_pair(arch: str = "llama", seed: int = 0, steps: int = 50, unroll: int = 3):
    """A successor target and a head trained to draft its text; cached per arguments."""
    target = _make_successor_target(arch, seed)
    torch.manual_seed(seed)
    head = Eagle3DraftModel(Eagle3Config.from_target_config(target.config)).attach_target(target)
    _train_head(target, head, steps, unroll)
    return move_pair(target, head)


def prompt_reaching_eos(target, tokens_before_eos: int, length: int = 5) -> torch.LongTensor:
    """A prompt of `length` ids ending `tokens_before_eos + 1` successor steps before EOS, on the target's device."""
    predecessor = torch.zeros_like(target.successor)
    predecessor[target.successor] = torch.arange(len(target.successor))
    token = torch.tensor(target.config.eos_token_id)
    for _ in range(tokens_before_eos + 1):
        token = predecessor[token]
    prompt = [int(token)]
    for _ in range(length - 1):
        prompt.insert(0, int(predecessor[prompt[0]]))
    return torch.tensor([prompt], device=target.device)


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def exact_continuation_probs(
    target, input_ids: torch.LongTensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
) -> dict[tuple[int, ...], float]:
    """Probability of every continuation under `generate(do_sample=True, temperature=..., top_k=...)`."""
    eos = target.config.eos_token_id
    finished: dict[tuple[int, ...], float] = {}
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for step in range(max_new_tokens):
        prefixes = list(frontier)
        batch = torch.cat(
            [
                input_ids.expand(len(prefixes), -1),
                torch.tensor(prefixes, dtype=torch.long, device=input_ids.device).view(len(prefixes), step),
            ],
            1,
        )
        logits = target(batch).logits[:, -1].double() / temperature
        if top_k is not None:
            threshold = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = logits.softmax(-1)
        next_frontier = {}
        for prefix, row in zip(prefixes, probs, strict=True):
            for token, p in enumerate(row.tolist()):
                if p == 0.0:
                    continue
                sequence = (*prefix, token)
                probability = frontier[prefix] * p
                if token == eos or step == max_new_tokens - 1:
                    finished[sequence] = probability
                else:
                    next_frontier[sequence] = probability
        frontier = next_frontier
    return finished


def chi_square_p_value(samples: list[tuple[int, ...]], probs: dict[tuple[int, ...], float]) -> float:
    """Pearson goodness-of-fit p-value; bins expected fewer than 5 times are pooled into one."""
    total = len(samples)
    counts = Counter(samples)
    unknown = [sample for sample in counts if sample not in probs]
    assert not unknown, f"sampled continuations the target cannot produce: {unknown[:5]}"
    statistic, bins = 0.0, 0
    pooled_expected, pooled_observed = 0.0, 0
    for sequence, p in probs.items():
        expected = p * total
        if expected < 5:
            pooled_expected += expected
            pooled_observed += counts.get(sequence, 0)
            continue
        statistic += (counts.get(sequence, 0) - expected) ** 2 / expected
        bins += 1
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        bins += 1
    # Chi-square survival function with `bins - 1` degrees of freedom.
    degrees = torch.tensor((bins - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(degrees, torch.tensor(statistic / 2, dtype=torch.float64)))
