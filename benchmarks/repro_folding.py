"""Model folding vs L2 pruning (METHODS.md B) at removal ratios 0.1..0.9 per layer, reproduced at
CPU scale on two networks:

- vgg_relu: the Fashion-MNIST VGG control run (conv -> BatchNorm -> ReLU, max pooling; 4 groups),
  evaluated on its 2,000 validation images;
- MNISTNet: the pretrained `ccexam` network without BatchNorm (3 groups, traced), on the 5,000-image
  MNIST subset split into 4,000 images for repair/fine-tuning and 1,000 for evaluation.

Stages per method and ratio: raw (fold with repair="none"; L2 keep-top-k), Fold-AR (the data-free
repair built into the fold criterion), BN reset (running statistics recomputed from 1,000 training
images, momentum=None; BN net only) and a fixed fine-tuning budget (one epoch by default) that
starts from the BN-reset model (BN net) or the raw model (no BN).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repro_folding.py
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import _repro_common as C
from secateur.pruning import Rule

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def mnistnet_setup(seed: int = 0) -> dict:
    """MNISTNet, its example input, and a seeded 4,000 / 1,000 split of the MNIST subset."""
    import prune_mnistnet

    x, y = prune_mnistnet.load_mnist_subset()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, ev = perm[:4000], perm[4000:]
    return {"name": "MNISTNet", "model": prune_mnistnet.load_mnistnet(), "train": (x[tr], y[tr]),
            "eval": (x[ev], y[ev]), "example": x[:2], "bn": False, "input": (1, 28, 28)}


def vgg_setup() -> dict:
    b = C.load_base("vgg_relu")
    return {"name": "vgg_relu", "model": b.model, "train": (b.data.train.x, b.data.train.y),
            "eval": (b.data.val.x, b.data.val.y), "example": None, "bn": True,
            "input": tuple(b.data.input_shape)}


def run_net(net: dict, ratios: tuple[float, ...], ft_steps: int, bn_images: int, log=print) -> list[dict]:
    """All stages of fold and L2 at every ratio on one network; rows of results."""
    (xt, yt), (xe, ye) = net["train"], net["eval"]
    base = net["model"]
    acc = lambda m: C.accuracy(m, xe, ye)
    rows = [{"net": net["name"], "method": "unpruned", "stage": "-", "ratio": 0.0,
             "params": C.param_count(base), "acc": acc(base)}]
    log(f"{net['name']}: unpruned acc {rows[0]['acc']:.4f}, {rows[0]['params']:,} params")
    for ratio in ratios:
        rule = Rule("ratio", ratio, "per_layer")
        for method in ("fold", "l2"):
            t0 = time.perf_counter()
            kw = {"repair": "none"} if method == "fold" else {}
            raw, _ = C.prune_copy(base, method, rule, example_input=net["example"], **kw)
            stages = {"raw": raw}
            if method == "fold":
                stages["Fold-AR"], _ = C.prune_copy(base, "fold", rule, example_input=net["example"],
                                                    repair="fold_ar")
            start = raw
            if net["bn"]:
                stages["BN reset"] = start = C.bn_reset(copy.deepcopy(raw), xt[:bn_images])
            stages["fine-tuned"] = C.finetune(copy.deepcopy(start), xt, yt, ft_steps, seed=0)
            for stage, m in stages.items():
                rows.append({"net": net["name"], "method": method, "stage": stage, "ratio": ratio,
                             "params": C.param_count(m), "acc": acc(m)})
            log(f"  {ratio:.1f} {method:4s} " + "  ".join(f"{r['stage']} {r['acc']:.4f}" for r in rows
                                                        if r["ratio"] == ratio and r["method"] == method)
                + f"  ({time.perf_counter() - t0:.0f} s)")
    return rows


LINES = [("fold", "raw"), ("fold", "Fold-AR"), ("fold", "BN reset"), ("fold", "fine-tuned"),
         ("l2", "raw"), ("l2", "BN reset"), ("l2", "fine-tuned")]


def table(rows: list[dict], ratios: tuple[float, ...]) -> str:
    out = []
    for name in dict.fromkeys(r["net"] for r in rows):
        sel = [r for r in rows if r["net"] == name]
        base = sel[0]
        body = []
        for method, stage in LINES:
            accs = {r["ratio"]: r["acc"] for r in sel if r["method"] == method and r["stage"] == stage}
            if accs:
                body.append([method, stage] + [accs[q] for q in ratios])
        params = {r["ratio"]: r["params"] for r in sel if r["method"] == "l2" and r["stage"] == "raw"}
        body.append(["(params, both methods)", "-"] + [params[q] for q in ratios])
        out.append(f"**{name}** (unpruned accuracy {base['acc']:.4f}, {base['params']:,} params)\n\n"
                   + C.md_table(["method", "stage"] + [f"{q:.1f}" for q in ratios], body))
    return "\n\n".join(out)


def plot(rows: list[dict], ratios: tuple[float, ...], path) -> None:
    styles = {"fold": "-", "l2": "--"}
    marks = {"raw": "o", "Fold-AR": "^", "BN reset": "s", "fine-tuned": "D"}
    panels = []
    for name in dict.fromkeys(r["net"] for r in rows):
        sel = [r for r in rows if r["net"] == name]
        series, fmt = {}, {}
        for method, stage in LINES:
            pts = [(r["ratio"], r["acc"]) for r in sel if r["method"] == method and r["stage"] == stage]
            if pts:
                label = f"{method} {stage}"
                series[label] = ([p[0] for p in pts], [p[1] for p in pts])
                fmt[label] = marks[stage] + styles[method]
        panels.append({"title": name, "xlabel": "fraction of units removed per layer", "ylabel": "accuracy",
                       "series": series, "styles": fmt, "hline": (sel[0]["acc"], "unpruned")})
    C.line_plot(path, panels, "Folding vs L2 pruning")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two ratios, 30 fine-tuning steps (a smoke run)")
    ap.add_argument("--ft-epochs", type=float, default=1.0, help="fine-tuning budget in epochs of each train split")
    ap.add_argument("--bn-images", type=int, default=1000, help="training images for the BN reset")
    ap.add_argument("--out", default=str(C.RESULTS), help="folder for folding.json/.md/.png")
    args = ap.parse_args(argv)
    ratios = (0.3, 0.7) if args.quick else RATIOS
    t0 = time.perf_counter()
    rows = []
    for net in (vgg_setup(), mnistnet_setup()):
        steps = 30 if args.quick else max(1, round(args.ft_epochs * len(net["train"][0]) / 128))
        net["ft_steps"] = steps
        print(f"{net['name']}: fine-tuning budget {steps} steps of 128 images", flush=True)
        rows += run_net(net, ratios, steps, args.bn_images, log=lambda s: print(s, flush=True))
    meta = {**C.run_meta(argv), "seconds": time.perf_counter() - t0, "ratios": ratios,
            "ft_epochs": args.ft_epochs, "bn_images": args.bn_images, "quick": args.quick}
    intro = (f"Accuracy after removing each fraction of units in every prunable layer (the logits layer "
             f"is never pruned). Fine-tuning: AdamW, lr 1e-3 cosine to 0, batch 128, "
             f"{args.ft_epochs:g} epoch(s) of each network's training split; BN reset uses "
             f"{args.bn_images} training images.")
    C.publish("folding", "Model folding vs L2 pruning (METHODS.md B), CPU-scale reproduction", args.out, meta,
              {"rows": rows}, intro, table(rows, ratios), lambda path: plot(rows, ratios, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
