"""Which implementation an op runs: Triton for CUDA tensors, the torch reference otherwise.
`SECATEUR_BACKEND=torch|triton` forces one (triton on CPU tensors needs TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch
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


def acc_dtype(x: Tensor) -> torch.dtype:
    """The accumulation dtype of the torch paths: float64 stays float64, the rest computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_3d(x: Tensor, dim: int) -> Tensor:
    """Contiguous view (outer, C, inner) of `x` with its channel axis `dim` in the middle, the
    layout every channel-wise Triton kernel here reads."""
    c = x.shape[dim]
    outer = 1
    for s in x.shape[:dim]:
        outer *= s
    return x.contiguous().view(outer, c, -1)


def channel_tiles(c: int, max_tile: int = 8192) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for kernels that hold all C channels of BLOCK_P positions in one tile:
    BLOCK_C is C rounded up to a power of two, BLOCK_P fills the tile up to `max_tile` elements."""
    import triton

    block_c = triton.next_power_of_2(max(c, 1))
    block_p = max(1, min(64, max_tile // block_c))
    return block_c, triton.next_power_of_2(block_p)
