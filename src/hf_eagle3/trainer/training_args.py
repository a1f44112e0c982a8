"""Training arguments of `Eagle3Trainer`: the TTT recipe on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class Eagle3TrainingArguments(TrainingArguments):
    r"""
    `TrainingArguments` plus the EAGLE-3 training-time-test recipe.

    Optimiser defaults follow the EAGLE-3 paper (AdamW betas (0.9, 0.95), gradient clipping 0.5) except the
    learning rate: the paper's 5e-5 goes with ~500k samples on 8B targets; 1e-4 converges in the few epochs a
    small head on tens of thousands of samples gets. Pass `learning_rate=5e-5` for the paper's recipe.

    Args:
        overwrite_output_dir: `Eagle3Trainer.train` refuses to start a new run in an `output_dir` that holds files
            (a trained head, an earlier run's checkpoints) unless this is set; resuming needs no flag. transformers
            v5 dropped the v4 argument of this name and overwrites silently.
        ttt_steps: how many steps the head is unrolled on its own outputs (training-time test). The
            official EAGLE code uses 7; a head drafts well about as deep as it was trained.
        step_loss_decay: step k's loss is weighted `step_loss_decay**k`.
        max_length: longer samples are truncated to this many tokens by the default collator.
        target_logits_chunk_size: positions whose full-vocabulary target logits are upcast to float32 at once
            when restricting them to the draft vocabulary; lower it if that step runs out of memory.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that already holds files (its checkpoint-N folders are deleted); "
            "without it such a run is refused, so that a trained head is never replaced by surprise."
        },
    )
    ttt_steps: int = field(default=7, metadata={"help": "Training-time-test unroll length (official EAGLE code: 7)."})
    step_loss_decay: float = field(default=0.8, metadata={"help": "Step k's loss is weighted step_loss_decay**k."})
    max_length: int | None = field(
        default=2048, metadata={"help": "Samples longer than this are truncated by the default collator."}
    )
    target_logits_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions of full-vocabulary target logits upcast to float32 at a time."},
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (paper: 5e-5 at 8B scale)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2, as in the EAGLE-3 paper."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping, as in the EAGLE-3 paper."})
    # Rows carry `loss_mask` (and stored features, when trained from them), which the head's forward does not take.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the dataset columns TTT needs."})
    # Every trainable parameter of the head gets a gradient each step; the unused-parameter search of DDP
    # would only cost time (and the head is called once per TTT step within one backward).
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP unused-parameter search; every head parameter is used."}
    )
    # transformers types this `str | bool`, which its argument parser reads as a bool alone: `non_padding` could not
    # be passed to `hf-eagle3 train`.
    include_num_input_tokens_seen: str = field(
        default="no",
        metadata={
            "help": "Count input tokens (num_input_tokens_seen, train_tokens_per_second): all, non_padding, no."
        },
    )

    def __post_init__(self):
        tokens_seen = str(self.include_num_input_tokens_seen).lower()
        self.include_num_input_tokens_seen = {"true": "all", "false": "no"}.get(tokens_seen, tokens_seen)
        super().__post_init__()
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be at least 1, got {self.ttt_steps}.")
        if not 0 < self.step_loss_decay <= 1:
            raise ValueError(f"step_loss_decay must lie in (0, 1], got {self.step_loss_decay}.")
        if self.max_length is not None and self.max_length < self.ttt_steps + 2:
            raise ValueError(
                f"max_length ({self.max_length}) leaves no position to score: TTT step k predicts token t + k + 2, "
                f"so samples need more than ttt_steps + 1 = {self.ttt_steps + 1} tokens."
            )
        self._disable_fsdp_cpu_ram_efficient_loading()

    def _disable_fsdp_cpu_ram_efficient_loading(self) -> None:
        """Turn off FSDP's CPU-RAM-efficient loading, which `accelerate launch --use_fsdp` turns on by default.

        With it, `from_pretrained` returns zeros on every rank but the first, for FSDP to broadcast rank 0's weights
        while it shards the model: the frozen target is never sharded, so those ranks would train against a zero
        target. accelerate's FSDP2 broadcast also fails on the head's persistent `d2t`/`t2d` buffers. The head is
        small and built alike on every rank, so the option saves nothing here. transformers and accelerate read it
        from the environment.
        """
        if self.fsdp_plugin_args is not None:
            self.fsdp_plugin_args["cpu_ram_efficient_loading"] = False
        if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in {"1", "true", "yes", "on"}:
            logger.info("FSDP CPU-RAM-efficient loading turned off: every rank loads the frozen target whole.")
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"

    @property
    def n_gpu(self) -> int:
        """GPUs used by this process: one, also when a single process sees several.

        With several visible GPUs and no distributed launch, Trainer would wrap the head in `nn.DataParallel`,
        which replicates the head but not the frozen target (nor the embedding the head shares with it), so the
        replicas would read features from another device. Several GPUs go through `accelerate launch` (DDP/FSDP).
        """
        visible = super().n_gpu
        if visible > 1:
            logger.warning_once(
                f"This process sees {visible} GPUs but was not started distributed: training on one. "
                "Use `accelerate launch --multi_gpu --num_processes N -m hf_eagle3.cli train ...` to use them all."
            )
        return min(visible, 1)
