"""Which implementation an op runs: Triton for CUDA tensors, the torch reference otherwise.
`SECATEUR_BACKEND=torch|triton` forces one (triton on CPU tensors needs TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("torch", "triton")


def backend_for(x: Tensor) -> str:
    """'triton' or 'torch' for an op on tensor `x`."""
    forced = os.environ.get("SECATEUR_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SECATEUR_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if x.is_cuda else "torch"


def channel_dim(x: Tensor, dim: int) -> int:
    """`dim` normalised to a non-negative axis of `x`, with a clear error when out of range."""
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-d tensor")
    return dim % x.dim()


def reduce_dims(x: Tensor, dim: int) -> list[int]:
    """Every axis of `x` except the channel axis `dim`."""
    return [d for d in range(x.dim()) if d != dim]
