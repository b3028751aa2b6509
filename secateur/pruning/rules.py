"""Decision rules: from per-unit importance (higher = keep) to the units each group keeps.

ratio: remove floor(value * n) lowest units, per layer, per TSRA subspace, or globally (scores
normalised by their group's mean so layers of different scale compete fairly).
Thresholds (METHODS A.6): remove units whose importance is below value * max / mean / median of
their layer (or subspace), or whose z-score is below value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

RATIO = "ratio"
THRESHOLDS = ("prop_of_max", "prop_of_avg", "prop_of_med", "zscore")
# uniform: per layer, then every group of one kind and original width keeps the same count (the
# layers of a stack stay alike, so a pruned Hugging Face model still fits its config class)
SCOPES = ("global", "per_layer", "per_subspace", "uniform")


@dataclass(frozen=True)
class Rule:
    kind: str = RATIO
    value: float = 0.5
    scope: str = "per_layer"

    def __post_init__(self) -> None:
        if self.kind not in (RATIO,) + THRESHOLDS:
            raise ValueError(f"kind must be 'ratio' or one of {THRESHOLDS}, got {self.kind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"value must be finite, got {self.value}")
        if self.kind == RATIO and not 0.0 <= self.value < 1.0:
            raise ValueError(f"value: a ratio must be in [0, 1), got {self.value}")
        if self.kind == "prop_of_max" and not 0.0 <= self.value < 1.0:
            raise ValueError(f"value: prop_of_max must be in [0, 1), got {self.value}")
        if self.kind in ("prop_of_avg", "prop_of_med") and self.value < 0:
            raise ValueError(f"value: {self.kind} must be >= 0, got {self.value}")
        if self.kind != RATIO and self.scope == "global":
            raise ValueError("scope: thresholds apply per layer or per subspace, not globally")


def _lowest(scores: Tensor, n_remove: int) -> Tensor:
    """Indices of the n_remove lowest scores (ties broken by index, so all ranks agree)."""
    order = torch.sort(scores.double(), stable=True).indices
    return order[:n_remove]


def threshold_remove(scores: Tensor, kind: str, value: float) -> Tensor:
    """Bool mask of units below the threshold `kind`/`value` over `scores`."""
    s = scores.double()
    if kind == "prop_of_max":
        return s < value * s.max()
    if kind == "prop_of_avg":
        return s < value * s.mean()
    if kind == "prop_of_med":
        return s < value * s.median()
    if kind == "zscore":
        sd = s.std() if s.numel() > 1 else s.new_tensor(0.0)
        return (s - s.mean()) / sd < value if sd > 0 else torch.zeros_like(s, dtype=torch.bool)
    raise ValueError(f"kind: unknown threshold {kind!r}")


def remove_count(scores: Tensor, rule: Rule, ratio: float | None = None) -> int:
    """How many of these units the rule removes (before minimums); `ratio` overrides a ratio rule."""
    n = scores.numel()
    if ratio is not None or rule.kind == RATIO:
        return int(math.floor((rule.value if ratio is None else ratio) * n + 1e-9))
    return int(threshold_remove(scores, rule.kind, rule.value).sum())


def keep_within(scores: Tensor, ranges: list[range], rule: Rule, min_keep: int,
                ratio: float | None = None) -> Tensor:
    """Kept unit indices (ascending) of one group. With per_subspace scope each range decides on
    its own and keeps at least one unit; otherwise the whole group decides. min_keep >= 1."""
    if rule.scope == "per_subspace" and len(ranges) > 1:
        removed = []
        for r in ranges:
            if len(r) == 0:
                continue
            idx = torch.arange(r.start, r.stop)
            k = min(remove_count(scores[idx], rule, ratio), len(r) - 1)
            removed.append(idx[_lowest(scores[idx], k)])
        rem = torch.cat(removed) if removed else torch.empty(0, dtype=torch.long)
        n_max = scores.numel() - min_keep
        if rem.numel() > n_max:     # honour the group minimum: give back the highest-scored removals
            rem = rem[torch.sort(scores[rem].double(), stable=True).indices[:max(n_max, 0)]]
    else:
        k = min(remove_count(scores, rule, ratio), scores.numel() - min_keep)
        rem = _lowest(scores, max(k, 0))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[rem] = False
    return mask.nonzero().flatten()


def global_keep(scores: dict[str, Tensor], ratio: float, min_keep: int) -> dict[str, Tensor]:
    """Global ratio: remove floor(ratio * total) units with the lowest mean-normalised score
    across all groups, never leaving a group with fewer than min_keep units."""
    names = list(scores)
    norm = [scores[n].double() / scores[n].double().mean().clamp_min(1e-30) for n in names]
    flat = torch.cat(norm)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(norm)])
    local = torch.cat([torch.arange(len(s)) for s in norm])
    budget = int(math.floor(ratio * flat.numel() + 1e-9))
    left = [len(s) for s in norm]
    removed = [[] for _ in names]
    for j in torch.sort(flat, stable=True).indices.tolist():
        if budget == 0:
            break
        g = int(owner[j])
        if left[g] > min_keep:
            removed[g].append(int(local[j]))
            left[g] -= 1
            budget -= 1
    out = {}
    for i, n in enumerate(names):
        mask = torch.ones(len(norm[i]), dtype=torch.bool)
        mask[removed[i]] = False
        out[n] = mask.nonzero().flatten()
    return out


def ratio_for_param_fraction(model: torch.nn.Module, groups: list, fraction: float,
                             tol: float = 1e-4) -> float:
    """The uniform per-layer ratio that leaves about `fraction` of the model's parameters,
    counting for every tensor the product of the kept fractions of the unit axes it spans."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    axes: dict[int, list[int]] = {}
    for g in groups:
        for s in g.producers + g.consumers + g.norms:
            axes.setdefault(id(s.tensor), []).append(g.size)
    params = {id(p): p for p in model.parameters()}

    def remaining(r: float) -> float:
        total = 0.0
        for pid, p in params.items():
            f = 1.0
            for n in axes.get(pid, []):
                f *= max(1, n - math.floor(r * n + 1e-9)) / n
            total += p.numel() * f
        return total / sum(p.numel() for p in params.values())

    lo, hi = 0.0, 0.999
    if remaining(hi) > fraction:
        raise ValueError(f"fraction: {fraction} is below what pruning the unit groups can reach "
                         f"({remaining(hi):.3f})")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if remaining(mid) > fraction else (lo, mid)
    return hi
