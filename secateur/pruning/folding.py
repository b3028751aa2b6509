"""Model folding (METHODS B): merge similar units instead of deleting them.

Pruning to a keep-set is an axis-aligned projection of a layer's unit rows; folding projects
each row onto its cluster mean (a k-means projection). Units are clustered by their rows (PCA,
then k-means), producers become the cluster mean and consumers the cluster sum, which is exact
when the merged rows are identical.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cluster_units(features: Tensor, k: int, seed: int = 42) -> Tensor:
    """Cluster labels (n,) in [0, k) of the n unit rows `features` (n, p) (conv rows are
    flattened): PCA (all components: centring and a rotation), then k-means (scikit-learn Lloyd
    with k-means++ init, n_init=3, max_iter=100, in place of the reference's Hartigan k-means with
    max_iter=10). Every cluster is non-empty (with fewer distinct rows than k, members of the
    largest cluster become singletons); labels are renumbered by first appearance so they do not
    depend on the solver's ordering."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = features.detach().reshape(n, -1).double().cpu().numpy()
    if k == n:
        return torch.arange(n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    z = x - x.mean(0)
    if not z.any():                 # all rows equal: one cluster, split below
        labels = np.zeros(n, dtype=np.int64)
    else:
        if min(x.shape) > 1:
            z = PCA(n_components=min(x.shape), random_state=seed).fit_transform(x)
        labels = KMeans(n_clusters=k, n_init=3, max_iter=100, random_state=seed).fit_predict(z)
    _, first = np.unique(labels, return_index=True)
    order = {int(labels[f]): j for j, f in enumerate(sorted(first))}
    out = torch.tensor([order[int(c)] for c in labels], dtype=torch.long)
    used = out.unique().numel()
    while used < k:     # fewer distinct rows than k: give the missing clusters singletons
        big = int(torch.bincount(out).argmax())
        out[(out == big).nonzero()[-1]] = used
        used += 1
    return out


def merge_maps(labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """producer map (k, n) with 1/|c| for the members of cluster c (the mean), consumer map (n, k)
    with ones (the sum), for `surgery.merge_units`."""
    labels = labels.to(torch.long)
    n = labels.numel()
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    counts = torch.bincount(labels, minlength=k).double()
    if (counts == 0).any():
        raise ValueError("labels: every cluster needs at least one member")
    cons = torch.zeros(n, k, dtype=torch.float64)
    cons[torch.arange(n), labels] = 1.0
    return cons.t() / counts[:, None], cons


def fold_ar_gain(rows: Tensor, labels: Tensor) -> Tensor:
    """Fold-AR variance gain per cluster (k,): sqrt(n_c / (1 + (n_c - 1) rho_c)) with rho_c the
    mean pairwise cosine similarity of the members' rows; the mean of n_c unit-variance signals
    with correlation rho has variance (1 + (n_c - 1) rho) / n_c. Singletons get 1."""
    r = rows.detach().reshape(rows.shape[0], -1).double()
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    k = int(labels.max()) + 1
    gain = torch.ones(k, dtype=torch.float64)
    for c in range(k):
        m = r[labels == c]
        nc = m.shape[0]
        if nc < 2:
            continue
        cos = m @ m.T
        rho = (cos.sum() - cos.diagonal().sum()) / (nc * (nc - 1))
        gain[c] = torch.sqrt(nc / (1.0 + (nc - 1) * rho).clamp_min(1e-12))
    return gain


def projection_error_prune(W: Tensor, keep: Tensor) -> float:
    """||W - P_S W||_F^2 for the axis-aligned projection onto the kept rows: the removed rows'
    squared norms."""
    w = W.detach().reshape(W.shape[0], -1).double()
    mask = torch.ones(w.shape[0], dtype=torch.bool)
    mask[keep.to(torch.long)] = False
    return float(w[mask].square().sum())


def projection_error_fold(W: Tensor, labels: Tensor) -> float:
    """||W - P_C W||_F^2 for the cluster projection: every row replaced by its cluster mean."""
    w = W.detach().reshape(W.shape[0], -1).double()
    k = int(labels.max()) + 1
    pmap, cmap = merge_maps(labels, k)
    return float((w - cmap @ (pmap @ w)).square().sum())
