"""`secateur bench kernels [--json FILE] [--quick]`: time every kernel op on the torch path (CPU,
and CUDA when present) and the Triton path (CUDA only), and report achieved GB/s (channel-wise
ops, bytes read + written once) or GFLOP/s (Gram, 2 n^2 m per matrix counting both triangles).
Also: the cost of TSRA's fused statistics over a plain forward, and TSRA eager vs torch.compile.
Timings are medians of interleaved repeats, measured side by side in one run."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from secateur.kernels import channel_sq_sum, gram, rms_norm2d, tsra


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _median_ms(fns: dict[str, Callable[[], object]], dev: str, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each fn, interleaved so machine noise hits all alike."""
    for f in fns.values():       # warm-up (and compile)
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _cases(dev: str, quick: bool):
    c, hw, b = (64, 16, 32) if quick else (128, 32, 64)
    x = torch.randn(b, c, hw, hw, device=dev)
    g = torch.randn_like(x)
    stats = torch.zeros(c, device=dev)
    xg = x.clone().requires_grad_()
    n, m = (256, 512) if quick else (1024, 2048)
    w = torch.randn(n, m, device=dev)
    nbytes = x.numel() * x.element_size()

    def fwd_bwd():
        xg.grad = None
        tsra(xg).backward(g)

    def rms_bwd():
        xg.grad = None
        rms_norm2d(xg).backward(g)

    return {   # name: (fn, bytes moved, flops)
        "tsra_fwd": (lambda: tsra(x), 2 * nbytes, 0),
        "tsra_fwd_stats": (lambda: tsra(x, stats=stats), 2 * nbytes, 0),
        "tsra_fwd_bwd": (fwd_bwd, 5 * nbytes, 0),
        "rms_norm2d_fwd": (lambda: rms_norm2d(x), 2 * nbytes, 0),
        "rms_norm2d_fwd_bwd": (rms_bwd, 5 * nbytes, 0),
        "channel_sq_sum": (lambda: channel_sq_sum(x), nbytes, 0),
        "gram": (lambda: gram(w), w.numel() * 4 + n * n * 4, 2 * n * n * m),
    }, tuple(x.shape), (n, m)


def run(quick: bool = False, repeats: int | None = None, compile_cpu: bool = True) -> dict:
    repeats = repeats or (5 if quick else 15)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()},
               "ops": []}
    for dev in devices:
        backends = ["torch"] + (["triton"] if dev == "cuda" else [])
        for be in backends:
            os.environ["SECATEUR_BACKEND"] = be
            cases, act_shape, gram_shape = _cases(dev, quick)
            ms = _median_ms({k: v[0] for k, v in cases.items()}, dev, repeats)
            for k, (_, nbytes, flops) in cases.items():
                results["ops"].append({
                    "op": k, "device": dev, "backend": be, "ms": ms[k],
                    "GB/s": nbytes / ms[k] / 1e6 if not flops else None,
                    "GFLOP/s": flops / ms[k] / 1e6 if flops else None,
                    "shape": list(gram_shape if k == "gram" else act_shape)})
    os.environ.pop("SECATEUR_BACKEND", None)
    results["tsra_stats_overhead_cpu"] = _stats_overhead(quick, repeats)
    if compile_cpu:
        results["tsra_eager_vs_compile_cpu"] = _eager_vs_compile(quick, repeats)
    return results


def _stats_overhead(quick: bool, repeats: int) -> dict:
    cases, _, _ = _cases("cpu", quick)
    ms = _median_ms({"plain": cases["tsra_fwd"][0], "stats": cases["tsra_fwd_stats"][0]}, "cpu",
                    repeats * 2)
    return {"plain_ms": ms["plain"], "stats_ms": ms["stats"],
            "overhead_pct": 100.0 * (ms["stats"] / ms["plain"] - 1.0)}


def _eager_vs_compile(quick: bool, repeats: int) -> dict:
    from secateur.kernels.tsra import tsra_backward_reference, tsra_forward_reference

    c, hw, b = (64, 16, 32) if quick else (128, 32, 64)
    x = torch.randn(b, c, hw, hw)
    g = torch.randn_like(x)
    sp = c // 2

    def eager_f():
        return tsra_forward_reference(x, 1, sp, 5.0, 0.5, 0.7, 1e-12)

    def eager_b():
        return tsra_backward_reference(x, g, 1, sp, 5.0, 0.5, 0.7, 1e-12)

    comp_f = torch.compile(lambda: tsra_forward_reference(x, 1, sp, 5.0, 0.5, 0.7, 1e-12))
    comp_b = torch.compile(lambda: tsra_backward_reference(x, g, 1, sp, 5.0, 0.5, 0.7, 1e-12))
    ms = _median_ms({"eager_fwd": eager_f, "compiled_fwd": comp_f, "eager_bwd": eager_b,
                     "compiled_bwd": comp_b}, "cpu", repeats)
    return {**ms, "fwd_speedup": ms["eager_fwd"] / ms["compiled_fwd"],
            "bwd_speedup": ms["eager_bwd"] / ms["compiled_bwd"], "shape": [b, c, hw, hw]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="secateur bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip TSRA eager vs torch.compile")
    args = ap.parse_args(argv)
    res = run(args.quick, args.repeats, compile_cpu=not args.no_compile)
    print(f"{'op':20s} {'device':6s} {'backend':7s} {'ms':>9s} {'GB/s':>8s} {'GFLOP/s':>8s}")
    for r in res["ops"]:
        gbs = f"{r['GB/s']:.1f}" if r["GB/s"] else "-"
        gfl = f"{r['GFLOP/s']:.1f}" if r["GFLOP/s"] else "-"
        print(f"{r['op']:20s} {r['device']:6s} {r['backend']:7s} {r['ms']:9.3f} {gbs:>8s} {gfl:>8s}")
    o = res["tsra_stats_overhead_cpu"]
    print(f"TSRA fused stats on CPU: {o['plain_ms']:.3f} ms -> {o['stats_ms']:.3f} ms "
          f"({o['overhead_pct']:+.1f}%)")
    if "tsra_eager_vs_compile_cpu" in res:
        e = res["tsra_eager_vs_compile_cpu"]
        print(f"TSRA torch.compile on CPU: forward x{e['fwd_speedup']:.2f}, "
              f"backward x{e['bwd_speedup']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0
