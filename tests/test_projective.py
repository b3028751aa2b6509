"""Projective pruning math against the per-row ridge solve and brute force (METHODS C, §6)."""
import pytest
import torch

from secateur.pruning import projective as P


def _w(n, m, seed=0):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n,m,lam", [(7, 12, 0.0), (7, 12, 1e-3), (9, 13, 0.5), (12, 5, 1e-2)])
def test_closed_form_scores_equal_the_per_row_ridge_solve(n, m, lam):
    w = _w(n, m, n + m)
    torch.testing.assert_close(P.scores(w, lam), P.rowwise_scores(w, lam), rtol=1e-7, atol=1e-9)


def test_without_ridge_the_score_is_one_over_sqrt_of_the_inverse_diagonal():
    w = _w(6, 10)
    h = torch.linalg.inv(w @ w.T)
    torch.testing.assert_close(P.scores(w, 0.0), h.diagonal().rsqrt())


def test_coefficients_solve_each_rows_ridge_problem():
    w, lam = _w(6, 9, 3), 0.1
    q = P.coefficients(w, lam)
    for i in range(6):
        others = torch.cat([w[:i], w[i + 1:]])
        ref = torch.linalg.solve(others @ others.T + lam * torch.eye(5, dtype=torch.float64), others @ w[i])
        torch.testing.assert_close(torch.cat([q[i, :i], q[i, i + 1:]]), ref)
        assert q[i, i] == 0


def test_schur_downdate_equals_reinverting_without_the_row():
    w, lam, i = _w(8, 11, 4), 1e-3, 3
    h = P.ridge_inverse(w, lam)
    rest = [j for j in range(8) if j != i]
    down = h[rest][:, rest] - torch.outer(h[rest, i], h[i, rest]) / h[i, i]
    torch.testing.assert_close(down, P.ridge_inverse(w[rest], lam))


def _brute_greedy(w, r, lam, alpha=0.0, beta=0.0, gamma=0.0):
    """Recompute every score from scratch after each removal (rows rescaled when redistributing)."""
    idx, rows, out = list(range(w.shape[0])), w.clone(), []
    scale = torch.ones(w.shape[0], dtype=torch.float64)
    for _ in range(r):
        sub = rows[idx]
        s = P.rowwise_scores(sub, lam)
        i = int(torch.argmin(s))
        q = P.coefficients(sub, lam)[i]
        keep = [j for j in range(len(idx)) if j != i]
        for j in keep:
            rows[idx[j]] *= 1 + alpha * q[j]
            scale[idx[j]] *= 1 + alpha * q[j]
        out.append(idx.pop(i))
    return out, scale


@pytest.mark.parametrize("seed,lam", [(0, 0.0), (1, 1e-3), (2, 0.3)])
def test_exact_greedy_equals_brute_force_recomputation(seed, lam):
    w = _w(9, 14, seed)
    res = P.greedy(w, 5, lam, redistribute=False)
    assert res.removed.tolist() == _brute_greedy(w, 5, lam)[0]
    assert res.keep.tolist() == sorted(set(range(9)) - set(res.removed.tolist()))
    assert torch.equal(res.w_scale, torch.ones(9, dtype=torch.float64))


def test_exact_greedy_with_redistribution_equals_brute_force_at_zero_ridge():
    w = _w(8, 12, 5)
    res = P.greedy(w, 4, 0.0, alpha=0.5, beta=0.5, gamma=0.5, redistribute=True)
    order, scale = _brute_greedy(w, 4, 0.0, alpha=0.5)
    assert res.removed.tolist() == order
    torch.testing.assert_close(res.w_scale[res.keep], scale[res.keep])


def test_lazy_mode_returns_a_valid_removal_and_tracks_scales():
    w = _w(10, 6, 6)
    res = P.greedy(w, 4, 1e-3, mode="lazy")
    assert len(set(res.removed.tolist())) == 4 and res.keep.numel() == 6
    assert not set(res.removed.tolist()) & set(res.keep.tolist())
    assert torch.isfinite(res.w_scale).all() and not torch.equal(res.w_scale, torch.ones(10, dtype=torch.float64))


def test_planted_near_duplicates_are_removed_by_projective_not_by_magnitude():
    w = _w(10, 16, 7) * 0.3
    w[8], w[9] = w[0] * 3 + 1e-3, w[1] * 3 - 1e-3      # large-norm near-copies of rows 0 and 1
    w[0], w[1] = w[0] * 3, w[1] * 3
    removed = set(P.greedy(w, 2, 1e-3, redistribute=False).removed.tolist())
    assert len(removed & {0, 8}) == 1 and len(removed & {1, 9}) == 1
    by_norm = set(torch.argsort(w.norm(dim=1))[:2].tolist())
    assert not by_norm & {0, 1, 8, 9}


def test_an_exact_linear_combination_is_removed_first_with_its_coefficients_as_scales():
    """The planted row 0.7 w0 - 0.4 w3 has residual 0 and goes first; its coefficients rebuild it
    exactly, and redistribution scales kept unit j by (1 + phi q_j) (METHODS C.2)."""
    w = _w(5, 9, 8)
    w = torch.cat([w, (0.7 * w[0] - 0.4 * w[3])[None]])
    res = P.greedy(w, 1, 0.0, alpha=0.25, beta=0.5, gamma=1.0, redistribute=True)
    assert res.removed.tolist() == [5]
    q = P.coefficients(w, 0.0)[5]
    torch.testing.assert_close(q[:5] @ w[:5], w[5])
    torch.testing.assert_close(q[:5], torch.tensor([0.7, 0, 0, -0.4, 0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(res.w_scale[:5], 1 + 0.25 * q[:5])
    torch.testing.assert_close(res.b_scale[:5], 1 + 0.5 * q[:5])
    torch.testing.assert_close(res.v_scale[:5], 1 + q[:5])


def test_conv_filters_are_scored_flattened_and_joint_qk_matches_per_head():
    conv = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(P.scores(conv, 1e-3), P.rowwise_scores(conv.reshape(6, -1), 1e-3))
    wq, wk = _w(8, 5, 10), _w(8, 5, 11)
    got = P.joint_qk_scores(wq, wk, 2, 1e-3)
    for h in range(2):
        rows = torch.cat([wq, wk], 1)[4 * h:4 * h + 4]
        torch.testing.assert_close(got[h], P.rowwise_scores(rows, 1e-3))


def test_bad_arguments_name_the_argument():
    w = _w(4, 6)
    for call, word in [(lambda: P.scores(w, -1.0), "lam"), (lambda: P.greedy(w, 4), "r"),
                       (lambda: P.greedy(w, 1, mode="fast"), "mode"),
                       (lambda: P.scores(torch.ones(3)), "W"),
                       (lambda: P.scores(torch.ones(3, 2, dtype=torch.float64), 0.0), "W")]:
        with pytest.raises(ValueError, match=word):
            call()
