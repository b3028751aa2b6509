"""Importance criteria behind one interface.

A criterion attaches statistics collectors to the groups (hooks, or the fused TSRA statistics),
exposes them as additive tensors (the trainer all-reduces them so every rank decides alike),
scores units (higher = keep) and performs the shrink: plain selection for most criteria, a
rotation first for change of basis, redistribution for projective, merging for folding.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from secateur.kernels import TSRA, channel_sq_sum
from secateur.pruning.groups import Slot, UnitGroup
from secateur.pruning.surgery import keep_units, merge_units, rescale_units


def _as_rows(out: Tensor, dim: int) -> Tensor:
    """(M, C) view of an activation with its unit axis `dim` last."""
    return out.detach().movedim(dim, -1).reshape(-1, out.shape[dim])


class Criterion:
    """Base: no statistics, selection by index. Subclasses override what they need."""
    name = "base"
    needs_targets = False

    def __init__(self, groups: list[UnitGroup], **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"criterion_args: {self.name} takes no argument(s) {sorted(kwargs)}")
        self.groups = groups
        self._hooks: list[Any] = []

    # statistics -------------------------------------------------------------------------
    def stats(self) -> dict[str, Tensor]:
        return {}

    def reset(self) -> None:
        """Fresh zero accumulators sized for the groups' current widths."""

    def observe_targets(self, y: Tensor) -> None:
        pass

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # decisions ----------------------------------------------------------------------------
    def prepare(self, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        """Edit the group before scoring (change of basis rotates it)."""

    def importance(self, group: UnitGroup) -> Tensor:
        raise NotImplementedError

    def automatic_keep(self, group: UnitGroup) -> Tensor | None:
        """Kept units chosen by the criterion itself (CoSeP), or None to use the rule."""
        return None

    def shrink(self, group: UnitGroup, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        keep_units(group, keep, optimizer)


class RandomCriterion(Criterion):
    """Uniform random scores from a generator seeded by (seed, event): identical on every rank."""
    name = "random"

    def __init__(self, groups: list[UnitGroup], seed: int = 0) -> None:
        super().__init__(groups)
        self.seed, self.event = int(seed), 0

    def importance(self, group: UnitGroup) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.event * 7919
                                          + sum(map(ord, group.name)))
        return torch.rand(group.size, generator=g, dtype=torch.float64)


class L2Criterion(Criterion):
    """L2 norm of each unit's producer weights (flattened filters / rows; biases excluded), or with
    `tensors="all"` of everything tied to the unit (producer rows, norm parameters, consumer
    columns), which on BatchNorm networks also sees the scale gamma that the filter norm lacks."""
    name = "l2"

    def __init__(self, groups: list[UnitGroup], tensors: str = "producers") -> None:
        super().__init__(groups)
        if tensors not in ("producers", "all"):
            raise ValueError(f"tensors must be 'producers' or 'all', got {tensors!r}")
        self.tensors = tensors

    def importance(self, group: UnitGroup) -> Tensor:
        rows = group.producer_weight_rows() if self.tensors == "producers" else group.unit_features()
        return rows.double().norm(dim=1)


class ActivationCriterion(Criterion):
    """Root-mean-square post-activation of each unit over the observed data (METHODS A.5).
    TSRA groups accumulate inside the TSRA forward (no extra pass); others through
    `kernels.channel_sq_sum` in a forward hook."""
    name = "activation"

    def __init__(self, groups: list[UnitGroup]) -> None:
        super().__init__(groups)
        for g in groups:
            if not g.observable:
                raise ValueError(f"criterion: group {g.name!r} has no activation module to observe")
        self.sq: dict[str, Tensor] = {}
        self.count: dict[str, Tensor] = {}
        self.reset()
        for g in groups:
            if self._fused(g):
                g.activation.track_stats(True)
                self._hooks.append(g.activation.register_forward_hook(self._fused_hook(g)))
            else:
                self._hooks.append(g.watch(self._hook(g)))

    @staticmethod
    def _fused(g: UnitGroup) -> bool:
        return g.act_slot is None and isinstance(g.activation, TSRA)

    def _width(self, g: UnitGroup) -> int:
        return g.channel_width()

    def _fused_hook(self, g: UnitGroup):
        def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
            acc = self.sq[g.name]
            if mod.stats is not acc:    # the module re-creates its buffer when C changes
                acc.add_(mod.stats)
                mod.stats = acc
            self.count[g.name] += out.numel() // out.shape[g.act_dim]
        return hook

    def _hook(self, g: UnitGroup):
        def hook(x: Tensor, dim: int) -> None:
            channel_sq_sum(x.detach(), dim, out=self.sq[g.name])
            self.count[g.name] += x.numel() // x.shape[dim]
        return hook

    def reset(self) -> None:
        for g in self.groups:
            w = self._width(g)
            dev = g.producers[0].tensor.device
            self.sq[g.name] = torch.zeros(w, dtype=torch.float32, device=dev)
            self.count[g.name] = torch.zeros((), dtype=torch.float64, device=dev)
            if self._fused(g):
                g.activation.stats, g.activation.stats_count = self.sq[g.name], 0

    def stats(self) -> dict[str, Tensor]:
        out = {f"{n}.sq": t for n, t in self.sq.items()}
        out.update({f"{n}.count": t for n, t in self.count.items()})
        return out

    def close(self) -> None:
        super().close()
        for g in self.groups:
            if self._fused(g):
                g.activation.track_stats(False)

    def importance(self, group: UnitGroup) -> Tensor:
        sq = group.to_units(self.sq[group.name].double())
        n = float(self.count[group.name])
        if n == 0:
            raise ValueError(f"criterion: no activations were observed for group {group.name!r} "
                             "before the pruning event")
        return (sq / n).sqrt()


class ProjectiveCriterion(Criterion):
    """Projective redundancy (METHODS C): a unit's distance to the ridge span of the other units'
    producer rows. Removal is exact greedy (O(n^2) downdates) or the published lazy update, with
    optional redistribution of the removed units' contribution (alpha, beta, gamma)."""
    name = "projective"

    def __init__(self, groups: list[UnitGroup], lam: float = 1e-3, mode: str = "exact",
                 redistribute: bool = True, alpha: float = 0.5, beta: float = 0.5,
                 gamma: float = 0.5) -> None:
        super().__init__(groups)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if mode not in ("exact", "lazy"):
            raise ValueError(f"mode must be 'exact' or 'lazy', got {mode!r}")
        self.lam, self.mode, self.redistribute = float(lam), mode, bool(redistribute)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)

    def _rows(self, group: UnitGroup) -> Tensor:
        # float64 on the host: the greedy's index bookkeeping and scales live there; attention
        # heads are compared on their joint query-key rows
        rows = group.qk_rows() if group.qk else group.producer_rows()
        return rows.double().cpu()

    def importance(self, group: UnitGroup) -> Tensor:
        from secateur.pruning import projective
        return projective.scores(self._rows(group), lam=self.lam)

    def shrink(self, group: UnitGroup, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        from secateur.pruning import projective
        n_remove = group.size - keep.numel()
        if n_remove == 0:
            return
        rows = self._rows(group)
        chosen: list[Tensor] = []
        w_s, b_s, v_s = (torch.ones(group.size, dtype=torch.float64) for _ in range(3))
        # greedy removal within each subspace keeps the TSRA structure; counts follow the rule
        for r in group.subspaces():
            idx = torch.arange(r.start, r.stop)
            k = int((~torch.isin(idx, keep)).sum())
            if k == 0:
                chosen.append(idx)
            elif k < len(idx):      # (a rule may also empty a whole subspace: nothing to keep)
                res = projective.greedy(rows[idx], k, lam=self.lam, mode=self.mode, alpha=self.alpha,
                                        beta=self.beta, gamma=self.gamma,
                                        redistribute=self.redistribute)
                chosen.append(idx[res.keep])
                w_s[idx], b_s[idx], v_s[idx] = res.w_scale, res.b_scale, res.v_scale
        if self.redistribute and not group.qk:    # (rescaled q and k rows would square in the logits)
            rescale_units(group, w_s, b_s, v_s, optimizer)
        keep_units(group, torch.cat(chosen), optimizer)


class CoBCriterion(ActivationCriterion):
    """Change of basis (METHODS A.3-A.5): streaming uncentred second moments of each TSRA
    subspace's post-activations; at the event the eigenvector rotations are absorbed into producer
    and consumer (an exact function-preserving edit), and the rotated units' importance is the
    square root of the eigenvalues (= their activation magnitude after rotation)."""
    name = "cob"

    def __init__(self, groups: list[UnitGroup]) -> None:
        for g in groups:
            if not g.tsra or g.norms:
                raise ValueError(f"criterion: cob needs TSRA groups without affine norms; "
                                 f"group {g.name!r} has {'norm parameters' if g.norms else 'no TSRA'}")
        Criterion.__init__(self, groups)
        self.moments: dict[str, Any] = {}
        self._eig: dict[str, Tensor] = {}
        self.reset()
        for g in groups:
            self._hooks.append(g.activation.register_forward_hook(self._moment_hook(g)))

    def _moment_hook(self, g: UnitGroup):
        def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
            self.moments[g.name].update(_as_rows(out, g.act_dim))
        return hook

    def reset(self) -> None:
        from secateur.pruning.cob import SubspaceMoments
        for g in self.groups:
            self.moments[g.name] = SubspaceMoments([len(r) for r in g.subspaces()])

    def stats(self) -> dict[str, Tensor]:
        return {f"{n}.m{i}": t for n, m in self.moments.items() for i, t in enumerate(m.tensors())}

    def close(self) -> None:
        Criterion.close(self)

    def prepare(self, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        from secateur.pruning.cob import rotations
        if float(self.moments[group.name].count) == 0:
            raise ValueError(f"criterion: no activations were observed for group {group.name!r} "
                             "before the pruning event")
        rots = rotations(self.moments[group.name])
        n = group.size
        rot = torch.zeros(n, n, dtype=torch.float64)
        eig = []
        for r, (R, ev) in zip(group.subspaces(), rots):
            rot[r.start:r.stop, r.start:r.stop] = R.double()
            eig.append(ev.double().clamp_min(0))
        merge_units(group, rot, rot.t(), optimizer, split=group.split)
        self._eig[group.name] = torch.cat(eig)

    def importance(self, group: UnitGroup) -> Tensor:
        return self._eig[group.name].sqrt()


class CoSePCriterion(Criterion):
    """CoSeP (METHODS D): per-class streaming moments of each unit's (spatially averaged)
    activation, Jeffries-Matusita separability profiles, k-medoids with the number of clusters at
    the knee of the mean simplified silhouette; one representative per cluster is kept. The width
    is chosen by the criterion; the rule is not used."""
    name = "cosep"
    needs_targets = True

    def __init__(self, groups: list[UnitGroup], num_classes: int, k_min: int = 2,
                 k_max: int | None = None, k_min_fraction: float = 0.0, seed: int = 0) -> None:
        super().__init__(groups)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if k_min < 2 or (k_max is not None and k_max < k_min):
            raise ValueError(f"k_min must be >= 2 and k_max >= k_min, got {k_min}, {k_max}")
        if not 0.0 <= k_min_fraction < 1.0:
            raise ValueError(f"k_min_fraction must be in [0, 1), got {k_min_fraction}")
        self.num_classes, self.k_min, self.k_max, self.seed = int(num_classes), k_min, k_max, seed
        self.k_min_fraction = float(k_min_fraction)
        self._targets: Tensor | None = None
        self.moments: dict[str, Any] = {}
        self.reset()
        for g in groups:
            self._hooks.append(g.watch(self._hook(g)))

    def observe_targets(self, y: Tensor) -> None:
        self._targets = y.detach().reshape(-1).cpu()

    def _hook(self, g: UnitGroup):
        def hook(out: Tensor, dim: int) -> None:
            if self._targets is None:
                return
            a = out.detach().movedim(dim, 1)
            a = a.reshape(a.shape[0], a.shape[1], -1).mean(-1) if a.dim() > 2 else a
            a = g.to_units(a) / g.channel_table().shape[1]
            if a.shape[0] == self._targets.numel():
                self.moments[g.name].update(a.double().cpu(), self._targets)
        return hook

    def reset(self) -> None:
        from secateur.pruning.cosep import ClassMoments
        for g in self.groups:
            self.moments[g.name] = ClassMoments(self.num_classes, g.size)

    def stats(self) -> dict[str, Tensor]:
        return {f"{n}.m{i}": t for n, m in self.moments.items() for i, t in enumerate(m.tensors())}

    def importance(self, group: UnitGroup) -> Tensor:
        return group.producer_weight_rows().double().norm(dim=1)

    def automatic_keep(self, group: UnitGroup) -> Tensor:
        from secateur.pruning.cosep import jm_profiles, select_components

        n = group.size
        if float(self.moments[group.name].count.sum()) == 0:
            raise ValueError(f"criterion: no labelled activations were observed for group "
                             f"{group.name!r} (call observe_targets(y) before each forward)")
        if n < 3:
            return torch.arange(n)
        # the knee is searched over k in [lo, hi]; k_min_fraction bounds how far one event may
        # shrink a layer (on networks whose silhouette curve has no knee it would pick k = 2)
        lo = max(self.k_min, math.ceil(self.k_min_fraction * n))
        hi = min(self.k_max if self.k_max is not None else n - 1, n - 1)
        if lo > hi:
            return torch.arange(n)
        res = select_components(jm_profiles(self.moments[group.name]), self.importance(group),
                                k_range=range(lo, hi + 1), seed=self.seed)
        return res.keep


class FoldCriterion(Criterion):
    """Model folding (METHODS B): cluster each group's units on everything tied to them
    (producer rows, norm parameters, consumer columns; k-means, `folding.cluster_units`)
    and merge each cluster (mean of producers, sum of consumers) instead of deleting units.
    The rule's count of removed units sets the number of clusters; `repair='fold_ar'` applies
    the data-free Fold-AR rescaling. TSRA groups fold within each subspace."""
    name = "fold"

    def __init__(self, groups: list[UnitGroup], repair: str = "fold_ar", seed: int = 42) -> None:
        super().__init__(groups)
        if repair not in ("none", "fold_ar"):
            raise ValueError(f"repair must be 'none' or 'fold_ar', got {repair!r}")
        self.repair, self.seed = repair, int(seed)

    def importance(self, group: UnitGroup) -> Tensor:
        return group.producer_weight_rows().double().norm(dim=1)

    def shrink(self, group: UnitGroup, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        from secateur.pruning.folding import cluster_units, fold_ar_gain, merge_maps
        n = group.size
        rows = group.producer_rows().double()          # Fold-AR: correlation of the weight rows
        feats = group.unit_features().double()         # clustering: every tensor tied to a unit
        p_blocks, c_blocks, gains, split = [], [], [], None
        for j, r in enumerate(group.subspaces()):
            if len(r) == 0:
                continue
            idx = torch.arange(r.start, r.stop)
            k = max(int(torch.isin(idx, keep).sum()), 1)
            labels = cluster_units(feats[idx], k, seed=self.seed)
            p, c = merge_maps(labels, k)
            big_p = torch.zeros(k, n, dtype=torch.float64)
            big_c = torch.zeros(n, k, dtype=torch.float64)
            big_p[:, idx], big_c[idx, :] = p.double(), c.double()
            p_blocks.append(big_p)
            c_blocks.append(big_c)
            gains.append(fold_ar_gain(rows[idx], labels).double())
            if j == 0 and group.tsra:
                split = k
        merge_units(group, torch.cat(p_blocks, 0), torch.cat(c_blocks, 1), optimizer, split=split)
        if self.repair == "fold_ar":
            self._fold_ar(group, torch.cat(gains))

    @staticmethod
    @torch.no_grad()
    def _fold_ar(group: UnitGroup, gain: Tensor) -> None:
        """Data-free repair (METHODS B.2): a merged cluster's pre-activation variance shrinks by
        (1 + (n_c - 1) rho_c) / n_c; the gain undoes it. With BatchNorm the gain multiplies gamma;
        the merged running mean and variance stay the cluster means of the members' statistics
        (the merged pre-activation's mean is exactly the mean of the members' means; resetting them
        to 0 / 1 collapsed a trained network to chance). Without a norm the gain scales the merged
        unit's producer weights and bias (the same pre-activation, for a homogeneous activation
        such as ReLU)."""
        norms = [s for s in group.norms if s.name == "weight" and s.tensor.dim() == 1]
        for s in norms or [s for s in group.producers]:
            _scale_units(s, gain)


def _scale_units(slot: Slot, gain: Tensor) -> None:
    """Multiply each unit's entries of the slot's tensor by gain[unit] (in place)."""
    t = slot.tensor
    v = torch.ones(t.shape[slot.axis], dtype=torch.float64)
    v[slot.table().reshape(-1)] = gain.double().repeat_interleave(slot.per_unit)
    shape = [1] * t.dim()
    shape[slot.axis] = -1
    t.mul_(v.to(t.dtype).to(t.device).reshape(shape))


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (
    RandomCriterion, L2Criterion, ActivationCriterion, ProjectiveCriterion, CoBCriterion,
    CoSePCriterion, FoldCriterion)}


def make_criterion(name: str, groups: list[UnitGroup], **kwargs: Any) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {name!r}")
    cls = CRITERIA[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "groups"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"criterion_args: {name} takes no argument(s) {unknown}; it accepts "
                         f"{sorted(accepted - {'kwargs'}) or 'none'}")
    return cls(groups, **kwargs)
