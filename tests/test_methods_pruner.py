"""The method criteria through the Pruner on real models: projective finds planted redundancy,
change of basis is an exact re-parametrisation, folding of duplicated units is exact, CoSeP
recovers the planted number of unit types."""
import pytest
import torch

from secateur.models import MLP, VGGTSRA
from secateur.pruning import Pruner, Rule


def _mlp_with_duplicates(seed=0):
    """MLP whose first hidden layer has units 6 and 7 as near-copies of units 0 and 1, with the
    largest norms of the layer."""
    torch.manual_seed(seed)
    model = MLP(10, 3, hidden=(8,)).double()
    w, b = model.net[1].weight, model.net[1].bias
    with torch.no_grad():
        w[:6] *= 0.5
        w[0] *= 6.0
        w[1] *= 6.0
        w[6] = w[0] * 1.001
        w[7] = w[1] * 0.999
        b[6], b[7] = b[0], b[1]
    return model


def test_projective_removes_planted_duplicates_where_l2_does_not():
    kept = {}
    for crit, kw in (("projective", {"redistribute": False}), ("l2", {})):
        model = _mlp_with_duplicates()
        Pruner(model, crit, Rule("ratio", 0.25), **kw).prune()
        planted = _mlp_with_duplicates().net[1].weight[[0, 1, 6, 7]]
        kept[crit] = sum(int(any(torch.allclose(r, p, rtol=0.01) for p in planted))
                         for r in model.net[1].weight)
    # projective keeps one of each duplicated pair (2 of the 4 rows); L2 keeps all four
    assert kept["projective"] == 2 and kept["l2"] == 4


def test_change_of_basis_is_an_exact_reparametrisation_and_scores_are_eigenvalues():
    torch.manual_seed(0)
    model = VGGTSRA(1, 4, widths=(6, "M", 10), fc=(8,), dropout=0.0).double().eval()
    pruner = Pruner(model, "cob", Rule("ratio", 0.5, "per_subspace"))
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        for g in pruner.groups:
            pruner.criterion.prepare(g, None)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-10)
    # after the rotation, each unit's activation magnitude is the square root of its eigenvalue
    outs = {}
    hooks = [g.activation.register_forward_hook(lambda m, i, o, n=g.name: outs.__setitem__(n, o))
             for g in pruner.groups]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    first = pruner.groups[0]
    h = outs[first.name].movedim(1, -1).reshape(-1, first.size)
    torch.testing.assert_close(h.square().sum(0).sqrt(), pruner.criterion.importance(first),
                               rtol=1e-6, atol=1e-9)


def test_cob_pruning_prunes_each_subspace_and_the_model_still_runs():
    torch.manual_seed(0)
    model = VGGTSRA(1, 4, widths=(6, "M", 10), fc=(8,), dropout=0.0).eval()
    pruner = Pruner(model, "cob", Rule("ratio", 0.5, "per_subspace"))
    model(torch.randn(8, 1, 8, 8))
    report = pruner.prune()
    assert [(b, a) for _, b, a in report] == [(6, 4), (10, 6), (8, 4)]
    assert model.features[2].split == 2 and model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_cob_refuses_groups_without_tsra():
    with pytest.raises(ValueError, match="cob"):
        Pruner(VGGTSRA(1, 4, widths=(6,), fc=(8,), act="relu"), "cob")


def test_folding_duplicated_units_is_exact():
    torch.manual_seed(1)
    model = MLP(10, 3, hidden=(8,)).double()
    with torch.no_grad():
        w, b, v = model.net[1].weight, model.net[1].bias, model.net[4].weight
        w[4:], b[4:], v[:, 4:] = w[:4].clone(), b[:4].clone(), v[:, :4].clone()
    x = torch.randn(20, 10, dtype=torch.float64)
    before = model(x)
    Pruner(model, "fold", Rule("ratio", 0.5), repair="none").prune()
    assert model.net[1].out_features == 4
    torch.testing.assert_close(model(x), before)


def test_cosep_keeps_one_unit_per_planted_type():
    torch.manual_seed(2)
    model = MLP(6, 4, hidden=(9,)).double()
    with torch.no_grad():                      # three distinct unit types, three copies each
        w, b = model.net[1].weight, model.net[1].bias
        for t in range(3):
            w[3 * t:3 * t + 3] = w[3 * t] * torch.tensor([1.0, 1.02, 0.98], dtype=torch.float64)[:, None]
            b[3 * t:3 * t + 3] = b[3 * t]
    pruner = Pruner(model, "cosep", Rule("ratio", 0.0))
    assert pruner.needs_targets
    centers = torch.randn(4, 6, dtype=torch.float64) * 2
    for _ in range(5):
        y = torch.randint(0, 4, (64,))
        pruner.observe_targets(y)
        model(centers[y] + 0.3 * torch.randn(64, 6, dtype=torch.float64))
    pruner.prune()
    assert model.net[1].out_features == 3


def test_cosep_k_min_fraction_bounds_how_far_a_layer_shrinks():
    torch.manual_seed(2)
    model = MLP(6, 4, hidden=(10,)).double()
    pruner = Pruner(model, "cosep", Rule("ratio", 0.0), k_min_fraction=0.6)
    centers = torch.randn(4, 6, dtype=torch.float64) * 2
    for _ in range(3):
        y = torch.randint(0, 4, (64,))
        pruner.observe_targets(y)
        model(centers[y] + 0.3 * torch.randn(64, 6, dtype=torch.float64))
    pruner.prune()
    assert 6 <= model.net[1].out_features <= 9
    with pytest.raises(ValueError, match="k_min_fraction"):
        Pruner(MLP(6, 4, hidden=(10,)), "cosep", k_min_fraction=1.0)


def test_fold_ar_scales_batchnorm_gamma_by_the_cluster_gain_and_keeps_the_merged_statistics():
    import copy

    from secateur.pruning.folding import cluster_units, fold_ar_gain

    torch.manual_seed(3)
    model = VGGTSRA(1, 4, widths=(8,), fc=(6,), act="relu").eval()
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    group = model.unit_groups()[0]
    rows = group.producer_rows().double()
    labels = cluster_units(group.unit_features().double(), 4, seed=42)
    plain, repaired = copy.deepcopy(model), copy.deepcopy(model)
    Pruner(plain, "fold", Rule("ratio", 0.5), layers=["features.0"], repair="none").prune()
    Pruner(repaired, "fold", Rule("ratio", 0.5), layers=["features.0"], repair="fold_ar").prune()
    a, b = plain.features[1], repaired.features[1]
    torch.testing.assert_close(b.weight / a.weight, fold_ar_gain(rows, labels).float())
    torch.testing.assert_close(b.running_mean, a.running_mean)
    counts = torch.bincount(labels).float()
    expected_mean = torch.zeros(4).index_add_(0, labels, bn.running_mean) / counts
    torch.testing.assert_close(a.running_mean, expected_mean)


@pytest.mark.parametrize("criterion,make", [
    ("cob", lambda: VGGTSRA(1, 4, widths=(6,), fc=(8,))),
    ("cosep", lambda: MLP(6, 4, hidden=(8,))),
])
def test_data_criteria_refuse_to_decide_without_observed_data(criterion, make):
    model = make()
    pruner = Pruner(model, criterion, Rule("ratio", 0.5))
    with pytest.raises(ValueError, match="observed"):
        pruner.prune()
