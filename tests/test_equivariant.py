"""Equivariance-aware pruning: C4 invariance of the conv stack, FC-only L2 pruning against a brute
force oracle, distillation loss closed form, INT8 closeness, config errors."""
from __future__ import annotations

import pytest
import torch

from secateur.models.c4cnn import C4CNN, PlainCNN, invariance_error

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
