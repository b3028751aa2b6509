"""Hand-written CUDA C kernels launched through CuPy (optional extra: ``secateur[cuda]``).

CuPy is imported only when a kernel is compiled or launched, so importing this package
works on machines without CuPy or a GPU.
"""

from secateur.kernels.cuda.greedy_projective import compile_check, greedy_order_cuda

__all__ = ["compile_check", "greedy_order_cuda"]
