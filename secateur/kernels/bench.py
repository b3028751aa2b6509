"""`secateur bench kernels [--json FILE] [--quick] [--threads N]`: time every kernel op on the torch
path (CPU, and CUDA when present) and the Triton path (CUDA only), and report achieved GB/s
(channel-wise ops, bytes read + written once) or GFLOP/s (Gram, 2 n^2 m per matrix counting both
triangles). Also: the cost of TSRA's fused statistics over a plain forward, and TSRA eager vs
torch.compile on CPU. Timings are medians of interleaved repeats, measured side by side in one run.

On a shared machine, 1 thread (`--threads 1`) gives far steadier CPU numbers than 2: with every
core busy, a parallel region waits for its slowest thread."""
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


def _times_ms(fns: dict[str, Callable[[], object]], dev: str, repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) of each fn over `repeats` rounds; in each round every fn runs once, in an
    order that alternates between rounds, so machine noise and allocator state hit all alike."""
    for f in fns.values():       # warm-up (and compile)
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rnd in range(repeats):
        for k in names if rnd % 2 == 0 else names[::-1]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[k]()
            _sync(dev)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of freshly mapped memory: with
    glibc, every activation-sized CPU tensor above its mmap threshold costs one per 4 KiB)."""
    try:
        import resource
    except ImportError:          # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _act_shape(quick: bool) -> tuple[int, int, int, int]:
    return (32, 64, 16, 16) if quick else (64, 128, 32, 32)


def _cases(dev: str, quick: bool):
    x = torch.randn(*_act_shape(quick), device=dev)
    c = x.shape[1]
    g = torch.randn_like(x)
    stats = torch.zeros(c, device=dev)
    xg = x.clone().requires_grad_()
    n, m = (256, 512) if quick else (1024, 2048)
    w = torch.randn(n, m, device=dev)
    nbytes = x.numel() * x.element_size()

    def fwd_bwd(op):
        def run():
            xg.grad = None
            op(xg).backward(g)
        return run

    return {   # name: (fn, bytes moved, flops)
        "tsra_fwd": (lambda: tsra(x), 2 * nbytes, 0),
        "tsra_fwd_stats": (lambda: tsra(x, stats=stats), 2 * nbytes, 0),
        "tsra_fwd_bwd": (fwd_bwd(tsra), 5 * nbytes, 0),
        "rms_norm2d_fwd": (lambda: rms_norm2d(x), 2 * nbytes, 0),
        "rms_norm2d_fwd_bwd": (fwd_bwd(rms_norm2d), 5 * nbytes, 0),
        "channel_sq_sum": (lambda: channel_sq_sum(x), nbytes, 0),
        "gram": (lambda: gram(w), w.numel() * 4 + n * n * 4, 2 * n * n * m),
    }, tuple(x.shape), (n, m)


def run(quick: bool = False, repeats: int | None = None, compile_cpu: bool = True) -> dict:
    """All measurements as a JSON-able dict (see `main` for what is printed)."""
    repeats = repeats or (5 if quick else 15)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                        "repeats": repeats},
               "ops": []}
    forced = os.environ.get("SECATEUR_BACKEND")
    try:
        for dev in devices:
            for be in ["torch"] + (["triton"] if dev == "cuda" else []):
                os.environ["SECATEUR_BACKEND"] = be
                cases, act_shape, gram_shape = _cases(dev, quick)
                for k, (fn, nbytes, flops) in cases.items():
                    # one op at a time: an op's allocator state (reused heap vs fresh pages) is
                    # its own, not left over from a neighbour
                    faults0 = _minor_faults()
                    times = _times_ms({k: fn}, dev, repeats)[k]
                    ms = statistics.median(times)
                    results["ops"].append({
                        "op": k, "device": dev, "backend": be, "ms": ms, "ms_min": min(times),
                        "page_faults_per_call": (_minor_faults() - faults0) / (repeats + 2),
                        "GB/s": nbytes / ms / 1e6 if not flops else None,
                        "GFLOP/s": flops / ms / 1e6 if flops else None,
                        "shape": list(gram_shape if k == "gram" else act_shape)})
        os.environ["SECATEUR_BACKEND"] = "torch"
        results["tsra_stats_overhead_cpu"] = [_stats_overhead(shape, repeats * 4)
                                              for shape in dict.fromkeys([(64, 128, 16, 16), _act_shape(quick)])]
        if compile_cpu:
            results["tsra_eager_vs_compile_cpu"] = _eager_vs_compile(_act_shape(quick), repeats)
    finally:
        if forced is None:
            os.environ.pop("SECATEUR_BACKEND", None)
        else:
            os.environ["SECATEUR_BACKEND"] = forced
    return results


def _stats_overhead(shape: tuple[int, ...], repeats: int) -> dict:
    """TSRA forward with vs without fused statistics on the CPU torch path. The overhead is the
    median over rounds of (stats / plain - 1): each round times both back to back."""
    x = torch.randn(*shape)
    stats = torch.zeros(shape[1])
    t = _times_ms({"plain": lambda: tsra(x), "stats": lambda: tsra(x, stats=stats)}, "cpu", repeats)
    ratio = statistics.median(s / p - 1.0 for p, s in zip(t["plain"], t["stats"]))
    return {"shape": list(shape), "plain_ms": statistics.median(t["plain"]),
            "stats_ms": statistics.median(t["stats"]), "plain_ms_min": min(t["plain"]),
            "stats_ms_min": min(t["stats"]), "overhead_pct": 100.0 * ratio}


def _eager_vs_compile(shape: tuple[int, ...], repeats: int) -> dict:
    """TSRA on CPU: the eager production path (`tsra`, one autograd Function) and the unfused
    eager reference vs torch.compile of the reference (inductor; its backward from AOTAutograd)."""
    from secateur.kernels.tsra import tsra_forward_reference

    x = torch.randn(*shape)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    sp = shape[1] // 2

    def ref(t):
        return tsra_forward_reference(t, 1, sp, 5.0, 0.5, 0.7, 1e-12)

    compiled = torch.compile(ref)

    def fwd_bwd(f):
        def run():
            xg.grad = None
            f(xg).backward(g)
        return run

    t0 = time.perf_counter()
    compiled(x)
    fwd_bwd(compiled)()
    compile_s = time.perf_counter() - t0
    t = _times_ms({"eager_fwd": lambda: tsra(x), "eager_reference_fwd": lambda: ref(x),
                   "compiled_fwd": lambda: compiled(x), "eager_fwd_bwd": fwd_bwd(tsra),
                   "eager_reference_fwd_bwd": fwd_bwd(ref), "compiled_fwd_bwd": fwd_bwd(compiled)},
                  "cpu", repeats)
    ms = {k: statistics.median(v) for k, v in t.items()}
    return {**ms, "fwd_speedup": ms["eager_fwd"] / ms["compiled_fwd"],
            "fwd_bwd_speedup": ms["eager_fwd_bwd"] / ms["compiled_fwd_bwd"],
            "first_compile_s": compile_s, "shape": list(shape)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="secateur bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip TSRA eager vs torch.compile")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    res = run(args.quick, args.repeats, compile_cpu=not args.no_compile)
    print(f"{'op':20s} {'device':6s} {'backend':7s} {'ms':>9s} {'min ms':>9s} {'GB/s':>8s} {'GFLOP/s':>8s} "
          f"{'faults':>7s}")
    for r in res["ops"]:
        gbs = f"{r['GB/s']:.1f}" if r["GB/s"] else "-"
        gfl = f"{r['GFLOP/s']:.1f}" if r["GFLOP/s"] else "-"
        print(f"{r['op']:20s} {r['device']:6s} {r['backend']:7s} {r['ms']:9.3f} {r['ms_min']:9.3f} "
              f"{gbs:>8s} {gfl:>8s} {r['page_faults_per_call']:7.0f}")
    for o in res["tsra_stats_overhead_cpu"]:
        print(f"TSRA fused stats on CPU {o['shape']}: {o['plain_ms']:.3f} ms -> {o['stats_ms']:.3f} ms "
              f"(median per-round overhead {o['overhead_pct']:+.1f}%)")
    if "tsra_eager_vs_compile_cpu" in res:
        e = res["tsra_eager_vs_compile_cpu"]
        print(f"TSRA on CPU {e['shape']}: forward eager {e['eager_fwd']:.3f} ms, compiled "
              f"{e['compiled_fwd']:.3f} ms (x{e['fwd_speedup']:.2f}); fwd+bwd eager "
              f"{e['eager_fwd_bwd']:.3f} ms, compiled {e['compiled_fwd_bwd']:.3f} ms "
              f"(x{e['fwd_bwd_speedup']:.2f}); first compile {e['first_compile_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0
