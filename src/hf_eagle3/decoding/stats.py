"""Per-call statistics of EAGLE-3 decoding: how much each target forward bought."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Eagle3GenerationStats:
    """Counts for one `generate` call (the prefill forward is not counted).

    `accepted_per_depth[d]` counts the verification steps that accepted at least `d + 1` draft tokens,
    so `accepted_per_depth[d] / target_forwards` is the acceptance rate at depth `d + 1`.
    """

    target_forwards: int = 0
    new_tokens: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)

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

    def to_dict(self) -> dict[str, float | int | list]:
        return {
            "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens,
            "mean_accept_len": self.mean_accept_len,
            "acceptance_rate_per_depth": self.acceptance_rate_per_depth,
        }
