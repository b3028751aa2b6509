"""gpu-check's benchmark stage: `python -m secateur.gpucheck.bench --out FILE [--small]`.

On the GPU (CUDA events, medians of interleaved rounds, Triton and torch measured side by side):
- the device's copy bandwidth: a large device-to-device copy (bytes read + written);
- TSRA forward (with and without fused statistics), forward+backward, RMSNorm2d, channel sum of
  squares: Triton vs the torch path in GB/s and as a fraction of the copy bandwidth (bytes as in
  `secateur bench kernels`: forward 2x the activation, forward+backward 5x, channel sums 1x);
- Gram W W^T in TFLOP/s (2 n^2 m, both triangles counted) vs torch.matmul (IEEE fp32, TF32, bf16);
- the fused statistics' overhead on a whole training step of a TSRA VGG (stats on vs off);
- the CUDA C greedy projective kernel vs the torch greedy (`projective.greedy`, exact, no
  redistribution: the same removal order) on the host and, where it runs, on the device, and
  whether the orders agree;
- `secateur bench kernels` at its standard shapes (kernels/bench.py), as one more table.

`--small` (the CPU dry run): tiny shapes, Triton in its interpreter (TRITON_INTERPRET=1), a few
repeats; the CUDA C kernel is recorded as skipped. The JSON file is rewritten after every section,
so a timeout leaves what was measured."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch


class Timer:
    """Median ms per call of `fn`: on CUDA with events around `k` back-to-back calls (k chosen so
    one sample lasts ~target_ms), on CPU with perf_counter."""

    def __init__(self, device: str, target_ms: float) -> None:
        self.device, self.target_ms = device, target_ms

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def sample(self, fn: Callable[[], object], k: int) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / k
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) * 1e3 / k

    def iters(self, fn: Callable[[], object]) -> int:
        fn()                      # warm-up (and JIT compile)
        fn()
        self.sync()
        one = self.sample(fn, 1)
        return max(1, min(200, int(self.target_ms / max(one, 1e-3))))

    def compare(self, fns: dict[str, Callable[[], object]], repeats: int,
                setup: dict[str, Callable[[], object]] | None = None) -> dict[str, dict]:
        """Interleaved rounds: in each round every fn is sampled once, the order alternating.
        `setup[name]` runs before each of name's samples (e.g. selecting a backend)."""
        setup = setup or {}
        ks = {}
        for name, fn in fns.items():
            setup.get(name, lambda: None)()
            ks[name] = self.iters(fn)
        times: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for rnd in range(repeats):
            for name in names if rnd % 2 == 0 else names[::-1]:
                setup.get(name, lambda: None)()
                times[name].append(self.sample(fns[name], ks[name]))
        return {n: {"ms": statistics.median(t), "ms_min": min(t), "iters": ks[n], "samples": len(t)}
                for n, t in times.items()}


@contextmanager
def restored_backend():
    """Put SECATEUR_BACKEND back as it was (the sections switch it between samples)."""
    old = os.environ.get("SECATEUR_BACKEND")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SECATEUR_BACKEND", None)
        else:
            os.environ["SECATEUR_BACKEND"] = old


def _use(name: str) -> Callable[[], None]:
    return lambda: os.environ.__setitem__("SECATEUR_BACKEND", name)


SHAPES = {  # mode -> shapes
    "gpu": {"act": (128, 256, 56, 56), "copy_mib": 1024, "gram": [(4096, 4096), (16, 512, 2048)],
            "greedy": [(1024, 2048, 512), (4096, 8192, 2048)], "repeats": 10, "target_ms": 2.0},
    "small": {"act": (2, 8, 4, 4), "copy_mib": 4, "gram": [(16, 32)], "greedy": [(16, 32, 8)],
              "repeats": 2, "target_ms": 0.0},
}
STEP_MODELS = {
    "gpu": [("quickstart VGG-TSRA", dict(in_channels=1, widths=[32, "M", 64, "M", 128], fc=[128], dropout=0.1),
             128, (1, 28, 28)),
            ("wide VGG-TSRA", dict(in_channels=3, widths=[128, "M", 256, "M", 512], fc=[512], dropout=0.1),
             256, (3, 32, 32))],
    "small": [("tiny VGG-TSRA", dict(in_channels=1, widths=[4, "M", 8], fc=[8], dropout=0.1), 8, (1, 8, 8))],
}


def copy_bandwidth(dev: str, mib: int, timer: Timer, repeats: int) -> dict:
    n = mib * 2**20 // 4
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    t = timer.compare({"copy": lambda: y.copy_(x)}, repeats)["copy"]
    nbytes = 2 * x.numel() * 4
    del x, y
    return {"bytes_per_call": nbytes, "ms": t["ms"], "GB/s": nbytes / t["ms"] / 1e6, "buffer_MiB": mib}


def channel_ops(dev: str, shape: tuple, dtypes: list[torch.dtype], timer: Timer, repeats: int,
                copy_gbs: float) -> list[dict]:
    from secateur.kernels import channel_sq_sum, rms_norm2d, tsra

    rows = []
    for dtype in dtypes:
        x = torch.randn(*shape, device=dev).to(dtype)
        g = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        stats = torch.zeros(shape[1], device=dev)
        nbytes = x.numel() * x.element_size()

        def fwd_bwd(op):
            def run():
                xg.grad = None
                op(xg).backward(g)
            return run

        cases = {
            "tsra_fwd": (lambda: tsra(x), 2 * nbytes),
            "tsra_fwd_stats": (lambda: tsra(x, stats=stats), 2 * nbytes),
            "tsra_fwd_bwd": (fwd_bwd(tsra), 5 * nbytes),
            "rms_norm2d_fwd": (lambda: rms_norm2d(x), 2 * nbytes),
            "rms_norm2d_fwd_bwd": (fwd_bwd(rms_norm2d), 5 * nbytes),
            "channel_sq_sum": (lambda: channel_sq_sum(x), nbytes),
        }
        for op, (fn, moved) in cases.items():
            t = timer.compare({"triton": fn, "torch": fn}, repeats,
                              setup={"triton": _use("triton"), "torch": _use("torch")})
            row = {"op": op, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                   "bytes": moved}
            for be in ("triton", "torch"):
                gbs = moved / t[be]["ms"] / 1e6
                row[be] = {**t[be], "GB/s": gbs, "of_copy": gbs / copy_gbs if copy_gbs else None}
            row["speedup"] = t["torch"]["ms"] / t["triton"]["ms"]
            rows.append(row)
        del x, g, xg
    return rows


def gram_ops(dev: str, shapes: list[tuple], timer: Timer, repeats: int) -> list[dict]:
    from secateur.kernels import gram

    rows = []
    for shape in shapes:
        n, m = shape[-2], shape[-1]
        batch = 1
        for s in shape[:-2]:
            batch *= s
        flops = 2 * batch * n * n * m
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(*shape, device=dev).to(dtype)
            wt = w.mT
            fns = {"triton": lambda: gram(w), "torch_path": lambda: gram(w)}
            setup = {"triton": _use("triton"), "torch_path": _use("torch")}
            if dtype == torch.float32:
                fns["matmul_ieee"] = lambda: torch.matmul(w, wt)
                fns["matmul_tf32"] = lambda: torch.matmul(w, wt)
                setup["matmul_ieee"] = lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False)
                setup["matmul_tf32"] = lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)
                # the torch path is an fp32 matmul: measure it with TF32 off, as it is by default
                setup["torch_path"] = lambda: (_use("torch")(),
                                               setattr(torch.backends.cuda.matmul, "allow_tf32", False))
            else:
                fns["matmul_bf16"] = lambda: torch.matmul(w, wt)
            old_tf32 = torch.backends.cuda.matmul.allow_tf32
            try:
                t = timer.compare(fns, repeats, setup)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old_tf32
            rows.append({"op": "gram", "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                         "flops": flops,
                         **{k: {**v, "TFLOP/s": flops / v["ms"] / 1e9} for k, v in t.items()}})
            del w, wt
    return rows


def step_overhead(dev: str, models: list, timer: Timer, repeats: int) -> list[dict]:
    """Median over rounds of (step with TSRA statistics / step without - 1) for a full training
    step (forward, backward, AdamW) of a TSRA VGG on the device's default kernel path."""
    import torch.nn.functional as F

    from secateur.kernels import TSRA
    from secateur.models import VGGTSRA

    rows = []
    for label, args, batch, in_shape in models:
        torch.manual_seed(0)
        model = VGGTSRA(num_classes=10, **args).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(batch, *in_shape, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        tsras = [m for m in model.modules() if isinstance(m, TSRA)]

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def tracking(on: bool):
            return lambda: [m.track_stats(on) for m in tsras]

        t = timer.compare({"plain": step, "stats": step}, max(repeats, 4),
                          setup={"plain": tracking(False), "stats": tracking(True)})
        rows.append({"model": label, "batch": batch, "input": list(in_shape),
                     "params": sum(p.numel() for p in model.parameters()),
                     "plain_ms": t["plain"]["ms"], "stats_ms": t["stats"]["ms"],
                     "overhead_pct": 100.0 * (t["stats"]["ms"] / t["plain"]["ms"] - 1.0)})
        del model, opt
    return rows


CPU_GREEDY_MAX_N = 1024   # the torch greedy on the host is O(r n^2) memory traffic: ~2 s at n = 1024


def greedy_ops(dev: str, cases: list[tuple], timer: Timer, kernel: Callable | None = None) -> list[dict]:
    """The CUDA C kernel (f64 and f32 working copies) vs the torch greedy (`projective.greedy`,
    exact, no redistribution: the kernel's removal order). The torch greedy is timed once on the
    host (n <= CPU_GREEDY_MAX_N; it is the reference order) and, where it runs, on the device;
    an error on the device is recorded, not raised. `kernel`: greedy_order_cuda (None: no GPU)."""
    from secateur.pruning.projective import greedy

    rows = []
    lam = 1e-3
    for n, m, r in cases:
        g = torch.Generator().manual_seed(n)
        W_cpu = torch.randn(n, m, generator=g, dtype=torch.float64)
        row: dict = {"n": n, "m": m, "r": r, "lam": lam}
        ref = None
        if n <= CPU_GREEDY_MAX_N:
            t0 = time.perf_counter()
            ref = greedy(W_cpu, r, lam, mode="exact", redistribute=False).removed.tolist()
            row["torch_cpu"] = (time.perf_counter() - t0) * 1e3
        if kernel is None:
            row["cuda"] = "skipped: the CUDA C kernel needs a CUDA GPU"
            rows.append(row)
            continue
        W = W_cpu.to(dev)
        fns = {"cuda_f64": lambda: kernel(W, r, lam),
               "cuda_f32": lambda: kernel(W, r, lam, dtype=torch.float32)}
        try:
            on_dev = greedy(W, r, lam, mode="exact", redistribute=False).removed.tolist()
            ref = ref if ref is not None else on_dev
            row["torch_cuda_same_order"] = on_dev == ref
            fns["torch_cuda"] = lambda: greedy(W, r, lam, mode="exact", redistribute=False)
        except Exception as err:       # a finding to report, not a reason to stop
            row["torch_cuda_error"] = f"{type(err).__name__}: {err}"[:300]
        order64 = kernel(W, r, lam).tolist()
        order32 = kernel(W, r, lam, dtype=torch.float32).tolist()
        # f64 against the torch order (None: no torch reference ran); f32: steps that agree with it
        # (or with the f64 kernel) before the first difference, of r
        row["same_order_f64"] = None if ref is None else order64 == ref
        base = order64 if ref is None else ref
        row["same_prefix_f32"] = next((i for i, (a, b) in enumerate(zip(order32, base)) if a != b), r)
        t = timer.compare(fns, 3)
        row.update({k: v["ms"] for k, v in t.items()})
        for base in ("torch_cpu", "torch_cuda"):
            if base in row:
                row[f"speedup_f64_vs_{base}"] = row[base] / row["cuda_f64"]
                row[f"speedup_f32_vs_{base}"] = row[base] / row["cuda_f32"]
        rows.append(row)
        del W
    return rows


def machine(dev: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": dev,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_GiB=round(p.total_memory / 2**30, 1))
    else:
        info["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


def run(out: Path, small: bool) -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not small:
        print("bench: no CUDA device; use --small for the CPU dry run", file=sys.stderr)
        return 2
    mode = "small" if small else "gpu"
    sh = SHAPES[mode]
    timer = Timer(dev, sh["target_ms"])
    res: dict = {"machine": machine(dev), "mode": mode, "errors": {}}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")

    sections = [
        ("copy", lambda: copy_bandwidth(dev, sh["copy_mib"], timer, sh["repeats"])),
        ("channel_ops", lambda: channel_ops(dev, sh["act"], [torch.float32, torch.bfloat16], timer,
                                            sh["repeats"], (res.get("copy") or {}).get("GB/s") or 0.0)),
        ("gram", lambda: gram_ops(dev, sh["gram"], timer, sh["repeats"])),
        ("train_step_stats_overhead", lambda: step_overhead(dev, STEP_MODELS[mode], timer, sh["repeats"])),
        ("greedy", lambda: greedy_ops(dev, sh["greedy"], timer, _greedy_kernel(dev))),
        ("secateur_bench_kernels", lambda: _standard(small)),
    ]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            with restored_backend():
                res[name] = fn()
            print(f"bench: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as err:      # record and go on: one broken section must not hide the rest
            res["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        if dev == "cuda":
            torch.cuda.empty_cache()
        save()
    return 1 if res["errors"] else 0


def _greedy_kernel(dev: str) -> Callable | None:
    if dev != "cuda":
        return None
    from secateur.kernels.cuda.greedy_projective import greedy_order_cuda

    return greedy_order_cuda


def _standard(small: bool) -> dict:
    """`secateur bench kernels` (kernels/bench.py) at its own shapes: CPU torch rows, and the
    CUDA torch and Triton rows where a GPU exists."""
    from secateur.kernels import bench as kbench

    os.environ.pop("SECATEUR_BACKEND", None)
    return kbench.run(quick=small, repeats=2 if small else 10, compile_cpu=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m secateur.gpucheck.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="CPU dry run: tiny shapes, Triton interpreter")
    args = ap.parse_args(argv)
    if args.small and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before secateur.kernels imports triton
    return run(Path(args.out), args.small)


if __name__ == "__main__":
    sys.exit(main())
