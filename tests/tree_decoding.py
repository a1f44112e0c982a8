"""Tree-decoding test helpers: oracle heads, the tree loop through `generate`, exactness checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from conftest import TEST_DEVICE, make_target, move_pair
from lossless import assert_greedy_lossless, make_friendly_pair, prompt_reaching_eos
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.decoding.checks import check_eagle3_inputs
from hf_eagle3.decoding.config import Eagle3DecodingConfig
from hf_eagle3.decoding.draft_tree import DraftTree
from hf_eagle3.decoding.stats import Eagle3GenerationStats
from hf_eagle3.decoding.tree_loop import tree_assisted_decoding

SMALL_TREE = (8, 3, 2)  # total_tokens, depth, top_k
DEFAULT_TREE = (60, 8, 10)


@dataclass
class RecordingStats(Eagle3GenerationStats):
    """Also keeps every `(num_accepted, num_emitted)` pair, to see where generation stopped."""

    steps: list[tuple[int, int]] = field(default_factory=list)

    def record(self, num_accepted: int, num_emitted: int) -> None:
        super().record(num_accepted, num_emitted)
        self.steps.append((num_accepted, num_emitted))


class OracleHead(Eagle3DraftModel):
    """A head that mostly agrees with a near-bigram target: its logits get `oracle[token]` added.

    The head still runs its own layer (caches, masks, positions); the bias only makes it propose what the target
    will say, so long accepted runs happen without training a head.
    """

    oracle: torch.Tensor

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        bias = self.oracle[input_ids]
        keep = kwargs.get("logits_to_keep", 0)
        output.logits = output.logits + (bias[:, -keep:] if keep else bias)
        return output


def make_oracle_pair(
    arch: str,
    context_weight: float,
    eos_token_id: int | None = 2,
    device: str | torch.device | None = None,
    **overrides,
):
    """A target whose next token depends mostly on the current token, and an `OracleHead` for it.

    `context_weight` scales every layer's output projections: 0 gives a pure bigram model (the head always
    agrees), larger values let the context change the target's choice (rejections). Built on the CPU (the same
    models on every device), then moved to `device` (default `TEST_DEVICE`).
    """
    target = make_target(arch, eos_token_id=eos_token_id, device="cpu", **overrides)
    with torch.no_grad():
        # The padding row starts at zero, which would make every next token after a pad a tie.
        target.model.embed_tokens.weight[target.config.pad_token_id].normal_(0, 0.02)
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(context_weight)
            layer.mlp.down_proj.weight.mul_(context_weight)
        bigram = target.lm_head(target.model.norm(target.model.embed_tokens.weight)).log_softmax(-1)
    torch.manual_seed(0)
    head = OracleHead(Eagle3Config.from_target_config(target.config)).eval().attach_target(target)
    target, head = move_pair(target, head, device)
    head.oracle = 30 * bigram.to(target.device)
    return target, head


def checked_tree_decoding(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    streamer=None,
    *,
    head,
    decoding_config,
    stats,
    **kwargs,
):
    """What the dispatch does in tree mode: check the call's inputs once, then run the tree loop."""
    check_eagle3_inputs(model, head, decoding_config, input_ids, generation_config, False, kwargs)
    return tree_assisted_decoding(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        draft_model=head,
        decoding_config=decoding_config,
        stats=stats,
        **kwargs,
    )


def tree_generate(
    target,
    head,
    input_ids,
    tree_shape=SMALL_TREE,
    stats=None,
    streamer=None,
    static_cache=None,
    compile=False,
    **generate_kwargs,
):
    """`target.generate` with transformers' own processors, criteria and cache, decoding through the tree loop."""
    total_tokens, depth, top_k = tree_shape
    config = Eagle3DecodingConfig(
        total_tokens=total_tokens, depth=depth, top_k=top_k, static_cache=static_cache, compile=compile
    )
    stats = stats if stats is not None else RecordingStats()
    decode = partial(checked_tree_decoding, head=head, decoding_config=config, stats=stats)
    if streamer is not None:
        decode = partial(decode, streamer=streamer)
    return target.generate(input_ids, custom_generate=decode, **generate_kwargs)


def prompt(
    seed: int, length: int = 7, vocab_size: int = 96, device: str | torch.device | None = None
) -> torch.LongTensor:
    """Random ids (no pad, BOS or EOS), the same on every device; on `device` (default `TEST_DEVICE`)."""
    ids = torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(TEST_DEVICE if device is None else device)


def hand_built_tree() -> DraftTree:
    r"""root -> {1, 2}; 1 -> {3, 4}; 3 -> {5}."""
    parents = torch.tensor([0, 0, 0, 1, 1, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    ancestors = torch.eye(6, dtype=torch.bool)
    for node, chain in {1: [0], 2: [0], 3: [0, 1], 4: [0, 1], 5: [0, 1, 3]}.items():
        ancestors[node, chain] = True
    return DraftTree(
        tokens=torch.tensor([11, 12, 13, 14, 15, 16]),
        parents=parents,
        depths=depths,
        ancestors=ancestors,
        scores=torch.zeros(6),
    )


class CollectingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        self.ended = True


def assert_scores_and_stream_match_sample(target, head, input_ids, static_cache=None, **generate_kwargs):
    """16 greedy tokens through the tree loop: sequences, scores and logits equal `_sample`'s, every token streamed."""
    kwargs = dict(
        max_new_tokens=16,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **generate_kwargs,
    )
    expected = target.generate(input_ids, **kwargs)
    streamer = CollectingStreamer()
    output = tree_generate(target, head, input_ids, (16, 5, 3), streamer=streamer, static_cache=static_cache, **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    assert len(output.scores) == len(expected.scores) == output.sequences.shape[1] - input_ids.shape[1]
    torch.testing.assert_close(torch.cat(output.scores), torch.cat(expected.scores), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(output.logits), torch.cat(expected.logits), atol=1e-4, rtol=1e-4)
    # The loop streams every new token once, then ends (generate() streams the prompt when it owns the streamer).
    # Streamed chunks are on the host, as `generate` streams them.
    assert torch.equal(torch.cat(streamer.chunks, dim=-1), output.sequences[:, input_ids.shape[1] :].cpu())
    assert streamer.ended


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs`; cells of probability 0 must stay empty."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc((support.sum() - 1) / 2.0, statistic / 2))


# The settings of the end-to-end sampling checks: temperature, top-k, top-p and a repetition penalty (which reads the
# sequence), or the target's plain distribution.
PROCESSED_SAMPLING = dict(temperature=0.8, top_k=5, top_p=1.0, repetition_penalty=1.3)
PLAIN_SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def sampling_processors(temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    """The processors `generate` builds for these sampling settings, in its order."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def assert_sampling_matches_target_distribution(
    static_cache: bool | None = None,
    device=None,
    compile: bool = False,
    arch: str = "llama",
    sampling: dict | None = None,
    runs: int = 150,
    auto_tree: bool = False,
):
    """End to end through `generate`: tokens 2 and 3, and the pair, vs the exact processed target distribution.

    Token 2 is drawn at the tree root, token 3 often below an accepted draft (conditioned on token 2), with the
    `sampling` settings (default `PROCESSED_SAMPLING`: temperature, top-k and a repetition penalty). Few runs keep it
    fast: the acceptance rules themselves are checked precisely in `test_decoding_acceptance`. The models live on
    `device` (default `TEST_DEVICE`); the counts and exact probabilities on the CPU. `auto_tree` decodes through the
    dispatch with `eagle3_tree="auto"` (the first call measures the tree, into the current tree cache) instead of the
    fixed tree 5/2/2.
    """
    sampling = PROCESSED_SAMPLING if sampling is None else sampling
    vocab = 8
    target, head = make_oracle_pair(arch, 0.5, vocab_size=vocab, eos_token_id=None, num_hidden_layers=4, device=device)
    head.oracle = head.oracle / 10  # agree often, not always: both acceptance and residual draws happen
    input_ids = torch.tensor([[3, 5, 4, 6]], device=target.device)
    tokens = torch.arange(vocab, device=target.device)
    processors = sampling_processors(**sampling)

    def next_probs(sequences: torch.LongTensor) -> torch.Tensor:
        with torch.no_grad():
            logits = target(sequences).logits[:, -1]
        return processors(sequences, logits).softmax(-1)

    first = next_probs(input_ids)[0]
    contexts = torch.cat([input_ids.expand(vocab, -1), tokens[:, None]], dim=1)
    second = next_probs(contexts)  # [t1, t2]
    pairs = torch.cat([contexts.repeat_interleave(vocab, 0), tokens.repeat(vocab)[:, None]], dim=1)
    third = next_probs(pairs).view(vocab, vocab, vocab)  # [t1, t2, t3]
    joint12 = first[:, None] * second
    joint23 = (joint12[..., None] * third).sum(0).cpu()
    exact = {2: joint12.sum(0).cpu(), 3: joint23.sum(0), (2, 3): joint23}

    torch.manual_seed(0)
    counts = {2: torch.zeros(vocab), 3: torch.zeros(vocab), (2, 3): torch.zeros(vocab, vocab)}
    stats = RecordingStats()
    for _ in range(runs):
        if auto_tree:
            output = target.generate(
                input_ids,
                assistant_model=head,
                eagle3_tree="auto",
                eagle3_static_cache=static_cache,
                eagle3_compile=compile,
                max_new_tokens=3,
                do_sample=True,
                **sampling,
            )
            call = head.last_generation_stats
            stats.steps.append((sum(call.accepted_per_depth), call.new_tokens))
            stats.target_forwards += call.target_forwards
            stats.static_cache, stats.compiled = call.static_cache, call.compiled
        else:
            output = tree_generate(
                target,
                head,
                input_ids,
                (5, 2, 2),
                stats,
                static_cache=static_cache,
                compile=compile,
                max_new_tokens=3,
                do_sample=True,
                **sampling,
            )
        counts[2][int(output[0, 5])] += 1
        counts[3][int(output[0, 6])] += 1
        counts[2, 3][int(output[0, 5]), int(output[0, 6])] += 1
    accepted = sum(accepted for accepted, _ in stats.steps)
    assert 0 < accepted < stats.target_forwards, "need acceptances and rejections"
    assert stats.static_cache == bool(static_cache) and stats.compiled == compile
    for position in (2, 3, (2, 3)):
        p_value = chi_square_p_value(counts[position].flatten(), exact[position].flatten())
        assert p_value > 1e-4, (position, counts[position])


def assert_friendly_head_lossless(arch: str, knobs: dict):
    """`target.generate(assistant_model=head)` decodes with the tree (the default mode), token-identically.

    The trained head of the shared harness drafts long runs, so EOS and `max_new_tokens` land inside them.
    """
    target, head = make_friendly_pair(arch)
    output = assert_greedy_lossless(target, head, prompt_reaching_eos(target, 23), max_new_tokens=40, **knobs)
    assert output.sequences[0, -1] == target.config.eos_token_id
    assert output.eagle3_stats.mean_accept_len > 2
    assert output.eagle3_stats.static_cache == bool(knobs.get("eagle3_static_cache"))
    for max_new_tokens in (9, 14):
        assert_greedy_lossless(target, head, prompt_reaching_eos(target, 30), max_new_tokens=max_new_tokens, **knobs)
