"""Folding math: exact merges of duplicated units, the projection geometry (METHODS B.1, §6)."""
import itertools

import pytest
import torch

from secateur.pruning.folding import (cluster_units, fold_ar_gain, merge_maps, projection_error_fold,
                                      projection_error_prune)


def test_merge_maps_average_producers_and_sum_consumers():
    labels = torch.tensor([0, 1, 0, 2, 1])
    p, c = merge_maps(labels, 3)
    w = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close((p @ w)[0], (w[0] + w[2]) / 2)
    torch.testing.assert_close((p @ w)[2], w[3])
    v = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close((v @ c)[:, 1], v[:, 1] + v[:, 4])


def test_folding_identical_rows_reproduces_a_two_layer_relu_net_exactly():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 7, generator=g, dtype=torch.float64)
    labels_true = torch.tensor([0, 1, 2, 0, 1, 0])
    w, b = base[labels_true], torch.randn(3, generator=g, dtype=torch.float64)[labels_true]
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = cluster_units(torch.cat([w, b[:, None]], 1), 3)
    assert all(len(set(labels[labels_true == t].tolist())) == 1 for t in range(3))
    p, c = merge_maps(labels, 3)
    x = torch.randn(10, 7, generator=g, dtype=torch.float64)
    before = torch.relu(x @ w.T + b) @ v.T
    after = torch.relu(x @ (p @ w).T + p @ b) @ (v @ c).T
    torch.testing.assert_close(after, before)


def _best_fold_error(w, k):
    """Optimal k-clustering error by enumerating all assignments (small n)."""
    n, best = w.shape[0], float("inf")
    for assign in itertools.product(range(k), repeat=n):
        if len(set(assign)) == k:
            best = min(best, projection_error_fold(w, torch.tensor(assign)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimal_k_plus_one_fold_is_never_worse_than_any_k_prune(seed):
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = 3
    best_prune = min(projection_error_prune(w, torch.tensor(s)) for s in itertools.combinations(range(6), k))
    assert _best_fold_error(w, k + 1) <= best_prune + 1e-12


def test_singletons_plus_one_cluster_of_the_pruned_rows_never_lose_to_the_prune():
    """The constructive (k+1)-fold of B.1 for 50 random keep-sets of random layers (FOLD-1)."""
    g = torch.Generator().manual_seed(11)
    for _ in range(50):
        w = torch.randn(12, 5, generator=g, dtype=torch.float64) + torch.randn(5, generator=g, dtype=torch.float64)
        keep = torch.randperm(12, generator=g)[:7]
        labels = torch.full((12,), 7, dtype=torch.long)
        labels[keep] = torch.arange(7)
        assert projection_error_fold(w, labels) <= projection_error_prune(w, keep) + 1e-12


def test_folding_duplicated_conv_filters_keeps_a_conv_relu_conv_net_exactly():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    truth = torch.tensor([2, 0, 1, 0, 2])
    w1 = base[truth]
    b1 = torch.randn(3, generator=g, dtype=torch.float64)[truth]
    w2 = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    conv = torch.nn.functional.conv2d
    before = conv(torch.relu(conv(x, w1, b1, padding=1)), w2, padding=1)
    labels = cluster_units(w1, 3)
    p, c = merge_maps(labels, 3)
    w1f = (p @ w1.reshape(5, -1)).reshape(3, 2, 3, 3)
    w2f = torch.einsum("oikl,ij->ojkl", w2, c)           # consumer in-channels summed per cluster
    after = conv(torch.relu(conv(x, w1f, p @ b1, padding=1)), w2f, padding=1)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def test_prune_and_fold_errors_have_their_closed_forms():
    w = torch.randn(5, 3, dtype=torch.float64)
    assert projection_error_prune(w, torch.tensor([0, 2])) == pytest.approx(
        float(w[[1, 3, 4]].square().sum()))
    labels = torch.tensor([0, 0, 1, 1, 1])
    err = sum(float((w[labels == c] - w[labels == c].mean(0)).square().sum()) for c in range(2))
    assert projection_error_fold(w, labels) == pytest.approx(err)


def test_fold_ar_gain_restores_the_variance_of_a_cluster_mean():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    gain = fold_ar_gain(rows, torch.tensor([0, 0, 1, 1]))
    # orthogonal pair: rho = 0, gain sqrt(2); parallel pair: rho = 1, gain 1
    torch.testing.assert_close(gain, torch.tensor([2 ** 0.5, 1.0], dtype=torch.float64))
    # Monte Carlo: the mean of two unit-variance signals with correlation rho, times the gain
    rho = 0.3
    z = torch.randn(200000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.stack([z[:, 0], rho * z[:, 0] + (1 - rho ** 2) ** 0.5 * z[:, 1]], 1)
    r = torch.tensor([[1.0, 0.0], [rho, (1 - rho ** 2) ** 0.5]], dtype=torch.float64)
    g = fold_ar_gain(r, torch.tensor([0, 0]))[0]
    assert float((s.mean(1) * g).var()) == pytest.approx(1.0, abs=0.02)


def test_cluster_units_validates_k_and_fills_every_cluster():
    rows = torch.ones(5, 3, dtype=torch.float64)           # all identical
    labels = cluster_units(rows, 3)
    assert sorted(labels.unique().tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="k"):
        cluster_units(rows, 0)


def _co_membership(labels):
    labels = torch.as_tensor(labels)
    return labels[:, None] == labels[None, :]


def _objective(x, labels):
    """Sum of squared distances of the rows to their cluster means, float64."""
    x = x.double()
    return float(sum((x[labels == c] - x[labels == c].mean(0)).square().sum() for c in labels.unique()))


@pytest.mark.parametrize("p, max_dim", [(8, 256), (1500, 64), (1500, 256)])
def test_cluster_units_recovers_planted_clusters(p, max_dim):
    """Well-separated blobs (centre distance ~ 10x the spread) are recovered exactly, also after
    the random projection (n > max_dim) or the exact QR narrowing (n <= max_dim) of wide rows."""
    g = torch.Generator().manual_seed(0)
    k, per = 12, 9
    centres = 10 * torch.randn(k, p, generator=g, dtype=torch.float64)
    truth = torch.arange(k).repeat_interleave(per)[torch.randperm(k * per, generator=g)]
    x = centres[truth] + 0.3 * torch.randn(k * per, p, generator=g, dtype=torch.float64) / p ** 0.5 * 10
    labels = cluster_units(x, k, seed=3, max_dim=max_dim, narrow_work=0)
    assert torch.equal(_co_membership(labels), _co_membership(truth))
    assert labels[0] == 0 and sorted(labels.unique().tolist()) == list(range(k))


def test_cluster_units_returns_a_lloyd_fixed_point():
    """Without the projection, each row's nearest cluster mean (brute force, cdist) is its own."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    labels = cluster_units(x, 25, seed=0, max_iter=1000, max_dim=None)
    means = torch.stack([x[labels == c].mean(0) for c in range(25)])
    d = torch.cdist(x, means)
    own = d.gather(1, labels[:, None])[:, 0]
    assert torch.all(own <= d.min(1).values + 1e-9)


def test_cluster_units_objective_is_close_to_scikit_learn():
    """On unstructured data (the hard case) the objective is within 5% of scikit-learn's
    k-means with ten seedings."""
    from sklearn.cluster import KMeans
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64)
    ours = _objective(x, cluster_units(x, 40, seed=0, max_dim=None))
    ref = KMeans(n_clusters=40, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert ours <= 1.05 * ref


def test_cluster_units_is_deterministic_in_its_seed_and_checks_its_arguments():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 600, generator=g)
    a, b = cluster_units(x, 10, seed=5), cluster_units(x, 10, seed=5)
    assert torch.equal(a, b)
    for kw, msg in [({"n_init": 0}, "n_init"), ({"max_iter": 0}, "max_iter"), ({"max_dim": 0}, "max_dim")]:
        with pytest.raises(ValueError, match=msg):
            cluster_units(x, 10, **kw)


def test_cluster_units_with_few_distinct_rows_keeps_duplicates_together_where_it_can():
    """Three distinct rows, k = 3: duplicates share a cluster; k = 5: every cluster non-empty and
    each cluster still holds copies of one row only."""
    base = torch.tensor([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0]], dtype=torch.float64)
    which = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    x = base[which]
    assert torch.equal(_co_membership(cluster_units(x, 3)), _co_membership(which))
    labels = cluster_units(x, 5)
    assert sorted(labels.unique().tolist()) == list(range(5))
    for c in range(5):
        assert which[labels == c].unique().numel() == 1


def test_narrowing_few_wide_rows_changes_no_label():
    """n <= max_dim < p: the QR narrowing keeps every distance, so the labels equal those of
    k-means on the full rows with the same seed."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 5000, generator=g, dtype=torch.float64)
    for seed in range(3):
        assert torch.equal(cluster_units(x, 9, seed=seed, max_dim=64, narrow_work=0),
                           cluster_units(x, 9, seed=seed, max_dim=None))


def test_fold_ar_gain_matches_the_pairwise_cosine_definition():
    """Against the definition: rho_c the mean cosine over ordered pairs i != j in the cluster (an
    all-zero row has cosine 0 with every other row)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(30, 7, generator=g, dtype=torch.float64)
    rows[3] = 0.0                                          # a dead unit in cluster 0
    labels = torch.tensor([0] * 6 + [1] + [2] * 10 + [3] * 2 + [4] * 11)
    got = fold_ar_gain(rows, labels)
    for c in range(5):
        m = rows[labels == c]
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-30)
        nc = m.shape[0]
        if nc == 1:
            assert float(got[c]) == 1.0
            continue
        rho = sum(float(m[i] @ m[j]) for i in range(nc) for j in range(nc) if i != j) / (nc * (nc - 1))
        assert float(got[c]) == pytest.approx((nc / (1 + (nc - 1) * rho)) ** 0.5, rel=1e-12)


def test_small_problems_cluster_the_full_rows():
    """Below narrow_work multiply-adds per assignment nothing is projected: the default equals
    k-means on the full rows; forcing the projection changes the result."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 600, generator=g, dtype=torch.float64)
    full = cluster_units(x, 30, seed=1, max_dim=None)
    assert torch.equal(cluster_units(x, 30, seed=1), full)
    assert not torch.equal(cluster_units(x, 30, seed=1, narrow_work=0), full)
