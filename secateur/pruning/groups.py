"""Unit groups: which tensors, on which axes, share one prunable unit axis.

A unit is an output channel / hidden neuron / attention head. Removing unit u removes its
producer rows (weights and biases that compute it), its norm entries, and its consumer columns
(the weights that read it). A TSRA after the group splits the units into two subspaces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(eq=False)
class Slot:
    """Tensor `getattr(module, name)` (parameter or buffer) whose axis `axis` indexes the units;
    unit u owns indices u*block .. u*block+block-1 (block > 1: attention heads, or a conv
    feeding a flattened linear)."""
    module: nn.Module
    name: str
    axis: int
    block: int = 1

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.name)

    @property
    def units(self) -> int:
        return self.tensor.shape[self.axis] // self.block

    def index(self, units: Tensor) -> Tensor:
        """Indices along `axis` owned by the unit indices `units` (LongTensor, in that order)."""
        units = units.to(torch.long)
        if self.block == 1:
            return units
        return (units[:, None] * self.block + torch.arange(self.block)).reshape(-1)


@dataclass(eq=False)
class UnitGroup:
    """One prunable unit axis. `activation`: the module whose output is the group's post-
    activation (statistics hooks attach there; TSRA modules fuse them); `act_dim`: its unit axis."""
    name: str
    producers: list[Slot]
    consumers: list[Slot] = field(default_factory=list)
    norms: list[Slot] = field(default_factory=list)
    tsra: list[nn.Module] = field(default_factory=list)
    activation: nn.Module | None = None
    act_dim: int = 1

    def __post_init__(self) -> None:
        if not self.producers:
            raise ValueError(f"producers: group {self.name!r} needs at least one producer slot")
        sizes = {s.units for s in self.producers + self.consumers + self.norms}
        if len(sizes) != 1:
            raise ValueError(f"group {self.name!r}: slots disagree on the number of units {sorted(sizes)}")

    @property
    def size(self) -> int:
        return self.producers[0].units

    @property
    def split(self) -> int | None:
        """The TSRA split (units below it form subspace U), or None without TSRA."""
        if not self.tsra:
            return None
        s = self.tsra[0].split
        return self.size // 2 if s is None else int(s)

    def subspaces(self) -> list[range]:
        """Index ranges of the TSRA subspaces (U then V), or one range without TSRA."""
        s = self.split
        if s is None:
            return [range(self.size)]
        return [range(0, s), range(s, self.size)]

    def producer_rows(self) -> Tensor:
        """(n, p) float tensor: every producer tensor's entries of each unit, concatenated
        (weights as flattened filters, biases as one extra column)."""
        cols = []
        for s in self.producers:
            t = s.tensor.detach().movedim(s.axis, 0)
            cols.append(t.reshape(self.size, -1))
        return torch.cat(cols, 1)

    def unit_features(self) -> Tensor:
        """(n, p): everything tied to each unit, concatenated: producer rows, norm parameters
        (not running statistics) and consumer columns moved to the unit axis (the clustering
        features of model folding, METHODS B.2)."""
        slots = self.producers + [s for s in self.norms if isinstance(s.tensor, torch.nn.Parameter)] \
            + self.consumers
        return torch.cat([s.tensor.detach().movedim(s.axis, 0).reshape(self.size, -1) for s in slots], 1)

    def producer_weight_rows(self) -> Tensor:
        """(n, p): the producers' weight tensors only (no biases), flattened per unit."""
        cols = [s.tensor.detach().movedim(s.axis, 0).reshape(self.size, -1)
                for s in self.producers if s.tensor.dim() > 1]
        return torch.cat(cols, 1) if cols else self.producer_rows()


def build_groups(model: nn.Module, example_input: Tensor | None = None) -> list[UnitGroup]:
    """The model's unit groups: its own `unit_groups()` when it declares them, else traced with
    Torch-Pruning's DependencyGraph (needs `example_input`)."""
    if hasattr(model, "unit_groups"):
        return list(model.unit_groups())
    if example_input is None:
        raise ValueError("example_input: needed to trace a model that does not declare unit_groups()")
    from secateur.pruning.tracing import trace_groups
    return trace_groups(model, example_input)
