"""Pruning while training vs the alternatives, on a LLaMA-architecture model trained from scratch
on the King James Bible (configs/llama_kjv.yaml: grouped-query attention, SwiGLU, RMSNorm, a BPE
tokenizer trained on the text). Every variant runs through `secateur train` with the same data
order and the same number of optimizer steps; held-out perplexity is measured on verses that
never appear in training.

    python benchmarks/llama_kjv.py --steps 300 --seeds 0 1 2 --jobs 2  # the table in RESULTS.md
    python benchmarks/llama_kjv.py --steps 200 --variants dense pwt-activation-50   # a quick look

Variants (targets are fractions of the heads and MLP neurons kept; the embedding is pruned only
by the -hidden- variants):
    dense                 no pruning (the reference)
    small-dense-50        a dense model built at the final widths of pwt-activation-50, from scratch
    pwt-<criterion>-<k>   heads + MLP neurons pruned while training on an AGP schedule (20%..70% of
                          the steps) to keep k% of the block units, uniform across layers
    end-oneshot-<k>       dense until 70% of the steps, one L2 event to k%, fine-tuned to the end
    end-tp-<k>            the dense run's step-70% checkpoint pruned once by Torch-Pruning (group L2
                          magnitude, same units), fine-tuned to the end by `secateur resume`
                          (Torch-Pruning drops the optimizer state, so the fine-tune starts fresh;
                          the pruned run holds weights only, so its data stream restarts at the
                          first batch: the one variant whose data order differs)
    pwt-activation-50-kd, end-oneshot-50-kd: the same with logit distillation from a snapshot of the
                          model taken just before the first pruning event (train.distill)
    pwt-l2-hidden-75, end-oneshot-hidden-75: heads, MLP neurons and the hidden size (the residual
                          width: embedding, every projection's input, the RMSNorms) pruned to 75%
                          each, while training (AGP) or once at 70% of the steps
Training FLOPs are 6 x parameters x tokens summed over the steps (parameters as logged per step).
Writes OUT.md, OUT.json and OUT.png (perplexity vs parameters, vs training FLOPs, vs wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "llama_kjv.yaml"
CRITERIA = ("activation", "l2", "projective", "fold")
# variants built from another variant's finished run: the run each one needs
DEPENDENT = {"small-dense-50": "pwt-activation-50", "end-tp-50": "dense", "end-tp-30": "dense"}


def variants(steps: int) -> dict[str, dict]:
    """--set overrides of each variant (small-dense-50 is filled in from a finished run)."""
    start, end, every = int(0.2 * steps), int(0.7 * steps), max(1, steps // 20)
    # the dense run keeps its step-`end` checkpoint: the Torch-Pruning variant starts from it
    out: dict[str, dict] = {"dense": {"pruning": None, "train.checkpoint_interval": end,
                                      "train.keep_checkpoints": 100}}
    for crit in CRITERIA:
        for keep in (50, 30):
            out[f"pwt-{crit}-{keep}"] = {
                "pruning.criterion": crit, "pruning.rule.kind": "ratio", "pruning.rule.ratio": 0.0,
                "pruning.rule.scope": "uniform", "pruning.schedule": {
                    "kind": "agp", "start": start, "end": end, "every": every, "target": 1 - keep / 100}}
    for keep in (50, 30):
        out[f"end-oneshot-{keep}"] = {
            "pruning.criterion": "l2", "pruning.rule": {"kind": "ratio", "ratio": 1 - keep / 100,
                                                        "scope": "uniform"},
            "pruning.schedule": {"kind": "oneshot", "at": end}}
    hidden = {"pruning.units": ["heads", "mlp", "hidden"]}
    out["pwt-l2-hidden-75"] = {**out["pwt-l2-50"], **hidden, "pruning.schedule": {
        **out["pwt-l2-50"]["pruning.schedule"], "target": 0.25}}
    out["end-oneshot-hidden-75"] = {**out["end-oneshot-50"], **hidden,
                                    "pruning.rule": {**out["end-oneshot-50"]["pruning.rule"], "ratio": 0.25}}
    kd = {"distill": {"teacher": "snapshot", "temperature": 2.0, "weight": 0.5}}
    out["pwt-activation-50-kd"] = {**out["pwt-activation-50"], **kd}
    out["end-oneshot-50-kd"] = {**out["end-oneshot-50"], **kd}
    return out


def _sets(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def run_variant(name: str, overrides: dict, steps: int, seed: int, data: Path, out_root: Path) -> dict:
    """Train one variant (one process) and read back its numbers."""
    run = out_root / f"{name}-s{seed}"
    base = {"seed": seed, "data.train_files": str(data / "train.txt"), "data.val_files": str(data / "val.txt"),
            "train.progress": False, "train.eval_interval": max(1, steps // 5), "train.eval_batches": 40}
    cmd = [sys.executable, "-m", "secateur", "train", "--config", str(CONFIG), "--out", str(run),
           "--max-steps", str(steps), "--overwrite", *_sets({**base, **overrides})]
    t0 = time.time()
    if REUSE and _finished(run, steps):
        return _read_run(name, seed, run, t0)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env())
    if proc.returncode != 0:
        return {"variant": name, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
    return _read_run(name, seed, run, t0)


REUSE = False     # --reuse: read runs that already finished instead of training them again


def _finished(run: Path, steps: int) -> bool:
    return ((run / "summary.json").is_file() and
            json.loads((run / "summary.json").read_text()).get("steps") == steps)


def _env() -> dict:
    threads = os.environ.get("BENCH_THREADS")
    return {**os.environ, "PYTHONWARNINGS": "ignore", **({"OMP_NUM_THREADS": threads} if threads else {})}


def run_tp(name: str, keep: int, steps: int, seed: int, out_root: Path) -> dict:
    """Torch-Pruning one-shot on the dense run's step-`end` checkpoint (its optimizer state is
    lost, as with Torch-Pruning), then `secateur resume` fine-tunes to `steps` on the same data
    order and schedule."""
    from tp_llama import tp_prune_checkpoint   # benchmarks/tp_llama.py

    end = int(0.7 * steps)
    src = out_root / f"dense-s{seed}" / "checkpoints" / f"step_{end:08d}"
    run = out_root / f"{name}-s{seed}"
    if REUSE and _finished(run, steps):
        return _read_run(name, seed, run, time.time())
    if run.exists():
        import shutil
        shutil.rmtree(run)
    t0 = time.time()
    tp = tp_prune_checkpoint(src, run, keep=keep / 100)
    cmd = [sys.executable, "-m", "secateur", "resume", str(run), "--max-steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env())
    if proc.returncode != 0:
        return {"variant": name, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
    r = _read_run(name, seed, run, t0)
    # the dense steps before the cut count towards this variant's compute
    from secateur.trainer.logs import read_metrics
    before = [row for row in read_metrics(out_root / f"dense-s{seed}") if row["step"] <= end]
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    tokens = cfg["data"]["batch_size"] * cfg["data"]["block_size"]
    r["train_flops"] += sum(6 * row["params"] * tokens for row in before)
    r["train_s"] += sum(row["step_time_s"] for row in before)
    return {**r, "tp_event_s": tp.get("seconds")}


def _read_run(name: str, seed: int, run: Path, t0: float) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    from secateur.trainer.logs import read_metrics

    rows = read_metrics(run)
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    tokens = cfg["data"]["batch_size"] * cfg["data"]["block_size"]
    flops = sum(6 * r["params"] * tokens for r in rows)
    evals = [(r["step"], math.exp(r["eval_loss"])) for r in rows if r["eval_loss"] is not None]
    return {"variant": name, "seed": seed, "params_end": summary["params_end"],
            "params_start": summary["params_start"], "ppl": evals[-1][1], "curve": evals,
            "train_flops": flops, "wall_s": time.time() - t0, "train_s": summary["seconds"],
            "run": str(run)}


def final_widths(run: Path) -> dict:
    """The Llama config overrides that build a dense model at a pruned run's final widths."""
    from secateur.trainer import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.latest(run))
    w = meta["widths"]
    heads = {v for k, v in w.items() if k.endswith("self_attn")}
    mlp = {v for k, v in w.items() if "mlp" in k}
    cfg = meta["config"]["model"]["hf"]["config"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    (kv,), (inter,) = heads, mlp            # uniform scope: one width per kind
    return {"model.hf.config.num_key_value_heads": kv, "model.hf.config.num_attention_heads": kv * group,
            "model.hf.config.intermediate_size": inter,
            "model.hf.config.head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "pruning": None}


def write_results(results: list[dict], out: Path) -> None:
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    order = [*variants(300), *DEPENDENT]                      # the table's row order
    by: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (order.index(r["variant"]) if r["variant"] in order
                                            else len(order), r["seed"])):
        if "error" not in r:
            by.setdefault(r["variant"], []).append(r)
    dates = sorted({r["date"] for r in results if r.get("date")})
    cmds = list(dict.fromkeys(r["cmd"] for r in results if r.get("cmd")))   # each run's own command
    lines = [f"# LLaMA on the KJV: pruning while training vs the alternatives", "",
             *[f"Command: `{c}`  " for c in cmds], f"Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; runs measured on {', '.join(dates) or time.strftime('%Y-%m-%d')}", "",
             "| variant | seeds | params end | perplexity (mean ± sd over seeds) | train TFLOP | train s |",
             "|---|---|---|---|---|---|"]
    for name, rs in by.items():
        ppl = [r["ppl"] for r in rs]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else float("nan")
        lines.append(f"| {name} | {len(rs)} | {rs[0]['params_end']:,} | {statistics.mean(ppl):.2f}{f' ± {sd:.2f}' if len(ppl) > 1 else ''} | "
                     f"{statistics.mean(r['train_flops'] for r in rs) / 1e12:.2f} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.0f} |")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", "Failed: " + "; ".join(f"{r['variant']} s{r['seed']}: {r['error']}" for r in errors)]
    lines += ["", "![llama_kjv](llama_kjv.png)"]
    from _repro_common import DISCUSSION        # text below it is the author's and is kept
    md = out.with_suffix(".md")
    kept = md.read_text().split(DISCUSSION, 1)[1] if md.exists() and DISCUSSION in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + DISCUSSION + kept)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (name, rs) in enumerate(by.items()):   # 10 colours x 3 markers: each variant its own
        for ax, key in zip(axes, ("params_end", "train_flops", "train_s")):
            ax.scatter([r[key] for r in rs], [r["ppl"] for r in rs], label=name, s=22,
                       color=f"C{i % 10}", marker="o^s"[i // 10 % 3])
    for ax, label in zip(axes, ("parameters at the end", "training FLOPs", "training seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", help="default: all")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (set BENCH_THREADS "
                   "to give each OMP_NUM_THREADS threads)")
    p.add_argument("--data", default=str(REPO / "data" / "kjv"), help="written by `secateur data kjv`")
    p.add_argument("--runs", default=str(REPO / "runs" / "bench-llama-kjv"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "llama_kjv"))
    p.add_argument("--fresh", action="store_true", help="do not merge with OUT.json's earlier results")
    p.add_argument("--reuse", action="store_true", help="read runs in --runs that finished with "
                   "--steps instead of training them again")
    p.add_argument("--core-seeds", type=int, nargs="*", default=[],
                   help="seeds run for the core variants only (dense, pwt-activation-50, "
                        "end-oneshot-50, small-dense-50, end-tp-50)")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    data, runs, out = Path(args.data), Path(args.runs), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)      # before hours of training, not after
    if not (data / "train.txt").is_file():
        from secateur.data.writers import write_kjv
        write_kjv(str(data))
    table = variants(args.steps)
    names = args.variants or [*table, *DEPENDENT]

    def one(name: str, seed: int) -> dict:
        try:
            return _one(name, seed)
        except Exception as e:   # one failed variant is reported in the table, the rest still run
            return {"variant": name, "seed": seed, "steps": args.steps, "error": [f"{type(e).__name__}: {e}"]}

    def _one(name: str, seed: int) -> dict:
        if name.startswith("end-tp-"):
            r = run_tp(name, int(name.rsplit("-", 1)[1]), args.steps, seed, runs)
        else:
            overrides = final_widths(runs / f"pwt-activation-50-s{seed}") if name == "small-dense-50" \
                else table[name]
            r = run_variant(name, overrides, args.steps, seed, data, runs)
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        return {**r, "steps": args.steps}

    core = ["dense", "pwt-activation-50", "end-oneshot-50", "small-dense-50", "end-tp-50"]
    plan = [(n, s) for s in args.seeds for n in names] + [(n, s) for s in args.core_seeds for n in core]
    first = [(n, s) for n, s in plan if n not in DEPENDENT]
    # a dependent variant needs its source run; train the source first when it is missing
    first += [(DEPENDENT[n], s) for n, s in plan if n in DEPENDENT
              and (DEPENDENT[n], s) not in first and not (runs / f"{DEPENDENT[n]}-s{s}" / "summary.json").is_file()]
    second = [(n, s) for n, s in plan if n in DEPENDENT]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: one(*t), first))
        results += list(pool.map(lambda t: one(*t), second))
    threads = os.environ.get("BENCH_THREADS")
    cmd = (f"BENCH_THREADS={threads} " if threads else "") + "python benchmarks/llama_kjv.py " + \
        " ".join(argv or sys.argv[1:])
    results = [{**r, "cmd": cmd, "date": time.strftime("%Y-%m-%d")} for r in results]
    if not args.fresh and out.with_suffix(".json").is_file():   # keep earlier variants/seeds
        done = {(r["variant"], r["seed"]) for r in results}
        earlier = json.loads(out.with_suffix(".json").read_text())
        results = [r for r in earlier if (r["variant"], r["seed"]) not in done
                   and r.get("steps") == args.steps] + results
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
