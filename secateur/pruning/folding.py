"""Model folding (METHODS B): merge similar units instead of deleting them.

Pruning to a keep-set is an axis-aligned projection of a layer's unit rows; folding projects
each row onto its cluster mean (a k-means projection). Units are clustered by their rows (a torch
k-means: k-means++ seeding, Lloyd iterations with GEMM distances; in large problems rows wider
than `max_dim` first narrowed by a seeded random projection), producers become the cluster mean and consumers
the cluster sum, which is exact when the merged rows are identical.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_kmeans_args(n_init: int, max_iter: int, max_dim: int | None) -> None:
    """ValueError unless n_init >= 1, max_iter >= 1 and max_dim is None or >= 1."""
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if max_dim is not None and max_dim < 1:
        raise ValueError(f"max_dim must be None or >= 1, got {max_dim}")


# multiply-adds of one Lloyd assignment (n x k x p) above which wide rows are narrowed: about
# 0.1 s in float64 on one core; below it k-means runs on the full rows, as exact as scikit-learn
NARROW_WORK = 1e9


def cluster_units(features: Tensor, k: int, seed: int = 42, *, n_init: int = 1, max_iter: int = 30,
                  max_dim: int | None = 256, narrow_work: float = NARROW_WORK) -> Tensor:
    """Cluster labels (n,) in [0, k) of the n unit rows `features` (n, p) (conv rows are
    flattened): k-means in float64 (k-means++ seeding, then Lloyd until the labels stop changing
    or `max_iter` iterations; `n_init` seedings, the lowest objective kept), all randomness from
    a generator seeded with `seed`. When one assignment would cost more than `narrow_work`
    multiply-adds (n k p), rows wider than `max_dim` (None: never) are centred and narrowed
    first: exactly to n coordinates when n <= max_dim (see `_reduce_width`), else by a seeded
    Gaussian (p, max_dim) matrix (Johnson-Lindenstrauss; the reference LLM code projects to 256
    dims). The projection costs objective: on a trained LLaMA's MLP rows (384 units, 384 wide)
    1-5% above scikit-learn's k-means, within 0.4% of it on the full rows. The reference's
    PCA is not applied: all components are a shift and a rotation, which keep every distance and
    so change no k-means step. Every cluster is non-empty (an empty cluster takes the point
    farthest from its centroid; with fewer distinct rows than k, members of the largest cluster
    become singletons); labels are renumbered by first appearance."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    _check_kmeans_args(n_init, max_iter, max_dim)
    if k == n:
        return torch.arange(n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    x = features.detach().reshape(n, -1).double().cpu()
    z = x - x.mean(0)
    if not z.any():                 # all rows equal: one cluster, split below
        labels = torch.zeros(n, dtype=torch.long)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        if n * k * z.shape[1] > narrow_work:
            z = _reduce_width(z, max_dim, gen)
        best = None
        for _ in range(n_init):
            run = _lloyd(z, _kmeans_pp(z, k, gen), max_iter)
            if best is None or run[1] < best[1]:
                best = run
        labels = best[0]
    return _renumber_and_fill(labels, k)


def _reduce_width(z: Tensor, max_dim: int | None, gen: torch.Generator) -> Tensor:
    """Rows z (n, p) re-expressed in fewer coordinates for k-means. With n <= max_dim < p: R^T
    (n, n) from z^T = QR, which keeps every distance and mean exactly (z = R^T Q^T, Q orthonormal
    columns); a few attention heads have rows of hundreds of thousands of weights, where a
    Gaussian (p, max_dim) matrix alone would take seconds to draw. With n > max_dim < p: z times
    a seeded Gaussian (p, max_dim) / sqrt(max_dim)."""
    n, p = z.shape
    if max_dim is None or p <= max_dim:
        return z
    if n <= max_dim:
        return torch.linalg.qr(z.T, mode="r")[1].T
    proj = torch.randn(p, max_dim, generator=gen, dtype=torch.float64)
    return z @ proj.div_(math.sqrt(max_dim))


def _sq_dists(z: Tensor, zz: Tensor, c: Tensor, cc: Tensor) -> Tensor:
    """Squared distances (n, m) of the rows of z to the rows of c as one GEMM,
    ||a||^2 + ||b||^2 - 2 a b^T (norms zz, cc given); entries within rounding of zero (1e-12 of
    the norms) are set to 0 so that duplicated rows count as identical."""
    d = torch.addmm(cc[None, :], z, c.T, alpha=-2).add_(zz[:, None]).clamp_min_(0)
    d[d <= 1e-12 * (zz[:, None] + cc[None, :])] = 0
    return d


def _pp_trials(k: int) -> int:
    """Candidates per k-means++ seed: 2 + ln k (the greedy k-means++ of Arthur and Vassilvitskii)."""
    return 2 + int(math.log(k))


def _kmeans_pp(z: Tensor, k: int, gen: torch.Generator, trials: int | None = None) -> Tensor:
    """Indices (k,) of the k-means++ seeds: the first uniform, each next one sampled with
    probability proportional to its squared distance to the nearest seed so far (greedy: the best
    of `trials` such samples by the resulting potential). With fewer distinct rows than k the
    first seed is repeated."""
    n = z.shape[0]
    trials = trials if trials is not None else _pp_trials(k)
    zz = z.square().sum(1)
    seeds = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sq_dists(z, zz, z[seeds], zz[seeds])[:, 0]
    while len(seeds) < k:
        if not d2.any():
            seeds += seeds[:1] * (k - len(seeds))
            break
        cand = torch.multinomial(d2, trials, replacement=True, generator=gen)
        dc = torch.minimum(_sq_dists(z, zz, z[cand], zz[cand]), d2[:, None])
        best = int(dc.sum(0).argmin())
        seeds.append(int(cand[best]))
        d2 = dc[:, best]
    return torch.tensor(seeds)


def _lloyd(z: Tensor, seeds: Tensor, max_iter: int) -> tuple[Tensor, float]:
    """Lloyd iterations from the centroids z[seeds]: labels (n,) and the objective (the sum of
    squared distances to the cluster means). Stops when the labels stop changing (then every row
    is nearest to its own cluster's mean) or after max_iter assignments. An empty cluster takes
    the row farthest from its centroid (from a cluster that keeps a member)."""
    k = seeds.numel()
    zz = z.square().sum(1)
    c = z[seeds]
    labels = None
    for _ in range(max_iter):
        cc = c.square().sum(1)
        d2 = _sq_dists(z, zz, c, cc)
        new = d2.argmin(1)
        counts = torch.bincount(new, minlength=k)
        if not counts.all():
            _fill_empty(new, counts, d2.gather(1, new[:, None])[:, 0])
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, z)
        c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], c)
    return labels, float((z - c[labels]).square().sum())


def _fill_empty(labels: Tensor, counts: Tensor, own: Tensor) -> None:
    """Give each empty cluster (in order) the row farthest from its centroid (`own`: squared
    distances) among rows off their centroid whose cluster keeps a member; in place. Clusters
    stay empty when no such row is left (fewer distinct rows than clusters)."""
    own = own.clone()
    for e in (counts == 0).nonzero()[:, 0].tolist():
        own[counts[labels] < 2] = 0
        i = int(own.argmax())
        if own[i] <= 0:
            return
        counts[labels[i]] -= 1
        counts[e], labels[i], own[i] = 1, e, 0


def _renumber_and_fill(labels: Tensor, k: int) -> Tensor:
    """Labels renumbered by first appearance (independent of the solver's ordering); with fewer
    than k clusters used, the last member of the largest cluster becomes a new singleton until k
    are."""
    n = labels.numel()
    first = torch.full((k,), n).scatter_reduce(0, labels, torch.arange(n), reduce="amin")
    rank = torch.empty(k, dtype=torch.long)
    rank[first.argsort(stable=True)] = torch.arange(k)
    out = rank[labels]
    used = int((first < n).sum())
    while used < k:
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
    with correlation rho has variance (1 + (n_c - 1) rho) / n_c. Singletons get 1. The pairwise
    sum comes from the cluster's sum s_c of normalised rows u_i: sum_{i != j} cos_ij =
    ||s_c||^2 - sum_i ||u_i||^2 (each term 1, or 0 for an all-zero row)."""
    r = rows.detach().reshape(rows.shape[0], -1).double()
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    labels = labels.to(torch.long)
    k = int(labels.max()) + 1
    nc = torch.bincount(labels, minlength=k).double()
    sums = torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, labels, r)
    own = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, r.square().sum(1))
    rho = (sums.square().sum(1) - own) / (nc * (nc - 1)).clamp_min(1)
    gain = torch.sqrt(nc / (1.0 + (nc - 1) * rho).clamp_min(1e-12))
    return torch.where(nc < 2, torch.ones_like(gain), gain)


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
