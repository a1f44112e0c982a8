import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_args, make_head, make_rows, make_target, write_cli_inputs
from huggingface_hub.errors import StrictDataclassClassValidationError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.trainer import (
    Eagle3DataCollator,
    Eagle3FeatureDataset,
    Eagle3Trainer,
    Eagle3TrainingArguments,
    prepare_features,
)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_logs_per_step_metrics_and_eval_acceptance(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=50)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer = Eagle3Trainer(
        model=head, target_model=target, args=args, train_dataset=make_rows(), eval_dataset=make_rows(4, seed=1)
    )
    before = trainable_state(head)
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"loss_step_0", "loss_step_1", "acc_step_0", "acc_step_1"} <= train_logs[0].keys()
    eval_log = next(log for log in trainer.state.log_history if "eval_loss" in log)
    assert {"eval_loss_step_1", "eval_acc_step_1", "eval_acceptance_length"} <= eval_log.keys()
    assert 1.0 <= eval_log["eval_acceptance_length"] <= 3.0
    # Weighted sum of step losses: loss = loss_0 + 0.8 * loss_1 (one micro-batch per logging step here).
    for log in train_logs:
        assert log["loss"] == pytest.approx(log["loss_step_0"] + 0.8 * log["loss_step_1"], rel=1e-3)
    assert all(not torch.equal(before[n], p) for n, p in trainable_state(head).items())
    assert not any(p.requires_grad for p in target.parameters())


def test_trainer_card_is_the_heads_own(tmp_path):
    target = make_target()
    head = make_head(target)
    head.config.target_name_or_path = "org/target-model"
    args = make_args(tmp_path, hub_model_id="org/my-eagle3-head")
    trainer = Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=make_rows())
    trainer.create_model_card(license="apache-2.0", dataset_tags="org/chats", tags="demo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/target-model" in card and "pipeline_tag: text-generation" in card
    assert "license: apache-2.0" in card and "- org/chats" in card and "- demo" in card
    assert "assistant_model" in card and 'from_pretrained("org/my-eagle3-head")' in card


def test_resumed_run_continues_like_uninterrupted(tmp_path):
    rows = make_rows(8)

    def run(output_dir, max_steps, resume=None):
        target = make_target()
        head = make_head(target, draft_vocab_size=50)
        args = make_args(
            tmp_path, output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=2
        )
        trainer = Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=rows)
        trainer.train(resume_from_checkpoint=resume)
        return head, trainer

    uninterrupted, _ = run(tmp_path / "full", 4)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    # The checkpoint is a complete head: it loads on its own (the embedding comes from the target).
    reloaded = Eagle3DraftModel.from_pretrained(checkpoint)
    assert reloaded.config.draft_vocab_size == 50
    resumed, trainer = run(tmp_path / "resumed", 4, resume=str(checkpoint))
    assert trainer.state.global_step == 4
    for name, value in trainable_state(uninterrupted).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    """Two micro-batches of one row must step exactly like one batch of two (no double or missing scaling)."""
    rows = make_rows(1) * 2  # identical rows: per-micro-batch means equal the batch mean
    results = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        target = make_target()
        head = make_head(target, draft_vocab_size=50)
        # Plain SGD, no clipping: the update is proportional to the gradient, so any mis-scaling shows.
        args = make_args(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            max_grad_norm=0.0,
            learning_rate=0.1,
        )
        trainer = Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=rows)
        trainer.train()
        results.append((trainable_state(head), trainer.state.log_history[0]["loss"]))
    (big, big_loss), (accumulated, accumulated_loss) = results
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-5)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value)


def test_stored_features_give_the_online_loss_and_resume(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=50)
    rows = make_rows(5)
    features_dir = prepare_features(
        target, rows, tmp_path / "features", head.config.target_layer_ids, samples_per_shard=2, batch_size=2
    )
    shards = sorted(features_dir.glob("features-*.safetensors"))
    assert len(shards) == 3
    dataset = Eagle3FeatureDataset(features_dir)
    assert len(dataset) == 5 and dataset[4]["input_ids"].tolist() == rows[4]["input_ids"]

    args = make_args(tmp_path)
    online = Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=rows)
    online_loss = online.compute_loss(head, online.data_collator(rows))
    # Offline needs no target: the head gets its embedding and the target's projection from the features.
    offline_head = Eagle3DraftModel(head.config).eval()
    offline_head.load_state_dict(
        {k: v for k, v in head.state_dict().items() if k != "embed_tokens.weight"}, strict=False
    )
    offline = Eagle3Trainer(model=offline_head, args=args, train_dataset=dataset)
    assert offline.target_model is None
    offline_loss = offline.compute_loss(offline_head, offline.data_collator([dataset[i] for i in range(5)]))
    torch.testing.assert_close(offline_loss, online_loss)
    offline.train()

    # Resumable: a missing shard is written again, finished ones are skipped.
    shards[1].unlink()
    with pytest.raises(ValueError, match="incomplete"):
        Eagle3FeatureDataset(features_dir)
    untouched = shards[0].stat().st_mtime_ns
    prepare_features(target, rows, features_dir, head.config.target_layer_ids, samples_per_shard=2, batch_size=2)
    assert shards[1].exists() and shards[0].stat().st_mtime_ns == untouched
    with pytest.raises(ValueError, match="different settings"):
        prepare_features(target, rows, features_dir, head.config.target_layer_ids, samples_per_shard=3)


def test_feature_directory_errors(tmp_path):
    target = make_target()
    with pytest.raises(ValueError, match="not a feature directory"):
        Eagle3FeatureDataset(tmp_path)
    features_dir = prepare_features(target, make_rows(2), tmp_path / "features", [1, 2, 3])
    head = make_head(target, draft_vocab_size=50)  # reads layers [2, 3, 3]
    with pytest.raises(ValueError, match="features hold layers"):
        Eagle3FeatureDataset(features_dir).attach_head(head)


def test_bad_data_gets_clear_errors(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=50)
    args = make_args(tmp_path)
    empty = [{"input_ids": row["input_ids"], "loss_mask": [0] * len(row["input_ids"])} for row in make_rows(3)]
    with pytest.raises(ValueError, match="no token to learn"):
        Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=empty)
    with pytest.raises(ValueError, match="lacks the column"):
        Eagle3Trainer(model=head, target_model=target, args=args, train_dataset=[{"input_ids": [5, 6, 7]}])
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        Eagle3DataCollator(vocab_size=96)([{"input_ids": [5, 200, 7], "loss_mask": [1, 1, 1]}])
    with pytest.raises(StrictDataclassClassValidationError, match="larger than the target vocabulary"):
        Eagle3Config.from_target_config(target.config, draft_vocab_size=97)
    broken = make_head(target, draft_vocab_size=50)
    broken.t2d.zero_()  # maps never loaded
    with pytest.raises(ValueError, match="d2t/t2d"):
        Eagle3Trainer(model=broken, target_model=target, args=args, train_dataset=make_rows())
    with pytest.raises(ValueError, match="no position to score"):
        make_args(tmp_path, max_length=8, ttt_steps=7)
    with pytest.raises(ValueError, match="does not fit"):
        Eagle3Trainer(model=head, target_model=make_target(vocab_size=128), args=args, train_dataset=make_rows())


def test_head_for_lora_adapted_target(tmp_path):
    """A PeftModel target: the head learns from the ADAPTED model's features and logits."""
    base = make_target()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    target = get_peft_model(base, lora)
    head = make_head(base, draft_vocab_size=50)
    trainer = Eagle3Trainer(model=head, target_model=target, args=make_args(tmp_path), train_dataset=make_rows())
    batch = trainer.data_collator(make_rows(2))
    features, logits = trainer.target_outputs(batch)
    torch.testing.assert_close(logits, target(**batch).logits)
    with target.disable_adapter():
        assert not torch.allclose(logits, target(**batch).logits)
    trainer.train()


def test_lora_on_existing_head_trains_saves_loads_and_merges(tmp_path):
    target = make_target()
    head = make_head(target, draft_vocab_size=50)
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc"])
    model = get_peft_model(head, lora)
    frozen = {n: p.detach().clone() for n, p in head.named_parameters() if "lora_" not in n}
    trainer = Eagle3Trainer(model=model, target_model=target, args=make_args(tmp_path), train_dataset=make_rows())
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in head.named_parameters() if "lora_" not in n)

    model.save_pretrained(tmp_path / "adapter")
    fresh = make_head(target, draft_vocab_size=50)  # same seed: the same base weights the adapter was trained on
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    features, ids = torch.randn(1, 6, 3 * 64), torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=ids, target_hidden_states=features).logits
        torch.testing.assert_close(loaded(input_ids=ids, target_hidden_states=features).logits, expected)
        merged = loaded.merge_and_unload()
        assert isinstance(merged, Eagle3DraftModel)
        torch.testing.assert_close(merged(input_ids=ids, target_hidden_states=features).logits, expected)


def test_cli_train_online_from_yaml_resumes_and_exports(tmp_path):
    from hf_eagle3.cli import main

    _, d2t = write_cli_inputs(tmp_path)
    output_dir = tmp_path / "head"
    (tmp_path / "train.yaml").write_text(
        f"target: {tmp_path / 'target'}\ndata: {tmp_path / 'data' / 'train.jsonl'}\n"
        f"vocab_map: {tmp_path / 'vocab_map.safetensors'}\noutput_dir: {output_dir}\nmax_steps: 2\n"
        "per_device_train_batch_size: 2\nttt_steps: 2\nuse_cpu: true\nreport_to: none\nsave_steps: 1\nlogging_steps: 1\n"
        "disable_tqdm: true\nexport_format: vllm\n"
    )
    with pytest.raises(ValueError, match="nginx"):
        main(["train", "--target", str(tmp_path / "target"), "--data", "unused", "--export_format", "nginx"])
    assert main(["train", str(tmp_path / "train.yaml")]) == 0
    head = Eagle3DraftModel.from_pretrained(output_dir)
    assert torch.equal(head.d2t, d2t) and head.config.draft_vocab_size == 50
    assert (output_dir / "export-vllm" / "config.json").exists()
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "target").eval()
    # speculators reads the embedding from the export: the target's.
    exported = load_file(output_dir / "export-vllm" / "model.safetensors")["embed_tokens.weight"]
    assert torch.equal(exported, target.get_input_embeddings().weight)
    # The saved head is ready for generate: lossless against plain greedy decoding.
    head.attach_target(target)
    prompt = torch.randint(3, 96, (1, 6))
    plain = target.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=head), plain)
    # Resuming from the last checkpoint with a higher step budget continues from step 2.
    args = ["train", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data" / "train.jsonl")]
    args += ["--vocab_map", str(tmp_path / "vocab_map.safetensors"), "--output_dir", str(output_dir)]
    args += ["--max_steps", "3", "--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu"]
    args += ["--report_to", "none", "--disable_tqdm", "true", "--resume_from_checkpoint", "latest"]
    args += ["--logging_steps", "1"]
    assert main(args) == 0
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Steps 1-2 come from the first run, whose linear schedule spanned 2 steps (a fresh 3-step run logs 6.7e-5).
    assert [log["learning_rate"] for log in state["log_history"] if "loss" in log][:2] == pytest.approx([1e-4, 5e-5])


def test_cli_prepare_features_then_train_from_them(tmp_path):
    """From a `prepare-data` folder (save_to_disk + vocab_map.safetensors) the map travels with the features."""
    from datasets import Dataset

    from hf_eagle3.cli import main
    from hf_eagle3.data.vocab import save_vocab_map

    _, d2t = write_cli_inputs(tmp_path)
    prepared = tmp_path / "prepared"
    Dataset.from_list(make_rows(6)).save_to_disk(prepared)
    save_vocab_map(prepared, d2t, load_file(tmp_path / "vocab_map.safetensors")["t2d"])
    features = tmp_path / "features"
    common = ["--target", str(tmp_path / "target"), "--data", str(prepared)]
    assert main(["prepare-features", *common, "--output_dir", str(features), "--samples_per_shard", "4"]) == 0
    args = ["train", "--data", str(features), "--output_dir", str(tmp_path / "head"), "--max_steps", "1"]
    args += ["--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu", "--report_to", "none"]
    args += ["--disable_tqdm", "true"]
    assert main(args) == 0
    head = Eagle3DraftModel.from_pretrained(tmp_path / "head")
    assert torch.equal(head.d2t, d2t)
    assert head.config.draft_vocab_size == 50 and head.config.target_layer_ids == [2, 3, 3]


def test_head_intermediate_size_shapes_a_new_head_only(tmp_path):
    """`--head_intermediate_size` narrows a new head's MLP (a smaller head to ship); with `--head` it is an error."""
    from hf_eagle3.trainer.jobs import TrainScriptArguments, build_head

    target = make_target("llama")
    wide = build_head(TrainScriptArguments(), target.config)
    narrow = build_head(TrainScriptArguments(head_intermediate_size=16), target.config)
    assert wide.config.intermediate_size == target.config.intermediate_size != 16
    assert narrow.config.intermediate_size == 16 and narrow.midlayer.mlp.up_proj.out_features == 16
    assert narrow.num_parameters() < wide.num_parameters()
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="keeps the MLP it was trained with"):
        build_head(TrainScriptArguments(head=str(tmp_path / "wide"), head_intermediate_size=16), target.config)
    with pytest.raises(ValueError, match="must be a positive integer"):
        build_head(TrainScriptArguments(head_intermediate_size=0), target.config)


def test_cli_lora_adapts_an_existing_head(tmp_path):
    from hf_eagle3.cli import main
    from hf_eagle3.data.vocab import build_vocab_maps, save_vocab_map

    target, d2t = write_cli_inputs(tmp_path)
    head = make_head(target, draft_vocab_size=50)
    head.d2t.copy_(d2t)
    head.t2d.copy_(load_file(tmp_path / "vocab_map.safetensors")["t2d"])
    head.save_pretrained(tmp_path / "base-head")
    common = ["--target", str(tmp_path / "target"), "--data", str(tmp_path / "data" / "train.jsonl")]
    common += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu"]
    common += ["--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4"]
    with pytest.raises(ValueError, match="--head"):
        main(["train", *common, "--output_dir", str(tmp_path / "unused")])
    output_dir = tmp_path / "adapted"
    args = ["train", *common, "--head", str(tmp_path / "base-head"), "--output_dir", str(output_dir)]
    other_map = tmp_path / "other_map.safetensors"
    save_vocab_map(other_map, *build_vocab_maps(make_rows(6, seed=3), 50, 96)[:2])
    with pytest.raises(ValueError, match="not the draft vocabulary"):
        main([*args, "--vocab_map", str(other_map)])
    assert main([*args, "--export_format", "sglang"]) == 0
    assert (output_dir / "adapter_config.json").exists()
    merged = Eagle3DraftModel.from_pretrained(output_dir / "merged")
    assert not torch.equal(merged.midlayer.self_attn.q_proj.weight, head.midlayer.self_attn.q_proj.weight)
    torch.testing.assert_close(merged.lm_head.weight, head.lm_head.weight)  # not a LoRA target: unchanged
    assert (output_dir / "export-sglang" / "config.json").exists()


def test_cli_continues_a_head_on_the_vocabulary_of_new_data(tmp_path, capsys):
    from hf_eagle3.cli import main
    from hf_eagle3.data.vocab import build_vocab_maps

    target, d2t = write_cli_inputs(tmp_path)
    old_d2t, old_t2d, _ = build_vocab_maps(make_rows(6, seed=3), 50, 96)
    head = make_head(target, draft_vocab_size=50)
    head.d2t.copy_(old_d2t)
    head.t2d.copy_(old_t2d)
    head.save_pretrained(tmp_path / "old-head")
    common = ["--target", str(tmp_path / "target"), "--data", str(tmp_path / "data" / "train.jsonl")]
    common += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu"]
    common += ["--report_to", "none", "--disable_tqdm", "true", "--head", str(tmp_path / "old-head")]
    new_map = ["--vocab_map", str(tmp_path / "vocab_map.safetensors")]
    with pytest.raises(ValueError, match="add --remap_vocab to switch"):
        main(["train", *common, *new_map, "--output_dir", str(tmp_path / "unused")])
    # Kept as it is, the head is told how much of the new data its vocabulary misses.
    assert main(["train", *common, "--output_dir", str(tmp_path / "kept")]) == 0
    report = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("Draft vocabulary"))
    assert "the data's 50 most frequent ids would cover 100.00%" in report and "Add --remap_vocab" in report
    assert torch.equal(Eagle3DraftModel.from_pretrained(tmp_path / "kept").d2t, old_d2t)
    assert main(["train", *common, *new_map, "--remap_vocab", "true", "--output_dir", str(tmp_path / "remapped")]) == 0
    assert "the head's 50 ids cover 100.00%" in capsys.readouterr().err
    remapped = Eagle3DraftModel.from_pretrained(tmp_path / "remapped")
    assert torch.equal(remapped.d2t, d2t) and remapped.config.draft_vocab_size == 50
    with pytest.raises(ValueError, match="pass the head with --head"):
        main(["train", *common[:-2], "--remap_vocab", "true", "--output_dir", str(tmp_path / "unused")])
    with pytest.raises(ValueError, match="LoRA adapters would leave untrained"):
        main(["train", *common, "--remap_vocab", "true", "--lora_r", "4", "--output_dir", str(tmp_path / "unused")])


def test_one_process_seeing_several_gpus_trains_on_one(tmp_path):
    # Trainer would wrap the head in nn.DataParallel, whose replicas cannot reach the target on the first GPU.
    args = Eagle3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=3)
    assert args.n_gpu == 0
    args._n_gpu = 2  # what transformers records when one process sees two GPUs
    assert args.n_gpu == 1
    assert args.train_batch_size == 3


LAUNCH_ON_CPU = str(Path(__file__).parent / "launch_on_cpu.py")
FSDP2_FLAGS = "--use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT "
FSDP2_FLAGS += "--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap Eagle3DecoderLayer"


def accelerate_launch_two_processes(launch_flags: str, train_args: list[str]) -> None:
    """`accelerate launch` two CPU processes (gloo) of `hf-eagle3 train`, as on two GPUs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    command += [*launch_flags.split(), LAUNCH_ON_CPU, *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    tracebacks = "\n".join(line for line in result.stderr.splitlines() if line.startswith("[rank"))
    assert result.returncode == 0, tracebacks or result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_processes_train_like_one_process_on_the_global_batch(tmp_path):
    from hf_eagle3.cli import main

    _, d2t = write_cli_inputs(tmp_path, num_rows=16)
    args = ["train", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data" / "train.jsonl")]
    args += ["--vocab_map", str(tmp_path / "vocab_map.safetensors"), "--max_steps", "2", "--ttt_steps", "2"]
    args += ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    args += ["--save_steps", "1", "--seed", "0"]
    assert main([*args, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    per_process = [*args, "--per_device_train_batch_size", "2"]
    accelerate_launch_two_processes("--multi_gpu", [*per_process, "--output_dir", str(tmp_path / "ddp")])
    accelerate_launch_two_processes(FSDP2_FLAGS, [*per_process, "--output_dir", str(tmp_path / "fsdp")])
    # Resume the FSDP run from its first checkpoint (full state dict, sharded optimizer state) in a fresh folder.
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    resumed = [*per_process, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    accelerate_launch_two_processes(FSDP2_FLAGS, resumed)

    def first_log(run):
        state = json.loads((tmp_path / run / "trainer_state.json").read_text())
        return next(log for log in state["log_history"] if "loss" in log)

    # Per-step metrics are sums over both processes' rows: equal to one process's on the same 4 rows.
    reference = first_log("one")
    for run in ("ddp", "fsdp"):
        for key in ("loss_step_0", "loss_step_1", "acc_step_0", "acc_step_1"):
            assert first_log(run)[key] == pytest.approx(reference[key], rel=1e-5), (run, key)
    heads = {run: Eagle3DraftModel.from_pretrained(tmp_path / run) for run in ("one", "ddp", "fsdp", "resumed")}
    for head in heads.values():  # complete: the draft vocabulary maps came back with the weights
        assert torch.equal(head.d2t, d2t) and head.config.draft_vocab_size == 50
    # The loss each process backpropagates is the mean over its own rows, so DDP and FSDP step alike, and a little
    # differently from one process averaging all four rows.
    for name, value in trainable_state(heads["ddp"]).items():
        torch.testing.assert_close(trainable_state(heads["fsdp"])[name], value)
        torch.testing.assert_close(trainable_state(heads["resumed"])[name], value)
    assert json.loads((tmp_path / "fsdp" / "train_results.json").read_text())["train_samples_per_second"] > 0
