"""The trainer-facing pruner: a criterion, a decision rule and a schedule over a model's groups.

    pruner = Pruner(model, criterion="activation", rule=Rule("ratio", 0.25), schedule=Schedule(...))
    ...forward passes (statistics accumulate on the fly)...
    if pruner.is_event(step):
        all_reduce(pruner.stats())        # the trainer sums them over ranks, in place
        report = pruner.prune(optimizer)  # [(group, units before, units after), ...]
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from secateur.pruning.criteria import CRITERIA, Criterion, make_criterion
from secateur.pruning.groups import UNIT_KINDS, UnitGroup, build_groups
from secateur.pruning.groups import unit_kinds as kinds_of
from secateur.pruning.rules import Rule, global_keep, keep_within
from secateur.pruning.schedules import Schedule


def _num_classes(model: nn.Module) -> int:
    """Outputs of the model's last Linear layer (the logits)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("criterion_args: num_classes is needed for a model without a Linear head")
    return linears[-1].out_features


def _resolve_layers(model: nn.Module, layers: Sequence[Any]) -> list[nn.Module]:
    """Modules given as modules or as names from `model.named_modules()`."""
    named = dict(model.named_modules())
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    out = []
    for item in layers:
        if isinstance(item, nn.Module):
            out.append(item)
        elif isinstance(item, str) and item in named:
            out.append(named[item])
        else:
            what = repr(item) if isinstance(item, str) else type(item).__name__
            raise ValueError(f"ignored_layers: {what} is neither a module nor a module name of the model")
    return out


class Pruner:
    """Prunes a model's unit groups while it trains.

    model: any nn.Module (wrappers such as DDP, DataParallel or a DeepSpeed engine are looked
    through; the Pruner keeps the inner module only). Models that declare `unit_groups()` use those;
    others are traced once from `example_input` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs). `layers`: prune only the groups with these names; `ignored_layers`: modules (or
    module names) whose outputs keep their size, as in Torch-Pruning; `round_to`: every cut width
    (channels of the group's first producer) stays a multiple of this (whole heads for attention).
    Layers whose outputs reach the model's outputs never change size. `verify` (traced models):
    every group's cut is first tried on a copy of the model with the example input, and groups
    whose cut would break the forward stay unpruned with a warning (costs one model copy per
    trial; turn off for models too large to copy). `unit_kinds`: prune only groups of these kinds
    ("channels", "heads", "mlp", "hidden"; see `groups.unit_kind`). Rule scope "uniform" decides per
    layer, then gives every group of one kind and original width the same count (the mean)."""

    def __init__(self, model: nn.Module, criterion: str = "l2", rule: Rule | None = None,
                 schedule: Schedule | None = None, min_units: int = 1,
                 example_input: Any = None, layers: Sequence[str] | None = None,
                 ignored_layers: Sequence[Any] = (), round_to: int | None = None,
                 verify: bool = True, unit_kinds: Sequence[str] | None = None,
                 **criterion_args: Any) -> None:
        from secateur.pruning.tracing import unwrap
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
        if min_units < 1:
            raise ValueError(f"min_units must be >= 1, got {min_units}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        model = unwrap(model)
        self.model = model
        self.rule = rule or Rule()
        self.schedule = schedule or Schedule()
        self.min_units = int(min_units)
        self.round_to = round_to
        ignored = _resolve_layers(model, ignored_layers)
        self.groups: list[UnitGroup] = build_groups(model, example_input, ignored, verify=verify)
        if layers is not None:      # prune only these groups (e.g. the classifier)
            unknown = sorted(set(layers) - {g.name for g in self.groups})
            if unknown:
                raise ValueError(f"layers: no unit group named {unknown}; groups are "
                                 f"{[g.name for g in self.groups]}")
            self.groups = [g for g in self.groups if g.name in set(layers)]
        kinds = kinds_of(model, self.groups)
        if unit_kinds is not None:
            bad = sorted(set(unit_kinds) - set(UNIT_KINDS))
            if bad:
                raise ValueError(f"unit_kinds: unknown kind(s) {bad}; choose from {list(UNIT_KINDS)}")
            found = sorted(set(kinds.values()))
            self.groups = [g for g in self.groups if kinds[g.name] in set(unit_kinds)]
            if not self.groups:
                raise ValueError(f"unit_kinds: this model has no groups of kind {', '.join(unit_kinds)} "
                                 f"(it has {', '.join(found) or 'none'})")
        if not self.groups:
            raise ValueError("model: no prunable unit groups found")
        if criterion == "cosep" and "num_classes" not in criterion_args:
            criterion_args["num_classes"] = _num_classes(model)
        self.criterion_name = criterion
        self.criterion: Criterion = make_criterion(criterion, self.groups, **criterion_args)
        self.initial = {g.name: g.size for g in self.groups}
        self.kinds = {g.name: kinds[g.name] for g in self.groups}
        self.events_done = 0
        self.step: int | None = None

    # ---- trainer interface ----------------------------------------------------------------
    @property
    def needs_targets(self) -> bool:
        return self.criterion.needs_targets

    def observe_targets(self, y: Tensor) -> None:
        self.criterion.observe_targets(y)

    def stats(self) -> dict[str, Tensor]:
        """Additive statistics accumulators (sum them over ranks in place before `prune`)."""
        return self.criterion.stats()

    def is_event(self, step: int) -> bool:
        if self.schedule.is_event(step):
            self.step = step
            return True
        return False

    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def _min_keep(self, g: UnitGroup) -> int:
        return min(g.size, max(self.min_units, len([r for r in g.subspaces() if len(r)])))

    def _agp_ratio(self, g: UnitGroup) -> float:
        step = self.schedule.start if self.step is None else self.step
        want = max(1, round(self.initial[g.name] * (1.0 - self.schedule.sparsity_at(step))))
        return max(0.0, 1.0 - want / g.size)

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> list[tuple[str, int, int]]:
        """Decide from the accumulated statistics, shrink the model and the optimizer state,
        reset the statistics. Returns [(group name, units before, units after)]."""
        crit = self.criterion
        if hasattr(crit, "event"):
            crit.event = self.events_done
        scores: dict[str, Tensor] = {}
        for g in self.groups:
            crit.prepare(g, optimizer)
            s = crit.importance(g).detach().double().cpu()
            if s.shape != (g.size,) or not torch.isfinite(s).all():
                warnings.warn(f"pruning: importance of group {g.name!r} is not finite; group skipped",
                              RuntimeWarning, stacklevel=2)
                continue
            scores[g.name] = s
        by_name = {g.name: g for g in self.groups}
        keeps: dict[str, Tensor] = {}
        auto = {n: crit.automatic_keep(by_name[n]) for n in scores}
        if any(k is not None for k in auto.values()):
            keeps = {n: k for n, k in auto.items() if k is not None}
        elif self.schedule.kind == "agp":
            for n, s in scores.items():
                g = by_name[n]
                keeps[n] = keep_within(s, g.subspaces(), Rule("ratio", min(self._agp_ratio(g), 0.999),
                                                               self.rule.scope if self.rule.scope != "global"
                                                               else "per_layer"), self._min_keep(g))
        elif self.rule.scope == "global":
            keeps = global_keep(scores, self.rule.value, self.min_units)
        else:
            for n, s in scores.items():
                g = by_name[n]
                keeps[n] = keep_within(s, g.subspaces(), self.rule, self._min_keep(g))
        if self.rule.scope == "uniform":
            keeps = self._uniform(keeps, scores, by_name)
        report = []
        for n, keep in keeps.items():
            g = by_name[n]
            before = g.size
            keep = torch.as_tensor(keep, dtype=torch.long).sort().values
            if keep.numel() < min(self.min_units, before):
                top = torch.sort(scores[n], descending=True, stable=True).indices[:min(self.min_units, before)]
                keep = torch.unique(torch.cat([keep, top]))
            if self.round_to is not None and g.split is None:
                keep = self._rounded(g, keep, scores[n])
            if keep.numel() < before:
                crit.shrink(g, keep, optimizer)
            report.append((n, before, g.size))
        crit.reset()
        self.events_done += 1
        return report

    def _uniform(self, keeps: dict[str, Tensor], scores: dict[str, Tensor],
                 by_name: dict[str, UnitGroup]) -> dict[str, Tensor]:
        """Every group of one kind and original width keeps the same number of units (the mean of
        what the rule chose per group, rounded), each its own highest-scored ones."""
        stacks: dict[tuple[str, int], list[str]] = {}
        for n in keeps:
            stacks.setdefault((self.kinds[n], self.initial[n]), []).append(n)
        out = dict(keeps)
        for names in stacks.values():
            count = int(round(sum(len(keeps[n]) for n in names) / len(names)))
            for n in names:
                g = by_name[n]
                k = max(1, min(count, g.size))
                top = torch.sort(scores[n], descending=True, stable=True).indices[:k]
                out[n] = top.sort().values
        return out

    def _rounded(self, g: UnitGroup, keep: Tensor, score: Tensor) -> Tensor:
        """`keep` grown or shrunk (by score) to the nearest width that is a multiple of round_to."""
        import math
        step = 1                 # units per step, so every slot's width is a multiple of round_to
        for s in g.producers + g.consumers + g.norms:
            need = self.round_to // math.gcd(self.round_to, s.per_unit)
            step = step * need // math.gcd(step, need)
        if g.size < step or (g.size % step and keep.numel() == g.size):
            return keep          # the group is narrower than one step: the rule decides alone
        want = max(step, int(round(keep.numel() / step)) * step)
        want = min(want, g.size - g.size % step)
        order = torch.sort(score, descending=True, stable=True).indices
        if want > keep.numel():
            extra = [int(i) for i in order if int(i) not in set(keep.tolist())][:want - keep.numel()]
            keep = torch.cat([keep, torch.tensor(extra, dtype=torch.long)])
        elif want < keep.numel():
            rank = {int(u): r for r, u in enumerate(order)}
            keep = torch.tensor(sorted(keep.tolist(), key=lambda u: rank[u])[:want], dtype=torch.long)
        return keep.sort().values

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion_name, "events_done": self.events_done, "step": self.step,
                "initial": dict(self.initial),
                "stats": {k: v.detach().cpu().clone() for k, v in self.stats().items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("criterion") != self.criterion_name:
            raise ValueError(f"state: saved for criterion {sd.get('criterion')!r}, "
                             f"not {self.criterion_name!r}")
        self.events_done, self.step = int(sd["events_done"]), sd.get("step")
        self.initial = dict(sd["initial"])
        self.criterion.reset()
        live = self.stats()
        for k, v in sd.get("stats", {}).items():
            if k not in live or live[k].shape != v.shape:
                raise ValueError(f"state: statistics {k!r} do not match the model's current widths")
            live[k].copy_(v)

    def close(self) -> None:
        """Remove the statistics hooks."""
        self.criterion.close()

    def __repr__(self) -> str:
        return (f"Pruner(criterion={self.criterion_name!r}, rule={self.rule}, schedule={self.schedule}, "
                f"groups={len(self.groups)})")
