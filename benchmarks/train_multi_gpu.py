"""The two halves of `train_multi_gpu.sh`.

`train ARGS`: `hf-eagle3 train ARGS`, run by every process of `accelerate launch`; each process then writes its peak
GPU memory to `<output_dir>/peak_memory_rank<N>.json`.

`report RUN_DIR MODE...`: per mode, samples/s and tokens/s from the Trainer's own metrics (`train_results.json`,
`trainer_state.json`) and every process's peak memory; then loads each saved head and its resumed twin to prove
they are complete. Prints a table and writes `RUN_DIR/summary.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def train(argv: list[str]) -> int:
    from hf_eagle3.cli import main

    status = main(["train", *argv])
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    if torch.cuda.is_available():
        peak = {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }
        rank = int(os.environ.get("RANK", 0))
        (output_dir / f"peak_memory_rank{rank}.json").write_text(json.dumps(peak))
    return status


def max_difference(head, other) -> float:
    """Largest absolute difference between the trained weights of two heads."""
    theirs = dict(other.named_parameters())
    return max(
        float((p.detach() - theirs[n].detach()).abs().max()) for n, p in head.named_parameters() if p.requires_grad
    )


def report(run_dir: Path, modes: list[str]) -> int:
    from hf_eagle3 import Eagle3DraftModel

    rows, heads = [], {}
    for mode in modes:
        output_dir = run_dir / mode
        metrics = json.loads((output_dir / "train_results.json").read_text())
        state = json.loads((output_dir / "trainer_state.json").read_text())
        first_log = next(log for log in state["log_history"] if "loss" in log)
        peaks = [json.loads(path.read_text()) for path in sorted(output_dir.glob("peak_memory_rank*.json"))]
        # from_pretrained refuses a head with missing tensors or inconsistent d2t/t2d maps.
        heads[mode] = Eagle3DraftModel.from_pretrained(output_dir)
        short, resumed = (Eagle3DraftModel.from_pretrained(run_dir / f"{mode}-{run}") for run in ("short", "resumed"))
        rows.append(
            {
                "mode": mode,
                "steps": state["global_step"],
                "train_runtime_s": metrics["train_runtime"],
                "samples_per_s": metrics["train_samples_per_second"],
                "tokens_per_s": round(state["num_input_tokens_seen"] / metrics["train_runtime"]),
                "peak_allocated_gib": [peak["peak_allocated_gib"] for peak in peaks],
                "peak_reserved_gib": [peak["peak_reserved_gib"] for peak in peaks],
                "first_loss_step_0": round(first_log["loss_step_0"], 5),
                "max_diff_vs_" + modes[0]: f"{max_difference(heads[mode], heads[modes[0]]):.1e}",
                "same_d2t_as_" + modes[0]: bool(torch.equal(heads[mode].d2t, heads[modes[0]].d2t)),
                "resumed_max_diff": f"{max_difference(resumed, short):.1e}",
            }
        )
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    print("\n".join(lines))
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    sys.exit(train(rest) if command == "train" else report(Path(rest[0]), rest[1:]))
