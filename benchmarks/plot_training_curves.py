#!/usr/bin/env python
"""Plot per-TTT-step loss and accuracy of an `hf-eagle3 train` run.

Reads the Trainer's `trainer_state.json` (its `log_history`) or a file of the log lines the Trainer prints
(one `{'loss': ..., 'acc_step_0': ...}` dict per line), and writes a PNG with one curve per TTT step.

    python benchmarks/plot_training_curves.py runs/head/checkpoint-2504/trainer_state.json out.png
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def read_logs(path: Path) -> list[dict[str, float]]:
    """Training log entries (those with per-step metrics), values as floats."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text())["log_history"]
    else:
        entries = [ast.literal_eval(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [{k: float(v) for k, v in entry.items()} for entry in entries if "acc_step_0" in entry]


def plot(logs: list[dict[str, float]], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(int(key.rsplit("_", 1)[1]) for key in logs[0] if key.startswith("acc_step_"))
    # Entries are logged every `logging_steps`; the epoch is what every log line carries.
    x = [entry["epoch"] for entry in logs]
    figure, (loss_axis, acc_axis, tau_axis) = plt.subplots(1, 3, figsize=(15, 4))
    for k in steps:
        loss_axis.plot(x, [entry[f"loss_step_{k}"] for entry in logs], label=f"step {k}")
        acc_axis.plot(x, [entry[f"acc_step_{k}"] for entry in logs], label=f"step {k}")
    tau_axis.plot(x, [entry["acceptance_length"] for entry in logs])
    for axis, name in (
        (loss_axis, "soft cross-entropy"),
        (acc_axis, "accuracy (argmax = target's)"),
        (tau_axis, "simulated acceptance length"),
    ):
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    acc_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="trainer_state.json or a file of printed log lines")
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--title", default="EAGLE-3 head training (training-time test)")
    args = parser.parse_args()
    logs = read_logs(args.log)
    if not logs:
        raise SystemExit(f"{args.log} holds no log entry with per-step metrics (acc_step_0, ...).")
    plot(logs, args.output, args.title)
    print(f"Wrote {args.output} ({len(logs)} log entries)")


if __name__ == "__main__":
    main()
