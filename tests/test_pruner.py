"""The Pruner end to end on small models: statistics collected on the fly equal a brute-force
recomputation, decisions are deterministic and resumable, bad input fails early, and generic
models are grouped through Torch-Pruning's DependencyGraph."""
import pytest
import torch
from torch import nn

from secateur.kernels import TSRA, RMSNorm2d
from secateur.models import MLP, VGGTSRA, TinyTransformer
from secateur.pruning import Pruner, Rule, Schedule, build_groups


def _vgg():
    torch.manual_seed(0)
    return VGGTSRA(1, 5, widths=(8, "M", 12), fc=(10,), dropout=0.0)


def test_activation_statistics_equal_a_brute_force_pass():
    model = _vgg().eval()
    pruner = Pruner(model, "activation", Rule("ratio", 0.25, "per_subspace"))
    xs = [torch.randn(3, 1, 8, 8) for _ in range(3)]
    outs: dict = {}
    hooks = [g.activation.register_forward_hook(
        lambda m, i, o, n=g.name: outs.setdefault(n, []).append(o.detach().double()))
        for g in pruner.groups]
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in hooks:
        h.remove()
    for g in pruner.groups:
        h = torch.cat([o.movedim(1, -1).reshape(-1, o.shape[1]) for o in outs[g.name]])
        expected = h.square().mean(0).sqrt()
        torch.testing.assert_close(pruner.criterion.importance(g), expected, rtol=1e-5, atol=1e-7)
    report = pruner.prune()
    assert [(n, b) for n, b, _ in report] == [(g.name, b) for g, b in zip(pruner.groups, (8, 12, 10))]
    assert all(a == b - 2 * (b // 2 // 4) for _, b, a in report)   # 25% of each subspace
    model(xs[0])


def test_transformer_heads_and_mlp_units_prune_by_activation():
    torch.manual_seed(0)
    model = TinyTransformer(13, d_model=16, n_heads=4, n_layers=2, d_ff=24, max_len=8)
    pruner = Pruner(model, "activation", Rule("ratio", 0.5))
    model(torch.randint(0, 13, (4, 8)))
    sizes = dict((n, a) for n, _, a in pruner.prune())
    assert sizes == {"blocks.0.attn": 2, "blocks.0.mlp": 12, "blocks.1.attn": 2, "blocks.1.mlp": 12}
    assert model(torch.randint(0, 13, (2, 8))).shape == (2, 8, 13)
    assert model.blocks[0].attn.n_heads == 2


def test_non_finite_importance_skips_that_group_with_a_warning():
    model = MLP(6, 3, hidden=(8, 8))
    with torch.no_grad():
        model.net[1].weight[0, 0] = float("nan")
    pruner = Pruner(model, "l2", Rule("ratio", 0.5))
    with pytest.warns(RuntimeWarning, match="net.1"):
        report = pruner.prune()
    assert report == [("net.4", 8, 4)] and model.net[1].out_features == 8


def test_a_rule_that_would_empty_a_layer_keeps_min_units():
    model = MLP(6, 3, hidden=(8, 8))
    pruner = Pruner(model, "l2", Rule("prop_of_avg", 50.0), min_units=3)
    assert [a for _, _, a in pruner.prune()] == [3, 3]


def test_random_decisions_agree_across_identical_replicas_and_differ_by_seed():
    keeps = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        model = MLP(6, 3, hidden=(16,))
        Pruner(model, "random", Rule("ratio", 0.5), seed=seed).prune()
        keeps.append(model.net[1].weight.detach().clone())
    assert torch.equal(keeps[0], keeps[1]) and not torch.equal(keeps[0], keeps[2])


def test_state_dict_restores_statistics_so_the_decision_is_the_same():
    x = torch.randn(5, 1, 8, 8)
    a, b = _vgg(), _vgg()
    pa = Pruner(a, "activation", Rule("ratio", 0.5, "per_subspace"))
    a(x)
    pb = Pruner(b, "activation", Rule("ratio", 0.5, "per_subspace"))
    pb.load_state_dict(pa.state_dict())
    pa.prune()
    pb.prune()
    assert torch.equal(a(x), b(x)) and a.spec() == b.spec()


def test_agp_widths_follow_the_cubic_ramp():
    model = MLP(6, 3, hidden=(40,))
    sched = Schedule("agp", start=0, end=30, every=10, target=0.75)
    pruner = Pruner(model, "l2", Rule("ratio", 0.0), schedule=sched)
    for step in range(31):
        if pruner.is_event(step):
            pruner.prune()
            assert model.net[1].out_features == round(40 * (1 - sched.sparsity_at(step)))
    assert model.net[1].out_features == 10


def test_invalid_arguments_fail_before_any_work():
    model = MLP(6, 3, hidden=(8,))
    for kwargs, word in [(dict(criterion="magic"), "criterion"), (dict(min_units=0), "min_units"),
                         (dict(criterion="l2", foo=1), "criterion_args"),
                         (dict(criterion="projective", lam=-1.0), "lam")]:
        with pytest.raises(ValueError, match=word):
            Pruner(model, **kwargs)
    assert model.net[1].out_features == 8


def _generic_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RMSNorm2d(), TSRA(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 3))


def test_dependency_graph_groups_couple_producers_norms_and_flattened_consumers():
    model, x = _generic_net(), torch.randn(2, 3, 4, 4)
    groups = {g.name: g for g in build_groups(model, x)}
    assert set(groups) == {"0", "4", "8"}                   # the logits layer is never a group
    assert groups["0"].tsra == [model[2]] and groups["0"].activation is model[2]
    assert [s.module for s in groups["4"].norms] == [model[5]] * 4
    assert [(s.module, s.per_unit) for s in groups["4"].consumers] == [(model[8], 4)]
    assert torch.equal(groups["4"].consumers[0].table(), torch.arange(24).reshape(6, 4))  # a unit owns a block
    # statistics read what the consumer reads (the ReLU's output is the last Linear's input)
    assert groups["8"].act_slot.module is model[10] and groups["8"].channel_width() == 5


def test_traced_generic_model_prunes_and_keeps_silent_units_function():
    model, x = _generic_net().eval(), torch.randn(2, 3, 4, 4)
    pruner = Pruner(model, "l2", Rule("ratio", 0.5), example_input=x)
    grp = next(g for g in pruner.groups if g.name == "4")
    order = torch.sort(grp.producer_weight_rows().norm(dim=1), stable=True).indices
    tsra_group = next(g for g in pruner.groups if g.name == "0")
    kept0 = torch.sort(tsra_group.producer_weight_rows().norm(dim=1), stable=True).indices[4:]
    with torch.no_grad():          # silence the units L2 will remove from the BN group
        model[8].weight.view(5, 6, 4)[:, order[:3]] = 0
        before = model(x)
    pruner.prune()
    assert model[0].out_channels == 4 and model[4].out_channels == 3
    assert model[2].split == int((kept0 < 4).sum())     # kept units below the old split
    assert model[8].in_features == 12
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    # group "4" alone is function-preserving; compare against a copy pruned only there
    model2 = _generic_net().eval()
    g2 = {g.name: g for g in build_groups(model2, x)}["4"]
    with torch.no_grad():
        model2[8].weight.view(5, 6, 4)[:, order[:3]] = 0
        ref = model2(x)
    from secateur.pruning import keep_units
    keep_units(g2, order[3:])
    with torch.no_grad():
        torch.testing.assert_close(model2(x), ref)


def test_l2_over_all_tied_tensors_matches_a_brute_force_norm():
    torch.manual_seed(5)
    model = VGGTSRA(1, 4, widths=(6,), fc=(5,), act="relu")
    with torch.no_grad():
        model.features[1].weight.uniform_(0.1, 3.0)
    g = model.unit_groups()[0]
    conv, bn, lin = model.features[0], model.features[1], model.classifier[0]
    expected = torch.stack([torch.cat([conv.weight[u].flatten(), conv.bias[u:u + 1], bn.weight[u:u + 1],
                                       bn.bias[u:u + 1], lin.weight[:, u]]).norm() for u in range(6)])
    pruner = Pruner(model, "l2", Rule("ratio", 0.5), tensors="all")
    torch.testing.assert_close(pruner.criterion.importance(g).float(), expected.detach())
    with pytest.raises(ValueError, match="tensors"):
        Pruner(model, "l2", tensors="some")
