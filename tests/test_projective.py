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


def _ridge_fit(rows, a, pen):
    """Least-squares oracle: coefficients and residual of rows[a] from the other rows with the
    ridge penalty sum_j pen_j q_j^2 (an augmented lstsq, no Gram inverse)."""
    others = [b for b in range(rows.shape[0]) if b != a]
    aug = torch.cat([rows[others].T, torch.diag(pen[others].sqrt())])
    y = torch.cat([rows[a], torch.zeros(len(others), dtype=torch.float64)])
    q = torch.linalg.lstsq(aug, y[:, None]).solution[:, 0]
    return others, q, float((rows[others].T @ q - rows[a]).norm())


def _brute_greedy(w, r, lam, alpha=0.0):
    """Refit every row from scratch after each removal, on the rows rescaled by the accumulated
    redistribution factors s; the ridge on row j is lam s_j^2, i.e. lam ||q||^2 in the original
    rows' coefficients (what the exact downdate keeps)."""
    idx, out = list(range(w.shape[0])), []
    s = torch.ones(w.shape[0], dtype=torch.float64)
    for _ in range(r):
        rows, pen = w[idx] * s[idx, None], lam * s[idx].square()
        fits = [_ridge_fit(rows, a, pen) for a in range(len(idx))]
        i = min(range(len(idx)), key=lambda a: fits[a][2])
        others, q, _ = fits[i]
        for pos, b in enumerate(others):
            s[idx[b]] *= 1 + alpha * q[pos]
        out.append(idx.pop(i))
    return out, s


@pytest.mark.parametrize("block", [64, 2])    # 2: the deferred downdates are applied mid-run
@pytest.mark.parametrize("seed,lam", [(0, 0.0), (1, 1e-3), (2, 0.3)])
def test_exact_greedy_equals_brute_force_recomputation(seed, lam, block):
    w = _w(9, 14, seed)
    res = P.greedy(w, 5, lam, redistribute=False, block=block)
    assert res.removed.tolist() == _brute_greedy(w, 5, lam)[0]
    assert res.keep.tolist() == sorted(set(range(9)) - set(res.removed.tolist()))
    assert torch.equal(res.w_scale, torch.ones(9, dtype=torch.float64))


@pytest.mark.parametrize("block", [64, 1, 3])
@pytest.mark.parametrize("seed,lam", [(5, 0.0), (18, 0.2), (22, 1.0), (8, 5.0)])
def test_exact_greedy_with_redistribution_equals_brute_force(seed, lam, block):
    w = _w(8, 12, seed)
    res = P.greedy(w, 4, lam, alpha=0.5, beta=0.25, gamma=-0.5, redistribute=True, block=block)
    order, scale = _brute_greedy(w, 4, lam, alpha=0.5)
    assert res.removed.tolist() == order
    torch.testing.assert_close(res.w_scale[res.keep], scale[res.keep])
    assert torch.equal(res.w_scale[res.removed], torch.ones(4, dtype=torch.float64))


def test_exact_greedy_over_several_blocks_equals_brute_force():
    """Most rows removed, across five flushes of the deferred downdates, with near-duplicate
    rows planted so that the order is not just by norm."""
    w = _w(24, 30, 7)
    w[3] = 0.6 * w[10] - 0.3 * w[17] + 1e-3 * w[3]
    w[20] = w[8] + 1e-2 * w[20]
    res = P.greedy(w, 18, 1e-2, alpha=0.5, redistribute=True, block=4)
    order, scale = _brute_greedy(w, 18, 1e-2, alpha=0.5)
    assert res.removed.tolist() == order
    torch.testing.assert_close(res.w_scale[res.keep], scale[res.keep])


@pytest.mark.parametrize("alpha,beta,gamma", [(1.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_redistribution_keeps_the_consumer_output_when_the_removed_unit_is_a_combination(alpha, beta, gamma):
    """Unit 5 = 0.7 unit 0 - 0.4 unit 3 (weights and bias), linear activation. Per-unit scales
    can hand h_5 on only to units whose consumer column equals unit 5's, so columns 0, 3 and 5
    are equal; then (1 + q_j) on the producers or on the consumer columns is exact (METHODS C.2)."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(5, 9, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.cat([w, (0.7 * w[0] - 0.4 * w[3])[None]])
    b = torch.cat([b, (0.7 * b[0] - 0.4 * b[3])[None]])
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    v[:, 0] = v[:, 3] = v[:, 5]
    x = torch.randn(10, 9, generator=g, dtype=torch.float64)
    before = (x @ w.T + b) @ v.T
    res = P.greedy(w, 1, 0.0, alpha=alpha, beta=beta, gamma=gamma)
    k = res.keep
    assert res.removed.tolist() == [5]
    after = (x @ (w * res.w_scale[:, None])[k].T + (b * res.b_scale)[k]) @ (v * res.v_scale)[:, k].T
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert (after - (x @ w[k].T + b[k]) @ v[:, k].T).abs().max() > 1e-2     # plain removal is not


def test_lazy_first_pick_is_the_minimum_score_and_without_redistribution_alpha_is_inert():
    w = _w(10, 6, 12)
    lazy = P.greedy(w, 4, 1e-3, mode="lazy", redistribute=False, alpha=0.5)
    assert int(lazy.removed[0]) == int(torch.argmin(P.rowwise_scores(w, 1e-3)))
    assert torch.equal(lazy.removed, P.greedy(w, 4, 1e-3, mode="lazy", redistribute=False, alpha=0.0).removed)
    assert torch.equal(lazy.w_scale, torch.ones(10, dtype=torch.float64))


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


def test_joint_qk_coefficient_variant_is_the_sum_of_the_query_and_key_coefficient_norms():
    wq, wk, lam = _w(6, 5, 13), _w(6, 5, 14), 0.05
    got = P.joint_qk_scores(wq, wk, 2, lam, variant="coef")
    eye = torch.eye(2, dtype=torch.float64)
    for h in range(2):
        for j in range(3):
            ref = 0.0
            for w in (wq[3 * h:3 * h + 3], wk[3 * h:3 * h + 3]):
                others = torch.cat([w[:j], w[j + 1:]])
                ref += float(torch.linalg.solve(others @ others.T + lam * eye, others @ w[j]).norm())
            assert float(got[h, j]) == pytest.approx(ref, rel=1e-9)


def test_bad_arguments_name_the_argument():
    w = _w(4, 6)
    for call, word in [(lambda: P.scores(w, -1.0), "lam"), (lambda: P.greedy(w, 4), "r"),
                       (lambda: P.greedy(w, 1, mode="fast"), "mode"),
                       (lambda: P.greedy(w, 1, block=0), "block"),
                       (lambda: P.greedy(w, -1), "r"),
                       (lambda: P.joint_qk_scores(w, w, 2, variant="sum"), "variant"),
                       (lambda: P.joint_qk_scores(w, w, 3), "n_heads"),
                       (lambda: P.joint_qk_scores(_w(8, 1), _w(8, 1), 1, 0.0), "Wq"),
                       (lambda: P.scores(torch.ones(3)), "W"),
                       (lambda: P.scores(torch.ones(3, 2, dtype=torch.float64), 0.0), "W")]:
        with pytest.raises(ValueError, match=word):
            call()
