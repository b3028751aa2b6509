"""Projective pruning (METHODS C): a unit is redundant when its producer row lies close to the
(ridge) span of the other units' rows.

For W (n, m), G = W W^T and H = (G + lam I)^-1, the closed forms (all n scores from one inverse):
    q_i = -H[-i, i] / H_ii                        reconstruction coefficients of row i
    d_i^2 = 1/H_ii - lam ||H[:, i]||^2 / H_ii^2   squared residual (lam = 0: d_i = 1/sqrt(H_ii))
With a per-row ridge Lambda = diag(lam_j), H = (G + Lambda)^-1, q_i is unchanged and
    d_i^2 = 1/H_ii - sum_j lam_j H_ji^2 / H_ii^2.
Greedy removal downdates H in O(n^2) per removed row (a Schur complement) instead of re-inverting;
the published lazy update (C.3) is kept as `mode="lazy"` for reproduction.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from secateur.kernels import gram


class GreedyResult(NamedTuple):
    """Outcome of `greedy` on n rows.

    removed: LongTensor (r,), row indices in removal order.
    keep: LongTensor (n - r,), the other rows, ascending.
    w_scale, b_scale, v_scale: float64 (n,), redistribution factors (METHODS C.2) for the kept
    units, to apply before slicing to `keep`: w_scale[j] multiplies producer weight row j (the
    whole flattened filter of a conv), b_scale[j] the producer bias entry j, v_scale[j] consumer
    column j (a conv consumer's in-channel j). All ones without redistribution; removed units
    get 1.0 (nothing to apply)."""
    removed: Tensor
    keep: Tensor
    w_scale: Tensor
    b_scale: Tensor
    v_scale: Tensor


def _flat(W: Tensor) -> Tensor:
    """Rows as float64 (n, m): conv filters (n, c, kh, kw) are flattened."""
    if W.dim() < 2:
        raise ValueError(f"W must have shape (n, m) or (n, c, kh, kw), got {tuple(W.shape)}")
    return W.detach().reshape(W.shape[0], -1).double()


def _check_lam(lam: float) -> float:
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return float(lam)


def _gram_inverse(rows: Tensor, lam: float, name: str = "W") -> Tensor:
    """(rows rows^T + lam I)^-1 for float64 rows (..., n, m), batched, via Cholesky; `name` is
    the argument the rows came from (for the error)."""
    chol, info = torch.linalg.cholesky_ex(gram(rows, lam))
    if bool((info != 0).any()):
        raise ValueError(f"{name}: the Gram matrix is singular; use lam > 0 (rows are linearly "
                         "dependent or there are more rows than columns)")
    return torch.cholesky_inverse(chol)


def ridge_inverse(W: Tensor, lam: float = 1e-3) -> Tensor:
    """H = (W W^T + lam I)^-1 (n, n) in float64 via Cholesky (W flattened to rows)."""
    return _gram_inverse(_flat(W), _check_lam(lam))


def _scores_from_inverse(h: Tensor, lam: float | Tensor) -> Tensor:
    """Residual norms (n,) from H = (G + Lambda)^-1 (h (..., n, n)); lam: scalar or per-row (n,)."""
    d = h.diagonal(dim1=-2, dim2=-1)
    if isinstance(lam, Tensor):
        pen = (lam[:, None] * h.square()).sum(-2)
    else:
        pen = lam * h.square().sum(-2)
    d2 = 1.0 / d - pen / d.square()
    return d2.clamp_min(0).sqrt()


def scores(W: Tensor, lam: float = 1e-3) -> Tensor:
    """Redundancy score of every row (n,): distance of row i to the ridge span of the other rows
    (higher = more unique, keep). One Gram matrix and one inverse: O(n^2 m + n^3)."""
    return _scores_from_inverse(ridge_inverse(W, lam), _check_lam(lam))


def coefficients(W: Tensor, lam: float = 1e-3) -> Tensor:
    """Q (n, n): row i holds q_i, the ridge coefficients that rebuild row i from the others
    (W_-i^T q_i ~ w_i), zero diagonal."""
    h = ridge_inverse(W, lam)
    q = -h / h.diagonal()[:, None]    # q[i, j] = -H[i, j] / H_ii = -H[j, i] / H_ii (H symmetric)
    q.fill_diagonal_(0.0)
    return q


def rowwise_scores(W: Tensor, lam: float = 1e-3) -> Tensor:
    """The per-row formulation (one ridge solve per row, on the shared Gram matrix): the
    baseline and test oracle. d_i^2 = G_ii - 2 q.b + q^T A q with A = G[-i,-i] + lam I,
    b = G[-i, i] and q = A^-1 b (the ridge penalty itself is not part of the residual)."""
    lam = _check_lam(lam)
    w = _flat(W)
    n = w.shape[0]
    g = w @ w.T
    out = torch.empty(n, dtype=torch.float64)
    eye = torch.eye(n - 1, dtype=torch.float64)
    for i in range(n):
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, n)])
        a, b = g[rest][:, rest], g[rest, i]
        q = torch.linalg.solve(a + lam * eye, b)
        out[i] = (g[i, i] - 2 * q @ b + q @ a @ q).clamp_min(0).sqrt()
    return out


def _check_greedy(n: int, r: int, mode: str) -> None:
    if not 0 <= r < n:
        raise ValueError(f"r must be in [0, {n}) for {n} rows, got {r}")
    if mode not in ("exact", "lazy"):
        raise ValueError(f"mode must be 'exact' or 'lazy', got {mode!r}")


def _exact_greedy(w: Tensor, r: int, lam: float, phis: Tensor, redistribute: bool,
                  block: int) -> tuple[list[int], Tensor]:
    """The exact greedy of `greedy` in O(n^2) per removed row, with the rank-one downdates
    deferred and applied `block` at a time as one GEMM.

    Removing a set S from G + Lambda leaves (G + Lambda)_KK, whose inverse ht is the Schur
    downdate of H by S (order-free). Redistribution only rescales rows: the inverse for the
    rescaled rows is Sigma^-1 ht Sigma^-1 (sigma_j the product of row j's factors d_j), and the
    ridge on row j is lam sigma_j^2, so the score of row j is
        sigma_j sqrt(1/ht_jj - lam s_j / ht_jj^2),   s_j = sum_k ht_kj^2,
    and the coefficients q_j = -ht_ji sigma_i / (sigma_j ht_ii). Per removal (u = ht[:, i],
    c = u_i): ht_jj -= u_j^2 / c and s_j -= 2 (u_j/c) (ht u)_j - (u_j/c)^2 ||u||^2, one
    matrix-vector product. ht = A - U V^T holds the pending downdates (columns u and u/c);
    every `block` removals they are applied, removed rows are dropped and diag/s recomputed
    (which also stops rounding drift)."""
    n, alpha = w.shape[0], float(phis[0])
    a = ridge_inverse(w, lam)
    active = torch.arange(n)             # original index of each row of a
    sigma = torch.ones(n, dtype=torch.float64)
    scales = torch.ones(3, n, dtype=torch.float64)
    u_buf = torch.empty(n, block, dtype=torch.float64)
    v_buf = torch.empty(n, block, dtype=torch.float64)
    removed: list[int] = []
    while len(removed) < r:
        m = a.shape[0]
        diag, s = a.diagonal().clone(), a.square().sum(0)
        dead = torch.zeros(m, dtype=torch.bool)
        uu, vv = u_buf[:m], v_buf[:m]
        steps = min(block, r - len(removed))
        for t in range(steps):
            d2 = (1.0 / diag - lam * s / diag.square()).clamp_min(0) * sigma.square()
            d2[dead] = float("inf")
            i = int(torch.argmin(d2))
            u = a[:, i] - uu[:, :t] @ vv[i, :t]
            u[dead] = 0.0
            c = u[i]
            hu = a @ u - uu[:, :t] @ (vv[:, :t].T @ u)
            f = u / c
            s = s - 2.0 * f * hu + f.square() * u.dot(u)
            diag = diag - f * u
            if redistribute:
                q = -(f * sigma[i]) / sigma        # q_j = -ht_ji sigma_i / (sigma_j ht_ii)
                q[dead] = 0.0
                q[i] = 0.0
                scales[:, active] *= 1.0 + phis * q
                sigma = sigma * (1.0 + alpha * q)
            uu[:, t], vv[:, t] = u, f
            dead[i] = True
            removed.append(int(active[i]))
        if len(removed) == r:
            break
        a = a - uu[:, :steps] @ vv[:, :steps].T
        live = ~dead
        a, active, sigma = a[live][:, live], active[live], sigma[live]
    return removed, scales


def greedy(W: Tensor, r: int, lam: float = 1e-3, mode: str = "exact", alpha: float = 0.5,
           beta: float = 0.5, gamma: float = 0.5, redistribute: bool = True,
           block: int = 64) -> GreedyResult:
    """Remove r of the n rows of W (n, m) or conv filters (n, c, kh, kw), one at a time, each time
    the row with the smallest score (the one best rebuilt from the others).

    exact: scores from H, then an O(n^2) Schur downdate of H removes the row (no re-inversion;
    the downdates are deferred and applied `block` rows at a time as one GEMM, see
    `_exact_greedy`; `block` changes the speed, not the result beyond rounding).
    With redistribution, removing row i rescales each kept row j by d_j = 1 + alpha q_i[j] (bias
    by 1 + beta q_i[j], consumer column by 1 + gamma q_i[j]) and H follows as D^-1 H D^-1, the
    inverse of D (G + Lambda) D. So the next scores are the exact ridge residuals of the rescaled
    rows, with lam = 0 exactly the unregularised ones; for lam > 0 the ridge on row j becomes
    lam * (product of its d_j)^2, i.e. the penalty stays lam ||q||^2 measured in the coefficients
    of the original rows (the plain lam I ridge on rescaled rows would need a re-inversion).
    lazy: the published update (C.3): coefficients solved once, a removed row's coefficient is
    dropped and the others are divided by (1 + alpha q_i), nothing is re-solved (without
    redistribution the rows are not rescaled, so nothing is divided).
    Cost: O(n^2 m + n^3 + r n^2) for exact, O(n^2 m + n^3 + r n^2 m) for lazy."""
    lam = _check_lam(lam)
    w = _flat(W)
    n = w.shape[0]
    _check_greedy(n, r, mode)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    scales = torch.ones(3, n, dtype=torch.float64)
    phis = torch.tensor([alpha, beta, gamma], dtype=torch.float64)[:, None]
    removed: list[int] = []
    if mode == "exact":
        removed, scales = _exact_greedy(w, r, lam, phis, redistribute, block)
    else:
        a = alpha if redistribute else 0.0
        q = coefficients(w, lam)
        alive = torch.ones(n, dtype=torch.bool)
        for _ in range(r):
            dist = (q @ w - w).norm(dim=1)              # Q's removed columns are zero
            dist[~alive] = float("inf")
            i = int(torch.argmin(dist))
            alive[i] = False
            q[:, i] = 0.0
            qi = q[i].clone()
            q[alive] = q[alive] / (1.0 + a * qi)[None, :]
            if redistribute:
                scales *= 1.0 + phis * qi
            removed.append(i)
    rem = torch.tensor(removed, dtype=torch.long)
    scales[:, rem] = 1.0
    keep = torch.ones(n, dtype=torch.bool)
    keep[rem] = False
    return GreedyResult(rem, keep.nonzero().flatten(), scales[0], scales[1], scales[2])


def joint_qk_scores(Wq: Tensor, Wk: Tensor, n_heads: int, lam: float = 1e-3,
                    variant: str = "joint") -> Tensor:
    """Scores (n_heads, head_dim) of the shared query-key dimensions (higher = keep; dimension j
    of a head is removed from the query and key rows together). Wq, Wk: (n_heads * head_dim, embed).

    variant="joint" (METHODS C.4 spec): per head, the residual criterion on the joint rows
    [q_j ; k_j] (length 2 * embed) against the head's other joint rows.
    variant="coef" (the published GPT-2 code): ||a_j|| + ||b_j||, the norms of the ridge
    reconstruction coefficients of query row j (from the head's other query rows) and of key
    row j (from the other key rows)."""
    if Wq.shape != Wk.shape or Wq.dim() != 2:
        raise ValueError(f"Wq and Wk must be (heads*head_dim, embed) of equal shape, got "
                         f"{tuple(Wq.shape)} and {tuple(Wk.shape)}")
    if n_heads < 1 or Wq.shape[0] % n_heads:
        raise ValueError(f"n_heads must divide {Wq.shape[0]}, got {n_heads}")
    if variant not in ("joint", "coef"):
        raise ValueError(f"variant must be 'joint' or 'coef', got {variant!r}")
    lam = _check_lam(lam)
    hd = Wq.shape[0] // n_heads

    if variant == "joint":
        joint = torch.cat([Wq, Wk], dim=1).detach().double().reshape(n_heads, hd, -1)
        return _scores_from_inverse(_gram_inverse(joint, lam, "Wq"), lam)    # batched over heads
    out = torch.zeros(n_heads, hd, dtype=torch.float64)
    for name, w in (("Wq", Wq), ("Wk", Wk)):
        h = _gram_inverse(w.detach().double().reshape(n_heads, hd, -1), lam, name)
        d = h.diagonal(dim1=-2, dim2=-1)
        # q_j = -H[-j, j] / H_jj: its norm from the column norm of H without the diagonal entry
        out += ((h.square().sum(-2) - d.square()).clamp_min(0).sqrt() / d.abs())
    return out
