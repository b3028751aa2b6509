"""VGG-style CNN for change-of-basis pruning: conv -> RMSNorm2d (no affine) -> TSRA, average
pooling, global average pool, a TSRA classifier. `act='relu'` gives the control network:
conv -> BatchNorm2d -> ReLU, max pooling, ReLU classifier."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from secateur.kernels import TSRA, RMSNorm2d
from secateur.pruning.groups import Slot, UnitGroup

ACTS = ("tsra", "relu")


class VGGTSRA(nn.Module):
    """widths: conv widths with 'M' for a 2x2 pool; fc: hidden classifier widths.
    splits: TSRA split per activation (convs then FC), None entries = half (for rebuilding
    pruned models from their spec)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128),
                 fc: Sequence[int] = (256, 256), act: str = "tsra", dropout: float = 0.5,
                 splits: Sequence[int | None] | None = None) -> None:
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        convs = [w for w in widths if w != "M"]
        if any(not isinstance(w, int) or w < 1 for w in convs) or not convs:
            raise ValueError(f"widths must be positive ints or 'M', got {list(widths)}")
        if any(int(f) < 1 for f in fc):
            raise ValueError(f"fc widths must be positive, got {list(fc)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n_act = len(convs) + len(fc)
        splits = list(splits) if splits is not None else [None] * n_act
        if len(splits) != n_act:
            raise ValueError(f"splits must have {n_act} entries (one per activation), got {len(splits)}")
        self.in_channels, self.num_classes, self.act, self.dropout = in_channels, num_classes, act, dropout
        self._pool_after = [False] * len(convs)

        feats: list[nn.Module] = []
        c, i = in_channels, 0
        for w in widths:
            if w == "M":
                feats.append(nn.AvgPool2d(2) if act == "tsra" else nn.MaxPool2d(2))
                continue
            feats.append(nn.Conv2d(c, w, 3, padding=1))
            if act == "tsra":
                feats += [RMSNorm2d(), TSRA(split=splits[i], dim=1)]
            else:
                feats += [nn.BatchNorm2d(w), nn.ReLU()]
            c, i = w, i + 1
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        cls: list[nn.Module] = []
        for f in fc:
            cls += [nn.Linear(c, int(f)), TSRA(split=splits[i], dim=1) if act == "tsra" else nn.ReLU(),
                    nn.Dropout(dropout)]
            c, i = int(f), i + 1
        cls.append(nn.Linear(c, num_classes))
        self.classifier = nn.Sequential(*cls)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def _layout(self) -> list[tuple[str, nn.Module, nn.Module | None, nn.Module]]:
        """(name, producer, norm or None, activation) for every hidden layer, in order."""
        out = []
        mods = list(self.features.named_children()) + [
            (f"classifier.{n}", m) for n, m in self.classifier.named_children()]
        mods = [(n if n.startswith("classifier") else f"features.{n}", m) for n, m in mods]
        for j, (name, m) in enumerate(mods):
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not self.classifier[-1]:
                nxt = [mm for _, mm in mods[j + 1:j + 3]]
                norm = nxt[0] if isinstance(nxt[0], nn.BatchNorm2d) else None
                act = nxt[1] if norm is not None or isinstance(nxt[0], RMSNorm2d) else nxt[0]
                out.append((name, m, norm, act))
        return out

    def unit_groups(self) -> list[UnitGroup]:
        layout = self._layout()
        weights = [p for _, p, _, _ in layout] + [self.classifier[-1]]
        groups = []
        for j, (name, prod, norm, act) in enumerate(layout):
            norms = ([Slot(norm, k, 0) for k in ("weight", "bias", "running_mean", "running_var")]
                     if norm is not None else [])
            groups.append(UnitGroup(
                name=name, producers=[Slot(prod, "weight", 0), Slot(prod, "bias", 0)],
                consumers=[Slot(weights[j + 1], "weight", 1)], norms=norms,
                tsra=[act] if isinstance(act, TSRA) else [], activation=act, act_dim=1))
        return groups

    def spec(self) -> dict:
        widths, k = [], 0
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        for m in self.features:
            if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
                widths.append("M")
            elif isinstance(m, nn.Conv2d):
                widths.append(convs[k].out_channels)
                k += 1
        fc = [m.out_features for m in self.classifier if isinstance(m, nn.Linear)][:-1]
        splits = [a.split for _, _, _, a in self._layout()] if self.act == "tsra" else None
        return {"name": "VGGTSRA", "args": {
            "in_channels": self.in_channels, "num_classes": self.num_classes, "widths": widths,
            "fc": fc, "act": self.act, "dropout": self.dropout, "splits": splits}}
