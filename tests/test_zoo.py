"""The zoo: every torchvision classifier under 60M parameters and tiny-config Hugging Face models,
pruned 30% by L2 through the generic path, then one AdamW step right after the prune.

Oracles: the logits keep their shape, the parameter count drops, the step's loss and updated
weights are finite, and every layer's size attributes equal its tensors (so the model rebuilds
from what it reports)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from secateur.pruning import Pruner, Rule
from secateur.zoo import hf_zoo, logits, timm_zoo, torchvision_zoo

TV = torchvision_zoo(max_params=60e6)
HF = hf_zoo()
TIMM = timm_zoo()


def _attributes_match_tensors(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels, name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            assert m.weight.shape[0] == m.num_features, name
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            assert tuple(m.weight.shape) == tuple(m.normalized_shape), name
        elif isinstance(m, nn.Embedding):
            assert m.weight.shape[1] == m.embedding_dim, name


def _prune_and_step(make, x) -> float:
    torch.manual_seed(0)
    model = make().train()
    n0 = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        shape = tuple(logits(model(x)).shape)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, "l2", Rule("ratio", 0.3), example_input=x)
        pruner.prune(opt)
    out = logits(model(x))
    assert tuple(out.shape) == shape
    loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    _attributes_match_tensors(model)
    n1 = sum(p.numel() for p in model.parameters())
    assert n1 < n0
    return n1 / n0


@pytest.mark.parametrize("name", sorted(TV))
def test_torchvision_model_prunes_then_trains(name):
    make, x = TV[name]
    _prune_and_step(make, x)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_model_prunes_then_trains(name):
    make, x = TIMM[name]
    _prune_and_step(make, x)


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_model_prunes_then_trains(name):
    make, x = HF[name]
    left = _prune_and_step(make, x)
    assert left < 0.9          # heads, MLP and hidden width all shrink, not just one layer
