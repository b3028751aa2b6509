"""CoSeP math: Bhattacharyya/JM closed forms against numerical integration, streaming class
moments, and recovery of a planted number of component types (METHODS D, §6)."""
import math

import pytest
import torch

from secateur.pruning.cosep import ClassMoments, bhattacharyya, jm_profiles, select_components


def _normal(x, mu, sd):
    return torch.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("mu_a,sd_a,mu_b,sd_b", [(0.0, 1.0, 1.5, 0.7), (2.0, 0.3, 2.1, 2.0), (-1.0, 1.0, -1.0, 1.0)])
def test_bhattacharyya_equals_minus_log_of_the_overlap_integral(mu_a, sd_a, mu_b, sd_b):
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)
    bc = torch.trapezoid(torch.sqrt(_normal(x, mu_a, sd_a) * _normal(x, mu_b, sd_b)), x)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    b = bhattacharyya(t(mu_a), t(sd_a), t(mu_b), t(sd_b))
    assert float(b) == pytest.approx(-math.log(float(bc)), abs=1e-6)


@pytest.mark.parametrize("root", [False, True])
def test_jm_profile_equals_two_minus_twice_the_numerical_overlap(root):
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5], dtype=torch.float64)
    y = torch.arange(400) % 2
    acts[y == 1] = acts[y == 1] * 1.7 + 0.8
    m = ClassMoments(2, 2)
    m.update(acts, y)
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)
    for j in range(2):
        pa = _normal(x, acts[y == 0, j].mean(), acts[y == 0, j].std(unbiased=False))
        pb = _normal(x, acts[y == 1, j].mean(), acts[y == 1, j].std(unbiased=False))
        jm = 2 * (1 - float(torch.trapezoid(torch.sqrt(pa * pb), x)))
        assert float(jm_profiles(m, root=root)[j, 0]) == pytest.approx(jm ** 0.5 if root else jm, abs=1e-6)


def test_pairs_with_an_unobserved_class_are_zero_for_every_component():
    g = torch.Generator().manual_seed(6)
    m = ClassMoments(4, 3)
    m.update(torch.randn(90, 3, generator=g, dtype=torch.float64) + torch.arange(3.0), torch.arange(90) % 3)
    prof = jm_profiles(m)                   # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); class 3 unseen
    assert torch.equal(prof[:, [2, 4, 5]], torch.zeros(3, 3, dtype=torch.float64))
    assert bool((prof[:, [0, 1, 3]] > 0).all())


def test_class_moments_stream_and_jm_profiles_have_the_closed_form():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=g)
    m = ClassMoments(3, 4)
    for a, yy in zip(acts.split(70), y.split(70)):
        m.update(a, yy)
    mu, sd = m.mean_std()
    for c in range(3):
        torch.testing.assert_close(mu[c], acts[y == c].mean(0))
        torch.testing.assert_close(sd[c], acts[y == c].std(0, unbiased=False))
    prof = jm_profiles(m)
    assert prof.shape == (4, 3)
    b01 = bhattacharyya(mu[0], sd[0], mu[1], sd[1])
    torch.testing.assert_close(prof[:, 0], 2 * (1 - torch.exp(-b01)))
    assert float(prof.min()) >= 0 and float(prof.max()) < 2


def test_select_components_recovers_the_planted_number_of_types():
    g = torch.Generator().manual_seed(3)
    types = torch.rand(4, 10, generator=g, dtype=torch.float64) * 2          # 4 distinct profiles
    member = torch.arange(4).repeat_interleave(6)                             # 24 components
    profiles = types[member] + 0.01 * torch.randn(24, 10, generator=g, dtype=torch.float64)
    norms = torch.rand(24, generator=g, dtype=torch.float64)
    res = select_components(profiles, norms)
    assert res.k_star == 4 and len(res.mss) == len(res.ks) == 22
    assert sorted(member[res.keep].tolist()) == [0, 1, 2, 3]
    for t in range(4):          # the representative is the largest-norm member of its type
        idx = (member == t).nonzero().flatten()
        assert int(idx[norms[idx].argmax()]) in res.keep.tolist()


def test_planted_types_are_recovered_from_activations_with_medoids_and_cosine():
    """12 components, 3 latent types: each component is a random affine copy of its type's
    class-conditional signal plus its own noise (JM is invariant to the affine map), so the
    profiles of a type agree up to sampling noise."""
    g = torch.Generator().manual_seed(4)
    n, classes = 6000, 5
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.rand(3, classes, generator=g, dtype=torch.float64) * 6 - 3
    member = torch.arange(3).repeat(4)
    scale = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(12, generator=g, dtype=torch.float64)
    acts = (means[member][:, y].T + torch.randn(n, 12, generator=g, dtype=torch.float64)) * scale + shift
    m = ClassMoments(classes, 12)
    for a, yy in zip(acts.split(1000), y.split(1000)):
        m.update(a, yy)
    prof = jm_profiles(m)
    for metric in ("euclidean", "cosine"):
        res = select_components(prof, torch.ones(12, dtype=torch.float64), metric=metric,
                                representative="medoid")
        assert res.k_star == 3
        assert sorted(member[res.keep].tolist()) == [0, 1, 2]


def test_a_polynomial_fit_of_the_silhouette_curve_keeps_the_planted_knee():
    g = torch.Generator().manual_seed(3)
    types = torch.rand(4, 10, generator=g, dtype=torch.float64) * 2
    member = torch.arange(4).repeat_interleave(6)
    profiles = types[member] + 0.01 * torch.randn(24, 10, generator=g, dtype=torch.float64)
    norms = torch.rand(24, generator=g, dtype=torch.float64)
    for degree in (3, 4, 6):
        res = select_components(profiles, norms, k_range=range(2, 12), poly_degree=degree)
        assert res.k_star == 4 and res.ks == list(range(2, 12))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="metric"):
        select_components(torch.rand(5, 3), torch.rand(5), metric="l1")
    with pytest.raises(ValueError, match="representative"):
        select_components(torch.rand(5, 3), torch.rand(5), representative="first")
    with pytest.raises(ValueError, match="k_range"):
        select_components(torch.rand(5, 3), torch.rand(5), k_range=[1, 2])
    with pytest.raises(ValueError, match="num_classes"):
        ClassMoments(1, 3)
    with pytest.raises(ValueError, match="weight_norms"):
        select_components(torch.rand(5, 3), torch.rand(4))
    with pytest.raises(ValueError, match="labels"):
        ClassMoments(2, 3).update(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]))
