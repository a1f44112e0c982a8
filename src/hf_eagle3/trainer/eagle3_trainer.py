"""`Eagle3Trainer`: train an EAGLE-3 draft head with training-time test, on a frozen target.

`Trainer.model` is the head alone, so checkpoints are a complete, loadable `Eagle3DraftModel` (plus
optimizer, scheduler, RNG and trainer state for `resume_from_checkpoint`). The frozen target lives in
`self.target_model` and runs inside each step without gradients ("online"); with an
`Eagle3FeatureDataset` (stored features) it is not needed at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from ..model_card import create_model_card
from ..modeling_eagle3 import Eagle3DraftModel
from ..target_features import TargetFeatureCapture, padded_batch_attention
from .checkpoints import prepare_output_dir
from .stored_features import Eagle3FeatureDataset
from .training_args import Eagle3TrainingArguments
from .ttt import TTTOutput, simulated_acceptance_length, target_distribution_from_logits, training_time_test

REQUIRED_COLUMNS = ("input_ids", "loss_mask")
FEATURE_COLUMNS = ("target_hidden_states", "target_last_hidden_state")


@dataclass
class Eagle3DataCollator:
    """Right-pad rows of `input_ids`, `loss_mask` (and `attention_mask`, precomputed features) into a batch.

    Rows longer than `max_length` are truncated; token ids outside the target vocabulary raise here, where
    the sample is still identifiable, instead of as an index error deep inside the embedding.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    vocab_size: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        names = ["input_ids", "loss_mask", "attention_mask", *(c for c in FEATURE_COLUMNS if c in rows[0])]
        for name in names:
            values = []
            for row in rows:
                value = row.get(name)
                if value is None and name == "attention_mask":
                    value = torch.ones(len(row["input_ids"]), dtype=torch.long)
                value = torch.as_tensor(value)[: self.max_length]
                if value.shape[0] != min(len(row["input_ids"]), self.max_length or len(row["input_ids"])):
                    raise ValueError(
                        f"A row's `{name}` has {value.shape[0]} entries but its `input_ids` {len(row['input_ids'])}; "
                        "every per-token column must be as long as `input_ids`."
                    )
                values.append(value)
            padding_value = self.pad_token_id if name == "input_ids" else 0
            batch[name] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=padding_value)
        if self.vocab_size is not None and int(batch["input_ids"].max()) >= self.vocab_size:
            raise ValueError(
                f"Token id {int(batch['input_ids'].max())} is outside the target vocabulary of {self.vocab_size}: the "
                "data was tokenised for another model. Tokenise it with the target's tokenizer (`hf-eagle3 prepare-data`)."
            )
        batch["input_ids"] = batch["input_ids"].long()
        return batch


def check_training_rows(dataset: Any, name: str) -> None:
    """Refuse datasets that cannot train a head: missing columns, or no token to learn in any row.

    Scans until the first row with a non-empty loss mask, so good data costs one row; an IterableDataset
    is not scanned (that would consume it).
    """
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty.")
    columns = getattr(dataset, "column_names", None) or list(dataset[0].keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"The {name} dataset lacks the column(s) {missing}; rows need `input_ids` and `loss_mask` (1 on the tokens "
            f"to learn, normally the assistant's), as written by `hf-eagle3 prepare-data`. It has: {columns}."
        )
    if hasattr(dataset, "select_columns"):  # datasets.Dataset: read the one column in batches
        batches = (batch["loss_mask"] for batch in dataset.select_columns(["loss_mask"]).iter(batch_size=1024))
        has_tokens = any(any(any(mask) for mask in batch) for batch in batches)
    else:
        has_tokens = any(bool(torch.as_tensor(dataset[i]["loss_mask"]).any()) for i in range(len(dataset)))
    if not has_tokens:
        raise ValueError(
            f"The loss mask of every row of the {name} dataset is empty: there is no token to learn. The mask must be "
            "1 on the tokens the head should predict (the assistant turns); check the chat template's assistant "
            "markers in data preparation."
        )


class Eagle3Trainer(Trainer):
    r"""
    A `transformers.Trainer` that trains an EAGLE-3 draft head with training-time test (TTT).

    Args:
        model: the draft head (`Eagle3DraftModel`, or a `PeftModel` around one to train adapters).
        target_model: the frozen target (any causal LM, or a `PeftModel` with its LoRA adapters). Load it in
            bfloat16 on GPU; it is moved to the training device, put in eval mode and never gets gradients.
            Not needed when the datasets are `Eagle3FeatureDataset`s (stored features).
        args: `Eagle3TrainingArguments`.
        train_dataset / eval_dataset: rows with `input_ids`, `loss_mask` (1 on tokens to learn) and optionally
            `attention_mask`; or an `Eagle3FeatureDataset`.
        data_collator: defaults to `Eagle3DataCollator` (right padding, truncation to `args.max_length`).

    Logs per TTT step `loss_step_k` and `acc_step_k` at every logging step and, at evaluation,
    `eval_loss_step_k`, `eval_acc_step_k` and `eval_acceptance_length` (simulated mean tokens per target
    forward of a chain draft of `ttt_steps` tokens), over the rows of all processes.

    Several GPUs: `accelerate launch` with DDP or FSDP2 wraps and shards the head alone; every process holds the
    whole frozen target (under FSDP the head shards a copy of the target's embedding).
    """

    # The loss is a per-step mean over one micro-batch, as in the official EAGLE code; Trainer divides it by the
    # gradient-accumulation steps (transformers >= 5.24 reads this, older releases `model_accepts_loss_kwargs`).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Eagle3DraftModel | nn.Module,
        target_model: PreTrainedModel | None = None,
        args: Eagle3TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        if args is None:
            args = Eagle3TrainingArguments(output_dir="eagle3-head")
        if not isinstance(args, Eagle3TrainingArguments):
            raise TypeError(
                f"Eagle3Trainer needs Eagle3TrainingArguments (TTT steps, loss decay, ...), got {type(args).__name__}."
            )
        draft = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(draft, Eagle3DraftModel):
            raise TypeError(
                f"`model` must be an Eagle3DraftModel (or a PeftModel of one), got {type(draft).__name__}."
            )
        datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
        feature_datasets = [d for d in datasets if isinstance(d, Eagle3FeatureDataset)]
        if target_model is None and (
            not feature_datasets or len(feature_datasets) != sum(d is not None for d in datasets)
        ):
            raise ValueError(
                "Pass `target_model`: online training runs the frozen target on every batch. Only datasets of "
                "precomputed features (`Eagle3FeatureDataset`, written by `hf-eagle3 prepare-features`) need none."
            )
        if target_model is not None:
            draft.check_target(target_model)
            if not draft.has_target_embeddings:
                draft.attach_target(target_model)
            self.target_output_embeddings = target_model.get_output_embeddings()
        if feature_datasets:
            for dataset in feature_datasets:
                if target_model is None:
                    dataset.attach_head(draft)
                elif dataset.features_config["target_layer_ids"] != list(draft.config.target_layer_ids):
                    raise ValueError(
                        f"The features hold target layers {dataset.features_config['target_layer_ids']}, the head "
                        f"reads {draft.config.target_layer_ids}."
                    )
            if target_model is None:
                self.target_output_embeddings = feature_datasets[0].target_output_embeddings()
        draft.check_vocab_maps()
        check_training_rows(train_dataset, "training")
        for name, dataset in (
            eval_dataset.items() if isinstance(eval_dataset, dict) else [("evaluation", eval_dataset)]
        ):
            check_training_rows(dataset, name)
        if data_collator is None:
            data_collator = Eagle3DataCollator(
                pad_token_id=draft.config.pad_token_id or 0,
                max_length=args.max_length,
                vocab_size=draft.config.vocab_size,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # transformers < 5.24: a model "accepting loss kwargs" would skip the division by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.target_model = target_model
        self.feature_capture = None
        if target_model is not None:
            target_model.eval().requires_grad_(False)
            # Placed by hand rather than with `accelerator.prepare_model(..., evaluation_mode=True)`: under mixed
            # precision that wraps forward to return float32 outputs, i.e. full-vocabulary float32 logits for the
            # whole batch, the largest tensor of the step. The target runs in the dtype it was loaded in.
            if getattr(target_model, "hf_device_map", None) is None:
                target_model.to(self.accelerator.device)
            shared = draft.embed_tokens.weight is target_model.get_input_embeddings().weight
            if self.is_fsdp_enabled and shared:
                # FSDP flattens and shards the head's parameters in place; the target must keep its own embedding.
                draft.embed_tokens.weight = nn.Parameter(
                    draft.embed_tokens.weight.detach().clone(), requires_grad=False
                )
            self.feature_capture = TargetFeatureCapture(target_model, draft.config.target_layer_ids)
        self.target_output_embeddings.to(self.accelerator.device)
        # Per-step sums (loss, scored, correct, chain scored, chain correct) since the last log, kept on the device
        # so that accumulating them costs no synchronisation.
        self._step_stats = {split: torch.zeros(5, args.ttt_steps, device=args.device) for split in ("train", "eval")}

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, minding the output folder: a new run refuses one that holds files unless
        `args.overwrite_output_dir`, and `resume_from_checkpoint=True` resumes from the newest complete checkpoint,
        skipping any a killed save left incomplete (see `hf_eagle3.trainer.checkpoints`)."""
        if trial is None:  # hyperparameter-search trials each write a run-* subfolder of one output_dir
            resume_from_checkpoint, stale = prepare_output_dir(
                self.args.output_dir, self.args.overwrite_output_dir, resume_from_checkpoint
            )
            self.accelerator.wait_for_everyone()  # every process has looked before the main one deletes
            if self.is_world_process_zero():
                for path in stale:
                    shutil.rmtree(path)
            self.accelerator.wait_for_everyone()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ------------------------------------------------------------------ loss
    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """Trainer's context (autocast) plus attention kernels without per-shape planning: batches are padded to
        a new length nearly every step (see `padded_batch_attention`)."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(padded_batch_attention())
        return stack

    @property
    def draft_model(self) -> Eagle3DraftModel:
        """The head itself, under any DDP/FSDP/PEFT wrapper."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @torch.no_grad()
    def target_outputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused-layer features and full-vocabulary logits of the target for a batch, online or stored."""
        if "target_hidden_states" in inputs:
            return inputs["target_hidden_states"], self.target_output_embeddings(inputs["target_last_hidden_state"])
        with self.feature_capture as capture:
            logits = self.target_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits
            return capture.pop(), logits

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, TTTOutput]:
        features, logits = self.target_outputs(inputs)
        target = target_distribution_from_logits(self.draft_model, logits, self.args.target_logits_chunk_size)
        del logits  # full-vocabulary: free it before the head's TTT steps allocate theirs
        output = training_time_test(
            model,
            features,
            inputs["input_ids"],
            inputs["loss_mask"],
            target,
            attention_mask=inputs["attention_mask"],
            num_steps=self.args.ttt_steps,
            step_loss_decay=self.args.step_loss_decay,
        )
        stats = torch.stack(
            [output.step_loss_sums, output.step_counts, output.step_correct, output.chain_counts, output.chain_correct]
        )
        self._step_stats["train" if model.training else "eval"] += stats.to(self._step_stats["train"].device)
        return (output.loss, output) if return_outputs else output.loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation keeps the TTT loss (rows have no `labels`, which the default would look for)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ metrics
    def _pop_step_metrics(self, split: str) -> dict[str, float]:
        """Per-step loss/accuracy since the last call, summed over processes; and the simulated acceptance."""
        stats = self.accelerator.reduce(self._step_stats[split].clone(), reduction="sum").cpu()
        self._step_stats[split].zero_()
        loss_sums, counts, correct, chain_counts, chain_correct = stats
        if not counts.any():
            return {}
        metrics = {}
        for step in range(stats.shape[1]):
            metrics[f"loss_step_{step}"] = float(loss_sums[step] / counts[step].clamp(min=1))
        for step in range(stats.shape[1]):
            metrics[f"acc_step_{step}"] = float(correct[step] / counts[step].clamp(min=1))
        metrics["acceptance_length"] = simulated_acceptance_length(chain_correct, chain_counts)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-step training metrics to the Trainer's own (so every `report_to` integration gets them)."""
        if "loss" in logs:
            logs.update(self._pop_step_metrics("train"))
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._step_stats["eval"].zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_step_metrics("eval").items()})
        return output

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the head's own card (target, usage with `assistant_model`, layer ids) to `output_dir/README.md`;
        `push_to_hub` uploads it. transformers' generic card would describe a fine-tuned causal LM instead.
        `language`, `tasks` and `dataset_args` keep `Trainer`'s signature; a draft head's card has no use for them."""
        if not self.is_world_process_zero():
            return
        as_list = lambda value: [value] if isinstance(value, str) else value  # noqa: E731
        card = create_model_card(
            self.draft_model.config,
            self.args.hub_model_id or model_name,
            base_model=finetuned_from,
            datasets=as_list(dataset_tags),
            training_data=", ".join(as_list(dataset)) if dataset else None,
            license=license,
            tags=as_list(tags),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))


__all__ = ["Eagle3DataCollator", "Eagle3Trainer", "check_training_rows"]
