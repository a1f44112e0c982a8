"""The jobs behind `hf-eagle3 train` and `hf-eagle3 prepare-features`, callable from Python too.

`train_head(script_args, training_args)` builds (or continues) a head for a target, trains it with `Eagle3Trainer`,
merges a LoRA adapter and exports a serving layout when asked; `write_features(args)` runs the target once over
tokenised data and stores its features to train from. The argument dataclasses are what the command line parses.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedConfig, set_seed
from transformers.utils import logging

from ..checkpoint_formats import SPECULATORS_LAYOUT, checkpoint_layout, load_target_embedding
from ..configuration_eagle3 import Eagle3Config, default_target_layer_ids
from ..data.vocab import VOCAB_MAP_NAME, count_loss_tokens, load_vocab_map
from ..modeling_eagle3 import Eagle3DraftModel
from ..offline_models import load_target
from .checkpoints import prepare_output_dir
from .eagle3_trainer import Eagle3Trainer
from .stored_features import FEATURES_CONFIG_NAME, Eagle3FeatureDataset, prepare_features
from .training_args import Eagle3TrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class TargetArguments:
    """Which target to load and how."""

    target: str | None = field(
        default=None,
        metadata={
            "help": "Target model: a local checkpoint, a Hub id, a .gguf file or an offline target name (smollm2, "
            "qwen-coder). Not needed when --data holds precomputed features."
        },
    )
    target_dtype: str = field(
        default="auto", metadata={"help": "Dtype of the frozen target: auto (bfloat16 on GPU, else float32), ..."}
    )
    target_layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Target feature layers (inputs of decoder layers i); default 2, L//2, L-3."},
    )


@dataclass
class TrainScriptArguments(TargetArguments):
    """What to train on and what to train: data, head configuration, export."""

    data: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a `hf-eagle3 prepare-data` output folder, a JSONL/JSON/Parquet file of rows with "
            "input_ids and loss_mask, or a `hf-eagle3 prepare-features` folder (stored features)."
        },
    )
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation data, in any form --data takes."})
    vocab_map: str | None = field(
        default=None,
        metadata={
            "help": "vocab_map.safetensors (d2t/t2d) of a reduced draft vocabulary; default: the one inside --data."
        },
    )
    draft_vocab_size: int | None = field(
        default=None, metadata={"help": "Draft vocabulary size; must match --vocab_map. Default: its size, or full."}
    )
    head_intermediate_size: int | None = field(
        default=None,
        metadata={
            "help": "MLP width of a new head (default: the target's). The MLP holds most of a head's weights: a "
            "narrower one makes a smaller head to ship, e.g. for targets with wide MLPs."
        },
    )
    head: str | None = field(
        default=None, metadata={"help": "Start from this trained head (a directory or Hub id) instead of a new one."}
    )
    remap_vocab: bool = field(
        default=False,
        metadata={
            "help": "With --head: switch the head to the draft vocabulary of --vocab_map (default: the one inside "
            "--data), keeping the lm_head rows of ids both hold; for continuing a head on data whose frequent tokens "
            "differ."
        },
    )
    export_format: str | None = field(
        default=None,
        metadata={
            "help": "Also save the final head in a serving layout: eagle3, specforge, sglang, vllm, speculators."
        },
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "Adapt the --head with LoRA adapters of this rank instead of training all its weights (e.g. to "
            "a new domain); the adapter lands in --output_dir, the merged head in --output_dir/merged."
        },
    )
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; default 2 x lora_r."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Head modules that get LoRA adapters."},
    )


@dataclass
class PrepareFeaturesArguments(TargetArguments):
    """`hf-eagle3 prepare-features`: run the target once over tokenised data and write feature shards."""

    data: str | None = field(default=None, metadata={"help": "Tokenised data (input_ids, loss_mask), as for train."})
    output_dir: str | None = field(default=None, metadata={"help": "Feature directory to write (or resume)."})
    samples_per_shard: int = field(default=512, metadata={"help": "Samples per safetensors shard."})
    batch_size: int = field(default=8, metadata={"help": "Target forward batch size."})
    max_length: int | None = field(default=2048, metadata={"help": "Truncate samples to this many tokens."})
    device: str = field(default="auto", metadata={"help": "Device of the target; auto picks cuda when present."})


def load_training_target(args: TargetArguments, device: str | None = None):
    """The frozen target of `args.target`, without its tokenizer (the data is tokenised already)."""
    dtype = args.target_dtype
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    target, _ = load_target(args.target, dtype=dtype, device=device, load_tokenizer=False)
    return target


def is_feature_directory(path: str) -> bool:
    """Whether `path` holds the output of `prepare_features` rather than tokenised rows."""
    return (Path(path) / FEATURES_CONFIG_NAME).exists()


def load_training_rows(path: str):
    """Tokenised rows, or the precomputed features of `prepare-features`."""
    if is_feature_directory(path):
        return Eagle3FeatureDataset(path)
    from ..data.chat import load_chat_dataset

    return load_chat_dataset(path)


def _vocab_map_path(args: TrainScriptArguments) -> str | None:
    """--vocab_map, else the vocab_map.safetensors that `prepare-data` wrote inside --data, if any."""
    if args.vocab_map is not None:
        return args.vocab_map
    candidate = Path(args.data) / VOCAB_MAP_NAME if args.data is not None else None
    return str(candidate) if candidate is not None and candidate.exists() else None


def build_head(args: TrainScriptArguments, target_config: PreTrainedConfig) -> Eagle3DraftModel:
    """The `--head` to continue from, or a new head fitted to the target with the draft vocabulary of `--vocab_map`
    (default: the `vocab_map.safetensors` inside `--data`)."""
    if args.head is not None and args.head_intermediate_size is not None:
        raise ValueError(
            f"--head_intermediate_size shapes a new head; --head {args.head} keeps the MLP it was trained with. Drop "
            "one of the two."
        )
    if args.head_intermediate_size is not None and args.head_intermediate_size < 1:
        raise ValueError(f"--head_intermediate_size must be a positive integer, got {args.head_intermediate_size}.")
    shape = {} if args.head_intermediate_size is None else {"intermediate_size": args.head_intermediate_size}
    if args.head is not None:
        head = Eagle3DraftModel.from_pretrained(args.head)
        if args.remap_vocab:
            vocab_map = _vocab_map_path(args)
            if vocab_map is None:
                raise ValueError(
                    "--remap_vocab switches the head to the draft vocabulary of --vocab_map, or of the "
                    "vocab_map.safetensors inside --data; there is neither. Pass --vocab_map."
                )
            return head.set_draft_vocab(*load_vocab_map(vocab_map))
        # The head's lm_head rows belong to the vocabulary it was trained with: another map would silently scramble it.
        if args.vocab_map is not None and not torch.equal(load_vocab_map(args.vocab_map)[0], head.d2t):
            raise ValueError(
                f"--vocab_map {args.vocab_map} is not the draft vocabulary --head {args.head} was trained with. Drop "
                "--vocab_map to keep the head's own, add --remap_vocab to switch the head to it (the rows of ids "
                "both hold are kept), or train a new head."
            )
        return head
    if args.remap_vocab:
        raise ValueError("--remap_vocab switches the vocabulary of a trained head: pass the head with --head.")
    vocab_map = _vocab_map_path(args)
    if vocab_map is None:
        if args.draft_vocab_size is not None and args.draft_vocab_size < target_config.get_text_config().vocab_size:
            raise ValueError(
                f"A draft vocabulary of {args.draft_vocab_size} ids needs its d2t/t2d maps: pass --vocab_map (written "
                "by `hf-eagle3 prepare-data` as vocab_map.safetensors)."
            )
        return Eagle3DraftModel(
            Eagle3Config.from_target_config(
                target_config, draft_vocab_size=args.draft_vocab_size, target_layer_ids=args.target_layer_ids, **shape
            )
        )
    d2t, t2d = load_vocab_map(vocab_map)
    if args.draft_vocab_size is not None and args.draft_vocab_size != len(d2t):
        raise ValueError(
            f"--draft_vocab_size {args.draft_vocab_size} differs from the {len(d2t)} ids of {vocab_map}; drop the "
            "flag, or rebuild the map with that size (`hf-eagle3 prepare-data --draft_vocab_size`)."
        )
    config = Eagle3Config.from_target_config(
        target_config, draft_vocab_size=len(d2t), target_layer_ids=args.target_layer_ids, **shape
    )
    if len(t2d) != config.vocab_size:
        raise ValueError(f"{vocab_map} covers {len(t2d)} target ids, the target's vocabulary has {config.vocab_size}.")
    head = Eagle3DraftModel(config)
    head.d2t.copy_(d2t)
    head.t2d.copy_(t2d)
    return head


def vocab_coverage_report(head: Eagle3DraftModel, dataset, suggest_remap: bool) -> str:
    """How many of the data's learned tokens the head can ever propose: a head continued on new data keeps the
    vocabulary of its old data, which may miss the new data's frequent tokens."""
    counts = count_loss_tokens(dataset, head.config.vocab_size)
    total = max(int(counts.sum()), 1)
    size = head.config.draft_vocab_size
    covered = int(counts[head.t2d.cpu()].sum()) / total
    best = int(counts.topk(size).values.sum()) / total
    report = (
        f"Draft vocabulary: the head's {size} ids cover {covered:.2%} of the tokens to learn in --data; the data's "
        f"{size} most frequent ids would cover {best:.2%}."
    )
    if suggest_remap and best - covered > 0.005:
        report += " Add --remap_vocab (with this data's vocab_map.safetensors) to switch the head to them."
    return report


def merge_lora(head: Eagle3DraftModel, adapter_dir: str | Path) -> Eagle3DraftModel:
    """`head` with the LoRA adapter saved in `adapter_dir` merged into its weights: a plain head again, which
    `generate(assistant_model=...)` and the serving layouts take."""
    from peft import PeftModel

    return PeftModel.from_pretrained(head, str(adapter_dir)).merge_and_unload()


def train_head(script_args: TrainScriptArguments, training_args: Eagle3TrainingArguments) -> Path:
    """Train (or resume training) an EAGLE-3 head; returns the directory of the final, plain head.

    The trained head (or LoRA adapter), metrics and trainer state land in `training_args.output_dir`; with
    `lora_r`, the merged head in `output_dir/merged`; with `export_format`, a copy in that serving layout in
    `output_dir/export-<format>`.
    """
    if script_args.data is None:
        raise ValueError("Pass --data: the output of `hf-eagle3 prepare-data` or of `hf-eagle3 prepare-features`.")
    if script_args.export_format is not None:
        checkpoint_layout(script_args.export_format)  # an unknown name fails now, not after hours of training
    if script_args.lora_r is not None and script_args.head is None:
        raise ValueError("--lora_r adapts an existing head: pass it with --head (a directory or Hub id).")
    if script_args.lora_r is not None and script_args.remap_vocab:
        raise ValueError(
            "--remap_vocab gives the head new lm_head rows, which LoRA adapters would leave untrained: continue the "
            "head without --lora_r, or keep its vocabulary."
        )
    if script_args.target is None and not is_feature_directory(script_args.data):
        raise ValueError(
            f"Pass --target: {script_args.data} holds tokenised rows, and online training runs the target on every "
            "batch (only a `hf-eagle3 prepare-features` folder trains without it)."
        )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in {"true", "latest"}:
        resume = True  # the newest complete checkpoint in --output_dir
    if resume is None and not training_args.overwrite_output_dir:
        prepare_output_dir(training_args.output_dir, False, None)  # refuses a folder with files before any loading
    set_seed(training_args.seed)
    train_dataset = load_training_rows(script_args.data)
    eval_dataset = load_training_rows(script_args.eval_data) if script_args.eval_data else None
    from_stored_features = isinstance(train_dataset, Eagle3FeatureDataset)
    target = load_training_target(script_args) if script_args.target is not None else None
    target_config = target.config if target is not None else train_dataset.target_config
    head = build_head(script_args, target_config)
    if target is not None:
        head.attach_target(target)
    if not from_stored_features and head.config.uses_draft_vocab and training_args.process_index == 0:
        logger.info(
            vocab_coverage_report(
                head, train_dataset, suggest_remap=script_args.head is not None and not script_args.remap_vocab
            )
        )
    if head.config.target_name_or_path is None:
        head.config.target_name_or_path = script_args.target or train_dataset.features_config["target_name_or_path"]

    model = head
    if script_args.lora_r is not None:
        from peft import LoraConfig, get_peft_model

        lora_alpha = script_args.lora_alpha or 2 * script_args.lora_r
        lora_config = LoraConfig(
            r=script_args.lora_r, lora_alpha=lora_alpha, target_modules=script_args.lora_target_modules
        )
        model = get_peft_model(head, lora_config)

    trainer = Eagle3Trainer(
        model=model, target_model=target, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    # train_results.json (runtime, samples/s) and trainer_state.json (log history), as transformers' examples do.
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        trainer.evaluate()
    final_dir = Path(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return final_dir
    # Final files are rebuilt from what was saved: under FSDP the in-memory weights are shards.
    if script_args.lora_r is not None:
        final_dir = final_dir / "merged"
        merge_lora(build_head(script_args, target_config), training_args.output_dir).save_pretrained(final_dir)
        logger.info(f"Saved the LoRA adapter to {training_args.output_dir} and the merged head to {final_dir}")
    if script_args.export_format is not None:
        export_dir = Path(training_args.output_dir) / f"export-{script_args.export_format}"
        exported = Eagle3DraftModel.from_pretrained(final_dir)
        # The speculators/vLLM layout stores the target's embedding: from the loaded target, or (stored features) read
        # from the target's checkpoint alone.
        if target is not None:
            exported.attach_target(target)
        elif checkpoint_layout(script_args.export_format) == SPECULATORS_LAYOUT:
            exported.set_target_embeddings(load_target_embedding(exported.config.target_name_or_path))
        exported.save_pretrained(
            export_dir,
            format=script_args.export_format,
            target_max_position_embeddings=target_config.get_text_config().max_position_embeddings,
        )
        logger.info(f"Saved the head in the {script_args.export_format!r} layout to {export_dir}")
    return final_dir


def write_features(args: PrepareFeaturesArguments) -> Path:
    """Run the target of `args` over the tokenised `args.data` and write feature shards to `args.output_dir`
    (resumable); the draft vocabulary found in `args.data` is copied beside them. Returns the feature directory."""
    if args.target is None or args.data is None or args.output_dir is None:
        raise ValueError("Pass --target, --data (tokenised rows) and --output_dir.")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    target = load_training_target(args, device=device)
    layer_ids = args.target_layer_ids or default_target_layer_ids(target.config.get_text_config().num_hidden_layers)
    rows = load_training_rows(args.data)
    path = prepare_features(
        target,
        rows,
        args.output_dir,
        layer_ids,
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    vocab_map = Path(args.data) / VOCAB_MAP_NAME
    if vocab_map.exists():  # `hf-eagle3 train --data FEATURES` then finds the draft vocabulary there too
        shutil.copyfile(vocab_map, path / VOCAB_MAP_NAME)
    logger.info(f"Wrote features of {len(rows)} samples (target layers {layer_ids}) to {path}")
    return path


__all__ = [
    "PrepareFeaturesArguments",
    "TargetArguments",
    "TrainScriptArguments",
    "build_head",
    "load_training_rows",
    "load_training_target",
    "merge_lora",
    "train_head",
    "write_features",
]
