"""Nothing lost, nothing silent: existing destinations, interrupted saves, unreadable inputs, network failures."""

import importlib
import json
import logging
import struct
from unittest import mock

import pytest
import torch
from checkpoint_files import assert_same_logits
from conftest import make_args, make_head, make_rows, make_target, write_cli_inputs

from hf_eagle3 import Eagle3DraftModel, Eagle3Trainer
from hf_eagle3.cli import main
from hf_eagle3.safe_writes import staged_folder
from hf_eagle3.trainer.checkpoints import checkpoint_problem


def train_args(tmp_path, output_dir, *extra):
    args = ["train", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data" / "train.jsonl")]
    args += ["--vocab_map", str(tmp_path / "vocab_map.safetensors"), "--output_dir", str(output_dir)]
    args += ["--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu", "--report_to", "none"]
    return [*args, "--disable_tqdm", "true", "--save_steps", "1", *extra]


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in Eagle3DraftModel.from_pretrained(path).state_dict().items() if k != "embed_tokens.weight"}


# ---------------------------------------------------------------------------------------------------- 1. train
def test_train_refuses_a_trained_head_unless_told_and_never_resumes_the_older_run(tmp_path):
    write_cli_inputs(tmp_path)
    output_dir = tmp_path / "head"
    assert main(train_args(tmp_path, output_dir, "--max_steps", "3")) == 0
    first = weights(output_dir)
    before = {path.name: path.stat().st_mtime_ns for path in output_dir.rglob("*")}

    with pytest.raises(
        ValueError, match=r"already holds files.*--resume_from_checkpoint latest.*--overwrite_output_dir"
    ):
        main(train_args(tmp_path, output_dir, "--max_steps", "2", "--seed", "1"))
    assert {path.name: path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before  # not a byte written

    # Asked to: the older run's checkpoints go, so that a later resume cannot pick its checkpoint-3.
    assert main(train_args(tmp_path, output_dir, "--max_steps", "2", "--seed", "1", "--overwrite_output_dir")) == 0
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    second = weights(output_dir)
    assert any(not torch.equal(second[name], first[name]) for name in first)
    assert (
        main(train_args(tmp_path, output_dir, "--max_steps", "3", "--seed", "1", "--resume_from_checkpoint", "latest"))
        == 0
    )
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 3
    assert any(not torch.equal(weights(output_dir)[name], first[name]) for name in first)


# ---------------------------------------------------------------------------------------------------- 2. convert
def test_convert_refuses_a_non_empty_destination_and_overwrite_replaces_it_whole(tmp_path, capsys):
    target = make_target()
    head = make_head(target, draft_vocab_size=40)
    head.save_pretrained(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"dst already holds files \(notes.txt\).*--overwrite"):
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "eagle3"])
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]
    assert "Wrote" not in capsys.readouterr().out

    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "eagle3", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_logits(Eagle3DraftModel.from_pretrained(tmp_path / "dst"), head.attach_target(target), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left behind


def test_converting_a_sharded_head_onto_its_own_folder_keeps_a_loadable_head(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=40).attach_target(target)
    folder = tmp_path / "head"
    head.save_pretrained(folder, max_shard_size="50KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    with pytest.raises(ValueError, match="--overwrite"):
        main(["convert", str(folder), str(folder), "--to", "sglang"])
    assert main(["convert", str(folder), str(folder), "--to", "sglang", "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_logits(Eagle3DraftModel.from_pretrained(folder), head, target)


@pytest.mark.parametrize("first_shard_size, second_shard_size", [("5GB", "50KB"), ("50KB", "5GB")])
def test_save_pretrained_over_an_earlier_save_leaves_no_stale_weights(tmp_path, first_shard_size, second_shard_size):
    """transformers keeps an earlier single file next to new shards (and loads it first), or a stale index."""
    target = make_target()
    head = make_head(target)
    head.save_pretrained(tmp_path, max_shard_size=first_shard_size)
    (tmp_path / "README.md").write_text("kept")
    with torch.no_grad():
        head.fc.weight.add_(1.0)
    head.save_pretrained(tmp_path, max_shard_size=second_shard_size)
    names = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors" in names) != ("model.safetensors.index.json" in names)
    assert "README.md" in names and not any(name.startswith(".incomplete") for name in names)
    torch.testing.assert_close(Eagle3DraftModel.from_pretrained(tmp_path).fc.weight, head.fc.weight)


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    destination = tmp_path / "head"
    destination.mkdir()
    (destination / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_folder(destination, overwrite=True) as staging:
            (staging / "config.json").write_text('{"new": true}')
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
    assert (destination / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------------- 3. a file
def test_writing_to_a_file_path_fails_and_reports_no_write(tmp_path, capsys):
    head = make_head(make_target())
    head.save_pretrained(tmp_path / "src")
    path = tmp_path / "f.txt"
    path.write_text("keep me")
    with pytest.raises(ValueError, match=r"f.txt is a file, not a folder"):
        main(["convert", str(tmp_path / "src"), str(path), "--to", "vllm"])
    assert "Wrote" not in capsys.readouterr().out
    for format in ("hf-eagle3", "sglang"):
        with pytest.raises(ValueError, match=r"f.txt is a file, not a folder"):
            head.save_pretrained(path, format=format)
    assert path.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------- 4. bad input
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"data.jsonl is empty \(or blank\): it holds no rows"),
        (b"\n  \n", r"data.jsonl is empty \(or blank\)"),
        (
            b'{"input_ids": [1, 2], "loss_mask": [0, 1]}\n{"input_ids": [1, \n',
            r"data.jsonl, line 2: not a JSON object",
        ),
        (
            b'{"input_ids": [1], "loss_mask": [1]}\n{"text": "caf\xe9"}\n',
            r"data.jsonl, line 2, column 14: byte 0xe9 is not UTF-8",
        ),
    ],
)
def test_unreadable_data_names_the_file_and_line(tmp_path, content, message, chatml):
    write_cli_inputs(tmp_path)
    chatml.save_pretrained(tmp_path / "target")  # prepare-data loads the target's tokenizer first
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    args = train_args(tmp_path, tmp_path / "head", "--max_steps", "1")
    args[args.index("--data") + 1] = str(data)
    with pytest.raises(ValueError, match=message):
        main(args)
    with pytest.raises(ValueError, match=message):
        main(
            [
                "prepare-data",
                "--target",
                str(tmp_path / "target"),
                "--data",
                str(data),
                "--output_dir",
                str(tmp_path / "prepared"),
            ]
        )


def test_a_config_that_is_not_json_names_the_file(tmp_path):
    make_head(make_target()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "eagle3",\n')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: .* line 2, column 1"):
        Eagle3DraftModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "eagle\xff3"}')
    with pytest.raises(ValueError, match=r"config.json, line 1, column 22: byte 0xff is not UTF-8"):
        Eagle3DraftModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- 5. resume
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` handler sees it."""


def test_resume_skips_a_checkpoint_a_killed_save_left_incomplete(tmp_path, caplog):
    rows = make_rows(8)
    output_dir = tmp_path / "run"

    def trainer(max_steps, output_dir=output_dir):
        target = make_target()
        args = make_args(
            tmp_path, output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=1
        )
        return Eagle3Trainer(
            model=make_head(target, draft_vocab_size=50), target_model=target, args=args, train_dataset=rows
        )

    killed = trainer(3)
    # The kill lands while checkpoint-3 is written: the head and optimizer are saved, its RNG and trainer state not.
    save_rng_state = Eagle3Trainer._save_rng_state

    def kill_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            raise Killed
        save_rng_state(self, output_dir)

    with mock.patch.object(Eagle3Trainer, "_save_rng_state", kill_at_step_3), pytest.raises(Killed):
        killed.train()
    assert (output_dir / "checkpoint-3" / "model.safetensors").exists()
    assert "trainer_state.json" in checkpoint_problem(output_dir / "checkpoint-3")
    # A second kill, while checkpoint-2's state was being written, would leave it truncated; here checkpoint-2 is kept
    # and a checkpoint-4 with a truncated state stands for it.
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')

    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-3: no trainer_state.json.*checkpoint-2"):
        trainer(3).train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))
    resumed = trainer(3)
    with caplog.at_level(logging.WARNING, logger="hf_eagle3.trainer.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-4: trainer_state.json is truncated" in caplog.text
    assert "checkpoint-3: no trainer_state.json" in caplog.text and "Resuming from" in caplog.text
    assert resumed.state.global_step == 3
    assert checkpoint_problem(output_dir / "checkpoint-3") is None and not (output_dir / "checkpoint-4").exists()

    # The same run uninterrupted ends with the same head.
    uninterrupted = trainer(3, output_dir=tmp_path / "uninterrupted")
    uninterrupted.train()
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)


def test_resume_without_a_complete_checkpoint_says_what_to_do(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-1").mkdir(parents=True)
    target = make_target()
    trainer = Eagle3Trainer(
        model=make_head(target),
        target_model=target,
        args=make_args(tmp_path, output_dir=str(output_dir)),
        train_dataset=make_rows(),
    )
    with pytest.raises(
        ValueError, match=r"No complete checkpoint .*checkpoint-1: no trainer_state.json.*overwrite_output_dir"
    ):
        trainer.train(resume_from_checkpoint=True)
    (output_dir / "checkpoint-1").rmdir()
    with pytest.raises(ValueError, match=r"no checkpoint-N folder in .*run to resume from"):
        trainer.train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------------------------------------- 7. hub
def test_push_to_hub_without_network_names_the_endpoint_and_token(monkeypatch):
    from hf_eagle3 import hub

    client = importlib.import_module(hub._HTTP_CLIENT_ERROR.__module__)  # httpx, or httpx2 in newer hub releases
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.mirror.example")
    offline = client.ConnectError("[Errno -2] Name or service not known")
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=offline):
        with pytest.raises(
            ConnectionError, match=r"Hub at https://hub.mirror.example to push me/head .*ConnectError.*token: given"
        ):
            make_head(make_target()).push_to_hub("me/head", token="hf_xxx")
    # The Hub's own answers (401, 404, ...) keep huggingface_hub's messages.
    from huggingface_hub.errors import HfHubHTTPError

    unauthorized = client.Response(401, request=client.Request("POST", "https://hub.mirror.example/api/repos/create"))
    with mock.patch(
        "huggingface_hub.HfApi.create_repo", side_effect=HfHubHTTPError("401 Unauthorized", response=unauthorized)
    ):
        with pytest.raises(HfHubHTTPError, match="401"):
            make_head(make_target()).push_to_hub("me/head", token="hf_xxx")


# ---------------------------------------------------------------------------------------------------- 8. integrity
def test_a_flipped_byte_in_a_head_cannot_change_what_generate_returns(tmp_path):
    """No checksum is recorded: the target verifies every drafted token, so a corrupted head (even one holding NaN or
    inf) costs acceptance, never output. A damaged header is caught by safetensors, with our explanation."""
    target = make_target()
    make_head(target, draft_vocab_size=50).save_pretrained(tmp_path / "head")
    path = tmp_path / "head" / "model.safetensors"
    data = path.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    for name, byte in (("midlayer.self_attn.q_proj.weight", 0x7F), ("lm_head.weight", 0xFF), ("norm.weight", 0x7F)):
        corrupted = bytearray(data)
        corrupted[8 + header_size + header[name]["data_offsets"][0] + 3] = byte  # a float32's sign and exponent
        path.write_bytes(bytes(corrupted))
        head = Eagle3DraftModel.from_pretrained(tmp_path / "head").attach_target(target)
        assert not torch.isfinite(head.state_dict()[name]).all() or head.state_dict()[name].abs().max() > 1e30
        for mode in ("tree", "chain"):
            output = target.generate(
                prompt, max_new_tokens=16, do_sample=False, assistant_model=head, eagle3_mode=mode
            )
            assert torch.equal(output, plain)
    path.write_bytes(data[:4] + b"\xff" + data[5:])  # the header length
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Eagle3DraftModel.from_pretrained(tmp_path / "head")
