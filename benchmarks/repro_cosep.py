"""CoSeP (METHODS.md D) on the Fashion-MNIST VGG control run (conv -> BatchNorm -> ReLU), reproduced
at CPU scale, layer by layer as in D.2 step 6:

for each prunable layer in order: collect per-class activation moments on calibration images (the
pruner is given the labels before every forward), let CoSeP choose the layer's width (JM
separability profiles -> k-medoids for every k -> knee of the mean simplified silhouette -> one
max-norm unit per cluster), prune that layer only (Pruner(..., layers=[name])), then fine-tune
briefly on a random 25% of the training images before the next layer.

The L2 baseline prunes the same layers to the same widths CoSeP chose (so the same FLOPs), choosing
the units by L2 norm, with the identical fine-tuning after each layer. The unpruned model given the
same total fine-tuning is reported too.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repro_cosep.py
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import _repro_common as C
from secateur.pruning import Rule


def ft_subset(n: int, frac: float, layer: int) -> torch.Tensor:
    """A random `frac` of range(n), different for every layer, the same for every method."""
    g = torch.Generator().manual_seed(1000 + layer)
    return torch.randperm(n, generator=g)[:max(1, int(frac * n))]


def layerwise(base: C.Base, method: str, n_calib: int, ft_epochs: float, frac: float, lr: float,
              target_widths: dict[str, int] | None = None, log=print) -> dict:
    """Prune `base` layer by layer, fine-tuning after each layer. method: 'cosep' (CoSeP chooses
    the width, or keeps exactly target_widths[layer] clusters when given), 'l2' (to target_widths)
    or 'none' (fine-tuning only). Returns per-layer records and the final model."""
    d = base.data
    xt, yt, xe, ye = d.train.x, d.train.y, d.val.x, d.val.y
    calib = (xt[:n_calib], yt[:n_calib])
    m = copy.deepcopy(base.model)
    layers = []
    for i, name in enumerate(C.widths(m)):
        t0 = time.perf_counter()
        before = C.widths(m)[name]
        k = target_widths[name] if target_widths else None
        if method == "cosep":
            fixed = {"k_min": k, "k_max": k} if k is not None else {}
            m, _ = C.prune_copy(m, "cosep", Rule(), calib, layers=[name], **fixed)
        elif method == "l2":
            m, _ = C.prune_copy(m, "l2", Rule("ratio", (before - k) / before, "per_layer"), layers=[name])
        acc_pruned = C.accuracy(m, xe, ye)
        sub = ft_subset(len(xt), frac, i)
        steps = max(1, round(ft_epochs * len(sub) / 128))
        C.finetune(m, xt[sub], yt[sub], steps, lr=lr, seed=i)
        rec = {"layer": name, "width_before": before, "width_after": C.widths(m)[name], "acc_pruned": acc_pruned,
               "acc_ft": C.accuracy(m, xe, ye), "ft_steps": steps, "seconds": time.perf_counter() - t0}
        layers.append(rec)
        log(f"  {method:5s} {name:13s} {before:4d} -> {rec['width_after']:4d}  acc after pruning "
            f"{acc_pruned:.4f}, after {steps} fine-tuning steps {rec['acc_ft']:.4f} ({rec['seconds']:.0f} s)")
    return {"layers": layers, "model": m}


def mss_curves(base: C.Base, n_calib: int) -> dict[str, dict]:
    """CoSeP's mean-simplified-silhouette curve MSS(k) and knee k* for every layer of the unpruned
    model (all layers from one set of statistics), to show how the width is chosen."""
    from secateur.pruning import Pruner
    from secateur.pruning.cosep import jm_profiles, select_components

    m = copy.deepcopy(base.model)
    pruner = Pruner(m, "cosep", Rule())
    C.calibrate(pruner, m, base.data.train.x[:n_calib], base.data.train.y[:n_calib])
    crit, out = pruner.criterion, {}
    for g in pruner.groups:
        res = select_components(jm_profiles(crit.moments[g.name]), crit.importance(g))
        out[g.name] = {"n": g.size, "k_star": res.k_star, "ks": res.ks, "mss": res.mss}
    pruner.close()
    return out


RUNS = {   # key -> label
    "none": "unpruned + same fine-tuning",
    "cosep": "CoSeP, automatic widths",
    "l2": "L2 at CoSeP's automatic widths",
    "cosep_fixed": "CoSeP selection at fixed widths",
    "l2_fixed": "L2 at the fixed widths",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calibration images, 0.3 epoch fine-tunes (a smoke run)")
    ap.add_argument("--calib", type=int, default=2560, help="calibration images (about 256 per class)")
    ap.add_argument("--ft-epochs", type=float, default=2.0, help="epochs over the 25%% subset after each layer")
    ap.add_argument("--ft-fraction", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak fine-tuning learning rate (AdamW, cosine to 0)")
    ap.add_argument("--flops-target", type=float, default=2.59,
                    help="FLOPs reduction of the fixed-width comparison (uniform per-layer ratio)")
    ap.add_argument("--out", default=str(C.RESULTS))
    args = ap.parse_args(argv)
    n_calib, epochs = (640, 0.3) if args.quick else (args.calib, args.ft_epochs)
    t0 = time.perf_counter()
    base = C.load_base("vgg_relu")
    shape = tuple(base.data.input_shape)
    xe, ye = base.data.val.x, base.data.val.y
    f0, p0, a0 = C.flops(base.model, shape), C.param_count(base.model), C.accuracy(base.model, xe, ye)
    print(f"vgg_relu: {f0:,} MACs, {p0:,} params, acc {a0:.4f}", flush=True)
    log = lambda s: print(s, flush=True)
    curves = mss_curves(base, n_calib)
    log("CoSeP knee on the unpruned model: " + ", ".join(f"{n} k*={c['k_star']}/{c['n']}" for n, c in curves.items()))
    speedup = lambda r: f0 / C.flops(C.prune_copy(base.model, "l2", Rule("ratio", r, "per_layer"))[0], shape)
    r_fixed = C.bisect(speedup, args.flops_target, 0.0, 0.9, iters=12)
    fixed = C.widths(C.prune_copy(base.model, "l2", Rule("ratio", r_fixed, "per_layer"))[0])
    runs = {"cosep": layerwise(base, "cosep", n_calib, epochs, args.ft_fraction, args.lr, log=log)}
    auto = C.widths(runs["cosep"]["model"])
    runs["l2"] = layerwise(base, "l2", n_calib, epochs, args.ft_fraction, args.lr, auto, log=log)
    log(f"fixed widths {fixed} (uniform per-layer ratio {r_fixed:.3f} for {args.flops_target}x FLOPs)")
    runs["cosep_fixed"] = layerwise(base, "cosep", n_calib, epochs, args.ft_fraction, args.lr, fixed, log=log)
    runs["l2_fixed"] = layerwise(base, "l2", n_calib, epochs, args.ft_fraction, args.lr, fixed, log=log)
    runs["none"] = layerwise(base, "none", n_calib, epochs, args.ft_fraction, args.lr, log=log)
    summary = []
    for key, label in RUNS.items():
        m = runs[key]["model"]
        f = C.flops(m, shape)
        summary.append({"key": key, "method": label, "widths": C.widths(m), "flops": f, "speedup": f0 / f,
                        "params": C.param_count(m), "acc": runs[key]["layers"][-1]["acc_ft"]})
    rows = [[s["method"], "/".join(map(str, s["widths"].values())), s["flops"], f"{s['speedup']:.2f}x",
             s["params"], s["acc"], f"{100 * (s['acc'] - a0):+.2f}"] for s in summary]
    rows.insert(0, ["unpruned base", "/".join(map(str, C.widths(base.model).values())), f0, "1.00x", p0, a0, "+0.00"])
    tab = C.md_table(["model", "widths (features.0/4/8, classifier.0)", "MACs", "FLOPs reduction", "params",
                      "val acc", "change vs base (pts)"], rows)
    per_layer = C.md_table(
        ["method", "layer", "width", "acc right after pruning the layer", "acc after its fine-tune"],
        [[RUNS[key], r["layer"], f"{r['width_before']} -> {r['width_after']}", r["acc_pruned"], r["acc_ft"]]
         for key in ("cosep", "l2", "cosep_fixed", "l2_fixed") for r in runs[key]["layers"]])
    knees = C.md_table(
        ["layer", "units n", "k* (knee)", "MSS(2)", "MSS(k*)", "MSS(n/2)", "MSS(n-1)"],
        [[n, c["n"], c["k_star"]] + [c["mss"][c["ks"].index(k)] for k in (2, c["k_star"], c["n"] // 2, c["n"] - 1)]
         for n, c in curves.items()])
    meta = {**C.run_meta(argv), "seconds": time.perf_counter() - t0, "calib_images": n_calib,
            "ft_epochs": epochs, "ft_fraction": args.ft_fraction, "lr": args.lr, "flops_target": args.flops_target,
            "fixed_ratio": r_fixed, "quick": args.quick}
    data = {"base": {"flops": f0, "params": p0, "acc": a0}, "summary": summary, "mss_curves": curves,
            "layers": {k: v["layers"] for k, v in runs.items()}}

    def plot(path: C.Path) -> None:
        mss = {"title": "CoSeP: MSS(k) on the unpruned model (x = k*)", "xlabel": "k / n",
               "ylabel": "mean simplified silhouette", "series": {}, "styles": {}}
        for n, c in curves.items():
            mss["series"][f"{n} (n={c['n']})"] = ([k / c["n"] for k in c["ks"]], c["mss"])
            mss["styles"][f"{n} (n={c['n']})"] = "-"
            mss["series"][f"{n} k*={c['k_star']}"] = ([c["k_star"] / c["n"]], [c["mss"][c["ks"].index(c["k_star"])]])
            mss["styles"][f"{n} k*={c['k_star']}"] = "kx"
        xs = list(range(len(auto) + 1))
        acc = {"title": "layer-wise prune + fine-tune", "ylabel": "validation accuracy",
               "xlabel": "layers pruned so far (" + ", ".join(auto) + ")", "hline": (a0, "unpruned base"),
               "series": {RUNS[k]: (xs, [a0] + [r["acc_ft"] for r in runs[k]["layers"]]) for k in RUNS},
               "styles": {RUNS["none"]: "-", RUNS["cosep"]: "o:", RUNS["l2"]: "s:", RUNS["cosep_fixed"]: "o-",
                          RUNS["l2_fixed"]: "s-"}}
        C.line_plot(path, [mss, acc], "CoSeP on the Fashion-MNIST VGG control")

    intro = (f"Base run `runs/repro/vgg_relu` (configs/fmnist_vgg_relu.yaml; Fashion-MNIST, 20k train / 2k "
             f"validation images). CoSeP statistics: the first {n_calib} training images (eval mode), "
             f"spatially averaged activations after the ReLU, JM = 2(1 - exp(-B)), Euclidean profile "
             f"distances, FasterPAM for every k in 2..n-1, Kneedle (concave, increasing, S = 1). Fine-tuning "
             f"after each layer: {epochs:g} epoch(s) over a random {args.ft_fraction:.0%} of the training images "
             f"(a different subset per layer, the same for every method), AdamW lr {args.lr:g} cosine to 0, batch 128. "
             f"'Fixed widths': a uniform per-layer ratio ({r_fixed:.3f}) found by bisection for "
             f"{args.flops_target}x fewer MACs (the paper's VGG-16 reduction); 'CoSeP selection' there keeps exactly "
             f"that many clusters per layer (criterion arguments k_min = k_max = width) with one max-norm unit per "
             f"cluster, so only the choice of units differs from L2.")
    C.publish("cosep", "CoSeP layer-wise pruning (METHODS.md D), CPU-scale reproduction", args.out, meta, data,
              intro, tab + "\n\nPer layer:\n\n" + per_layer + "\n\nCoSeP's width choice on the unpruned model "
              "(statistics of all layers at once):\n\n" + knees, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
