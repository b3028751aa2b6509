"""Equivariance-aware structured pruning (METHODS.md E), reproduced at CPU scale.

C4-equivariant teacher -> distilled C4 student -> FC-only L2 pruning at each ratio -> adaptive
fine-tuning -> INT8 dynamic quantization, and the same for a plain CNN of about the same size. Every
row reports parameters, size on disk, accuracy on upright and on 90-degree-rotated test images, the
gap, and the conv stack's rotation-invariance error. Writes results.json, table.md and
equivariant.png into --out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repro_equivariant.py --config configs/recipes/equivariant.yaml \
        --out runs/equivariant

About 5 minutes on 2 shared CPU cores with one thread (two threads competing with another job for the
same two cores ran 3.5x slower). Measured results: benchmarks/results/equivariant.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from secateur.data import DataError, check_available
from secateur.recipes.equivariant import ConfigError, Row, load_config, load_data, run_family

FAMILY_NAMES = {"c4": "C4CNN", "plain": "PlainCNN"}


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | stage | FC widths | params | weights on disk (KB) | full state_dict (KB) | acc upright (%) "
             "| acc rot90 (%) | gap (pts) | invariance error | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {FAMILY_NAMES[r.family]} | {r.stage} | {r.fc} | {r.params:,} | {r.size_bytes / 1024:.1f} "
                     f"| {r.full_size_bytes / 1024:.1f} "
                     f"| {r.acc:.2f} | {r.acc_rot90:.2f} | {r.gap:+.2f} | {r.equiv_error:.1e} | {r.note} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The numbers METHODS.md E states targets for, per family."""
    out = []
    for fam in ("c4", "plain"):
        fr = {r.stage: r for r in rows if r.family == fam}
        if not fr:
            continue
        teacher, student = fr["teacher"], fr["student (KD)"]
        out.append(f"- {FAMILY_NAMES[fam]}: teacher {teacher.params:,} params -> student {student.params:,} "
                   f"({100 * (1 - student.params / teacher.params):.1f}% fewer)")
        for stage, r in fr.items():
            if not stage.endswith("INT8"):
                continue
            ft = fr[stage.removesuffix(" + INT8")]
            pr = fr[stage.removesuffix(" + FT + INT8")]
            out.append(
                f"  - {stage.split(' +')[0]}: params {student.params:,} -> {ft.params:,} "
                f"({100 * (1 - ft.params / student.params):.1f}% fewer, "
                f"{100 * (1 - ft.params / teacher.params):.1f}% fewer than the teacher); "
                f"acc {student.acc:.2f} -> {pr.acc:.2f} after pruning -> {ft.acc:.2f} after FT; "
                f"INT8 size {r.size_bytes / 1024:.1f} KB vs float student {student.size_bytes / 1024:.1f} KB "
                f"({100 * (1 - r.size_bytes / student.size_bytes):.1f}% smaller) and vs teacher "
                f"{teacher.size_bytes / 1024:.1f} KB ({100 * (1 - r.size_bytes / teacher.size_bytes):.1f}% "
                f"smaller), keeping {100 * r.acc / teacher.acc:.1f}% of the teacher's accuracy "
                f"({100 * r.acc / student.acc:.1f}% of the student's)")
    return "\n".join(out)


def plot(rows: list[Row], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [0.0] + list(ratios)
    for fam, color in (("c4", "tab:blue"), ("plain", "tab:orange")):
        fr = {r.stage: r for r in rows if r.family == fam}
        if not fr:
            continue
        final = [fr["student (KD)"]] + [fr[f"pruned {100 * p:.0f}% + FT"] for p in ratios]
        raw = [fr["student (KD)"]] + [fr[f"pruned {100 * p:.0f}%"] for p in ratios]
        name = FAMILY_NAMES[fam]
        ax_acc.plot(xs, [r.acc for r in final], "o-", color=color, label=f"{name} upright (after FT)")
        ax_acc.plot(xs, [r.acc_rot90 for r in final], "s--", color=color, label=f"{name} rotated 90 (after FT)")
        ax_acc.plot(xs, [r.acc for r in raw], "x:", color=color, alpha=0.6, label=f"{name} upright, right after pruning")
        ax_size.plot(xs, [r.size_bytes / 1024 for r in final], "o-", color=color, label=f"{name} float32")
        q = [fr.get(f"pruned {100 * p:.0f}% + FT + INT8") for p in ratios]
        if all(q):
            ax_size.plot(xs[1:], [r.size_bytes / 1024 for r in q], "^--", color=color, label=f"{name} INT8 Linear")
    ax_acc.set(xlabel="fraction of hidden FC neurons removed", ylabel="test accuracy (%)",
               title="Accuracy, upright vs rotated 90 degrees")
    ax_size.set(xlabel="fraction of hidden FC neurons removed", ylabel="weights on disk (KB)",
                title="Size on disk")
    for ax in (ax_acc, ax_size):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/recipes/equivariant.yaml", help="YAML settings (see the file)")
    ap.add_argument("--out", default="runs/equivariant", help="folder for results.json, table.md, equivariant.png")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_available(cfg.data.dataset, cfg.data.root)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_data(cfg.data, cfg.seed)
    print(f"{cfg.data.dataset}: {len(data.train)} train / {len(data.monitor)} monitor / {len(data.test)} test images, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for fam in ("c4", "plain"):
        rows += run_family(fam, cfg, data, log=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - t0
    table, summ = markdown_table(rows), summary(rows)
    meta = {"config": cfg.model_dump(), "seconds": seconds, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "rows": [{**asdict(r), "gap": r.gap} for r in rows]}, indent=1))
    (out / "table.md").write_text(f"{table}\n\n{summ}\n\nTotal time {seconds:.0f} s.\n")
    plot(rows, cfg.prune.ratios, out / "equivariant.png")
    print(f"\n{table}\n\n{summ}\n\nTotal time {seconds:.0f} s; wrote {out}/results.json, table.md, equivariant.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
