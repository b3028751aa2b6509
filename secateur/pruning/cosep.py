"""CoSeP (METHODS D): components (units) that separate the same class pairs are redundant.

Each unit's separability profile is its Jeffries-Matusita distance for every class pair, from
per-class Gaussian moments of its activation. Units are clustered on their profiles with
k-medoids (FasterPAM) for every k; the knee of the mean simplified silhouette picks k*, and one
representative per cluster (the largest weight norm, or the medoid) is kept.
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


def jm_profiles(moments: ClassMoments, eps: float = 1e-6, root: bool = False) -> Tensor:
    """Jeffries-Matusita profiles (P, C(C-1)/2): JM_ab = 2 (1 - exp(-B_ab)) per class pair a < b
    (pairs in torch.triu_indices order), or its square root sqrt(2 (1 - exp(-B))) with root=True
    (METHODS D.1 leaves the variant open). A pair with a class that was never observed gets 0 for
    every component: it carries no evidence and shifts no distance between profiles. For conv
    filters with per-position components (P = filters * positions, filter-major) the filter's
    profile is `profiles.reshape(filters, -1)`."""
    mu, sd = moments.mean_std(eps)
    a, b = torch.triu_indices(mu.shape[0], mu.shape[0], offset=1)
    bd = bhattacharyya(mu[a], sd[a], mu[b], sd[b])          # (pairs, P)
    jm = 2.0 * (1.0 - torch.exp(-bd))
    if root:
        jm = jm.sqrt()
    seen = moments.count > 0
    jm = jm * (seen[a] & seen[b]).to(jm.dtype)[:, None]
    return jm.T.contiguous()


def _mss(dist: np.ndarray, medoids: np.ndarray) -> float:
    """Mean simplified silhouette: (b - a) / max(a, b) with a / b the distance to the own /
    nearest other medoid."""
    d = np.sort(dist[:, medoids], axis=1)
    a, b = d[:, 0], d[:, 1]
    den = np.maximum(a, b)
    s = np.where(den > 0, (b - a) / np.where(den > 0, den, 1.0), 0.0)
    return float(s.mean())


def _distances(x: np.ndarray, metric: str) -> np.ndarray:
    """Pairwise distances (P, P) of the profiles x (P, L): Euclidean, or 1 - cosine similarity
    (an all-zero profile is at distance 1 from everything)."""
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        u = x / np.where(norms > 0, norms, 1.0)[:, None]
        dist = 1.0 - u @ u.T
        np.fill_diagonal(dist, 0.0)
        return np.maximum(dist, 0.0)
    from scipy.spatial.distance import cdist    # exact differences, no (P, P, L) temporary
    return cdist(x, x)


def _knee(ks: list[int], mss: list[float], poly_degree: int | None) -> int:
    """Kneedle (concave, increasing, S = 1) on MSS(k), optionally on a least-squares polynomial
    fit of the curve; without a knee (fewer than 3 k, or a curve with no elbow) the k of the
    largest MSS."""
    from kneed import KneeLocator

    if len(ks) >= 3:
        y = np.asarray(mss)
        if poly_degree is not None:
            y = np.polyval(np.polyfit(ks, y, min(poly_degree, len(ks) - 1)), ks)
        knee = KneeLocator(ks, list(y), S=1.0, curve="concave", direction="increasing").knee
        if knee is not None:
            return int(knee)
    return ks[int(np.argmax(mss))]


def select_components(profiles: Tensor, weight_norms: Tensor, k_range: Sequence[int] | None = None,
                      seed: int = 0, metric: str = "euclidean", representative: str = "max_norm",
                      poly_degree: int | None = None) -> CoSePResult:
    """Choose which of P components to keep from their separability profiles (P, L).

    For each k in k_range (default 2..P-1) FasterPAM clusters the profiles (distance `metric`:
    "euclidean" or "cosine") and MSS(k) is the mean simplified silhouette; k* is the knee of
    MSS(k) (see `_knee`; `poly_degree` smooths the curve first, as CAHP does). One component per
    cluster of the k* clustering is kept: the member with the largest weight_norms (P,) entry
    (representative="max_norm", the paper's "highest-weight component") or the medoid
    (representative="medoid"). Fewer than 3 components: all are kept."""
    import kmedoids

    p = profiles.shape[0]
    if weight_norms.shape != (p,):
        raise ValueError(f"weight_norms must have shape ({p},), got {tuple(weight_norms.shape)}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if representative not in ("max_norm", "medoid"):
        raise ValueError(f"representative must be 'max_norm' or 'medoid', got {representative!r}")
    if poly_degree is not None and poly_degree < 1:
        raise ValueError(f"poly_degree must be None or >= 1, got {poly_degree}")
    if p < 3:
        return CoSePResult(torch.arange(p), p, [], [])
    ks = list(k_range) if k_range is not None else list(range(2, p))
    if not ks or min(ks) < 2 or max(ks) >= p:
        raise ValueError(f"k_range must lie in [2, {p - 1}], got {ks}")
    dist = _distances(profiles.detach().double().cpu().numpy(), metric)
    fits, mss = {}, []
    for k in ks:
        fit = kmedoids.fasterpam(dist, k, random_state=seed, n_cpu=1)
        fits[k] = fit
        mss.append(_mss(dist, np.asarray(fit.medoids)))
    k_star = _knee(ks, mss, poly_degree)
    if representative == "medoid":
        keep = sorted(int(m) for m in fits[k_star].medoids)
    else:
        labels = np.asarray(fits[k_star].labels)
        norms = weight_norms.detach().double().cpu().numpy()
        keep = sorted(int(np.flatnonzero(labels == c)[np.argmax(norms[labels == c])])
                      for c in np.unique(labels))
    return CoSePResult(torch.tensor(keep, dtype=torch.long), k_star, ks, mss)
