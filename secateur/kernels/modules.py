"""nn.Module wrappers: TSRA (with on-the-fly activation statistics) and RMSNorm2d (no affine)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from secateur.kernels.rms_norm import rms_norm2d
from secateur.kernels.tsra import tsra


class TSRA(nn.Module):
    """Logistic TSRA over channel axis `dim`. `split` is a plain int (None: C//2 at call time);
    pruning surgery sets it to the number of kept units below the old split.

    `track_stats(True)` makes each forward add the per-channel sum of out**2 into `stats`
    (fp32 (C,), re-created when C changes) and the number of reduced positions into `stats_count`.
    """

    def __init__(self, split: int | None = None, a: float = 5.0, b_u: float = 0.5, b_v: float = 0.7,
                 eps: float = 1e-12, dim: int = 1) -> None:
        super().__init__()
        self.split, self.a, self.b_u, self.b_v, self.eps, self.dim = split, a, b_u, b_v, eps, dim
        self.tracking = False
        self.stats: Tensor | None = None
        self.stats_count = 0

    def track_stats(self, on: bool = True) -> "TSRA":
        self.tracking = bool(on)
        return self

    def reset_stats(self) -> None:
        self.stats, self.stats_count = None, 0

    def forward(self, x: Tensor) -> Tensor:
        stats = None
        if self.tracking:
            c = x.shape[self.dim]
            if self.stats is None or self.stats.shape != (c,) or self.stats.device != x.device:
                self.stats, self.stats_count = torch.zeros(c, dtype=torch.float32, device=x.device), 0
            stats = self.stats
            self.stats_count += x.numel() // c
        return tsra(x, self.dim, self.split, self.a, self.b_u, self.b_v, self.eps, stats)

    def extra_repr(self) -> str:
        return f"split={self.split}, a={self.a}, b_u={self.b_u}, b_v={self.b_v}, dim={self.dim}"


class RMSNorm2d(nn.Module):
    """RMS normalisation over the channel axis `dim` at every position, no learned affine
    (rotation-invariant, so change-of-basis rotations pass through it)."""

    def __init__(self, eps: float = 1e-6, dim: int = 1) -> None:
        super().__init__()
        self.eps, self.dim = eps, dim

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm2d(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, dim={self.dim}"
