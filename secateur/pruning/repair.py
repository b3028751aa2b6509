"""Statistics repair after pruning or folding (METHODS B.2 "REPAIR / BN reset"): recompute every
BatchNorm's running mean and variance from a few batches of data, as a cumulative average, so the
normalisation matches the edited weights. Weights are not touched."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def reset_batchnorm_stats(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm in `model` from `batches`
    (inputs only; e.g. ~1,000 training images). Only the norms run in training mode (dropout
    stays off). Returns the number of inputs seen; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("model: has no BatchNorm layers to repair")
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over all batches
        m.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise ValueError("batches: no data was given")
    return seen
