"""Test-session setup. Without a CUDA device the Triton kernels run in Triton's interpreter,
which must be switched on before anything imports triton (secateur.kernels does)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
