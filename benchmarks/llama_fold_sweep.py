"""Folding vs L2 pruning of a trained LLaMA, one unit kind at a time, across removal ratios.

The dense run of benchmarks/llama_kjv.py (configs/llama_kjv.yaml: 4 layers, 8 query / 4
key-value heads, SwiGLU width 384) is cut once by `secateur prune` (oneshot.prune_run) with the
rule "ratio r, scope uniform" restricted to one unit kind: MLP neurons, or attention heads (a
key-value head with its query heads). Held-out perplexity (exp of the mean token loss on the
run's validation verses) is measured right after the cut ("raw") and after a short fine-tune by
`secateur resume OUT --max-steps STEP+K` (the run's own schedule continued, a fresh AdamW: the
pruned checkpoint holds weights only). Both commands run in this process, on one copy of the
tokenized data.

    python benchmarks/llama_fold_sweep.py                    # the table in results/llama_fold_sweep.md
    python benchmarks/llama_fold_sweep.py --kinds heads --ratios 0.5 --ft-steps 5   # a quick look

Cuts that remove the same number of units per layer give the same model (with 4 key-value heads
per layer, ratios 0.3 and 0.4 both remove one), so each distinct cut is pruned and fine-tuned once
and its numbers repeated for every ratio that gives it; a cut that removes nothing is the dense
model (fine-tuned K steps as well), shared by both methods.
Writes OUT.json, OUT.md and OUT.png (perplexity vs ratio, one panel per unit kind).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# criterion and its arguments per method name (fold-none: folding without the Fold-AR rescaling)
METHODS = {"fold": ("fold", {}), "l2": ("l2", {}), "fold-none": ("fold", {"repair": "none"})}
KINDS = ("mlp", "heads")
MACHINE = "2-core x86-64 CPU shared with other jobs"


def widths(run: Path) -> dict[str, int]:
    """Units per layer of each kind in the dense run: key-value heads and MLP neurons."""
    from secateur.trainer import checkpoint as ckpt

    hf = ckpt.read_meta(ckpt.latest(run))["config"]["model"]["hf"]["config"]
    return {"heads": int(hf["num_key_value_heads"]), "mlp": int(hf["intermediate_size"])}


def prune_one(run: Path, out: Path, kind: str, method: str, ratio: float, calib_batches: int,
              eval_batches: int) -> dict[str, Any]:
    """One-shot cut of the run's latest checkpoint into `out`; prune_run's summary."""
    from secateur.trainer.config import RatioRule
    from secateur.trainer.oneshot import prune_run

    criterion, args = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune_run(run, out, criterion, RatioRule(kind="ratio", ratio=ratio, scope="uniform"),
                         calib_batches=calib_batches, criterion_args=dict(args),
                         eval_batches=eval_batches, unit_kinds=[kind])


def fine_tune(out: Path, step: int, ft_steps: int, eval_batches: int) -> dict[str, Any]:
    """`secateur resume out --max-steps step+ft_steps` (in this process); the final validation
    loss, the learning rates used and the time."""
    from secateur.cli import main as secateur
    from secateur.trainer.logs import read_metrics

    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = secateur(["resume", str(out), "--max-steps", str(step + ft_steps),
                       "--set", f"train.eval_interval={ft_steps}", "--set", f"train.eval_batches={eval_batches}",
                       "--set", "train.progress=false", "--set", "train.threads=1"])
    if rc != 0:
        return {"error": f"secateur resume exited {rc}"}
    rows = [r for r in read_metrics(out) if r["step"] > step]
    return {"eval_loss": rows[-1]["eval_loss"], "seconds": time.time() - t0,
            "lr": [rows[0]["lr"], rows[-1]["lr"]]}


def share_dataset() -> None:
    """Load the text data once for the whole sweep: every prune_run and every resumed run would
    otherwise read and tokenize the KJV again (about 15 s each on this machine)."""
    import secateur.trainer.loop as loop
    import secateur.trainer.oneshot as oneshot
    from secateur.trainer.setup import dataset_from_config

    cache: dict[str, Any] = {}

    def cached(cfg: Any, cache_dir: Any = None) -> Any:
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if key not in cache:
            cache[key] = dataset_from_config(cfg, cache_dir)
        return cache[key]

    loop.dataset_from_config = oneshot.dataset_from_config = cached


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every (kind, ratio, method) cell; distinct cuts measured once."""
    from secateur.trainer import checkpoint as ckpt

    run, root = Path(args.run), Path(args.work)
    step = int(ckpt.read_meta(ckpt.latest(run))["step"])
    width = widths(run)
    root.mkdir(parents=True, exist_ok=True)
    share_dataset()
    done: dict[tuple, dict] = {}
    rows, dense = [], None
    for kind in args.kinds:
        for ratio in args.ratios:
            removed = int(ratio * width[kind])      # the rule's floor(ratio * width), per layer
            for method in args.methods:
                key = (kind, "none" if removed == 0 else method, removed)
                if key not in done:
                    out = root / f"{kind}-{key[1]}-{removed}"
                    if out.exists():                # a folder of an earlier sweep of this script
                        shutil.rmtree(out)
                    t0 = time.time()
                    s = prune_one(run, out, kind, method, ratio, args.calib_batches, args.eval_batches)
                    prune_s = time.time() - t0
                    ft = fine_tune(out, step, args.ft_steps, args.eval_batches)
                    cell = {"removed_per_layer": removed, "width_per_layer": width[kind] - removed,
                            "params": s["params_after"], "loss_raw": s["eval_loss_after"],
                            "ppl_raw": math.exp(s["eval_loss_after"]), "prune_s": prune_s,
                            "ft_loss": ft.get("eval_loss"), "ft_s": ft.get("seconds"),
                            "ppl_ft": math.exp(ft["eval_loss"]) if "eval_loss" in ft else None,
                            "error": ft.get("error"), "ft_lr": ft.get("lr"),
                            "widths": sorted({a for _, _, a in s["groups"]})}
                    dense = dense or {"params": s["params_before"], "loss": s["eval_loss_before"],
                                      "ppl": math.exp(s["eval_loss_before"])}
                    done[key] = cell
                    if cell["widths"] and cell["widths"] != [width[kind] - removed]:
                        print(f"note: {kind} r={ratio} left widths {cell['widths']}, not "
                              f"{width[kind] - removed} as planned", flush=True)
                    if not args.keep_runs:
                        shutil.rmtree(out)
                    print(f"{kind:5s} r={ratio:.1f} {method:9s} -{removed}/{width[kind]}: params "
                          f"{cell['params']:,} ppl raw {cell['ppl_raw']:.2f} ft "
                          f"{cell['ppl_ft'] if cell['ppl_ft'] is None else round(cell['ppl_ft'], 2)} "
                          f"({prune_s:.0f}s + {cell['ft_s'] or 0:.0f}s)", flush=True)
                rows.append({"kind": kind, "ratio": ratio, "method": method, **done[key]})
    return {"dense": {**(dense or {}), "step": step, "widths": width}, "rows": rows}


def write_md(res: dict[str, Any], path: Path) -> None:
    """Tables (ratio x method, per kind) and the setup."""
    s, d = res["settings"], res["dense"]
    lr = next((r["ft_lr"] for r in res["rows"] if r.get("ft_lr")), [float("nan")] * 2)
    lines = ["# Folding vs L2 pruning of a trained LLaMA, per unit kind", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {MACHINE}; torch {res['torch']}, Python {res['python']}; {res['date']}.", "",
             f"Source: the dense run `{s['run']}` (configs/llama_kjv.yaml trained {d['step']} steps by "
             "benchmarks/llama_kjv.py), its latest checkpoint: "
             f"{d['params']:,} parameters, held-out perplexity {d['ppl']:.2f}. "
             f"Widths per layer: {d['widths']['heads']} key-value heads (8 query heads), "
             f"{d['widths']['mlp']} MLP neurons; 4 layers.", "",
             f"Each cut: `secateur prune` (oneshot.prune_run), rule ratio r with scope uniform, "
             f"`--units` the one kind; fold = model folding (k-means clusters merged, Fold-AR "
             f"rescaling), l2 = L2 norm of each unit's producer rows, lowest removed"
             + ("; fold-none = the same folding without the Fold-AR rescaling (criterion args "
                "repair: none). With no norm in the group, Fold-AR multiplies each merged unit's "
                "producer rows by its gain: in the SwiGLU MLP both the gate and the up rows"
                if "fold-none" in s["methods"] else "") + ". "
             f"Fine-tune: `secateur resume --max-steps {d['step']}+{s['ft_steps']}` (the run's "
             f"cosine schedule continued to the new end: lr {lr[0]:.1e} falling to {lr[1]:.1e}, a "
             "fresh AdamW). Perplexity: exp of the mean token loss over the first "
             f"{s['eval_batches']} validation batches (32 blocks of 128 tokens each), the same "
             "batches raw and fine-tuned.", "",
             "Removed units per layer are floor(r x width): with 4 key-value heads, r = 0.1-0.2 "
             "remove none, 0.3-0.4 one, 0.5-0.7 two, 0.8-0.9 three; such repeated cuts were "
             "measured once. A cut of zero units is the dense model fine-tuned the same K steps.", ""]
    for kind in s["kinds"]:
        lines += [f"## {'MLP neurons' if kind == 'mlp' else 'Attention heads (key-value groups)'}", "",
                  "| ratio | removed/layer | params | " + " | ".join(
                      f"{m} raw | {m} ft" for m in s["methods"]) + " |",
                  "|---|---|---|" + "---|---|" * len(s["methods"])]
        for ratio in s["ratios"]:
            cells = {r["method"]: r for r in res["rows"] if r["kind"] == kind and r["ratio"] == ratio}
            first = next(iter(cells.values()))
            vals = []
            for m in s["methods"]:
                c = cells[m]
                vals += [f"{c['ppl_raw']:.2f}", "error" if c["ppl_ft"] is None else f"{c['ppl_ft']:.2f}"]
            lines.append(f"| {ratio:.1f} | {first['removed_per_layer']}/{d['widths'][kind]} | "
                         f"{first['params']:,} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["## Conclusion (as measured)", "", res.get("conclusion", ""), "",
              f"One dense run (seed 0), one fine-tune per cut, {s['eval_batches'] * 32 * 128:,} "
              "held-out tokens per perplexity: differences of a few tenths of a percent (the "
              "'within 0.5%' cells) are below what this setup resolves.", ""]
    path.write_text("\n".join(lines))


def conclusion(res: dict[str, Any]) -> str:
    """Plain statements read off the numbers: at which ratios one method's perplexity is below
    another's (more than 0.5% apart), raw and after the fine-tune."""
    methods = res["settings"]["methods"]
    pairs = [(a, b) for a, b in (("fold", "l2"), ("fold-none", "l2"), ("fold-none", "fold"))
             if a in methods and b in methods]
    if not pairs:
        return "Only one method was run; no comparison."
    out = []
    for a, b in pairs:
        for kind in res["settings"]["kinds"]:
            for col, label in (("ppl_raw", "raw"), ("ppl_ft", "after the fine-tune")):
                wins, losses, ties = [], [], []
                for ratio in res["settings"]["ratios"]:
                    c = {r["method"]: r for r in res["rows"] if r["kind"] == kind and r["ratio"] == ratio}
                    x, y = c[a][col], c[b][col]
                    if c[a]["removed_per_layer"] == 0 or x is None or y is None:
                        continue
                    (wins if x < y * 0.995 else losses if x > y * 1.005 else ties).append(f"{ratio:.1f}")
                n = len(wins) + len(losses) + len(ties)
                below = f"at {len(wins)} of {n} ratios (r = {', '.join(wins)})" if wins else f"at none of {n} ratios"
                out.append(f"- {kind}, {label}: {a} below {b} {below}; above at {', '.join(losses) or 'none'}"
                           + (f"; within 0.5% at {', '.join(ties)}" if ties else "") + ".")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> None:
    """Perplexity vs ratio, one panel per kind; dashed raw, solid fine-tuned."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = res["settings"]["kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    colors = {"fold": "tab:blue", "l2": "tab:orange", "fold-none": "tab:green"}
    for ax, kind in zip(axes[0], kinds):
        for m in res["settings"]["methods"]:
            rows = [r for r in res["rows"] if r["kind"] == kind and r["method"] == m]
            x = [r["ratio"] for r in rows]
            ax.plot(x, [r["ppl_raw"] for r in rows], "--o", color=colors.get(m), label=f"{m} raw", ms=4)
            ax.plot(x, [r["ppl_ft"] if r["ppl_ft"] is not None else float("nan") for r in rows], "-s",
                    color=colors.get(m), label=f"{m} + {res['settings']['ft_steps']} steps", ms=4)
        ax.axhline(res["dense"]["ppl"], color="gray", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())   # 90, not 9 x 10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("removal ratio (uniform per layer)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("MLP neurons" if kind == "mlp" else "attention heads (KV groups)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write OUT.json, OUT.md, OUT.png."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(REPO / "runs/bench-llama-kjv/dense-s0"),
                   help="the dense run (its latest checkpoint is cut)")
    p.add_argument("--work", default=str(REPO / "runs/llama-fold-sweep"),
                   help="folder for the pruned runs (this script's own)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--methods", nargs="+", default=["fold", "l2"], choices=list(METHODS))
    p.add_argument("--ratios", nargs="+", type=float, default=[round(0.1 * i, 1) for i in range(1, 10)])
    p.add_argument("--ft-steps", type=int, default=20, help="fine-tune steps after each cut")
    p.add_argument("--eval-batches", type=int, default=6, help="validation batches per perplexity")
    p.add_argument("--calib-batches", type=int, default=1,
                   help="calibration batches (fold and l2 read weights only)")
    p.add_argument("--keep-runs", action="store_true", help="keep the pruned run folders")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/llama_fold_sweep"))
    args = p.parse_args(argv)
    bad = [r for r in args.ratios if not 0 < r < 1]
    for name, value in (("--ft-steps", args.ft_steps), ("--eval-batches", args.eval_batches),
                        ("--calib-batches", args.calib_batches)):
        if value < 1:
            bad.append(f"{name} {value}")
    if bad:
        print(f"error: ratios must be in (0, 1) and counts positive, got {bad}", file=sys.stderr)
        return 2
    if not (Path(args.run) / "checkpoints").is_dir():
        print(f"error: {args.run} has no checkpoints (train it with benchmarks/llama_kjv.py)",
              file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    res = sweep(args)
    res.update({"command": "python benchmarks/llama_fold_sweep.py " + " ".join(argv or sys.argv[1:]),
                "machine": MACHINE, "date": datetime.date.today().isoformat(),
                "torch": torch.__version__, "python": platform.python_version(),
                "settings": {k: getattr(args, k) for k in ("run", "kinds", "methods", "ratios",
                                                           "ft_steps", "eval_batches", "calib_batches")},
                "wall_s": time.time() - t0})
    res["conclusion"] = conclusion(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
