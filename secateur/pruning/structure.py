"""A pruned structure as data: which original units of each group survive.

Checkpoints and exports of models that are not secateur's own record `record(groups)`; loading
rebuilds the original model, traces the same groups and replays the cuts with `apply`, then loads
the weights. No module is ever pickled.
"""
from __future__ import annotations

from typing import Iterable

import torch

from secateur.pruning.groups import UnitGroup
from secateur.pruning.surgery import keep_units


def record(groups: Iterable[UnitGroup]) -> dict[str, list[int]]:
    """{group name: original indices of its surviving units (ascending)} for every group."""
    return {g.name: [int(o) for o in g.origin.tolist()] for g in groups}


def apply(groups: Iterable[UnitGroup], structure: dict[str, list[int]]) -> None:
    """Cut freshly built `groups` down to `structure` (from `record`). Raises ValueError naming
    the group when the structure does not belong to these groups (a different model or
    different tracing settings)."""
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(structure) - set(by_name))
    if unknown:
        raise ValueError(f"structure: group(s) {', '.join(unknown)} do not exist in this model; "
                         "it was built differently from the one the structure was recorded on")
    for name, kept in structure.items():
        g = by_name[name]
        pos = {int(o): i for i, o in enumerate(g.origin.tolist())}
        missing = [k for k in kept if k not in pos]
        if missing:
            raise ValueError(f"structure: group {name} has no unit(s) {missing[:5]} to keep "
                             f"(it has {g.size})")
        keep = torch.tensor([pos[k] for k in kept], dtype=torch.long)
        if keep.numel() < g.size:
            keep_units(g, keep)
