"""Kernels: each op has a Triton implementation (CUDA tensors) and a torch reference (CPU path
and test oracle); `SECATEUR_BACKEND=torch|triton` forces one."""
from secateur.kernels.gram import gram
from secateur.kernels.importance import channel_sq_sum
from secateur.kernels.modules import TSRA, RMSNorm2d
from secateur.kernels.rms_norm import rms_norm2d
from secateur.kernels.tsra import tsra

__all__ = ["gram", "tsra", "channel_sq_sum", "rms_norm2d", "TSRA", "RMSNorm2d"]
