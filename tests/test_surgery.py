"""Surgery: physical shrinking keeps the function when the removed units are silent, carries the
optimizer moments of kept units unchanged, and merges/rescales exactly where algebra says so."""
import copy

import pytest
import torch
from torch import nn

from secateur.models import MLP, VGGTSRA, TinyTransformer, build_model
from secateur.pruning import keep_units, merge_units, rescale_units


def _silence_and_keep(model, x, seed=0):
    """Zero the consumer columns of a random half of every group's units, then remove exactly
    those units. Returns (output before removal, output after)."""
    g = torch.Generator().manual_seed(seed)
    plans = []
    with torch.no_grad():
        for grp in model.unit_groups():
            perm = torch.randperm(grp.size, generator=g)
            drop, keep = perm[:grp.size // 2], perm[grp.size // 2:]
            for s in grp.consumers:
                s.tensor.index_fill_(s.axis, s.index(drop), 0.0)
            plans.append((grp, keep))
        before = model(x)
    for grp, keep in plans:
        keep_units(grp, keep)
    with torch.no_grad():
        return before, model(x)


@pytest.mark.parametrize("make,x", [
    (lambda: MLP(20, 5, hidden=(17, 9)), torch.randn(6, 20)),
    (lambda: VGGTSRA(1, 4, widths=(6, "M", 10), fc=(7,), act="relu"), torch.randn(3, 1, 8, 8)),
    (lambda: TinyTransformer(11, d_model=12, n_heads=3, n_layers=2, d_ff=14, max_len=9),
     torch.randint(0, 11, (2, 9))),
])
def test_removing_units_with_zero_outgoing_weights_keeps_outputs(make, x):
    torch.manual_seed(0)
    model = make().eval()
    before, after = _silence_and_keep(model, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # the shrunk model is exactly what its spec rebuilds
    rebuilt = build_model(model.spec()).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), after)


def test_shrunk_widths_match_the_kept_units():
    model = VGGTSRA(1, 4, widths=(6, "M", 10), fc=(7,), act="relu")
    groups = model.unit_groups()
    keep_units(groups[0], torch.tensor([5, 1, 3]))
    conv0, bn0, conv1 = model.features[0], model.features[1], model.features[4]
    assert conv0.weight.shape[0] == conv0.out_channels == 3 and conv0.bias.shape == (3,)
    assert bn0.running_mean.shape == (3,) and bn0.num_features == 3
    assert conv1.weight.shape[1] == conv1.in_channels == 3


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_moments_of_kept_units_are_unchanged(opt_cls):
    torch.manual_seed(1)
    model = MLP(12, 3, hidden=(10, 8))
    kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 12)).square().mean().backward()
        opt.step()
    grp = model.unit_groups()[0]
    lin0, lin1 = model.net[1], model.net[4]
    old = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
           for p in (lin0.weight, lin0.bias, lin1.weight)}
    keep = torch.tensor([0, 3, 4, 9])
    ids = {id(p) for p in model.parameters()}
    keep_units(grp, keep, opt)
    assert {id(p) for p in model.parameters()} == ids        # same Parameter objects
    for k, v in old[lin0.weight].items():
        assert torch.equal(opt.state[lin0.weight][k], v[keep])
    for k, v in old[lin0.bias].items():
        assert torch.equal(opt.state[lin0.bias][k], v[keep])
    for k, v in old[lin1.weight].items():
        assert torch.equal(opt.state[lin1.weight][k], v[:, keep])
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    opt.step()                                                # the optimizer keeps working


def test_tsra_split_counts_kept_units_below_the_old_split():
    model = MLP(8, 3, hidden=(10,), act="tsra")
    grp = model.unit_groups()[0]
    assert grp.subspaces() == [range(0, 5), range(5, 10)]
    keep_units(grp, torch.tensor([1, 4, 6, 7, 9]))
    assert model.net[2].split == 2 and grp.subspaces() == [range(0, 2), range(2, 5)]
    assert build_model(model.spec()).net[2].split == 2


def test_merging_duplicated_units_is_exact():
    torch.manual_seed(2)
    model = MLP(6, 3, hidden=(5,)).double()
    grp = model.unit_groups()[0]
    lin0 = model.net[1]
    with torch.no_grad():                       # unit 4 duplicates unit 1
        lin0.weight[4] = lin0.weight[1]
        lin0.bias[4] = lin0.bias[1]
    x = torch.randn(7, 6, dtype=torch.float64)
    before = model(x)
    labels = torch.tensor([0, 1, 2, 3, 1])
    counts = torch.bincount(labels).double()
    pmap = torch.zeros(4, 5, dtype=torch.float64)
    pmap[labels, torch.arange(5)] = 1.0 / counts[labels]
    cmap = pmap.t().ne(0).double()
    merge_units(grp, pmap, cmap)
    assert lin0.out_features == 4
    torch.testing.assert_close(model(x), before)


def test_positive_rescaling_of_relu_units_is_exact_and_moves_moments():
    torch.manual_seed(3)
    model = MLP(6, 3, hidden=(5,)).double()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    x = torch.randn(7, 6, dtype=torch.float64)
    before = model(x)
    grp = model.unit_groups()[0]
    w = model.net[1].weight
    m_old, v_old = opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone()
    s = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    rescale_units(grp, s, s, 1.0 / s, opt)
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(opt.state[w]["exp_avg"], m_old * s[:, None])
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], v_old * s[:, None] ** 2)


def test_bad_surgery_arguments_raise_value_errors():
    model = MLP(6, 3, hidden=(5,))
    grp = model.unit_groups()[0]
    with pytest.raises(ValueError, match="keep"):
        keep_units(grp, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="keep"):
        keep_units(grp, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="producer_map"):
        merge_units(grp, torch.ones(2, 4), torch.ones(5, 2))
    with pytest.raises(ValueError, match="consumer_scale"):
        rescale_units(grp, consumer_scale=torch.ones(3))
    assert copy.deepcopy(model).net[1].out_features == 5      # nothing was changed


def test_batchnorm_reset_recomputes_running_statistics_from_data():
    from secateur.pruning import reset_batchnorm_stats

    torch.manual_seed(4)
    model = VGGTSRA(1, 4, widths=(6, "M", 10), fc=(7,), act="relu", dropout=0.5)
    xs = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    with torch.no_grad():
        model.features[1].running_mean.fill_(5.0)          # stale statistics, as after surgery
    assert reset_batchnorm_stats(model, xs) == 24 and not model.training
    x = torch.cat(xs)
    with torch.no_grad():
        pre = model.features[0](x)                          # the first BN's input
    bn = model.features[1]
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    # a cumulative average of the per-batch (unbiased) variances
    per_batch = torch.stack([p.var((0, 2, 3), unbiased=True) for p in pre.split(8)])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1
    with pytest.raises(ValueError, match="BatchNorm"):
        reset_batchnorm_stats(MLP(4, 2, hidden=(3,)), xs)
