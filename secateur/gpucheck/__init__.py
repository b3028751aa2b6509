"""`make gpu-check OUT=DIR`: one prepared command that proves the kernels on a CUDA machine.

The target machine (one GPU, no network, its own `python3` with torch, triton, numpy, pytest,
cupy, safetensors, ...) gets everything else secateur needs as a wheel set built here by
`make gpu-wheels` (`python -m secateur.gpucheck.wheels`). The check itself
(`python3 -m secateur.gpucheck --out DIR`, `run.py`) then runs these stages, each in its own
process with its own timeout, inside one overall budget (8 minutes):

- preflight: is there a CUDA GPU for this python3? If not: one line, exit 3, nothing started.
- install:   the wheel set into a fresh folder (`pip install --no-index --no-deps --target`),
             put on PYTHONPATH; an import check of the deployed set.
- tests:     tests/test_kernels.py and tests/test_cuda_greedy.py with pytest on the device.
- bench:     Triton vs torch on the device (`bench.py`): copy bandwidth, TSRA / RMSNorm /
             channel statistics in GB/s, Gram in TFLOP/s vs torch.matmul, the fused-statistics
             overhead on a training step, the CUDA C greedy kernel vs the torch greedy.
- train:     the quickstart config through DeepSpeed (NCCL on a GPU) with pruning events, step
             times before and after each event (`train.py`).
- train_bf16, train_fp16: the same run in bf16 and in fp16 (loss scaling); fp16 is skipped
             with its reason where the config check refuses it (a CPU without fp16).

Everything is written under DIR: results.json, summary.md and the stages' logs.
`--allow-cpu --small` runs the same logic on a CPU with Triton's interpreter (the dry run the
tests check). Only the standard library is imported by the orchestrator, so it runs before
anything is installed.
"""

# stage name -> its own timeout (seconds); the overall budget trims later stages further
STAGE_TIMEOUTS = {"install": 60, "tests": 140, "bench": 100, "train": 110, "train_bf16": 45,
                  "train_fp16": 45}
BUDGET_S = 470            # the whole command, preflight included (the issue allows 8 minutes)
TARGET_PYTHON = "3.12"    # the CUDA machine's python3
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
KERNEL_TEST_FILES = ("tests/test_kernels.py", "tests/test_cuda_greedy.py")
