"""The static runners' prompt encoding padded to a few lengths (`decoding.prompt_encoding`), which CUDA replays as
graphs: on the CPU the padded encoding runs directly, here forced on, and must change nothing the steps see."""

from __future__ import annotations

import pytest
import torch
from lossless import assert_greedy_lossless, assert_rows_lossless, make_friendly_pair, prompt_reaching_eos

from hf_eagle3.decoding import prompt_encoding, static_tree
from hf_eagle3.decoding.prompt_encoding import MIN_PADDED_LENGTH, padded_length
from hf_eagle3.target_features import TargetFeatureCapture

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture
def padded(monkeypatch):
    """Prompts padded on the CPU too (run directly: there is nothing to capture)."""
    monkeypatch.setattr(prompt_encoding, "pads_prompts", lambda device: True)


def test_padded_lengths():
    assert MIN_PADDED_LENGTH == 64
    assert [padded_length(n, 4096) for n in (1, 63, 64, 65, 128, 129, 700)] == [64, 64, 64, 128, 128, 256, 1024]
    # Never past the cache, which holds the prompt and what follows it.
    assert padded_length(65, 96) == 96 and padded_length(10, 32) == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_prompts_decode_as_the_target_alone(arch, padded):
    """Greedy, float32: one prompt and a left-padded batch, token-identical to plain `generate`; calls whose prompts
    pad to the same length share one padded encoding."""
    target, head = make_friendly_pair(arch)
    for tokens_before_eos, length in ((23, 5), (30, 9)):
        output = assert_greedy_lossless(
            target,
            head,
            prompt_reaching_eos(target, tokens_before_eos, length=length),
            max_new_tokens=40,
            eagle3_static_cache=True,
        )
        assert output.eagle3_stats.static_cache and output.eagle3_stats.mean_accept_len > 2
    encoder = static_tree.cached_runner(head).prompt_encoder
    assert encoder.padded and list(encoder.encodings) == [(1, 64)]
    prompts = [prompt_reaching_eos(target, 12, length=4), prompt_reaching_eos(target, 30, length=8)]
    assert_rows_lossless(target, head, prompts, max_new_tokens=20, eagle3_static_cache=True)
    assert list(static_tree.cached_runner(head, batched=True).prompt_encoder.encodings) == [(2, 64)]


def _runner_after_a_call(arch: str = "llama"):
    """A friendly pair's single-prompt static runner, built by a short call, and a prompt of 9 tokens."""
    target, head = make_friendly_pair(arch)
    input_ids = prompt_reaching_eos(target, 30, length=9)
    target.generate(input_ids, assistant_model=head, max_new_tokens=4, eagle3_static_cache=True, do_sample=False)
    return target, head, static_tree.cached_runner(head), input_ids


@torch.no_grad()
def _encode(target, head, runner, input_ids, model_kwargs):
    """The runner's prompt encoding of `input_ids` alone, with a feature capture of its own."""
    positions = torch.arange(input_ids.shape[1])
    allowed = (runner.columns <= positions[:, None])[None]
    with TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        runner.capture = capture
        return runner.prompt_encoder(input_ids, allowed, positions[None], model_kwargs)


def test_padded_encoding_leaves_what_the_eager_one_leaves(padded):
    """The same prompt encoded padded and unpadded: the same logits, features and cache entries over the prompt, and
    both caches at the prompt's length (the head's one short of it)."""
    target, head, runner, input_ids = _runner_after_a_call()
    length = input_ids.shape[1]
    results = {}
    for pad in (False, True):
        runner.prompt_encoder.padded = pad
        logits, features = _encode(target, head, runner, input_ids, {"logits_to_keep": 1})
        caches = [
            layer.keys[:, :, :length].clone()
            for cache in (runner.target_cache, runner.head_cache)
            for layer in cache.layers
        ]
        lengths = [int(cache.layers[0].cumulative_length) for cache in (runner.target_cache, runner.head_cache)]
        results[pad] = (logits.clone(), features.clone(), caches, lengths)
    (eager_logits, eager_features, eager_caches, eager_lengths) = results[False]
    (logits, features, caches, lengths) = results[True]
    torch.testing.assert_close(logits, eager_logits)
    assert features.shape == eager_features.shape and features.shape[1] == length
    torch.testing.assert_close(features, eager_features)
    # The head holds every prompt position but the last.
    for index, (padded_keys, eager_keys) in enumerate(zip(caches, eager_caches, strict=True)):
        kept = length if index < len(runner.target_cache.layers) else length - 1
        torch.testing.assert_close(padded_keys[:, :, :kept], eager_keys[:, :, :kept])
    assert lengths == eager_lengths == [length, length - 1]


def test_targets_without_logits_to_keep_are_encoded_eagerly(padded):
    """Without `logits_to_keep` the padded encoding could not pick the prompt's last position: eager, unpadded."""
    target, head, runner, input_ids = _runner_after_a_call()
    runner.prompt_encoder.encodings.clear()
    logits, features = _encode(target, head, runner, input_ids, {})
    assert not runner.prompt_encoder.encodings and logits.shape == (1, target.config.vocab_size)
    assert features.shape[1] == input_ids.shape[1]
