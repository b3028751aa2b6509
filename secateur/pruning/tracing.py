"""Unit groups of an arbitrary model, traced with Torch-Pruning's DependencyGraph.

The graph follows autograd nodes; secateur's TSRA and RMSNorm2d are single autograd Functions,
so it sees them as channel pass-through and couples the producer before them with the consumer
after them. Forward hooks recorded during the trace map each activation node back to its module,
so the group knows its TSRA (whose split the surgery must update) and where to read activations.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from secateur.kernels import TSRA
from secateur.pruning.groups import Slot, UnitGroup

_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _output_layer(model: nn.Module) -> nn.Module | None:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    return layers[-1] if layers else None


def trace_groups(model: nn.Module, example_input: Tensor) -> list[UnitGroup]:
    """One UnitGroup per prunable Conv/Linear output axis (the output layer excluded)."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    by_grad_fn: dict[Any, nn.Module] = {}

    def record(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            by_grad_fn[out.grad_fn] = mod

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        for h in hooks:
            h.remove()
    out_layer = _output_layer(model)
    groups = []
    for g in graph.get_all_groups(ignored_layers=[out_layer] if out_layer is not None else [],
                                  root_module_types=[nn.Conv2d, nn.Conv1d, nn.Linear]):
        groups.append(_convert(g, names, by_grad_fn))
    return [g for g in groups if g is not None]


def _convert(group: Any, names: dict, by_grad_fn: dict) -> UnitGroup | None:
    producers, consumers, norms, tsra, acts = [], [], [], [], []
    n_units = None
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        mod = dep.target.module
        handler = getattr(dep.handler, "__name__", str(dep.handler))
        out_side = handler.startswith("prune_out")
        if isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            if isinstance(mod, (nn.Conv2d, nn.Conv1d)) and mod.groups != 1:
                raise ValueError(f"model: grouped convolution {names.get(mod, mod)!r} is not supported")
            if out_side:
                producers.append(Slot(mod, "weight", 0))
                if mod.bias is not None:
                    producers.append(Slot(mod, "bias", 0))
                n_units = mod.weight.shape[0]
            else:
                consumers.append((mod, len(idxs)))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if isinstance(mod, nn.GroupNorm):
                raise ValueError(f"model: GroupNorm {names.get(mod, mod)!r} is not supported")
            norms += [Slot(mod, k, 0) for k in _NORM_BUFFERS if getattr(mod, k, None) is not None]
        elif isinstance(mod, nn.Module) and any(True for _ in mod.parameters(recurse=False)):
            raise ValueError(f"model: cannot prune through {type(mod).__name__} {names.get(mod, '')!r}")
        else:
            m = by_grad_fn.get(getattr(dep.target, "grad_fn", None))
            if isinstance(m, TSRA) and m not in tsra:
                tsra.append(m)
            if m is not None and m not in acts and not isinstance(m, (nn.Flatten, nn.Dropout)):
                acts.append(m)
    if not producers or n_units is None:
        return None
    cons = [Slot(m, "weight", 1, block=max(1, k // n_units)) for m, k in consumers]
    name = names.get(producers[0].module, "group")
    activation = tsra[0] if tsra else (acts[-1] if acts else None)
    return UnitGroup(name=name, producers=producers, consumers=cons, norms=norms, tsra=tsra,
                     activation=activation, act_dim=1)
