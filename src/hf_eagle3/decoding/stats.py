"""Per-call statistics of EAGLE-3 decoding: how much each target forward bought, and where the time went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Eagle3GenerationStats:
    """Counts for one `generate` call (the prefill forward is not counted).

    `accepted_per_depth[d]` counts the verification steps that accepted at least `d + 1` draft tokens,
    so `accepted_per_depth[d] / target_forwards` is the acceptance rate at depth `d + 1`.
    `phase_seconds` (tree mode) is the time spent in each phase of the call, summed over steps: `setup` (the
    static path's caches and CUDA graphs, when they had to be built), `prefill` (the prompt and the first token),
    `draft`, `verify` and `accept` (acceptance, cache compaction and bookkeeping). `static_cache` tells whether tree
    decoding ran on static caches (see `eagle3_static_cache`), `compiled` whether their steps ran compiled (see
    `eagle3_compile`), `tree_shape` the `(total_tokens, depth, top_k)` tree mode decoded with (see `eagle3_tree`).
    `plain_fallback` tells that the call decoded without drafts (the target alone, as `generate` without an
    assistant, on transformers' static cache where `static_cache` is set): a batch left to the automatic tree where no
    tree pays (see `batch_tree_shape`); the counts then stay zero.

    For a batch of several prompts, `rows` holds each row's own counts and the call's counts are their sums: each
    verification forward counts once for every row it served, so `mean_accept_len` stays the tokens a row gets per
    forward. `batch_forwards` counts the verification forwards themselves; `cache_holes` the cache entries the rows
    left empty (masked) because another row accepted more tokens in the same step.
    """

    target_forwards: int = 0
    new_tokens: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    static_cache: bool = False
    compiled: bool = False
    tree_shape: tuple[int, int, int] | None = None
    rows: list[Eagle3GenerationStats] = field(default_factory=list)
    batch_forwards: int = 0
    cache_holes: int = 0
    plain_fallback: bool = False

    def record(self, num_accepted: int, num_emitted: int) -> None:
        """One verification forward that accepted `num_accepted` draft tokens and emitted `num_emitted` tokens.

        `num_emitted` is normally `num_accepted + 1` (the target's own token), less when generation stopped
        inside the accepted run (EOS, max_new_tokens).
        """
        self.target_forwards += 1
        self.new_tokens += num_emitted
        if len(self.accepted_per_depth) < num_accepted:
            self.accepted_per_depth.extend([0] * (num_accepted - len(self.accepted_per_depth)))
        for depth in range(num_accepted):
            self.accepted_per_depth[depth] += 1

    @property
    def mean_accept_len(self) -> float:
        """Tokens produced per target forward (accepted drafts + 1): EAGLE papers' tau."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate_per_depth(self) -> list[float]:
        return [count / self.target_forwards for count in self.accepted_per_depth] if self.target_forwards else []

    def to_dict(self) -> dict[str, float | int | list | dict | bool]:
        return {
            "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens,
            "mean_accept_len": self.mean_accept_len,
            "acceptance_rate_per_depth": self.acceptance_rate_per_depth,
            "phase_seconds": dict(self.phase_seconds),
            "static_cache": self.static_cache,
            "compiled": self.compiled,
            "tree_shape": self.tree_shape,
            "rows": [row.to_dict() for row in self.rows],
            "batch_forwards": self.batch_forwards,
            "cache_holes": self.cache_holes,
            "plain_fallback": self.plain_fallback,
        }


class PhaseTimer:
    """Time of each phase of a decoding loop, summed over steps, without a synchronisation inside the loop.

    On CUDA `mark` records an event on the device's current stream and the events are read once, in `seconds`:
    GPU-timeline time, so a phase that waits for the host (acceptance reading the device) includes that wait.
    Elsewhere it is wall-clock time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._last: torch.cuda.Event | float | None = None
        self._spans: list[tuple[str, torch.cuda.Event | float, torch.cuda.Event | float]] = []

    def _now(self) -> torch.cuda.Event | float:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def mark(self, phase: str | None = None) -> None:
        """End `phase`, begun at the previous mark, now; without a phase, only start the clock."""
        now = self._now()
        if phase is not None:
            self._spans.append((phase, self._last, now))
        self._last = now

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase (waits for the last marked event on CUDA)."""
        if self.device.type == "cuda" and self._spans:
            self._spans[-1][2].synchronize()
        totals: dict[str, float] = {}
        for phase, start, end in self._spans:
            elapsed = start.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - start
            totals[phase] = totals.get(phase, 0.0) + elapsed
        return totals
