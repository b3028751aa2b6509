"""Projective scoring and greedy removal, measured side by side.

1. All n redundancy scores from one inverse (`projective.scores`) vs the per-row formulation
   (`projective.rowwise_scores`: one ridge solve per row on the shared Gram matrix), on random
   layers of 512x1024, 1024x2048 and 2048x4096: time ratio and max difference.
2. Removing half the rows: exact greedy with O(n^2) downdates vs recomputing every score from
   scratch after each removal vs the published lazy update: time and overlap of removed sets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf_projective.py --out benchmarks/results/projective_perf.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from secateur.pruning import projective as P


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def recompute_greedy(w: torch.Tensor, r: int, lam: float) -> list[int]:
    """Greedy removal that re-inverts the Gram matrix of the remaining rows at every step."""
    idx = list(range(w.shape[0]))
    removed = []
    for _ in range(r):
        i = int(torch.argmin(P.scores(w[idx], lam)))
        removed.append(idx.pop(i))
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048", "2048x4096"])
    ap.add_argument("--greedy-sizes", nargs="+", default=["512x1024", "1024x2048"])
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results/projective_perf.json")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    res = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} thread(s)", "date": time.strftime("%Y-%m-%d")},
           "scores": [], "greedy": []}
    print("| layer | closed form (s) | per-row solves (s) | speed-up | max abs diff |\n|---|---|---|---|---|")
    for size in args.sizes:
        n, m = map(int, size.split("x"))
        w = torch.randn(n, m, generator=g, dtype=torch.float64) / m ** 0.5
        fast, t_fast = _time(lambda: P.scores(w, args.lam))
        slow, t_slow = _time(lambda: P.rowwise_scores(w, args.lam))
        diff = float((fast - slow).abs().max())
        res["scores"].append({"size": size, "closed_s": t_fast, "rowwise_s": t_slow,
                              "speedup": t_slow / t_fast, "max_abs_diff": diff})
        print(f"| {size} | {t_fast:.3f} | {t_slow:.2f} | {t_slow / t_fast:.0f}x | {diff:.1e} |", flush=True)
    print("\n| layer | rows removed | exact greedy (s) | recompute (s) | lazy (s) | exact = recompute | "
          "overlap lazy/exact |\n|---|---|---|---|---|---|---|")
    for size in args.greedy_sizes:
        n, m = map(int, size.split("x"))
        w = torch.randn(n, m, generator=g, dtype=torch.float64) / m ** 0.5
        r = n // 2
        ex, t_ex = _time(lambda: P.greedy(w, r, args.lam, mode="exact", redistribute=False))
        rc, t_rc = _time(lambda: recompute_greedy(w, r, args.lam))
        lz, t_lz = _time(lambda: P.greedy(w, r, args.lam, mode="lazy", redistribute=False))
        same = ex.removed.tolist() == rc
        overlap = len(set(lz.removed.tolist()) & set(ex.removed.tolist())) / r
        res["greedy"].append({"size": size, "removed": r, "exact_s": t_ex, "recompute_s": t_rc,
                              "lazy_s": t_lz, "exact_equals_recompute": same, "lazy_overlap": overlap})
        print(f"| {size} | {r} | {t_ex:.2f} | {t_rc:.1f} | {t_lz:.2f} | {same} | {overlap:.1%} |", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
