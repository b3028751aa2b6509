"""Unit groups: which tensors, on which axes, share one prunable unit axis.

A unit is an output channel / hidden neuron / attention head. Removing unit u removes its
producer rows (weights and biases that compute it), its norm entries, and its consumer columns
(the weights that read it). A TSRA after the group splits the units into two subspaces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn


class AxisMap:
    """Which of one tensor axis's original positions are still alive. Every Slot on that axis
    (in any group: the two branches of a concatenation, say) shares one AxisMap, so a cut made
    through one group moves the current positions the others see."""

    def __init__(self, length: int) -> None:
        self.alive = torch.ones(length, dtype=torch.bool)

    def positions(self) -> Tensor:
        """(length,) current position of each original index (meaningless where dead)."""
        return torch.cumsum(self.alive.to(torch.long), 0) - 1


@dataclass(eq=False)
class Slot:
    """Tensor `getattr(module, name)` (parameter or buffer) whose axis `axis` indexes the units.

    Two ways to say which indices a unit owns: `block` (unit u owns u*block .. u*block+block-1,
    and the axis holds nothing else: attention heads, a conv feeding a flattened linear), or an
    explicit table `orig` (units, k) of original indices on an `axis_map` shared by every slot on
    that tensor axis (concatenation offsets, fused q/k/v rows, chunk interleave, GQA groups); the
    axis may then hold indices owned by other groups, which a cut leaves in place."""
    module: nn.Module
    name: str
    axis: int
    block: int = 1
    orig: Tensor | None = None
    axis_map: AxisMap | None = None

    def __post_init__(self) -> None:
        if self.orig is not None:
            self.orig = torch.as_tensor(self.orig, dtype=torch.long)
            if self.orig.dim() != 2:
                raise ValueError(f"orig: expected a (units, k) index table, got shape {tuple(self.orig.shape)}")
            if self.axis_map is None:
                self.axis_map = AxisMap(self.tensor.shape[self.axis])

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.name)

    @property
    def units(self) -> int:
        if self.orig is not None:
            return self.orig.shape[0]
        t = self.tensor     # a ZeRO-3 partitioned parameter is empty; ds_shape is its whole shape
        return tuple(getattr(t, "ds_shape", t.shape))[self.axis] // self.block

    @property
    def per_unit(self) -> int:
        """Indices each unit owns on the axis."""
        return self.orig.shape[1] if self.orig is not None else self.block

    def table(self) -> Tensor:
        """(units, per_unit) current indices owned by each unit."""
        if self.orig is None:
            return torch.arange(self.units * self.block).reshape(self.units, self.block)
        return self.axis_map.positions()[self.orig]

    def index(self, units: Tensor) -> Tensor:
        """Indices along `axis` owned by the unit indices `units` (LongTensor, in that order)."""
        units = torch.as_tensor(units, dtype=torch.long)
        if self.orig is None and self.block == 1:
            return units
        return self.table()[units].reshape(-1)

    def unit_view(self, t: Tensor | None = None, first: int | None = None) -> Tensor:
        """(units, per_unit * rest): the entries of `t` (default: the tensor) each unit owns
        (only the first `first` indices of each unit when given)."""
        t = self.tensor.detach() if t is None else t
        x = t.movedim(self.axis, 0)
        if self.orig is not None or first is not None:
            table = self.table() if first is None else self.table()[:, :first]
            x = x[table.reshape(-1).to(x.device)]
        return x.reshape(self.units, -1)

    def drop(self, removed: Tensor, keep: Tensor) -> Tensor:
        """Positions along the axis that survive removing the units `removed`; records the cut
        (the shared axis map and this slot's table keep only the units `keep`)."""
        length = self.tensor.shape[self.axis]
        gone = self.index(removed)
        mask = torch.ones(length, dtype=torch.bool)
        mask[gone] = False
        if self.orig is not None:
            self.axis_map.alive[self.orig[removed].reshape(-1)] = False
            self.orig = self.orig[keep]
        return torch.nonzero(mask).reshape(-1)


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
    # traced groups: statistics read the input of `act_slot`'s module (a consumer), or the output of
    # `activation` when act_slot is None; `modules` are every module whose size attributes follow
    act_slot: Slot | None = None
    modules: list[nn.Module] = field(default_factory=list)
    # attention heads: (slot, n) whose first n indices per unit are the unit's query and key rows
    qk: list[tuple[Slot, int]] = field(default_factory=list)
    # original index (at construction) of each current unit; the surgery keeps it up to date, so a
    # pruned structure can be recorded and replayed on a freshly built model (`pruning.structure`)
    origin: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.producers:
            raise ValueError(f"producers: group {self.name!r} needs at least one producer slot")
        sizes = {s.units for s in self.producers + self.consumers + self.norms}
        if len(sizes) != 1:
            raise ValueError(f"group {self.name!r}: slots disagree on the number of units {sorted(sizes)}")
        if self.origin is None:
            self.origin = torch.arange(self.size)

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

    # ---- where the statistics criteria look ------------------------------------------------------
    def watch(self, fn: Any) -> Any:
        """Call `fn(x, dim)` on every forward with the tensor whose axis `dim` carries the group's
        channels: the input of `act_slot`'s module (a consumer) for traced groups, else the output of
        `activation`. Returns the hook handle."""
        if self.act_slot is not None:
            from secateur.pruning.tracing import act_dim
            d = act_dim(self.act_slot.module)
            return self.act_slot.module.register_forward_pre_hook(lambda mod, inp: fn(inp[0], d))
        if self.activation is None:
            raise ValueError(f"criterion: group {self.name!r} has no activation module to observe")
        return self.activation.register_forward_hook(lambda mod, inp, out: fn(out, self.act_dim))

    @property
    def observable(self) -> bool:
        return self.act_slot is not None or self.activation is not None

    def channel_table(self) -> Tensor:
        """(units, k): the observed channels (see `watch`) each unit owns."""
        if self.act_slot is not None:
            return self.act_slot.table()
        blocks = max(s.block for s in self.producers)
        return torch.arange(self.size * blocks).reshape(self.size, blocks)

    def channel_width(self) -> int:
        """Number of channels on the observed axis (see `watch`)."""
        if self.act_slot is not None:
            return self.act_slot.tensor.shape[self.act_slot.axis]
        return self.size * max(s.block for s in self.producers)

    def to_units(self, per_channel: Tensor) -> Tensor:
        """(..., W) per observed channel -> (..., units): summed over each unit's channels."""
        return per_channel[..., self.channel_table().reshape(-1).to(per_channel.device)] \
            .reshape(per_channel.shape[:-1] + (self.size, -1)).sum(-1)

    def producer_rows(self) -> Tensor:
        """(n, p) float tensor: every producer tensor's entries of each unit, concatenated
        (weights as flattened filters, biases as one extra column)."""
        return torch.cat([s.unit_view() for s in self.producers], 1)

    def unit_features(self) -> Tensor:
        """(n, p): everything tied to each unit, concatenated: producer rows, norm parameters
        (not running statistics) and consumer columns moved to the unit axis (the clustering
        features of model folding, METHODS B.2)."""
        slots = self.producers + [s for s in self.norms if isinstance(s.tensor, torch.nn.Parameter)] \
            + self.consumers
        return torch.cat([s.unit_view() for s in slots], 1)

    def qk_rows(self) -> Tensor:
        """(heads, p): each head unit's query and key weight rows, flattened (the joint query-key
        rows of METHODS C.4, taken per whole head)."""
        return torch.cat([s.unit_view(first=n) for s, n in self.qk], 1)

    def producer_weight_rows(self) -> Tensor:
        """(n, p): the producers' weight tensors only (no biases), flattened per unit."""
        cols = [s.unit_view() for s in self.producers if s.tensor.dim() > 1]
        return torch.cat(cols, 1) if cols else self.producer_rows()


def build_groups(model: nn.Module, example_input: Any = None,
                 ignored_layers: Sequence[nn.Module] = (), verify: bool = True) -> list[UnitGroup]:
    """The model's unit groups: its own `unit_groups()` when it declares them, else traced with
    Torch-Pruning's DependencyGraph (needs `example_input`). Wrappers (DDP, DataParallel, a
    DeepSpeed engine) are looked through."""
    from secateur.pruning.tracing import trace_groups, unwrap
    inner = unwrap(model)
    if hasattr(inner, "unit_groups"):
        ignored = {id(m) for m in ignored_layers}
        return [g for g in inner.unit_groups()
                if not any(id(s.module) in ignored for s in g.producers)]
    if example_input is None:
        raise ValueError("example_input: needed to trace a model that does not declare unit_groups()")
    return trace_groups(inner, example_input, ignored_layers, verify=verify)


UNIT_KINDS = ("channels", "heads", "mlp", "hidden")


def unit_kind(group: UnitGroup) -> str:
    """What a group's units are, in the words users pick them by (`Pruner(unit_kinds=...)`):
    "heads" (attention heads), "channels" (produced by a convolution), "hidden" (a stream read
    through embeddings or layer/RMS norms: a transformer's residual width), else "mlp" (neurons
    between linear layers)."""
    from secateur.pruning.attention import attention_spec
    from secateur.pruning.layers import channelwise
    if group.qk:
        return "heads"
    for m in group.modules:       # heads whose output projection lies outside the module (BERT)
        spec = attention_spec(m)
        if spec is not None:
            projs = {id(spec.proj(c)) for c in (spec.q, spec.k, spec.v, spec.qkv) if c is not None}
            if any(id(s.module) in projs and s.name == "weight" for s in group.producers):
                return "heads"
    if any(isinstance(s.module, nn.modules.conv._ConvNd) for s in group.producers):
        return "channels"
    layer_norms = (nn.LayerNorm, nn.RMSNorm, nn.Embedding)
    if any(isinstance(s.module, layer_norms) or (channelwise(s.module) and s.module.weight.dim() == 1
                                                  and "norm" in type(s.module).__name__.lower())
           for s in group.producers + group.consumers + group.norms):
        return "hidden"
    return "mlp"


def _block(name: str) -> str | None:
    """The numbered layer a module name lies in ("model.layers.3.self_attn.q_proj" ->
    "model.layers.3"), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i + 1])
    return None


def unit_kinds(model: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, str]:
    """`unit_kind` of every group, refined with the model's module names: in a model with attention,
    neurons between linear layers are "mlp" only inside a transformer block (a numbered layer that
    holds attention heads); elsewhere (a pooler before the classifier) they count as "hidden"."""
    names = {id(m): n for n, m in model.named_modules()}
    kinds = {g.name: unit_kind(g) for g in groups}
    blocks = {_block(names.get(id(s.module), "")) for g in groups if kinds[g.name] == "heads"
              for s in g.producers} - {None}
    if blocks:
        for g in groups:
            if kinds[g.name] == "mlp" and _block(names.get(id(g.producers[0].module), "")) not in blocks:
                kinds[g.name] = "hidden"
    return kinds
