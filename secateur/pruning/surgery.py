"""Physical surgery on a unit group: keep a subset of units, merge units linearly (folding,
change of basis), or rescale them (projective redistribution).

Every edit replaces `param.data` in place, so parameter identity (and the optimizer's param groups)
survive, and applies the same edit to every optimizer state tensor shaped like the parameter
(Adam `exp_avg`/`exp_avg_sq`, SGD `momentum_buffer`). Module size attributes and TSRA splits are
updated so the model rebuilds from its spec.

A parameter's gradient accumulator (the autograd node that adds gradients into `.grad`) caches the
parameter's shape, and PyTorch reuses it for as long as any autograd graph that saw the parameter
is alive (a traced graph waiting for the garbage collector, or last step's `loss`). `set_data`
drops that cache only when the dtype or device changes, so a shape change alone lets the next
backward fail with "invalid gradient ... got [4, 7] but expected [4, 10]". Each edit therefore
passes the parameter through an empty tensor of another dtype first, which drops the stale node.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from secateur.pruning.groups import Slot, UnitGroup

# module attribute that records a slot's size, by (role, attribute), for declared groups
_PRODUCER_ATTRS = ("out_features", "out_channels", "num_features", "normalized_shape")
_CONSUMER_ATTRS = ("in_features", "in_channels")


def _set_param_data(p: nn.Parameter, value: Tensor) -> None:
    """`p.data = value`, dropping the cached gradient accumulator when the shape changes (see the
    module docstring)."""
    if value.shape != p.shape:
        other = torch.float16 if p.dtype != torch.float16 else torch.float32
        p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = value


def _edit_slot(slot: Slot, edit: Callable[[Tensor, bool], Tensor],
               optimizer: torch.optim.Optimizer | None) -> None:
    """Apply `edit(tensor, is_second_moment)` to the slot's tensor, its grad and its optimizer state."""
    t = slot.tensor
    old_shape = t.shape
    if isinstance(t, nn.Parameter):
        _set_param_data(t, edit(t.data, False).contiguous())
        if t.grad is not None:
            t.grad = edit(t.grad, False).contiguous()
        if optimizer is not None and t in optimizer.state:
            st = optimizer.state[t]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and v.shape == old_shape:
                    st[k] = edit(v, k in ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")).contiguous()
    else:
        slot.module._buffers[slot.name] = edit(t, False).contiguous()


def _sync_sizes(group: UnitGroup) -> None:
    if group.modules:       # traced groups: the layer registry knows every module's attributes
        from secateur.pruning.layers import layer_kind
        for m in group.modules:
            kind = layer_kind(m)
            if not isinstance(kind, str):
                kind.sync(m)
        for t in group.tsra:
            if hasattr(t, "reset_stats"):
                t.reset_stats()
        return
    for s in group.producers + group.norms:
        n = s.tensor.shape[s.axis]
        for attr in _PRODUCER_ATTRS:
            if hasattr(s.module, attr) and not isinstance(getattr(s.module, attr), (tuple, list)):
                setattr(s.module, attr, n)
    for s in group.consumers:
        n = s.tensor.shape[s.axis]
        for attr in _CONSUMER_ATTRS:
            if hasattr(s.module, attr):
                setattr(s.module, attr, n)
    for t in group.tsra:
        if hasattr(t, "reset_stats"):
            t.reset_stats()


def _distinct(slots: list[Slot]) -> list[Slot]:
    """Slots on distinct tensor axes (a tied weight, e.g. input and output embeddings, is one
    tensor reached through two modules: it is cut once)."""
    seen, out = set(), []
    for s in slots:
        t = s.tensor
        if t is None:
            continue
        key = (id(t), s.axis)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _check_keep(group: UnitGroup, keep: Tensor) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0:
        raise ValueError(f"keep: cannot remove every unit of group {group.name!r}")
    if keep.min() < 0 or keep.max() >= group.size or keep.unique().numel() != keep.numel():
        raise ValueError(f"keep: indices must be distinct and in [0, {group.size}) for group {group.name!r}")
    return keep.sort().values


def keep_units(group: UnitGroup, keep: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Shrink every tensor of `group` to the units `keep` (any order; kept in ascending order).
    Optimizer moments of the kept units are carried over unchanged. A TSRA's split becomes the
    number of kept units below the old split."""
    keep = _check_keep(group, keep)
    old_split = group.split
    removed = torch.tensor(sorted(set(range(group.size)) - set(keep.tolist())), dtype=torch.long)
    for slot in _distinct(group.producers + group.consumers + group.norms):
        idx = slot.drop(removed, keep)
        _edit_slot(slot, lambda t, _sq, s=slot, i=idx: t.index_select(s.axis, i.to(t.device)), optimizer)
    if old_split is not None:
        for t in group.tsra:
            t.split = int((keep < old_split).sum())
    group.origin = group.origin[keep]
    _sync_sizes(group)


def _apply_unit_map(t: Tensor, axis: int, table: Tensor, m: Tensor, second_moment: bool,
                    survive: Tensor) -> Tensor:
    """Map the units of `t` by matrix m (new_units, old_units): the entries of new unit j are
    sum_i m[j, i] * (entries of old unit i); they are written where old unit j's entries were,
    then only the positions `survive` are kept (entries of no unit of this group pass unchanged).
    `table` (old_units, k): each old unit's indices on `axis`. Second moments (Adam's exp_avg_sq)
    map with |m|^2 so they stay non-negative."""
    mm = m.square() if second_moment else m
    x = t.movedim(axis, 0)
    rest = x.shape[1:]
    n, k = table.shape
    units = x[table.reshape(-1).to(x.device)].reshape(n, k, -1)
    y = torch.einsum("ji,ibp->jbp", mm.to(x.dtype).to(x.device), units)
    out = x.clone()
    out[table[:m.shape[0]].reshape(-1).to(x.device)] = y.reshape((m.shape[0] * k,) + tuple(rest))
    return out.index_select(0, survive.to(x.device)).movedim(0, axis)


def merge_units(group: UnitGroup, producer_map: Tensor, consumer_map: Tensor,
                optimizer: torch.optim.Optimizer | None = None, split: int | None = None) -> None:
    """Replace the group's n units by k linear combinations of them.

    producer_map (k, n): new producer row j = sum_i producer_map[j, i] * old row i (norm entries too).
    consumer_map (n, k): new consumer column j = sum_i old column i * consumer_map[i, j].
    Folding uses the cluster mean for producers and the cluster sum for consumers; a change of
    basis uses R and R^T (k = n). `split` sets the new TSRA split (default: unchanged when k = n)."""
    n = group.size
    k = producer_map.shape[0]
    if producer_map.shape != (k, n):
        raise ValueError(f"producer_map: expected shape (k, {n}), got {tuple(producer_map.shape)}")
    if consumer_map.shape != (n, k):
        raise ValueError(f"consumer_map: expected shape ({n}, {k}), got {tuple(consumer_map.shape)}")
    if k < 1:
        raise ValueError("producer_map: must keep at least one unit")
    ct = consumer_map.t()
    removed, kept = torch.arange(k, n), torch.arange(k)
    for slot in _distinct(group.producers + group.norms + group.consumers):
        m = ct if any(slot is c for c in group.consumers) else producer_map
        table = slot.table()
        survive = slot.drop(removed, kept)
        _edit_slot(slot, lambda t, sq, s=slot, tb=table, mm=m, sv=survive:
                   _apply_unit_map(t, s.axis, tb, mm, sq, sv), optimizer)
    if group.tsra:
        if split is None and k != n:
            raise ValueError("split: required when a merge changes the width of a TSRA group")
        if split is not None:
            if not 0 <= split <= k:
                raise ValueError(f"split: must be in [0, {k}], got {split}")
            for t in group.tsra:
                t.split = int(split)
    group.origin = group.origin[kept]     # merged unit j sits where unit j's entries were
    _sync_sizes(group)


def rescale_units(group: UnitGroup, producer_scale: Tensor | None = None,
                  bias_scale: Tensor | None = None, consumer_scale: Tensor | None = None,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """Per-unit rescaling: producer weight rows by producer_scale (n,), producer biases (1-d
    producer tensors) by bias_scale (n,), consumer columns by consumer_scale (n,). None = 1.
    Optimizer first moments scale like the weights, second moments by the square."""
    n = group.size
    for name, s in (("producer_scale", producer_scale), ("bias_scale", bias_scale),
                    ("consumer_scale", consumer_scale)):
        if s is not None and s.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(s.shape)}")

    def scaler(slot: Slot, scale: Tensor):
        idx = slot.table().reshape(-1)
        per = scale.repeat_interleave(slot.per_unit)

        def edit(t: Tensor, sq: bool) -> Tensor:
            v = torch.ones(t.shape[slot.axis], dtype=torch.float64)
            v[idx] = per.double()
            v = (v.square() if sq else v).to(t.dtype).to(t.device)
            shape = [1] * t.dim()
            shape[slot.axis] = -1
            return t * v.reshape(shape)
        return edit

    for slot in group.producers:
        scale = bias_scale if slot.tensor.dim() == 1 else producer_scale
        if scale is not None:
            _edit_slot(slot, scaler(slot, scale), optimizer)
    if consumer_scale is not None:
        for slot in group.consumers:
            _edit_slot(slot, scaler(slot, consumer_scale), optimizer)
