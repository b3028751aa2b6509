"""Decision rules and schedules against brute-force and closed-form oracles."""
import math

import pytest
import torch

from secateur.models import MLP, VGGTSRA
from secateur.pruning import Rule, Schedule, keep_units, ratio_for_param_fraction
from secateur.pruning.rules import global_keep, keep_within


def _brute_keep(scores, n_remove):
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[n_remove:])


@pytest.mark.parametrize("n,ratio", [(10, 0.25), (7, 0.5), (33, 0.9), (5, 0.0)])
def test_ratio_per_layer_removes_the_lowest_floor_ratio_n(n, ratio):
    s = torch.rand(n, generator=torch.Generator().manual_seed(n))
    keep = keep_within(s, [range(n)], Rule("ratio", ratio), min_keep=1)
    assert keep.tolist() == _brute_keep(s.tolist(), min(math.floor(ratio * n), n - 1))


def test_ratio_per_subspace_decides_inside_each_subspace():
    s = torch.tensor([9., 8., 7., 6., 0.5, 0.6, 0.7, 5.])
    ranges = [range(0, 4), range(4, 8)]
    keep = keep_within(s, ranges, Rule("ratio", 0.5, "per_subspace"), min_keep=1)
    assert keep.tolist() == [0, 1, 6, 7]
    # decided per layer, the four lowest overall go, emptying nearly all of V
    keep = keep_within(s, ranges, Rule("ratio", 0.5, "per_layer"), min_keep=1)
    assert keep.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind,value,oracle", [
    ("prop_of_max", 0.5, lambda s: s < 0.5 * s.max()),
    ("prop_of_avg", 0.8, lambda s: s < 0.8 * s.mean()),
    ("prop_of_med", 1.0, lambda s: s < s.median()),
    ("zscore", -0.5, lambda s: (s - s.mean()) / s.std() < -0.5),
])
def test_thresholds_remove_exactly_the_units_below_them(kind, value, oracle):
    s = torch.rand(41, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    keep = keep_within(s, [range(41)], Rule(kind, value), min_keep=1)
    assert keep.tolist() == (~oracle(s)).nonzero().flatten().tolist()


def test_a_threshold_that_would_empty_a_layer_keeps_the_minimum():
    s = torch.tensor([1.0, 1.0, 1.0, 2.0])
    keep = keep_within(s, [range(4)], Rule("prop_of_avg", 100.0), min_keep=2)
    assert keep.tolist() == [2, 3]      # ties broken by index, so every rank agrees


def test_global_ratio_ranks_mean_normalised_scores_across_groups():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 100.0, 190.0])}
    # normalised: a = [.5, 1, 1.5], b = [.1, 1, 1.9]; removing 2 of 6 takes b0 then a0
    keep = global_keep(scores, 2 / 6, min_keep=1)
    assert keep["a"].tolist() == [1, 2] and keep["b"].tolist() == [1, 2]
    keep = global_keep({"a": torch.tensor([1.0, 1.1]), "b": torch.tensor([5.0, 50.0])}, 0.75, 1)
    assert len(keep["a"]) >= 1 and len(keep["b"]) >= 1


def test_invalid_rules_name_the_argument():
    for kwargs, word in [(dict(kind="ratio", value=1.0), "value"), (dict(kind="bogus"), "kind"),
                         (dict(scope="everywhere"), "scope"),
                         (dict(kind="prop_of_max", value=0.5, scope="global"), "scope")]:
        with pytest.raises(ValueError, match=word):
            Rule(**kwargs)


def test_ratio_for_param_fraction_hits_the_target_when_applied():
    model = VGGTSRA(1, 10, widths=(16, "M", 24), fc=(32,))
    total = sum(p.numel() for p in model.parameters())
    r = ratio_for_param_fraction(model, model.unit_groups(), 0.4)
    for g in model.unit_groups():
        keep_units(g, torch.arange(g.size - math.floor(r * g.size + 1e-9)))
    frac = sum(p.numel() for p in model.parameters()) / total
    assert abs(frac - 0.4) < 0.03
    with pytest.raises(ValueError, match="fraction"):
        ratio_for_param_fraction(MLP(4, 2, hidden=(3,)), [], 0.0)


def test_schedules_fire_on_their_steps_and_agp_follows_the_cubic():
    it = Schedule("iterative", start=10, end=40, every=15)
    assert [s for s in range(60) if it.is_event(s)] == [10, 25, 40] == it.events()
    one = Schedule("oneshot", start=7)
    assert [s for s in range(60) if one.is_event(s)] == [7]
    agp = Schedule("agp", start=0, end=100, every=10, target=0.8)
    for t in (0, 30, 50, 100, 150):
        u = min(t, 100) / 100
        assert agp.sparsity_at(t) == pytest.approx(0.8 * (1 - (1 - u) ** 3))
    for bad, word in [(dict(kind="agp", end=5, target=1.5), "target"), (dict(every=0), "every"),
                      (dict(kind="iterative", start=5, end=2), "end"), (dict(kind="x"), "kind")]:
        with pytest.raises(ValueError, match=word):
            Schedule(**bad)
