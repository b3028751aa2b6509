"""Wrappers: a DeepSpeed engine is looked through like DDP and DataParallel; the Pruner keeps only
the inner module, and the rebuilt engine trains on the pruned model with its moments carried."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from secateur.pruning import Pruner, Rule
from secateur.trainer.engine import Engine, init_distributed, shutdown_distributed


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_deepspeed_engine_is_traced_through_and_its_rebuild_trains():
    init_distributed()
    try:
        model, x = _net(), torch.randn(4, 3, 6, 6)
        eng = Engine(model, lambda m: torch.optim.AdamW(m.parameters(), 1e-2),
                     {"train_batch_size": 4, "steps_per_print": 10 ** 9,
                      "zero_optimization": {"stage": 0}})
        loss = eng.engine(x).pow(2).mean()
        eng.engine.backward(loss)
        eng.engine.step()
        pruner = Pruner(eng.engine, "l2", Rule("ratio", 0.5), example_input=x)
        assert pruner.model is model                     # the inner module, not the engine
        assert {g.name for g in pruner.groups} == {"0", "5"}
        opt = eng.engine.optimizer
        moment = opt.state[model[5].weight]["exp_avg"].clone()
        rows = torch.sort(model[5].weight.detach().norm(dim=1), stable=True).indices[3:].sort().values
        cols = torch.sort(model[0].weight.detach().flatten(1).norm(dim=1), stable=True).indices[4:].sort().values
        pruner.prune(opt)
        assert model[0].out_channels == 4 and model[5].out_features == 3
        torch.testing.assert_close(opt.state[model[5].weight]["exp_avg"], moment[rows][:, cols])
        ref = weakref.ref(eng.engine)
        eng.engine.destroy()
        eng.engine = eng._initialize(opt)                 # the trainer's rebuild, same optimizer
        assert ref() is not eng.engine
        loss = eng.engine(x).pow(2).mean()
        eng.engine.backward(loss)
        eng.engine.step()
        assert torch.isfinite(loss) and tuple(eng.engine(x).shape) == (4, 3)
    finally:
        shutdown_distributed()
