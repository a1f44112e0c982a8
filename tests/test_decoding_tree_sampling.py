"""Acceptance for sampling and processors on the device: every node's processed scores at once, the multi-candidate
rule drawn for the whole tree, one host transfer per step; exact against the walk and the target's distribution.

The device acceptance runs on accelerators only (on the CPU the node-by-node walk is cheaper), so the end-to-end
tests force it on the CPU (the `device_acceptance` fixture).
"""

from __future__ import annotations

import pytest
import torch
from lossless import chi_square_p_value
from test_decoding_overhead import SyncCounter, assert_one_host_transfer_per_step, walk_tree_logits
from transformers.generation import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from tree_decoding import (
    PLAIN_SAMPLING,
    assert_sampling_matches_target_distribution,
    hand_built_tree,
    make_oracle_pair,
    prompt,
    tree_generate,
)

from hf_eagle3.decoding import cuda_graphs, static_tree, tree_processors
from hf_eagle3.decoding.acceptance import accept, accept_on_device, sampled_path
from hf_eagle3.decoding.static_tree import StaticTreeRunner
from hf_eagle3.decoding.stopping import host_stop_rule
from hf_eagle3.decoding.tree_processors import path_tokens, process_tree_logits, processes_rows_independently

VOCAB = 20
PREFIX = torch.tensor([[7, 12, 9, 11]])  # ends with the root's token, as `input_ids` does

SEQUENCE_FREE = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(6), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]
# Processors that read the sequence: the penalty its tokens, min-length its length, bad words its last token.
ROW_WISE = [
    RepetitionPenaltyLogitsProcessor(1.8),
    MinLengthLogitsProcessor(PREFIX.shape[1] + 2, eos_token_id=3),
    NoBadWordsLogitsProcessor([[13, 15], [4]], eos_token_id=2),
    TemperatureLogitsWarper(0.7),
    TopKLogitsWarper(8),
]


def node_sequence(tree, node: int) -> torch.LongTensor:
    """The prefix followed by the node's path below the root, as `_sample` would have it."""
    path, parents = [], tree.parents.tolist()
    while node:
        path.append(int(tree.tokens[node]))
        node = parents[node]
    return torch.cat([PREFIX, torch.tensor([path[::-1]], dtype=torch.long)], dim=1)


@pytest.mark.parametrize("processors", [SEQUENCE_FREE, ROW_WISE, []], ids=["sequence-free", "row-wise", "none"])
def test_process_tree_logits_equals_one_call_per_node(processors):
    """Every node gets what the list returns for its own sequence alone."""
    processors = LogitsProcessorList(processors)
    tree = hand_built_tree()
    logits = torch.randn(len(tree), VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    assert path_tokens(tree, 3).tolist() == [[0, 0, 0], [12, 0, 0], [13, 0, 0], [12, 14, 0], [12, 15, 0], [12, 14, 16]]
    processed = process_tree_logits(logits, tree, PREFIX, processors, depth=3)
    for node in range(len(tree)):
        expected = processors(node_sequence(tree, node), logits[node : node + 1].clone())
        torch.testing.assert_close(processed[node : node + 1], expected, rtol=0, atol=1e-6)


class Custom(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


class SubclassedPenalty(RepetitionPenaltyLogitsProcessor):
    pass


def test_only_known_row_wise_processors_go_to_the_device():
    assert processes_rows_independently(LogitsProcessorList(SEQUENCE_FREE + ROW_WISE))
    assert processes_rows_independently(LogitsProcessorList())
    for unknown in (Custom(), SubclassedPenalty(1.2)):
        assert not processes_rows_independently(LogitsProcessorList([TemperatureLogitsWarper(0.7), unknown]))
    # A per-row prompt length is sized for the call's batch, not for the tree's rows.
    per_row = RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=torch.tensor([2]))
    assert not processes_rows_independently(LogitsProcessorList([per_row]))
    assert processes_rows_independently(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2, 2)]))


def walk_distribution(probs: torch.Tensor, tree) -> dict[tuple[int, ...], float]:
    """The exact probability of every token sequence one step can emit: at each node a token of the node's
    distribution, moving on to the child holding it, ending at a token no child holds (what `accept` samples)."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    outcomes: dict[tuple[int, ...], float] = {}

    def visit(node: int, emitted: tuple[int, ...], probability: float):
        kid_of = {tokens[kid]: kid for kid in children[node]}
        for token, p in enumerate(probs[node].tolist()):
            if p == 0:
                continue
            if token in kid_of:
                visit(kid_of[token], (*emitted, token), probability * p)
            else:
                outcomes[(*emitted, token)] = probability * p

    visit(0, (), 1.0)
    return outcomes


def draw_steps(logits: torch.Tensor, tree, draws: int) -> list[tuple[int, ...]]:
    """`draws` steps of `sampled_path` over the nodes' `logits`, checking that each is a path whose tokens lead from
    node to node."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    steps = []
    for _ in range(draws):
        num_visited, visited, emitted = sampled_path(logits, tree, 4)
        num_visited, visited, emitted = int(num_visited), visited.tolist(), emitted.tolist()
        path = visited[:num_visited]
        assert path[0] == 0 and all(parents[node] == previous for previous, node in zip(path, path[1:], strict=False))
        assert all(emitted[index] == tokens[node] for index, node in enumerate(path[1:]))
        # The last token is drawn at the last node: never one of its children's tokens.
        assert emitted[num_visited - 1] not in [tokens[kid] for kid in tree.children()[path[-1]]]
        steps.append(tuple(emitted[:num_visited]))
    return steps


@pytest.mark.parametrize("case", ["mixed", "children-hold-all", "zero-children"])
def test_sampled_path_has_the_walks_distribution(case):
    """Chi-square over whole emitted sequences against the exact walk of `sample_with_candidates`: the acceptance
    probabilities renormalised over earlier rejected siblings, the residual draws, and their fallback."""
    tree = hand_built_tree()
    logits = torch.randn(len(tree), VOCAB, generator=torch.Generator().manual_seed(1))
    for child in range(1, len(tree)):
        logits[tree.parents[child], tree.tokens[child]] += 2.0
    if case == "children-hold-all":
        # The root's two children hold all its mass: rounding may leave a residual, or none.
        logits[0] = float("-inf")
        logits[0, tree.tokens[1]], logits[0, tree.tokens[2]] = 0.3, 0.0
    if case == "zero-children":
        logits[1, tree.tokens[3]] = float("-inf")  # node 3 can never be reached
    exact = walk_distribution(logits.softmax(-1), tree)
    torch.manual_seed(0)
    steps = draw_steps(logits, tree, 3000)
    assert chi_square_p_value(steps, exact) > 1e-4
    assert max(map(len, steps)) >= 3, "deep paths should be drawn"


def test_accept_on_device_greedy_with_processors_equals_the_walk():
    """Processed greedy decoding: the same tokens, path, stop and scores as the walk, for paths of every length."""
    tree = hand_built_tree()
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), TopKLogitsWarper(5)])
    for path in ([0], [0, 1], [0, 1, 3], [0, 1, 3, 5], [0, 2]):
        logits = walk_tree_logits(tree, path)
        for stopping in ([MaxLengthCriteria(100)], [MaxLengthCriteria(PREFIX.shape[1] + 2)], [EosTokenCriteria(14)]):
            stopping = StoppingCriteriaList(stopping)
            expected = accept(logits, tree.tokens, tree.children(), PREFIX, processors, stopping, False, (), ())
            step, visited, ids, scores, raw_logits = accept_on_device(
                logits, tree, 3, PREFIX, processors, False, stopping, host_stop_rule(stopping), (), ()
            )
            assert step == expected[0] and visited.tolist() == step.visited
            assert torch.equal(ids, expected[1])
            assert len(scores) == len(raw_logits) == len(expected[2])
            for got, reference in zip(scores, expected[2], strict=True):
                torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


PROCESSED_TOP_P = dict(temperature=0.7, top_k=6, top_p=0.9, repetition_penalty=1.3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("sampling", [PLAIN_SAMPLING, PROCESSED_TOP_P], ids=["t1", "t0.7-topk-topp-penalty"])
def test_sampling_matches_target_distribution(device_acceptance, arch, sampling):
    assert_sampling_matches_target_distribution(arch=arch, sampling=sampling, runs=200)
    assert device_acceptance, "the device acceptance was not used"


# Sequence-free warpers only: the static path runs them inside its sample step.
IN_STEP_TOP_P = dict(temperature=0.7, top_k=6, top_p=0.9, repetition_penalty=1.0)


@pytest.fixture
def built_sample_steps(monkeypatch) -> list[str]:
    """The names of the step functions the static runners build their sample steps from, in order."""
    names = []
    build = StaticTreeRunner._build_sample_step

    def recorded(self, function):
        names.append(function.__name__)
        return build(self, function)

    monkeypatch.setattr(StaticTreeRunner, "_build_sample_step", recorded)
    return names


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    ("sampling", "step"),
    [(PLAIN_SAMPLING, "_process_and_sample"), (IN_STEP_TOP_P, "_process_and_sample"), (None, "_sample")],
    ids=["t1-in-step", "t0.7-topk-topp-in-step", "penalty-eager"],
)
def test_static_path_sampling_matches_target_distribution(
    device_acceptance, aot_eager, built_sample_steps, caplog, compile, sampling, step
):
    """The static runner draws the path in a step function of its own, compiled with the others; sequence-free
    warpers run inside it, a repetition penalty eagerly before it. One step serves every call (equal settings)."""
    with caplog.at_level("WARNING"):
        assert_sampling_matches_target_distribution(static_cache=True, compile=compile, sampling=sampling)
    assert device_acceptance, "the device acceptance was not used"
    assert "sampled acceptance without a compiled or captured step" not in caplog.text
    assert built_sample_steps == [step]


def test_in_step_processors_are_rebuilt_when_their_settings_change(device_acceptance, aot_eager, built_sample_steps):
    """A compiled sample step with its warpers is reused (nothing recompiled) by a call with the same settings, and
    rebuilt for another temperature."""
    target, head = make_oracle_pair("llama", 0.3, eos_token_id=None)
    kwargs = dict(max_new_tokens=10, do_sample=True, static_cache=True, compile=True, top_k=6, top_p=0.9)
    tree_generate(target, head, prompt(1), (8, 3, 2), temperature=0.7, **kwargs)
    runner = static_tree.cached_runner(head)
    step = runner._process_step
    with torch.compiler.set_stance("fail_on_recompile"):
        tree_generate(target, head, prompt(2), (8, 3, 2), temperature=0.7, **kwargs)
    assert runner._process_step is step and built_sample_steps == ["_process_and_sample"]
    tree_generate(target, head, prompt(2), (8, 3, 2), temperature=0.9, **kwargs)
    assert static_tree.cached_runner(head) is runner and runner._process_step is not step
    assert [type(processor).__name__ for processor in runner.step_processors] == [
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert runner.step_processors[0].temperature == 0.9 and len(built_sample_steps) == 2


def test_in_step_processors_draw_what_eager_processors_draw(device_acceptance, monkeypatch):
    """Seed for seed, the static step that runs the warpers itself emits the tokens and scores of the step that draws
    from eagerly processed scores, before and after a change of temperature."""
    target, head = make_oracle_pair("llama", 0.3, eos_token_id=None)
    kwargs = dict(
        max_new_tokens=10, do_sample=True, static_cache=True, top_k=6, top_p=0.9, return_dict_in_generate=True
    )

    def run(temperature: float, seed: int):
        torch.manual_seed(seed)
        output = tree_generate(
            target, head, prompt(seed), (8, 3, 2), temperature=temperature, output_scores=True, **kwargs
        )
        return output.sequences, torch.cat(output.scores)

    for seed, temperature in enumerate((0.7, 0.7, 1.3)):
        in_step = run(temperature, seed)
        with monkeypatch.context() as patch:
            patch.setattr(static_tree, "capturable", lambda processors: False)
            eager = run(temperature, seed)
        assert torch.equal(in_step[0], eager[0])
        torch.testing.assert_close(in_step[1], eager[1], rtol=0, atol=0)
    runner = static_tree.cached_runner(head)
    assert runner._process_step is not None and runner._sample_step is not None


# Every sequence-free processor but token suppression (left out of the captured step for a host copy, not a read).
HOST_CHECKED = [
    TemperatureLogitsWarper(0.7),
    TopKLogitsWarper(6),
    TopPLogitsWarper(0.9),
    MinPLogitsWarper(0.05),
    TypicalLogitsWarper(0.9),
    EpsilonLogitsWarper(0.02),
    InfNanRemoveLogitsProcessor(),
    LogitNormalization(),
    EtaLogitsWarper(0.02),
    TopHLogitsWarper(0.5),
]


@pytest.mark.parametrize("processor", HOST_CHECKED, ids=lambda processor: type(processor).__name__)
def test_capturable_processors_read_nothing_on_the_host(monkeypatch, processor):
    """The warpers the static path runs inside its captured step read no device value; Eta and Top-H do (through
    the validation of their `Categorical`, on by default; dynamo turns it off for the whole process once it runs)."""
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    assert {type(checked) for checked in HOST_CHECKED} | {
        SuppressTokensLogitsProcessor
    } == tree_processors.SEQUENCE_FREE
    counter = SyncCounter()
    with counter:
        processor(None, torch.randn(5, VOCAB))
    assert (counter.count == 0) == tree_processors.capturable([processor])


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_one_host_transfer_per_sampled_step(device_acceptance, monkeypatch, static_cache):
    """A sampled step with processors, drafted, verified and accepted, reads the device once."""
    assert_one_host_transfer_per_step(monkeypatch, static_cache, do_sample=True, **PROCESSED_TOP_P)
    assert device_acceptance, "the device acceptance was not used"


def test_static_sample_step_that_cannot_be_compiled_runs_eagerly(device_acceptance, aot_eager, monkeypatch, caplog):
    """A sample step that fails to compile is drawn eagerly, with a warning; the other steps stay compiled. Its
    buffer outlives an inference-mode call."""
    compile_step = cuda_graphs._compile_step

    def failing_sample(method):
        if method.__func__ is not StaticTreeRunner._sample:
            return compile_step(method)

        def fail():
            raise RuntimeError("cannot trace this")

        return fail

    monkeypatch.setattr(cuda_graphs, "_compile_step", failing_sample)
    target, head = make_oracle_pair("llama", 0.3, eos_token_id=None)
    kwargs = dict(max_new_tokens=10, do_sample=True, static_cache=True, compile=True, **PROCESSED_TOP_P)
    with caplog.at_level("WARNING"), torch.inference_mode():
        output = tree_generate(target, head, prompt(1), (8, 3, 2), **kwargs)
    assert "sampled acceptance without a compiled or captured step: cannot trace this" in caplog.text
    runner = static_tree.cached_runner(head)
    assert runner.compiled and runner._sample_step.function == runner._sample
    assert output.shape[1] == prompt(1).shape[1] + 10
    # Outside inference mode, the same runner and buffer.
    assert tree_generate(target, head, prompt(2), (8, 3, 2), **kwargs).shape[1] == prompt(2).shape[1] + 10
    assert static_tree.cached_runner(head) is runner and device_acceptance
