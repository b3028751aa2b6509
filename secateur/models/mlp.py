"""A multilayer perceptron with prunable hidden layers (ReLU or TSRA)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from secateur.kernels import TSRA
from secateur.pruning.groups import Slot, UnitGroup


class MLP(nn.Module):
    """Flatten -> [Linear -> act -> Dropout] per hidden width -> Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128),
                 act: str = "relu", dropout: float = 0.0,
                 splits: Sequence[int | None] | None = None) -> None:
        super().__init__()
        if act not in ("relu", "tsra"):
            raise ValueError(f"act must be 'relu' or 'tsra', got {act!r}")
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {list(hidden)}")
        splits = list(splits) if splits is not None else [None] * len(hidden)
        if len(splits) != len(hidden):
            raise ValueError(f"splits must have {len(hidden)} entries, got {len(splits)}")
        self.in_features, self.num_classes, self.act, self.dropout = in_features, num_classes, act, dropout
        layers: list[nn.Module] = [nn.Flatten()]
        c = in_features
        for h, s in zip(hidden, splits):
            layers += [nn.Linear(c, int(h)), TSRA(split=s, dim=1) if act == "tsra" else nn.ReLU(),
                       nn.Dropout(dropout)]
            c = int(h)
        layers.append(nn.Linear(c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _hidden(self) -> list[tuple[int, nn.Linear, nn.Module]]:
        return [(i, m, self.net[i + 1]) for i, m in enumerate(self.net)
                if isinstance(m, nn.Linear) and i + 1 < len(self.net)]

    def unit_groups(self) -> list[UnitGroup]:
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        return [UnitGroup(name=f"net.{i}", producers=[Slot(lin, "weight", 0), Slot(lin, "bias", 0)],
                          consumers=[Slot(linears[j + 1], "weight", 1)],
                          tsra=[act] if isinstance(act, TSRA) else [], activation=act, act_dim=1)
                for j, (i, lin, act) in enumerate(self._hidden())]

    def spec(self) -> dict:
        hidden = self._hidden()
        return {"name": "MLP", "args": {
            "in_features": self.in_features, "num_classes": self.num_classes,
            "hidden": [lin.out_features for _, lin, _ in hidden], "act": self.act,
            "dropout": self.dropout,
            "splits": [a.split for _, _, a in hidden] if self.act == "tsra" else None}}
