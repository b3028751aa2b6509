"""Unit groups of an arbitrary model, traced with Torch-Pruning's DependencyGraph.

Torch-Pruning follows autograd nodes and maps channel indices through concatenation, split,
chunk and reshape ("root indices": which channel of the group's root layer an index came from).
This module turns each of its groups into a UnitGroup with explicit index tables:

- a unit is a connected set of root channels: two root channels that reach the same index of any
  tensor (a SwiGLU gate row and up row read by one down column), the channels of one GroupNorm
  group, or the channels of one attention head, are one unit;
- every tensor a unit touches gets a table (units, k) of the indices it owns (`Slot.orig`); all
  slots on one tensor axis share an AxisMap, so cuts in one group move the indices others see;
- the layer registry (`layers.py`) says which tensors each module kind slices on which axis.

Attention modules and per-channel custom modules (LlamaRMSNorm) are traced as one opaque node
each (a pass-through autograd Function wraps their output during the trace), so their internal
reshapes and matmuls do not leak channel-level couplings; attention heads become their own
groups. secateur's TSRA and RMSNorm2d are single autograd Functions already.

Groups that reach the model's outputs are never pruned; a group that touches a module the
registry cannot handle is left unpruned with a warning naming the module. The trace's autograd
graph is released before returning: nothing here keeps a reference to it.
"""
from __future__ import annotations

import gc
import warnings
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from secateur.kernels import TSRA
from secateur.pruning.attention import attention_spec
from secateur.pruning.groups import AxisMap, Slot, UnitGroup
from secateur.pruning.layers import channelwise, layer_kind


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel or a DeepSpeed engine."""
    while isinstance(getattr(model, "module", None), nn.Module) and (
            isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            or type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine")):
        model = model.module
    return model


class _Opaque(torch.autograd.Function):
    """y = out, with a gradient edge only to `x`: the tracer sees one node from x to y."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        return None, None


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for a in list(args) + [kwargs.get(k) for k in ("hidden_states", "x", "query", "input")]:
        if isinstance(a, Tensor) and a.is_floating_point():
            return a
    return None


def _detached(obj: Any, memo: dict | None = None) -> Any:
    """`obj` with every tensor detached; one tensor passed twice (self-attention's query, key and
    value) stays one object."""
    memo = {} if memo is None else memo
    if isinstance(obj, Tensor):
        return memo.setdefault(id(obj), obj.detach())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v, memo) for k, v in obj.items()}
    return obj


def _opaque_forward(m: nn.Module, calls: dict | None = None):
    orig = m.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if calls is not None and m not in calls:      # one real call, replayed by the trials
            memo: dict = {}
            calls[m] = (_detached(args, memo), _detached(kwargs, memo))
        x = _first_tensor(args, kwargs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if x is None or not isinstance(first, Tensor) or not x.requires_grad:
            return out
        y = _Opaque.apply(x, first.detach())
        if isinstance(out, tuple):
            return (y,) + tuple(out[1:])
        if isinstance(out, list):
            return [y] + list(out[1:])
        return y
    return forward


def _tp_pruner(coupled: bool, width_out, width_in):
    """A Torch-Pruning layer pruner that only reports widths (secateur's surgery does the cut)."""
    import torch_pruning as tp

    def _never(self: Any, layer: nn.Module, idxs: Any) -> None:
        raise RuntimeError("secateur cuts through its own surgery")

    class _Widths(tp.pruner.function.BasePruningFunc):
        # the graph links in and out channels when both are one function (norms, pass-through)
        prune_out_channels = _never
        prune_in_channels = _never if coupled else (lambda self, layer, idxs: _never(self, layer, idxs))

        def get_out_channels(self, layer):
            return width_out(layer)

        def get_in_channels(self, layer):
            return width_in(layer)
    return _Widths()


def _complete(tg: Any) -> dict:
    """{dependency: [(index, root index)]} for every item of a Torch-Pruning group, with the pairs
    its propagation skipped: it visits a node once per index set, so a node reached again with
    the same indices from other roots (the product of a SwiGLU's gate and up halves) keeps only
    the first roots. One more step from every item restores them."""
    from torch_pruning._helpers import _HybridIndex
    found: dict[Any, set] = {}
    by_target: dict[tuple[int, Any], Any] = {}
    for it in tg.items:
        found.setdefault(it.dep, set()).update(zip(it.idxs, it.root_idxs))
        by_target[(id(it.dep.target), it.dep.handler)] = it.dep
    for it in tg.items:
        hybrid = [_HybridIndex(i, r) for i, r in zip(it.idxs, it.root_idxs)]
        for nd in it.dep.target.dependencies:
            if not nd.is_triggered_by(it.dep.handler):
                continue
            key = (id(nd.target), nd.handler)
            if key not in by_target:
                continue
            mapped = hybrid
            for mapping in nd.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            found[by_target[key]].update((h.idx, h.root_idx) for h in mapped
                                         if isinstance(h, _HybridIndex))
    return {d: sorted(p) for d, p in found.items()}


def _resolve(m: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    if "." not in dotted:
        return m, dotted
    path, name = dotted.rsplit(".", 1)
    return m.get_submodule(path), name


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.p = list(range(n))

    def find(self, a: int) -> int:
        while self.p[a] != a:
            self.p[a] = self.p[self.p[a]]
            a = self.p[a]
        return a

    def union(self, items: Iterable[int]) -> None:
        items = list(items)
        for b in items[1:]:
            ra, rb = self.find(items[0]), self.find(b)
            if ra != rb:
                self.p[max(ra, rb)] = min(ra, rb)


class _Refused(Exception):
    pass


class _Tracer:
    def __init__(self, model: nn.Module, example_input: Any, ignored: Sequence[nn.Module]) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.ignored = set(id(m) for m in ignored)
        self.owner: dict[int, tuple[nn.Module, str]] = {}
        for mod in model.modules():
            for n, p in mod._parameters.items():
                if p is not None:
                    self.owner.setdefault(id(p), (mod, n))
        self.axis_maps: dict[tuple[int, int], AxisMap] = {}
        self.warned: set[str] = set()
        self.example_input = example_input

    def name(self, m: Any) -> str:
        return self.names.get(m, type(m).__name__)

    def warn(self, msg: str) -> None:
        if msg not in self.warned:
            self.warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def axis_map(self, t: Tensor, axis: int) -> AxisMap:
        key = (id(t), axis)
        if key not in self.axis_maps:
            self.axis_maps[key] = AxisMap(t.shape[axis])
        return self.axis_maps[key]

    # ---- the trace ----------------------------------------------------------------------------
    def trace(self) -> list[UnitGroup]:
        import torch_pruning as tp

        model = self.model
        special: dict[type, Any] = {}
        patched: list[nn.Module] = []
        self.attn: list[nn.Module] = []
        for m in model.modules():
            kind = layer_kind(m)
            if isinstance(kind, str):
                if isinstance(m, nn.MultiheadAttention):
                    patched.append(m)
                continue
            if kind.attention is not None:
                self.attn.append(m)
                patched.append(m)
                special[type(m)] = _tp_pruner(False, lambda l: _layer_width(l, "out"),
                                              lambda l: _layer_width(l, "in"))
            elif (channelwise(m) and not isinstance(m, _TP_KNOWN)) or isinstance(m, getattr(nn, "RMSNorm", ())):
                patched.append(m)
                special[type(m)] = _tp_pruner(True, lambda l: _layer_width(l, "out"),
                                              lambda l: _layer_width(l, "out"))
            elif type(m).__name__ == "Conv1D":
                special[type(m)] = _tp_pruner(False, lambda l: l.weight.shape[1], lambda l: l.weight.shape[0])

        by_grad_fn: dict[Any, nn.Module] = {}

        def record(mod: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.grad_fn is not None:
                by_grad_fn[out.grad_fn] = mod

        outputs: list[Any] = []

        def forward_fn(m: nn.Module, x: Any) -> Any:
            # Torch-Pruning switches to eval(); trace in the user's mode instead, so branches
            # that only run in training (Inception's auxiliary heads) are seen
            for mod, t in modes.items():
                mod.training = t
            if isinstance(x, dict):
                out = m(**x)
            elif isinstance(x, (tuple, list)):
                out = m(*x)
            else:
                out = m(x)
            flat = [o for o in tp.utils.flatten_as_list(out) if isinstance(o, Tensor)
                    and o.is_floating_point() and o.grad_fn is not None]
            outputs.extend(o.grad_fn for o in flat)
            return flat

        # GLU halves its input's channels; traced as chunk + product, the halves couple unit-wise
        glu = torch.nn.functional.glu

        def glu_as_chunks(x: Tensor, dim: int = -1) -> Tensor:
            a, b = x.chunk(2, dim)
            return a * torch.sigmoid(b)

        modes = {m: m.training for m in model.modules()}
        buffers = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
                   if not isinstance(v, nn.Parameter) and torch.is_tensor(v)}
        rng = torch.get_rng_state()
        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(record) for m in leaves]
        self.calls: dict[nn.Module, tuple] = {}
        for m in patched:
            m.forward = _opaque_forward(m, self.calls if m in self.attn else None)
        torch.nn.functional.glu = glu_as_chunks
        from torch_pruning.dependency import index_mapping
        reshape_mapping = index_mapping.update_reshape_index_mapping
        self.unmapped: set[int] = set()

        def guarded_reshape_mapping(graph: Any, node: Any) -> Any:
            try:
                return reshape_mapping(graph, node)
            except Exception:  # noqa: BLE001 - a reshape it cannot map: its groups stay unpruned
                self.unmapped.add(id(node))

        index_mapping.update_reshape_index_mapping = guarded_reshape_mapping
        try:
            with torch.enable_grad():
                graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=self.example_input, forward_fn=forward_fn,
                    customized_pruners=special, verbose=False)
            self.unmapped |= _channel_shuffles(graph)
            roots = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding) + tuple(special)
            tp_groups = self.all_groups(graph, roots)
            self.output_fns = set(outputs)
            self.by_grad_fn = by_grad_fn
            self.attn_ok = {m: _attention_trials(m, self.calls.get(m)) for m in self.attn}
            groups = [g for g in (self.convert(graph, tg) for tg in tp_groups) if g is not None]
            groups += [g for g in (self.head_group(m) for m in self.attn) if g is not None]
            groups = self.merge_shared(groups)
            _attach_qk(groups)
        finally:
            torch.nn.functional.glu = glu
            index_mapping.update_reshape_index_mapping = reshape_mapping
            for h in hooks:
                h.remove()
            for m in patched:
                m.__dict__.pop("forward", None)
            for m, t in modes.items():
                m.training = t
            with torch.no_grad():       # the trace's forward must leave no trace (BN statistics)
                for k, v in model.state_dict(keep_vars=True).items():
                    if k in buffers and torch.is_tensor(v) and v.shape == buffers[k].shape:
                        v.copy_(buffers[k])
            torch.set_rng_state(rng)
            # release the traced autograd graph now (Torch-Pruning's nodes form reference cycles)
            graph = tp_groups = outputs = by_grad_fn = self.calls = None
            self.output_fns = self.by_grad_fn = None
            gc.collect()
        return groups

    def all_groups(self, graph: Any, roots: tuple) -> list:
        """Torch-Pruning's groups, one per root layer's output (as its get_all_groups), each search
        bounded: on some block-partition reshapes (MaxViT) its index propagation grows without
        end; such a group is left unpruned with a warning instead of hanging."""
        from torch_pruning.dependency.group import Group
        add_dep = Group.add_dep
        budget = {"entries": 0}

        def bounded(group: Any, dep: Any, idxs: Any) -> Any:
            budget["entries"] += len(idxs)
            if budget["entries"] > budget["limit"]:
                raise _Refused("the dependency search exceeded its budget "
                               f"({budget['limit']:,} index entries)")
            return add_dep(group, dep, idxs)

        out, visited = [], set()
        Group.add_dep = bounded
        try:
            for m in list(graph.module2node):
                if not isinstance(m, roots) or m in visited or id(m) in self.ignored:
                    continue
                pr = graph.get_pruner_of_module(m)
                n = pr.get_out_channels(m) if pr is not None else None
                if not n:
                    continue
                # a group visits each node about once with at most the root's channels (times a
                # reshape's block); 4x that bound, deterministic, so every rank decides alike
                budget["entries"] = 0
                budget["limit"] = max(1_000_000, 4 * len(graph.module2node) * n)
                try:
                    g = graph.get_pruning_group(m, pr.prune_out_channels, list(range(n)))
                except Exception as e:  # noqa: BLE001 - its index mapping failed on this group
                    visited.add(m)
                    why = e if isinstance(e, _Refused) else \
                        f"Torch-Pruning's index mapping failed ({type(e).__name__}: {e})"
                    self.warn(f"pruning: group of {self.name(m)!r} left unpruned: {why}")
                    continue
                for dep, _ in g:
                    if graph.is_out_channel_pruning_fn(dep.handler):
                        visited.add(dep.target.module)
                out.append(g)
        finally:
            Group.add_dep = add_dep
        return out

    # ---- conversion ---------------------------------------------------------------------------
    def convert(self, graph: Any, tg: Any) -> UnitGroup | None:
        root_mod = tg.items[0].dep.target.module
        try:
            return self._convert(graph, tg)
        except _Refused as e:
            msg = str(e)
            if msg:
                self.warn(f"pruning: group of {self.name(root_mod)!r} left unpruned: {msg}")
            return None

    def _convert(self, graph: Any, tg: Any) -> UnitGroup:
        from torch_pruning import ops
        entries: dict[tuple[int, int], dict] = {}
        ties: list[list[tuple[int, int]]] = []   # lists of (target, root) that must be one unit
        tsra: list[nn.Module] = []
        modules: list[nn.Module] = []
        n_roots = 1 + max(max(it.root_idxs) for it in tg.items if len(it.root_idxs))
        for dep, pairs in _complete(tg).items():
            idxs, roots = [p[0] for p in pairs], [p[1] for p in pairs]
            node, mod = dep.target, dep.target.module
            if id(node) in self.unmapped:
                raise _Refused("it passes a reshape that permutes channels (a channel shuffle) or "
                               "that Torch-Pruning cannot map")
            out_side = graph.is_out_channel_pruning_fn(dep.handler)
            if isinstance(mod, ops._OutputOp):
                raise _Refused("")                       # reaches the model's output
            if out_side and getattr(node, "grad_fn", None) in self.output_fns:
                raise _Refused("")
            if isinstance(mod, nn.Parameter):
                self._add_param(mod, node, idxs, roots, entries)
                continue
            if not isinstance(mod, nn.Module) or type(mod).__module__.startswith("torch_pruning"):
                m = self.by_grad_fn.get(getattr(node, "grad_fn", None))
                if isinstance(m, TSRA) and m not in tsra:
                    tsra.append(m)
                if isinstance(mod, (ops._ElementWiseOp, ops._ConcatOp, ops._SplitOp)):
                    # one channel of one op's tensor reached from two roots: one unit
                    # (the gate and up halves of a SwiGLU meet at the product)
                    by_target = defaultdict(list)
                    for i, r in zip(idxs, roots):
                        by_target[i].append((i, r))
                    ties += [v for v in by_target.values() if len(v) > 1]
                continue
            if id(mod) in self.ignored and out_side:
                raise _Refused("")
            kind = layer_kind(mod)
            if isinstance(kind, str):
                raise _Refused(f"{self.name(mod)} ({type(mod).__name__}): {kind}")
            modules.append(mod)
            side = "out" if out_side else "in"
            if kind.attention is not None:
                spec = kind.attention
                why = self.attn_ok[mod].get("heads" if side == "out" and spec.o is None else side)
                if why:
                    raise _Refused(f"{self.name(mod)} ({type(mod).__name__}): {why}")
                if side == "out" and spec.o is None:
                    if spec.n_heads != spec.n_kv_heads:
                        raise _Refused(f"{self.name(mod)}: grouped-query attention with its output "
                                       "projection outside the module")
                    per = spec.context_units().shape[1]
                    ties += [[(i, r) for i, r in zip(idxs, roots) if i // per == h]
                             for h in range(spec.n_heads)]
                    for sub in {n.split(".")[0] for n, _ in spec.out_axes()}:
                        modules.append(spec.proj(sub))
                for dotted, axis in (spec.out_axes() if side == "out" else spec.in_axes()):
                    owner, name = _resolve(mod, dotted)
                    if getattr(owner, name, None) is None:
                        continue
                    role = "producer" if side == "out" else "consumer"
                    self._add(owner, name, axis, idxs, roots, role, entries)
                    modules.append(owner)
                continue
            axes = kind.out if (side == "out" or kind.coupled) else kind.inp
            if side == "in" and not kind.coupled and not kind.inp:
                raise _Refused(f"{self.name(mod)} ({type(mod).__name__}) has no input axis to cut")
            role = kind.role if kind.role == "norm" else ("producer" if side == "out" else "consumer")
            for name, axis in axes:
                if getattr(mod, name, None) is not None:
                    self._add(mod, name, axis, idxs, roots, role, entries)
            if kind.tie > 1:
                blocks = defaultdict(list)
                for i, r in zip(idxs, roots):
                    blocks[i // kind.tie].append((i, r))
                ties += list(blocks.values())
        return self._build(tg, entries, ties, n_roots, tsra, modules)

    def _add(self, mod: nn.Module, name: str, axis: int, idxs: list, roots: list, role: str,
             entries: dict) -> None:
        t = getattr(mod, name)
        key = (id(t), axis)
        e = entries.setdefault(key, {"module": mod, "name": name, "axis": axis, "pairs": set(),
                                     "role": role})
        if role == "producer":
            e["role"] = "producer"
        e["pairs"].update(zip(idxs, roots))

    def _add_param(self, p: nn.Parameter, node: Any, idxs: list, roots: list, entries: dict) -> None:
        if id(p) not in self.owner:
            raise _Refused("a parameter outside the model")
        mod, name = self.owner[id(p)]
        if not any(True for _ in mod.children()):      # a leaf module's own weight, unknown kind
            kind = layer_kind(mod)
            if isinstance(kind, str):
                raise _Refused(f"{self.name(mod)} ({type(mod).__name__}): {kind}")
        axis = node.pruning_dim if node.pruning_dim is not None else p.dim() - 1
        axis = axis % p.dim()
        self._add(mod, name, axis, idxs, roots, "norm", entries)

    def _build(self, tg: Any, entries: dict, ties: list, n_roots: int, tsra: list,
               modules: list) -> UnitGroup:
        uf = _UnionFind(n_roots)
        for e in entries.values():
            by_target = defaultdict(list)
            for i, r in e["pairs"]:
                by_target[i].append(r)
            for rs in by_target.values():
                uf.union(rs)
        for tie in ties:
            uf.union(r for _, r in tie)
        used = sorted({r for e in entries.values() for _, r in e["pairs"]})
        comp = defaultdict(list)
        for r in used:
            comp[uf.find(r)].append(r)
        units = sorted(comp.values(), key=min)
        unit_of = {r: u for u, rs in enumerate(units) for r in rs}
        producers, consumers, norms = [], [], []
        root_name = self.name(tg.items[0].dep.target.module)
        for e in entries.values():
            owned = defaultdict(set)
            for i, r in e["pairs"]:
                owned[unit_of[r]].add(i)
            if len(owned) != len(units) or len({len(v) for v in owned.values()}) != 1:
                raise _Refused(f"{self.name(e['module'])}.{e['name']}: units own irregular index sets")
            table = torch.tensor([sorted(owned[u]) for u in range(len(units))], dtype=torch.long)
            t = getattr(e["module"], e["name"])
            slot = Slot(e["module"], e["name"], e["axis"], orig=table,
                        axis_map=self.axis_map(t, e["axis"]))
            {"producer": producers, "consumer": consumers, "norm": norms}[e["role"]].append(slot)
        if not producers:
            raise _Refused("")
        for s in producers + consumers + norms:
            if (s.orig >= s.axis_map.alive.numel()).any() or not s.axis_map.alive.all():
                raise _Refused(f"{self.name(s.module)}.{s.name}: index outside its axis")
        uniq = []
        for m in modules:
            if all(m is not u for u in uniq):
                uniq.append(m)
        act = _act_slot(consumers)
        activation = tsra[0] if tsra else None
        return UnitGroup(name=root_name, producers=producers, consumers=consumers, norms=norms,
                         tsra=tsra, activation=activation, act_dim=1,
                         act_slot=None if tsra else act, modules=uniq)

    # ---- groups that share a tensor axis (tied weights) -------------------------------------------
    def merge_shared(self, groups: list[UnitGroup]) -> list[UnitGroup]:
        """Merge groups that cut the same tensor axis: a weight tied between two layers (a masked-LM
        decoder sharing the input embedding) couples the hidden width before and after it. Units
        that own a common index become one unit; a merge that leaves irregular units leaves both
        groups unpruned with a warning."""
        while True:
            owner: dict[tuple[int, int, int], int] = {}
            pair = None
            for gi, g in enumerate(groups):
                for sl in g.producers + g.consumers + g.norms:
                    idx = sl.orig.reshape(-1).tolist() if sl.orig is not None else [-1]
                    for i in idx:     # the same index of the same tensor axis in two groups
                        key = (id(sl.tensor), sl.axis, i)
                        if owner.get(key, gi) != gi:
                            pair = (owner[key], gi)
                            break
                        owner[key] = gi
                    if pair:
                        break
                if pair:
                    break
            if pair is None:
                return groups
            a, b = groups[pair[0]], groups[pair[1]]
            try:
                merged = [self._merge_two(a, b)]
            except _Refused as e:
                self.warn(f"pruning: groups {a.name!r} and {b.name!r} left unpruned: {e}")
                merged = []
            groups = [g for i, g in enumerate(groups) if i not in pair] + merged

    def _merge_two(self, a: UnitGroup, b: UnitGroup) -> UnitGroup:
        if a.tsra or b.tsra:
            raise _Refused("they share a tied tensor and one has a TSRA")
        offset = a.size
        uf = _UnionFind(a.size + b.size)
        holders: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for base, g in ((0, a), (offset, b)):
            for sl in g.producers + g.consumers + g.norms:
                if sl.orig is None:
                    raise _Refused("a declared slot has no index table")
                for u in range(sl.units):
                    for i in sl.orig[u].tolist():
                        holders[(id(sl.tensor), sl.axis, i)].append(base + u)
        for us in holders.values():
            uf.union(us)
        comps = defaultdict(list)
        for u in range(a.size + b.size):
            comps[uf.find(u)].append(u)
        units = sorted(comps.values(), key=min)
        new: dict[tuple[int, int], Slot] = {}
        roles = {"producers": [], "consumers": [], "norms": []}
        for base, g in ((0, a), (offset, b)):
            for role in roles:
                for sl in getattr(g, role):
                    key = (id(sl.tensor), sl.axis)
                    if key in new:
                        continue
                    rows = []
                    for comp in units:
                        own = sorted({i for u in comp if base <= u < base + sl.units
                                      for i in sl.orig[u - base].tolist()})
                        rows.append(own)
                    if len({len(r) for r in rows}) != 1 or not rows[0]:
                        raise _Refused(f"{self.name(sl.module)}.{sl.name}: units own irregular index sets")
                    ns = Slot(sl.module, sl.name, sl.axis, orig=torch.tensor(rows), axis_map=sl.axis_map)
                    new[key] = ns
                    roles[role].append(ns)
        act = a.act_slot or b.act_slot
        act = new.get((id(act.tensor), act.axis)) if act is not None else None
        mods = list(a.modules) + [m for m in b.modules if all(m is not x for x in a.modules)]
        return UnitGroup(name=a.name, producers=roles["producers"], consumers=roles["consumers"],
                         norms=roles["norms"], act_slot=act, modules=mods)

    def head_group(self, m: nn.Module) -> UnitGroup | None:
        """The heads of an attention module whose output projection is inside it."""
        spec = attention_spec(m)
        if spec is None or spec.o is None:
            return None
        if self.attn_ok[m].get("heads"):
            self.warn(f"pruning: heads of {self.name(m)!r} ({type(m).__name__}) left unpruned: "
                      f"{self.attn_ok[m]['heads']}")
            return None
        producers, consumers, qk = [], [], []
        for child, name, axis, table in spec.head_slots():
            sub = spec.proj(child)
            t = getattr(sub, name)
            slot = Slot(sub, name, axis, orig=table, axis_map=self.axis_map(t, axis))
            (consumers if child == spec.o else producers).append(slot)
            if name == "weight" and child == spec.qkv:       # fused rows per unit: [q | k | v]
                qk.append((slot, table.shape[1] - spec.head_dim))
            elif name == "weight" and child in (spec.q, spec.k):
                qk.append((slot, table.shape[1]))
        mods = [m] + [spec.proj(c) for c in {s[0] for s in spec.head_slots()}]
        return UnitGroup(name=self.name(m), producers=producers, consumers=consumers,
                         act_slot=_act_slot(consumers), modules=mods, qk=qk)


def _attach_qk(groups: list[UnitGroup]) -> None:
    """Give head groups traced through the graph (BERT-style: the output projection lies outside
    the attention module, so `head_group` does not build them) their joint query-key rows: the
    unit rows of the separate query and key projections' weights (METHODS C.4)."""
    for g in groups:
        if g.qk:
            continue
        for m in g.modules:
            spec = attention_spec(m)
            if spec is None or spec.q is None or spec.k is None:
                continue
            wanted = [spec.proj(spec.q), spec.proj(spec.k)]
            slots = [next((s for s in g.producers if s.module is w and s.name == "weight"), None)
                     for w in wanted]
            if all(s is not None for s in slots):
                g.qk = [(s, s.per_unit) for s in slots]
                break


def _channel_shuffles(graph: Any) -> set[int]:
    """ids of reshape nodes in a split-transpose-merge pattern (ShuffleNet's channel shuffle): the
    reshapes look like flattens to Torch-Pruning and the transpose like an element-wise op, so the
    permutation of channels would be missed."""
    from torch_pruning import ops
    found: set[int] = set()

    def is_swap(node: Any) -> bool:
        name = node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""
        return "Transpose" in name or "Permute" in name

    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.RESHAPE:
            continue
        for mid in node.outputs:
            if is_swap(mid):
                for after in mid.outputs:
                    if after.type == ops.OPTYPE.RESHAPE:
                        found |= {id(node), id(mid), id(after)}
    return found


def _attention_trials(m: nn.Module, call: tuple | None) -> dict[str, str | None]:
    """Whether `m`'s forward still works with one head fewer ("heads"), one input channel fewer
    ("in") and one output channel fewer ("out"): each cut is made on a copy of the module and its
    recorded call replayed. {side: None if it works, else the reason}. An attention module whose
    forward ties its inner width to its input (nn.MultiheadAttention-like reshapes) or keeps
    per-head tables the registry does not know fails here, before any real cut."""
    import copy

    from secateur.pruning.surgery import keep_units
    if call is None:
        return {k: "it was not called in the traced forward" for k in ("heads", "in", "out")}
    args, kwargs = call
    # a key/value cache recorded in the trace was filled by that call: replay without it
    kwargs = {k: (None if "cache" in type(v).__name__.lower() else v) for k, v in kwargs.items()}
    args = tuple(None if "cache" in type(a).__name__.lower() else a for a in args)
    try:
        with torch.no_grad():
            ref = type(m).forward(m, *args, **kwargs)
    except Exception as e:  # noqa: BLE001
        why = f"its recorded call cannot be replayed ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        return {k: why for k in ("heads", "in", "out")}
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out: dict[str, str | None] = {}

    def attempt(side: str) -> str | None:
        c = copy.deepcopy(m)
        c.__dict__.pop("forward", None)       # the copy runs its own forward, not the traced one
        spec = attention_spec(c)
        a, kw = args, kwargs
        want = list(ref.shape)
        if side == "heads":
            if spec.n_kv_heads < 2:
                return "it has a single key/value head"
            if spec.o is not None:
                slots = [Slot(spec.proj(ch), n, ax, orig=t) for ch, n, ax, t in spec.head_slots()]
            else:
                table = spec.context_units()
                slots = [Slot(*_resolve(c, d), ax, orig=table) for d, ax in spec.out_axes()
                         if getattr(*_resolve(c, d)) is not None]
                want[-1] -= table.shape[1]
            keep_units(UnitGroup("trial", producers=slots, modules=[c] + list(c.children())),
                       torch.arange(spec.n_kv_heads - 1))
        else:
            axes = spec.in_axes() if side == "in" else spec.out_axes()
            for d, ax in axes:
                owner, name = _resolve(c, d)
                t = getattr(owner, name, None)
                if t is not None:
                    t.data = t.data.narrow(ax, 1, t.shape[ax] - 1).clone()
            for ch in [c] + list(c.children()):
                kind = layer_kind(ch)
                if not isinstance(kind, str):
                    kind.sync(ch)
            if side == "in":
                x = _first_tensor(args, kwargs)
                x2 = x[..., 1:]
                a = tuple(x2 if t is x else t for t in args)
                kw = {k: (x2 if v is x else v) for k, v in kwargs.items()}
            else:
                want[-1] -= 1
        try:
            with torch.no_grad():
                y = c(*a, **kw)
        except Exception as e:  # noqa: BLE001 - any failure means the cut is unsafe
            return f"its forward fails after the cut ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        y = y[0] if isinstance(y, (tuple, list)) else y
        if list(y.shape) != want:
            return f"its output has shape {tuple(y.shape)} after the cut, expected {tuple(want)}"
        return None

    for side in ("heads", "in", "out"):
        spec = attention_spec(m)
        if side == "out" and spec.o is None:
            continue
        out[side] = attempt(side)
    return out


_TP_KNOWN = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU,
             nn.modules.instancenorm._InstanceNorm, nn.Embedding, nn.Linear)


def _layer_width(m: nn.Module, side: str) -> int:
    kind = layer_kind(m)
    if isinstance(kind, str):
        return 0
    axes = kind.out if side == "out" else kind.inp
    for dotted, axis in axes:
        owner, name = _resolve(m, dotted)
        t = getattr(owner, name, None)
        if t is not None:
            return t.shape[axis]
    return 0


def _act_slot(consumers: list[Slot]) -> Slot | None:
    """The consumer whose input the statistics read: a dense layer (Linear, Conv1D, ungrouped conv)
    reading the units on its weight's input axis."""
    for s in consumers:
        if s.name != "weight":
            continue
        m = s.module
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or \
                (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1):
            return s
    return None


def act_dim(module: nn.Module) -> int:
    """Channel axis of `module`'s input: last for Linear / HF Conv1D, 1 for convolutions."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    import torch_pruning as tp
    return [tuple(o.shape) for o in tp.utils.flatten_as_list(out) if isinstance(o, Tensor)]


def verify_groups(model: nn.Module, groups: list[UnitGroup], example_input: Any,
                  warn: Any = None) -> list[UnitGroup]:
    """The groups whose cut leaves a working model: on a copy of the model, one unit of every
    group is removed and the example input replayed; the outputs must keep their shapes. A failing
    set is bisected to the groups at fault, which are dropped with a warning (a layout the tracer
    misread - a reshape or permutation it cannot see - never reaches the real model). Costs a copy
    of the model per trial; pass `verify=False` to the Pruner to skip it."""
    import copy

    rng = torch.get_rng_state()
    with torch.no_grad():
        want = _shapes(_call(model, example_input))

    def works(subset: list[int]) -> str | None:
        m2, gs = copy.deepcopy((model, [groups[i] for i in subset]))
        try:
            from secateur.pruning.surgery import keep_units
            with torch.no_grad():
                for g in gs:
                    if g.size > 1:
                        keep_units(g, torch.arange(1, g.size))
                got = _shapes(_call(m2, example_input))
        except Exception as e:  # noqa: BLE001 - any failure means the cut is unsafe
            return f"the model's forward fails after the cut ({type(e).__name__}: {' '.join(str(e).split())[:100]})"
        return None if got == want else f"the outputs change shape after the cut ({want} -> {got})"

    bad: dict[int, str] = {}

    def bisect(subset: list[int]) -> None:
        why = works(subset)
        if why is None:
            return
        if len(subset) == 1:
            bad[subset[0]] = why
            return
        half = len(subset) // 2
        bisect(subset[:half])
        bisect(subset[half:])
        if not any(i in bad for i in subset):      # only the combination fails: keep none of it
            bad.update({i: why for i in subset})

    try:
        bisect(list(range(len(groups))))
    finally:
        torch.set_rng_state(rng)
    for i, why in bad.items():
        msg = f"pruning: group of {groups[i].name!r} left unpruned: {why}"
        warn(msg) if warn is not None else warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return [g for i, g in enumerate(groups) if i not in bad]


def trace_groups(model: nn.Module, example_input: Any,
                 ignored_layers: Sequence[nn.Module] = (), verify: bool = True) -> list[UnitGroup]:
    """One UnitGroup per prunable coupled unit axis of `model` (outputs, `ignored_layers` and
    modules the registry cannot handle excluded; see the module docstring). `example_input`: a
    tensor, a tuple of positional inputs or a dict of keyword inputs for one forward pass.
    `verify`: try every cut on a copy first (see `verify_groups`)."""
    tracer = _Tracer(unwrap(model), example_input, ignored_layers)
    groups = tracer.trace()
    seen: dict[str, int] = {}
    for g in groups:            # a residual group rooted at an attention module shares its name
        if g.name in seen:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name]}"
        else:
            seen[g.name] = 1
    if verify and groups:
        groups = verify_groups(unwrap(model), groups, example_input, tracer.warn)
    return groups
