"""The static-cache CUDA-graph tree path on CUDA, through the public `generate(assistant_model=head)` call.

GPU only (marked `gpu`: skipped without CUDA, run alone with `-m gpu`). Nothing here forces `eagle3_static_cache`:
on CUDA the automatic choice must take the static path and capture the step as graphs, and every check asserts it
did (a capture failure would fall back to the dynamic cache with a warning, and fail these tests).

- float32: greedy text token-identical to plain `generate`, for every tiny architecture, with a head that drafts
  long runs and a random one (mostly rejections, reduced draft vocabulary); calls that fit reuse the runner and
  its graphs, a longer call builds a larger one.
- bfloat16 (no identity expected: other kernels round differently and near-ties flip): every emitted token is the
  argmax of the verification logits the call returns for it (`output_logits`), a fresh forward over the output
  agrees with those tokens up to near-ties, and the text mostly matches plain `generate` (agreements printed).
- sampling: continuations follow the target's exact distribution (chi-square), with temperature and top-k, the
  acceptance drawn on the device by a captured step of its own; with top-p and a repetition penalty too, on the
  static and the dynamic path.
- statistics: `static_cache` and the draft / verify / accept phase times.
- prompts: encoded by a captured graph per padded length (`prompt_encoding`), the logits a call returns for its
  first token kept when a later call replays the same graph.
- a padded batch (the automatic choice decodes it on the batch runner's graphs, with the automatic tree shape):
  every row token-identical to its prompt alone and to plain batched `generate` (float32), and sampled rows with
  their exact distributions. The CPU suite of batches runs on CUDA too with `HF_EAGLE3_TEST_DEVICE=cuda`
  (tests/test_decoding_batched.py: both backends, the static one captured).

Each check runs twice: on the captured eager steps (`graphs`) and with `eagle3_compile=True` (`compiled`): the step
functions compiled by inductor (Triton kernels), warmed up, then captured; calls that reuse the runner replay its
graphs and compile nothing again (`fail_on_recompile` would raise). Every new runner compiles anew, so the compiled
half is slower: run it as a call of its own.

On a CUDA machine, with the static-tree suite on CUDA too (see conftest), in two calls:
    HF_EAGLE3_TEST_DEVICE=cuda python -m pytest tests/test_decoding_cuda.py tests/test_decoding_static_tree.py tests/test_decoding_batched.py -q -rA -s -k "not compiled"
    python -m pytest tests/test_decoding_cuda.py -q -rA -s -k compiled
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_head, make_target
from lossless import (
    assert_greedy_lossless,
    assert_rows_lossless,
    chi_square_p_value,
    exact_continuation_probs,
    left_pad,
)
from tree_decoding import assert_sampling_matches_target_distribution, make_oracle_pair, prompt

from hf_eagle3.decoding import cuda_graphs, static_tree

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
PHASES = ("draft", "verify", "accept")
# Every check on the captured eager steps and on the captured compiled ones (`eagle3_compile`).
COMPILED = pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "compiled"])


def assert_graph_path(output, head, compiled: bool = False, batched: bool = False):
    """The call (on a `batched` prompt or not) decoded on the static path (replaying CUDA graphs on CUDA), with
    compiled steps or not, and timed its phases; its runner."""
    stats = output.eagle3_stats
    runner = static_tree.cached_runner(head, batched)
    assert stats.static_cache, "not on the static path: did the capture fail (see the logged warning)?"
    assert stats.compiled == compiled and runner.compiled == compiled
    assert set(PHASES) <= set(stats.phase_seconds), stats.phase_seconds
    assert all(stats.phase_seconds[phase] >= 0 for phase in PHASES) and sum(map(stats.phase_seconds.get, PHASES)) > 0
    if output.sequences.device.type == "cuda":
        steps = (runner._draft_step, runner._verify_step, runner._commit_step)
        assert all(step.graph is not None for step in steps), "the tree step was not captured as CUDA graphs"
        encodings = runner.prompt_encoder.encodings.values()
        assert encodings and all(encoding.step.graph is not None for encoding in encodings), (
            "prompts were not captured"
        )
    return runner


def make_pair(arch: str, head_kind: str, device, dtype=torch.float32):
    """A target without EOS (every call runs to `max_new_tokens`) and an oracle or random head, on `device`."""
    if head_kind == "oracle":
        target, head = make_oracle_pair(arch, 0.3, eos_token_id=None, device=device)
        head.oracle = head.oracle.to(dtype)
    else:
        target = make_target(arch, eos_token_id=None, device=device)
        head = make_head(target, draft_vocab_size=64)
    target.to(dtype)
    return target, head.to(dtype).attach_target(target)


def check_float32_identity(arch: str, head_kind: str, device=CUDA, **knobs):
    target, head = make_pair(arch, head_kind, device)
    compiled = knobs.get("eagle3_compile", False)
    runner = None
    for seed in range(3):
        input_ids = prompt(seed, length=5 + seed, device=device)
        # Only the first call builds (and compiles) the runner; the others replay its graphs.
        with torch.compiler.set_stance("fail_on_recompile" if seed else "default"):
            output = assert_greedy_lossless(target, head, input_ids, max_new_tokens=40, **knobs)
        current = assert_graph_path(output, head, compiled)
        assert runner is None or current is runner, "a call that fits the runner should reuse it and its graphs"
        runner = current
    if head_kind == "oracle":
        assert output.eagle3_stats.mean_accept_len > 2, "the oracle head should get long runs accepted"
    # Past the runner's caches: a new runner, with new graphs.
    output = assert_greedy_lossless(target, head, prompt(3, device=device), max_new_tokens=300, **knobs)
    grown = assert_graph_path(output, head, compiled)
    assert grown is not runner and grown.max_cache_len > runner.max_cache_len


@COMPILED
@pytest.mark.parametrize("head_kind", ["oracle", "random"])
def test_float32_greedy_is_token_identical(arch, head_kind, compiled):
    check_float32_identity(arch, head_kind, eagle3_compile=compiled)


def test_prompts_are_encoded_by_one_graph_per_padded_length():
    """Prompts of 5 and 9 tokens replay one captured encoding (padded to 64), 70 tokens a second one (128); the
    logits a call returns for its first token stay its own when a later call replays the same graph."""
    target, head = make_pair("llama", "oracle", CUDA)
    kwargs = dict(max_new_tokens=8, output_logits=True)
    first = assert_greedy_lossless(target, head, prompt(0, length=5, device=CUDA), **kwargs)
    kept = first.logits[0].clone()
    second = assert_greedy_lossless(target, head, prompt(1, length=9, device=CUDA), **kwargs)
    runner = assert_graph_path(second, head)
    assert list(runner.prompt_encoder.encodings) == [(1, 64)]
    assert torch.equal(first.logits[0], kept)
    third = assert_greedy_lossless(target, head, prompt(2, length=70, device=CUDA), **kwargs)
    assert list(assert_graph_path(third, head).prompt_encoder.encodings) == [(1, 64), (1, 128)]


def bfloat16_agreement(arch: str, device=CUDA, prompts: int = 8, max_new_tokens: int = 48, **knobs):
    """Greedy bf16 decoding on the static path: (recomputed argmax agreement, mean fraction of plain generate's
    tokens matched before the first difference, largest logit gap of a recomputed disagreement)."""
    target, head = make_pair(arch, "oracle", device, torch.bfloat16)
    agreeing = emitted = 0
    prefix_fractions, gaps = [], [0.0]
    for seed in range(prompts):
        input_ids = prompt(seed, device=device)
        start = input_ids.shape[1]
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        plain = target.generate(input_ids, **kwargs)[0, start:]
        output = target.generate(
            input_ids, assistant_model=head, return_dict_in_generate=True, output_logits=True, **kwargs, **knobs
        )
        assert_graph_path(output, head, knobs.get("eagle3_compile", False))
        new = output.sequences[0, start:]
        assert len(output.logits) == len(new) == max_new_tokens
        # Exact: each token is the argmax of the verification logits that produced it (the prefill's for the first).
        verified = torch.cat(output.logits).argmax(-1)
        assert torch.equal(verified, new), f"emitted {new.tolist()}\nargmax   {verified.tolist()}"
        # Independent: one forward over the whole output. Other shapes round differently, so a few near-ties may
        # flip; a disagreement must be one (its gap is small next to the spread of that row's logits).
        with torch.no_grad():
            logits = target(output.sequences[:, :-1]).logits[0, start - 1 :].float()
        chosen = logits.gather(-1, new[:, None])[:, 0]
        best = logits.max(-1).values
        differs = logits.argmax(-1) != new
        agreeing += int((~differs).sum())
        emitted += len(new)
        gaps += ((best - chosen) / logits.std(-1))[differs].tolist()
        mismatch = (plain != new).nonzero()
        prefix_fractions.append((int(mismatch[0, 0]) if len(mismatch) else len(new)) / len(new))
    return agreeing / emitted, sum(prefix_fractions) / len(prefix_fractions), max(gaps)


@COMPILED
def test_bfloat16_tokens_are_the_targets_argmax(arch, compiled):
    recomputed, plain, gap = bfloat16_agreement(arch, eagle3_compile=compiled)
    variant = "compiled" if compiled else "graphs"
    print(
        f"{arch} bf16 {variant}: {recomputed:.1%} of tokens are the argmax of a fresh forward over the output, "
        f"{plain:.1%} of plain generate's text matched before the first difference, largest near-tie gap "
        f"{gap:.3f} logit std"
    )
    assert recomputed >= 0.95 and gap < 0.1
    assert plain >= 0.5, "bf16 text should mostly match plain generate"


def sampling_p_value(temperature: float, top_k: int | None, device=CUDA, runs: int = 1000, **knobs) -> float:
    """Chi-square p-value of `runs` sampled 3-token continuations against the target's exact distribution."""
    vocab = 8
    target, head = make_oracle_pair(
        "llama", 0.5, vocab_size=vocab, eos_token_id=None, num_hidden_layers=4, device=device
    )
    with torch.no_grad():
        target.lm_head.weight.mul_(8)  # peaked distributions: few likely continuations, so the bins fill
    input_ids = torch.tensor([[3, 5, 4, 6]], device=device)
    probs = exact_continuation_probs(target, input_ids, 3, temperature=temperature, top_k=top_k)
    torch.manual_seed(0)
    samples, accepted, steps = [], 0, 0
    for _ in range(runs):
        output = target.generate(
            input_ids,
            assistant_model=head,
            max_new_tokens=3,
            do_sample=True,
            temperature=temperature,
            top_k=top_k or vocab,
            top_p=1.0,
            eagle3_total_tokens=5,
            eagle3_depth=2,
            eagle3_top_k=2,
            return_dict_in_generate=True,
            **knobs,
        )
        runner = assert_graph_path(output, head, knobs.get("eagle3_compile", False))
        # Temperature and top-k are sequence-free: they run inside the captured sample step.
        assert runner._process_step.graph is not None, "the sampled acceptance was not captured as a CUDA graph"
        samples.append(tuple(output.sequences[0, input_ids.shape[1] :].tolist()))
        stats = output.eagle3_stats
        accepted += sum(stats.accepted_per_depth[:1])
        steps += stats.target_forwards
    assert 0 < accepted < steps, "need both accepted drafts and residual draws"
    return chi_square_p_value(samples, probs)


@COMPILED
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 4)], ids=["t1", "t0.7-top4"])
def test_sampling_matches_target_distribution(temperature, top_k, compiled):
    assert sampling_p_value(temperature, top_k, eagle3_compile=compiled) > 1e-4


@COMPILED
def test_sample_step_is_captured_again_when_the_temperature_changes(compiled):
    """The captured step that runs the warpers serves every call with the same settings, and is captured again for
    another temperature."""
    target, head = make_oracle_pair("llama", 0.5, vocab_size=8, eos_token_id=None, num_hidden_layers=4, device=CUDA)
    input_ids = torch.tensor([[3, 5, 4, 6]], device=CUDA)

    def sample_step(temperature: float) -> cuda_graphs.StepFunction:
        output = target.generate(
            input_ids,
            assistant_model=head,
            max_new_tokens=6,
            do_sample=True,
            temperature=temperature,
            top_k=4,
            eagle3_total_tokens=5,
            eagle3_depth=2,
            eagle3_top_k=2,
            eagle3_compile=compiled,
            return_dict_in_generate=True,
        )
        return assert_graph_path(output, head, compiled)._process_step

    first = sample_step(0.7)
    assert first.graph is not None and sample_step(0.7) is first
    second = sample_step(1.3)
    assert second is not first and second.graph is not None


@COMPILED
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_processed_sampling_matches_target_distribution_on_both_paths(arch, compiled):
    """Temperature, top-k, top-p and a repetition penalty (which reads each node's sequence): tokens 2, 3 and the
    pair against the exact distribution, on the static path (captured, compiled or not) and the dynamic one."""
    sampling = dict(temperature=0.7, top_k=6, top_p=0.9, repetition_penalty=1.3)
    assert_sampling_matches_target_distribution(
        static_cache=True, device=CUDA, compile=compiled, arch=arch, sampling=sampling, runs=400
    )
    if not compiled:
        assert_sampling_matches_target_distribution(
            static_cache=False, device=CUDA, arch=arch, sampling=sampling, runs=400
        )


@COMPILED
def test_stats_report_the_graph_path(compiled):
    target = make_target("qwen3", device=CUDA)
    head = make_head(target)
    output = target.generate(
        prompt(0, device=CUDA),
        assistant_model=head,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        eagle3_compile=compiled,
    )
    stats = output.eagle3_stats
    assert stats.static_cache is True and stats.to_dict()["static_cache"] is True
    assert stats.to_dict()["compiled"] is compiled
    assert {"setup", "prefill", *PHASES} <= set(stats.phase_seconds)
    assert all(stats.phase_seconds[phase] > 0 for phase in PHASES), stats.phase_seconds
    assert_graph_path(output, head, compiled)


@pytest.mark.parametrize(
    ("batch_size", "compiled"), [(2, False), (8, False), (4, True)], ids=["2-graphs", "8-graphs", "4-compiled"]
)
def test_float32_padded_batch_rows_are_token_identical(arch, batch_size, compiled):
    """Rows of different lengths, some reaching EOS, each accepting its own number of drafts per step, on the batch
    runner's graphs (the automatic choice); a second batch of that size replays them without compiling again."""
    target, head = make_oracle_pair(arch, 0.3, device=CUDA)
    runner = None
    for offset in (0, batch_size):
        prompts = [
            prompt(seed, length=3 + (5 * seed) % 11, device=CUDA) for seed in range(offset, offset + batch_size)
        ]
        with torch.compiler.set_stance("fail_on_recompile" if offset else "default"):
            output = assert_rows_lossless(target, head, prompts, max_new_tokens=32, eagle3_compile=compiled)
        current = assert_graph_path(output, head, compiled, batched=True)
        assert runner is None or current is runner, "a batch that fits the runner should reuse it and its graphs"
        runner = current
        stats = output.eagle3_stats
        assert len(stats.rows) == batch_size and runner.batch_size == batch_size
        assert stats.mean_accept_len > 1.5, "the oracle head should get drafts accepted"


@COMPILED
def test_sampled_batch_rows_keep_their_distributions(compiled):
    """Sampling on the batch runner's graphs: each row of a padded batch follows its prompt's exact distribution."""
    vocab = 8
    target, head = make_oracle_pair(
        "llama", 0.5, vocab_size=vocab, eos_token_id=None, num_hidden_layers=4, device=CUDA
    )
    with torch.no_grad():
        target.lm_head.weight.mul_(6)  # peaked distributions: few likely continuations, so the bins fill
    prompts = [torch.tensor([[3, 5, 4, 6]], device=CUDA), torch.tensor([[6, 3]], device=CUDA)]
    input_ids, attention_mask = left_pad(prompts, target.config.pad_token_id)
    probs = [exact_continuation_probs(target, row, 3, temperature=0.8) for row in prompts]
    torch.manual_seed(0)
    samples: list[list[tuple[int, ...]]] = [[], []]
    for _ in range(600):
        output = target.generate(
            input_ids,
            attention_mask=attention_mask,
            assistant_model=head,
            max_new_tokens=3,
            do_sample=True,
            temperature=0.8,
            top_k=vocab,
            top_p=1.0,
            eagle3_total_tokens=5,
            eagle3_depth=2,
            eagle3_top_k=2,
            eagle3_compile=compiled,
            return_dict_in_generate=True,
        )
        assert_graph_path(output, head, compiled, batched=True)
        for row in range(2):
            samples[row].append(tuple(output.sequences[row, input_ids.shape[1] :].tolist()))
    for row in range(2):
        assert chi_square_p_value(samples[row], probs[row]) > 1e-4, row
