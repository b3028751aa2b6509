"""CoSeP (METHODS D): components (units) that separate the same class pairs are redundant.

Each unit's separability profile is its Jeffries-Matusita distance for every class pair, from
per-class Gaussian moments of its activation. Units are clustered on their profiles with
k-medoids (FasterPAM) for every k; the knee of the mean simplified silhouette picks k*, and one
representative per cluster (the largest weight norm) is kept.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class CoSePResult(NamedTuple):
    keep: Tensor          # kept unit indices, ascending
    k_star: int           # chosen number of clusters
    ks: list[int]         # the k swept
    mss: list[float]      # mean simplified silhouette at each k


class ClassMoments:
    """Per-class count, sum and sum of squares of P components (float64, additive over batches
    and ranks)."""

    def __init__(self, num_classes: int, num_components: int) -> None:
        if num_classes < 2 or num_components < 1:
            raise ValueError(f"num_classes must be >= 2 and num_components >= 1, got "
                             f"{num_classes}, {num_components}")
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.sum = torch.zeros(num_classes, num_components, dtype=torch.float64)
        self.sumsq = torch.zeros(num_classes, num_components, dtype=torch.float64)

    def update(self, acts: Tensor, labels: Tensor) -> None:
        """acts (N, P), labels (N,) in [0, num_classes)."""
        a = acts.detach().double().cpu()
        y = labels.detach().to(torch.long).cpu()
        if a.dim() != 2 or a.shape[1] != self.sum.shape[1] or y.shape != (a.shape[0],):
            raise ValueError(f"acts must be (N, {self.sum.shape[1]}) with labels (N,), got "
                             f"{tuple(a.shape)} and {tuple(y.shape)}")
        if y.numel() and (y.min() < 0 or y.max() >= self.count.numel()):
            raise ValueError(f"labels must lie in [0, {self.count.numel()})")
        self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.sum.index_add_(0, y, a)
        self.sumsq.index_add_(0, y, a.square())

    def tensors(self) -> list[Tensor]:
        return [self.count, self.sum, self.sumsq]

    def mean_std(self, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """Per-class mean and standard deviation (C, P); sigma clamped at eps."""
        n = self.count.clamp_min(1.0)[:, None]
        mu = self.sum / n
        var = (self.sumsq / n - mu.square()).clamp_min(0.0)
        return mu, var.sqrt().clamp_min(eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.clone(), "sum": self.sum.clone(), "sumsq": self.sumsq.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k in ("count", "sum", "sumsq"):
            getattr(self, k).copy_(sd[k])


def bhattacharyya(mu_a: Tensor, sd_a: Tensor, mu_b: Tensor, sd_b: Tensor) -> Tensor:
    """Bhattacharyya distance of two univariate Gaussians:
    (mu_a - mu_b)^2 / (4 (sa^2 + sb^2)) + 1/2 ln((sa^2 + sb^2) / (2 sa sb))."""
    va, vb = sd_a.square(), sd_b.square()
    return (mu_a - mu_b).square() / (4 * (va + vb)) + 0.5 * torch.log((va + vb) / (2 * sd_a * sd_b))


def jm_profiles(moments: ClassMoments, eps: float = 1e-6) -> Tensor:
    """Jeffries-Matusita profiles (P, C(C-1)/2): JM_ab = 2 (1 - exp(-B_ab)) per class pair a < b."""
    mu, sd = moments.mean_std(eps)
    a, b = torch.triu_indices(mu.shape[0], mu.shape[0], offset=1)
    bd = bhattacharyya(mu[a], sd[a], mu[b], sd[b])          # (pairs, P)
    return (2.0 * (1.0 - torch.exp(-bd))).T.contiguous()


def _mss(dist: np.ndarray, medoids: np.ndarray) -> float:
    """Mean simplified silhouette: (b - a) / max(a, b) with a / b the distance to the own /
    nearest other medoid."""
    d = np.sort(dist[:, medoids], axis=1)
    a, b = d[:, 0], d[:, 1]
    den = np.maximum(a, b)
    s = np.where(den > 0, (b - a) / np.where(den > 0, den, 1.0), 0.0)
    return float(s.mean())


def select_components(profiles: Tensor, weight_norms: Tensor, k_range: Sequence[int] | None = None,
                      seed: int = 0) -> CoSePResult:
    """Cluster the P profiles (P, L) with FasterPAM for each k in k_range (default 2..P-1), pick
    k* at the knee of MSS(k) (Kneedle, concave increasing, S = 1; without a knee the k of the
    largest MSS), and keep the member with the largest weight norm in each of the k* clusters."""
    import kmedoids
    from kneed import KneeLocator

    p = profiles.shape[0]
    if weight_norms.shape != (p,):
        raise ValueError(f"weight_norms must have shape ({p},), got {tuple(weight_norms.shape)}")
    if p < 3:
        return CoSePResult(torch.arange(p), p, [], [])
    ks = list(k_range) if k_range is not None else list(range(2, p))
    if not ks or min(ks) < 2 or max(ks) >= p:
        raise ValueError(f"k_range must lie in [2, {p - 1}], got {ks}")
    x = profiles.detach().double().cpu().numpy()
    dist = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    fits, mss = {}, []
    for k in ks:
        fit = kmedoids.fasterpam(dist, k, random_state=seed, n_cpu=1)
        fits[k] = fit
        mss.append(_mss(dist, np.asarray(fit.medoids)))
    k_star = None
    if len(ks) >= 3:
        knee = KneeLocator(ks, mss, S=1.0, curve="concave", direction="increasing").knee
        k_star = int(knee) if knee is not None else None
    if k_star is None:
        k_star = ks[int(np.argmax(mss))]
    labels = np.asarray(fits[k_star].labels)
    norms = weight_norms.detach().double().cpu().numpy()
    keep = sorted(int(np.flatnonzero(labels == c)[np.argmax(norms[labels == c])])
                  for c in np.unique(labels))
    return CoSePResult(torch.tensor(keep, dtype=torch.long), k_star, ks, mss)
