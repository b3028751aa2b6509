"""When pruning events happen, and (for AGP) how sparse the model should be at each."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("oneshot", "iterative", "agp")


@dataclass(frozen=True)
class Schedule:
    """oneshot: one event at `start`. iterative: an event every `every` steps from `start` to
    `end` inclusive. agp: the same event steps, with the fraction of removed units following the
    cubic ramp s(t) = target (1 - (1 - (t - start)/(end - start))^3) (Zhu & Gupta)."""
    kind: str = "oneshot"
    start: int = 0
    end: int | None = None
    every: int = 1
    target: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.kind != "oneshot" and (self.end is None or self.end < self.start):
            raise ValueError(f"end must be >= start={self.start} for a {self.kind} schedule, got {self.end}")
        if self.kind == "agp" and (self.target is None or not 0.0 < self.target < 1.0):
            raise ValueError(f"target must be in (0, 1) for an agp schedule, got {self.target}")

    @property
    def last(self) -> int:
        return self.start if self.kind == "oneshot" else int(self.end)  # type: ignore[arg-type]

    def is_event(self, step: int) -> bool:
        if self.kind == "oneshot":
            return step == self.start
        return self.start <= step <= self.last and (step - self.start) % self.every == 0

    def events(self) -> list[int]:
        if self.kind == "oneshot":
            return [self.start]
        return list(range(self.start, self.last + 1, self.every))

    def sparsity_at(self, step: int) -> float:
        """AGP: fraction of each group's initial units removed after the event at `step`."""
        if self.kind != "agp":
            raise ValueError(f"sparsity_at is defined for agp schedules, not {self.kind!r}")
        span = max(1, self.last - self.start)
        t = min(max(step - self.start, 0), span) / span
        return float(self.target) * (1.0 - (1.0 - t) ** 3)  # type: ignore[arg-type]
