"""Equivariance-aware pruning: C4 invariance of the conv stack, FC-only L2 pruning against a brute
force oracle, distillation loss closed form, INT8 closeness, config errors."""
from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from secateur.data import Split
from secateur.models.c4cnn import C4CNN, PlainCNN, invariance_error
from secateur.recipes.equivariant import (ConfigError, Data, FinetuneSection, accuracy, adaptive_finetune,
                                          distillation_loss, fc_l2_prune, load_config, param_count,
                                          parse_config, quantize_int8)

torch.set_num_threads(2)


def tiny_c4(fc=(8, 6), seed=0) -> C4CNN:
    torch.manual_seed(seed)
    return C4CNN(in_channels=1, num_classes=5, fields=(2, 3), fc=fc, kernel_size=3).eval()


def tiny_plain(seed=0) -> PlainCNN:
    torch.manual_seed(seed)
    return PlainCNN(in_channels=1, num_classes=5, channels=(4, 6), fc=(8,), kernel_size=3).eval()


def _give_bn_stats(model, x):
    # a few train-mode passes so BatchNorm running statistics are not the trivial (0, 1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def test_c4_features_are_rotation_invariant_and_plain_are_not():
    x = torch.randn(4, 1, 12, 12)
    c4 = _give_bn_stats(tiny_c4(), x)
    plain = _give_bn_stats(tiny_plain(), x)
    with torch.no_grad():
        f = c4.features(x)
        for k in (1, 2, 3):
            fr = c4.features(torch.rot90(x, k, dims=(2, 3)))
            assert (fr - f).abs().max() <= 1e-5 * f.abs().max()
            # the spatial maps rotate with the input (oracle: torch.rot90 of the maps)
            m, mr = c4.conv_features(x), c4.conv_features(torch.rot90(x, k, dims=(2, 3)))
            assert torch.allclose(mr, torch.rot90(m, k, dims=(2, 3)), atol=1e-5 * m.abs().max())
        pf, pfr = plain.features(x), plain.features(torch.rot90(x, 1, dims=(2, 3)))
    assert (pfr - pf).abs().max() > 1e-2 * pf.abs().max()
    assert invariance_error(c4, x) < 1e-5
    assert invariance_error(plain, x) > 1e-2


def test_spec_rebuilds_same_architecture():
    for model in (tiny_c4(), tiny_plain()):
        rebuilt = type(model).from_spec(model.spec()).eval()
        rebuilt.load_state_dict(model.state_dict())
        x = torch.randn(2, 1, 12, 12)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="spec"):
        C4CNN.from_spec({"name": "PlainCNN", "args": {}})


def test_unit_groups_cover_hidden_layers_only():
    model = tiny_c4(fc=(8, 6))
    groups = model.unit_groups()
    assert [g.size for g in groups] == [8, 6]
    assert all(g.producers[0].module is not model.logits_layer for g in groups)
    assert groups[-1].consumers[0].module is model.logits_layer


# ----------------------------------------------------------------------------- FC-only L2 pruning

def _bruteforce_lowest(weight: torch.Tensor, r: int) -> list[int]:
    """Indices of the r rows with the smallest Euclidean norm (ties: lower index), by plain loops."""
    norms = [math.sqrt(sum(float(v) ** 2 for v in row)) for row in weight.tolist()]
    return sorted(sorted(range(len(norms)), key=lambda i: (norms[i], i))[:r])


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fc_l2_prune_removes_lowest_norm_rows_only_in_hidden_linears(ratio):
    x = torch.randn(6, 1, 12, 12)
    model = _give_bn_stats(tiny_c4(fc=(8, 6)), x)
    with torch.no_grad():  # a large bias must not save a low-norm row: the saliency ignores biases
        w0 = model.hidden_linears()[0]
        w0.bias[w0.weight.norm(dim=1).argmin()] = 100.0
    original = copy.deepcopy(model)
    w = [lin.weight.detach().clone() for lin in model.hidden_linears()]
    logits_w = model.logits_layer.weight.detach().clone()
    conv_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}

    report = fc_l2_prune(model, ratio)

    removed = [_bruteforce_lowest(wi, int(ratio * wi.shape[0] + 1e-9)) for wi in w]
    kept = [[i for i in range(wi.shape[0]) if i not in rem] for wi, rem in zip(w, removed)]
    assert report == [("head.0", 8, len(kept[0])), ("head.2", 6, len(kept[1]))]
    lin0, lin1 = model.hidden_linears()
    assert torch.equal(lin0.weight, w[0][kept[0]])
    assert torch.equal(lin1.weight, w[1][kept[1]][:, kept[0]])
    assert (lin0.out_features, lin1.in_features, lin1.out_features) == (len(kept[0]), len(kept[0]), len(kept[1]))
    # the logits layer keeps all its outputs; only its input columns follow the last hidden layer
    assert model.logits_layer.out_features == 5
    assert torch.equal(model.logits_layer.weight, logits_w[:, kept[1]])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in conv_state.items())
    # oracle: the unpruned model with the removed units' outgoing weights zeroed
    with torch.no_grad():
        original.hidden_linears()[1].weight[:, removed[0]] = 0.0
        original.logits_layer.weight[:, removed[1]] = 0.0
        assert torch.allclose(model(x), original(x), atol=1e-5, rtol=1e-5)
    assert model.fc_widths() == [len(kept[0]), len(kept[1])]


def test_pruned_model_rebuilds_from_spec_and_weights():
    x = torch.randn(4, 1, 12, 12)
    for model in (_give_bn_stats(tiny_c4(), x), _give_bn_stats(tiny_plain(), x)):
        fc_l2_prune(model, 0.4)
        rebuilt = type(model).from_spec(json.loads(json.dumps(model.spec())))
        rebuilt.load_weights(model.weights_state_dict())
        rebuilt.eval()
        with torch.no_grad():
            assert torch.allclose(rebuilt(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="state"):
        tiny_c4(fc=(8, 6)).load_weights(model.weights_state_dict())


def test_fc_l2_prune_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        fc_l2_prune(tiny_c4(), 1.0)


# ----------------------------------------------------------------------------- distillation, INT8

def test_distillation_loss_matches_closed_form():
    t = 4.0
    student = torch.tensor([[0.0, 0.0], [t * math.log(3.0), 0.0]])
    teacher = torch.tensor([[t * math.log(3.0), 0.0], [t * math.log(3.0), 0.0]])
    targets = torch.tensor([0, 1])
    # row 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); CE = ln 2.  row 2: p_s = p_t, KL = 0; CE = ln(3^4 + 1)
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = (0.7 * t * t * kl1 + 0.3 * math.log(2.0) + 0.3 * math.log(82.0)) / 2
    got = distillation_loss(student, teacher, targets, temperature=t, alpha=0.7)
    assert abs(float(got) - expected) < 1e-6


def test_int8_model_outputs_close_to_float_and_conv_untouched():
    x = torch.randn(16, 1, 12, 12)
    model = _give_bn_stats(tiny_c4(fc=(32,)), x)
    q = quantize_int8(model)
    with torch.no_grad():
        f, fq = model(x), q(x)
    assert (fq - f).norm() <= 0.05 * f.norm()
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert param_count(q) == param_count(model)
    assert invariance_error(q, x) < 1e-5
    conv = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(q.state_dict()[k], v) for k, v in conv.items())


# ----------------------------------------------------------------------------- adaptive fine-tuning

def _toy_data(n=240, seed=0) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x.abs().mean(dim=(1, 2, 3)) > 0.8).long()
    s = lambda a, b: Split(x[a:b], y[a:b])  # noqa: E731
    return Data(s(0, 160), s(160, 200), s(200, n), num_classes=5, in_channels=1)


@pytest.mark.parametrize("scope", ["head", "all"])
def test_adaptive_finetune_runs_only_after_a_large_drop(scope):
    data = _toy_data()
    model = _give_bn_stats(tiny_c4(fc=(16,)), data.train.x[:32])
    fc_l2_prune(model, 0.5)
    cfg = FinetuneSection(threshold=2.0, max_epochs=3, early_stop=2, scope=scope)
    now = accuracy(model, data.monitor)
    head_before = copy.deepcopy(model.head.state_dict())
    skipped = adaptive_finetune(model, data, monitor_before=now + 2.0, cfg=cfg)
    assert not skipped.ran and skipped.epochs == 0
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())
    conv_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    done = adaptive_finetune(model, data, monitor_before=now + 2.5, cfg=cfg)
    assert done.ran and 1 <= done.epochs <= 3
    assert done.monitor_after >= done.monitor_pruned
    assert abs(accuracy(model, data.monitor) - done.monitor_after) < 1e-9  # best epoch restored
    if scope == "head":  # the conv stack, its BatchNorm statistics included, is left exactly as it was
        assert all(torch.equal(model.state_dict()[k], v) for k, v in conv_state.items())
    assert invariance_error(model, data.test.x) < 1e-5


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("data, message", [
    ({"teacher": {"fields": [4], "fc": [8], "depth": 3}}, "unknown key 'teacher.depth'"),
    ({"prune": {"ratios": [0.3, 1.5]}}, "prune.ratios"),
    ({"student": {"fields": [4], "fc": [8], "kernel_size": 4}}, "student.kernel_size"),
    ({"data": {"train_subset": 500, "monitor": 500}}, "monitor"),
    ({"finetune": {"scope": "conv"}}, "finetune.scope"),
    ([1, 2], "valid dictionary"),
])
def test_config_errors_are_one_line(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        parse_config(data)
    assert "\n" not in str(err.value)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "recipes" / "equivariant.yaml")
    assert cfg.prune.ratios == [0.3, 0.4, 0.5] and cfg.distill.temperature == 4.0 and cfg.distill.alpha == 0.7


def test_benchmark_script_exits_2_on_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nquantise: true\n")
    script = Path(__file__).parents[1] / "benchmarks" / "repro_equivariant.py"
    proc = subprocess.run([sys.executable, str(script), "--config", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'quantise'" in proc.stderr
    assert not (tmp_path / "o").exists()
