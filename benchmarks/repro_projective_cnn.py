"""Projective pruning of a CNN to 2x and 3x fewer FLOPs (METHODS.md C, Table 1 setting), reproduced at
CPU scale: the Fashion-MNIST VGG base run is pruned globally (Rule("ratio", r, "global"): lowest
mean-normalised scores across all layers) with r found by bisection so that the pruned model's
conv + linear multiply-accumulates are at most 1/2 (1/3) of the base's, then fine-tuned with the
same fixed budget for every criterion: random, L2, projective without and with redistribution.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repro_projective_cnn.py
"""
from __future__ import annotations

import argparse
import copy
import time

import _repro_common as C
from secateur.pruning import Rule

METHODS = {
    "random": ("random", {"seed": 0}),
    "l2": ("l2", {}),
    "projective": ("projective", {"redistribute": False}),
    "projective+redistribution": ("projective", {"redistribute": True}),
}


def prune_to_speedup(base: C.Base, crit: str, kw: dict, target: float, base_flops: int):
    """(ratio, pruned model) with the smallest global ratio whose FLOPs reduction reaches `target`."""
    shape = tuple(base.data.input_shape)

    def speedup(r: float) -> float:
        m, _ = C.prune_copy(base.model, crit, Rule("ratio", r, "global"), **kw)
        return base_flops / C.flops(m, shape)

    r = C.bisect(speedup, target, 0.0, 0.95, iters=12)
    return r, C.prune_copy(base.model, crit, Rule("ratio", r, "global"), **kw)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2x only, 40 fine-tuning steps (a smoke run)")
    ap.add_argument("--base", choices=sorted(C.BASES), default="vgg_relu")
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(C.RESULTS))
    args = ap.parse_args(argv)
    targets = (2.0,) if args.quick else (2.0, 3.0)
    steps = 40 if args.quick else args.ft_steps
    t0 = time.perf_counter()
    base = C.load_base(args.base)
    (xt, yt), (xe, ye) = (base.data.train.x, base.data.train.y), (base.data.val.x, base.data.val.y)
    shape = tuple(base.data.input_shape)
    f0, p0 = C.flops(base.model, shape), C.param_count(base.model)
    acc0 = C.accuracy(base.model, xe, ye)
    base_ft = C.finetune(copy.deepcopy(base.model), xt, yt, steps, lr=args.lr)
    bn_acc = lambda m: C.accuracy(C.bn_reset(copy.deepcopy(m), xt[:1000]), xe, ye)
    rows = [{"target": 1.0, "method": "unpruned", "ratio": 0.0, "flops": f0, "speedup": 1.0, "params": p0,
             "widths": C.widths(base.model), "acc_pruned": acc0, "acc_bn": bn_acc(base.model),
             "acc_ft": C.accuracy(base_ft, xe, ye)}]
    print(f"{args.base}: {f0:,} MACs, {p0:,} params, acc {acc0:.4f} "
          f"(same fine-tune without pruning: {rows[0]['acc_ft']:.4f})", flush=True)
    for target in targets:
        for label, (crit, kw) in METHODS.items():
            t1 = time.perf_counter()
            r, m = prune_to_speedup(base, crit, kw, target, f0)
            row = {"target": target, "method": label, "ratio": r, "flops": C.flops(m, shape),
                   "params": C.param_count(m), "widths": C.widths(m), "acc_pruned": C.accuracy(m, xe, ye),
                   "acc_bn": bn_acc(m)}
            row["speedup"] = f0 / row["flops"]
            row["acc_ft"] = C.accuracy(C.finetune(m, xt, yt, steps, lr=args.lr), xe, ye)
            rows.append(row)
            print(f"{target:.0f}x {label:26s} r={r:.3f} speed-up {row['speedup']:.2f} widths "
                  f"{list(row['widths'].values())} acc {row['acc_pruned']:.4f}, BN reset "
                  f"{row['acc_bn']:.4f}, fine-tuned {row['acc_ft']:.4f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    tab = C.md_table(
        ["target", "method", "global ratio r", "MACs", "FLOPs reduction", "params", "widths",
         "acc after pruning", "acc after BN reset", f"acc after {steps}-step fine-tune"],
        [[f"{r['target']:.0f}x" if r["target"] > 1 else "-", r["method"], f"{r['ratio']:.3f}", r["flops"],
          f"{r['speedup']:.2f}x", r["params"], "/".join(map(str, r["widths"].values())), r["acc_pruned"],
          r["acc_bn"], r["acc_ft"]] for r in rows])
    meta = {**C.run_meta(argv), "seconds": time.perf_counter() - t0, "base": args.base, "ft_steps": steps,
            "lr": args.lr, "quick": args.quick}

    def plot(path: C.Path) -> None:
        panels = []
        for key, title in (("acc_pruned", "right after pruning"), ("acc_bn", "after BN reset (1,000 images)"),
                           ("acc_ft", f"after {steps} fine-tuning steps")):
            series = {lab: ([r["speedup"] for r in rows if r["method"] == lab],
                            [r[key] for r in rows if r["method"] == lab]) for lab in METHODS}
            note = " (same fine-tune)" if key == "acc_ft" else ""
            panels.append({"title": title, "xlabel": "FLOPs reduction (x)", "ylabel": "validation accuracy",
                           "series": series, "hline": (rows[0][key], "unpruned" + note)})
        C.line_plot(path, panels, f"Global pruning of {args.base} to a FLOPs target")

    intro = (f"Base run `{args.base}` (Fashion-MNIST, 20k train / 2k validation images). Global ratio r "
             f"found by 12 bisection steps so that MACs <= base / target. Fine-tuning, identical for every "
             f"row: AdamW lr {args.lr:g} cosine to 0, weight decay 5e-4, batch 128, {steps} steps, same "
             f"data order, starting from the pruned model (not the BN-reset one). 'BN reset' recomputes the "
             f"BatchNorm running statistics from 1,000 training images (no weight changes). The unpruned row's "
             f"last column is the base model given the same fine-tune. "
             f"Widths are per group (features.0/4/8, classifier.0).")
    C.publish("projective_cnn", "Projective pruning of a CNN to 2x / 3x fewer FLOPs (METHODS.md C)", args.out,
              meta, {"rows": rows}, intro, tab, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
