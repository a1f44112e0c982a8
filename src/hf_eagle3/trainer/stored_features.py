"""Training from stored features: run the target once over a tokenised dataset, store what TTT needs, train from disk.

What is stored per token: the three feature layers (`3 * H`) and the input of the target's output
projection (`H`, the final normed hidden state), in the target's dtype. The trainer recomputes the
target's logits from the latter with the stored projection. Compared with storing the draft-vocabulary
log-probs, that is `V' / H` times smaller (32000 / 4096 ~ 8x at Llama-8B scale, 55x for SmolLM2), it gives
the very same loss as online training, and the draft vocabulary can still change after the features
were written. `prepare_features` checks on the first batch that projecting the stored state reproduces
the target's logits, so targets whose logits are post-processed (soft-capping, scaling) are refused
instead of silently trained on the wrong distribution.

Layout of a feature directory:
- `features_config.json`: what wrote it (target, layer ids, sizes, shard size, sample count).
- `config.json`: the target's config (a head checks it fits with `check_target`).
- `target_weights.safetensors`: the target's input embedding and output projection.
- `features-XXXXX.safetensors`: samples `[i * samples_per_shard, (i + 1) * samples_per_shard)`, token
  tensors concatenated, `offsets` marking where each sample starts. A shard appears only once complete
  (written to a temporary name, then renamed), so an interrupted run resumes by skipping finished shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoConfig, PreTrainedModel
from transformers.utils.logging import tqdm

from ..json_files import read_json
from ..modeling_eagle3 import Eagle3DraftModel
from ..target_features import TargetFeatureCapture, padded_batch_attention

FEATURES_CONFIG_NAME = "features_config.json"
TARGET_WEIGHTS_NAME = "target_weights.safetensors"
SHARD_PATTERN = "features-{:05d}.safetensors"
FORMAT_VERSION = 1


class TargetOutputCapture:
    """Capture the input of the target's output projection: the final hidden state the logits come from."""

    def __init__(self, target: PreTrainedModel):
        self.output_embeddings = target.get_output_embeddings()
        if not isinstance(self.output_embeddings, nn.Linear):
            raise ValueError(
                f"{type(target).__name__} has no linear output projection (`get_output_embeddings()` returned "
                f"{type(self.output_embeddings).__name__}); stored features need one to recompute the logits."
            )
        self.hidden_state: torch.Tensor | None = None

    def _hook(self, module, args):
        self.hidden_state = args[0]

    def __enter__(self) -> TargetOutputCapture:
        self._handle = self.output_embeddings.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.hidden_state = None


def _pad_batch(rows: Sequence[dict[str, Any]], max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    sequences = [torch.as_tensor(row["input_ids"], dtype=torch.long)[:max_length] for row in rows]
    lengths = torch.tensor([len(s) for s in sequences])
    input_ids = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    attention_mask = (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long()
    return input_ids, attention_mask


def _check_or_write_config(output_dir: Path, config: dict[str, Any]) -> None:
    path = output_dir / FEATURES_CONFIG_NAME
    if path.exists():
        existing = read_json(path)
        if existing != config:
            changed = sorted(k for k in config.keys() | existing.keys() if existing.get(k) != config.get(k))
            raise ValueError(
                f"{output_dir} already holds features written with different settings ({', '.join(changed)}). "
                "Resuming needs the same target, data and options; use a new output directory otherwise."
            )
    else:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def prepare_features(
    target: PreTrainedModel,
    dataset: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    target_layer_ids: Sequence[int],
    samples_per_shard: int = 512,
    batch_size: int = 8,
    max_length: int | None = None,
) -> Path:
    """Write the target features of every row of `dataset` (`input_ids`, `loss_mask`) under `output_dir`.

    Resumable: shards already written are skipped. Returns the directory.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_config = target.config.get_text_config()
    _check_or_write_config(
        output_dir,
        {
            "format_version": FORMAT_VERSION,
            "target_name_or_path": getattr(target.config, "_name_or_path", None) or None,
            "target_layer_ids": list(target_layer_ids),
            "hidden_size": text_config.hidden_size,
            "vocab_size": text_config.vocab_size,
            "num_samples": len(dataset),
            "samples_per_shard": samples_per_shard,
            "max_length": max_length,
        },
    )
    output_embeddings = target.get_output_embeddings()
    if not (output_dir / TARGET_WEIGHTS_NAME).exists():
        target.config.save_pretrained(output_dir)
        weights = {
            "embed_tokens.weight": target.get_input_embeddings().weight,
            "lm_head.weight": output_embeddings.weight,
        }
        if getattr(output_embeddings, "bias", None) is not None:
            weights["lm_head.bias"] = output_embeddings.bias
        # Tied embeddings share storage; safetensors stores each tensor on its own.
        save_file(
            {k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}, output_dir / TARGET_WEIGHTS_NAME
        )

    device = next(target.parameters()).device
    checked = False
    num_shards = -(-len(dataset) // samples_per_shard)
    with (
        TargetFeatureCapture(target, target_layer_ids) as features,
        TargetOutputCapture(target) as final,
        padded_batch_attention(),
    ):
        progress = tqdm(total=len(dataset), desc="Writing target features", unit="sample")
        for shard in range(num_shards):
            path = output_dir / SHARD_PATTERN.format(shard)
            if path.exists():  # written by an earlier, interrupted run
                progress.update(min(samples_per_shard, len(dataset) - shard * samples_per_shard))
                continue
            start, stop = shard * samples_per_shard, min((shard + 1) * samples_per_shard, len(dataset))
            columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "loss_mask", "hidden_states")}
            columns["last_hidden_state"] = []
            for batch_start in range(start, stop, batch_size):
                rows = [dataset[i] for i in range(batch_start, min(batch_start + batch_size, stop))]
                input_ids, attention_mask = _pad_batch(rows, max_length)
                logits = target(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                hidden_states, last_hidden_state = features.pop(), final.hidden_state
                if not checked:
                    recomputed = F.linear(last_hidden_state, output_embeddings.weight, output_embeddings.bias)
                    if not torch.allclose(recomputed.float(), logits.float(), atol=1e-2, rtol=1e-2):
                        raise ValueError(
                            f"The logits of {type(target).__name__} are not its output projection of its final "
                            "hidden state (logit soft-capping or scaling?). Stored features would train on the "
                            "wrong distribution: train this target online (without prepare-features)."
                        )
                    checked = True
                for row, length in enumerate(attention_mask.sum(-1).tolist()):
                    columns["input_ids"].append(input_ids[row, :length])
                    loss_mask = torch.as_tensor(rows[row]["loss_mask"], dtype=torch.long)[:length]
                    columns["loss_mask"].append(loss_mask)
                    columns["hidden_states"].append(hidden_states[row, :length].cpu())
                    columns["last_hidden_state"].append(last_hidden_state[row, :length].cpu())
                progress.update(len(rows))
            lengths = torch.tensor([0] + [len(ids) for ids in columns["input_ids"]])
            tensors = {name: torch.cat(values).contiguous() for name, values in columns.items()}
            tensors["offsets"] = lengths.cumsum(0)
            partial = path.with_suffix(".tmp")
            save_file(tensors, partial)
            os.replace(partial, path)
        progress.close()
    return output_dir


class Eagle3FeatureDataset(Dataset):
    """Samples written by `prepare_features`, read lazily from the shards (memory-mapped by safetensors).

    Rows hold `input_ids`, `loss_mask`, `attention_mask`, `target_hidden_states` (the three layers) and
    `target_last_hidden_state` (input of the target's output projection); `Eagle3Trainer` trains on them
    with the same loss as online, computing the target's logits with `target_output_embeddings()`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_path = self.path / FEATURES_CONFIG_NAME
        if not config_path.exists():
            raise ValueError(
                f"{self.path} is not a feature directory (no {FEATURES_CONFIG_NAME}); write one with "
                "`hf-eagle3 prepare-features`."
            )
        self.features_config = read_json(config_path)
        samples_per_shard = self.features_config["samples_per_shard"]
        num_samples = self.features_config["num_samples"]
        num_shards = -(-num_samples // samples_per_shard)
        missing = [i for i in range(num_shards) if not (self.path / SHARD_PATTERN.format(i)).exists()]
        if missing:
            raise ValueError(
                f"{self.path} is incomplete: shards {missing[:5]}{'...' if len(missing) > 5 else ''} of {num_shards} "
                "are missing. Run `hf-eagle3 prepare-features` again with the same options to finish it."
            )
        self._offsets = []
        for shard in range(num_shards):
            with safe_open(self.path / SHARD_PATTERN.format(shard), "pt") as file:
                self._offsets.append(file.get_tensor("offsets").tolist())
        self._samples_per_shard = samples_per_shard
        self._num_samples = num_samples

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} out of range for {self._num_samples} samples")
        shard, local = divmod(index, self._samples_per_shard)
        start, stop = self._offsets[shard][local], self._offsets[shard][local + 1]
        with safe_open(self.path / SHARD_PATTERN.format(shard), "pt") as file:
            row = {name: file.get_slice(name)[start:stop] for name in ("input_ids", "loss_mask")}
            row["target_hidden_states"] = file.get_slice("hidden_states")[start:stop]
            row["target_last_hidden_state"] = file.get_slice("last_hidden_state")[start:stop]
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        return row

    @property
    def target_config(self):
        """The config of the target the features came from."""
        return AutoConfig.from_pretrained(self.path)

    def target_output_embeddings(self) -> nn.Linear:
        """The target's output projection, to turn stored final hidden states into logits."""
        with safe_open(self.path / TARGET_WEIGHTS_NAME, "pt") as file:
            weight = file.get_tensor("lm_head.weight")
            bias = file.get_tensor("lm_head.bias") if "lm_head.bias" in file.keys() else None
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        projection.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            projection.bias = nn.Parameter(bias, requires_grad=False)
        return projection.eval()

    def attach_head(self, draft: Eagle3DraftModel) -> Eagle3DraftModel:
        """Check `draft` fits the features' target and give it the target's input embedding, with no target."""
        draft.check_target(self.target_config)
        if list(draft.config.target_layer_ids or []) != self.features_config["target_layer_ids"]:
            raise ValueError(
                f"The head reads target layers {draft.config.target_layer_ids}, the features hold layers "
                f"{self.features_config['target_layer_ids']}. Write features for the head's layers, or build the "
                "head with `target_layer_ids` equal to them."
            )
        with safe_open(self.path / TARGET_WEIGHTS_NAME, "pt") as file:
            weight = file.get_tensor("embed_tokens.weight")
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(weight.to(draft.embed_tokens.weight.dtype))
        draft.has_target_embeddings = True
        return draft


__all__ = ["Eagle3FeatureDataset", "TargetOutputCapture", "prepare_features"]
