"""`secateur report RUN_DIR`: PNG plots of a run and a markdown summary, from metrics.csv and
events.jsonl only (no model, no process group)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from secateur.trainer.logs import read_events, read_metrics

PLOTS = ("params_vs_step.png", "width_vs_step.png", "loss_acc_vs_step.png",
         "step_time_vs_step.png", "params_vs_acc.png")


def _prune_steps(events: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in events if e["kind"] == "prune"]


def _mark_events(ax, steps: list[int]) -> None:
    for i, s in enumerate(steps):
        ax.axvline(s, color="0.6", lw=0.8, ls=":", label="pruning event" if i == 0 else None)


def make_plots(rows: list[dict[str, Any]], events: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNGs of PLOTS into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    prune_steps = _prune_steps(events)
    evals = [r for r in rows if r["eval_acc"] is not None]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, [r["params"] for r in rows], color="C0")
    _mark_events(ax, prune_steps)
    ax.set(xlabel="step", ylabel="parameters", title="Parameters vs step")
    if prune_steps:
        ax.legend(loc="upper right")
    save(fig, "params_vs_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    names = list(rows[0]["widths"]) if rows and rows[0]["widths"] else []
    for name in names:
        ax.plot(steps, [r["widths"].get(name, float("nan")) for r in rows], label=name)
    _mark_events(ax, prune_steps)
    ax.set(xlabel="step", ylabel="units", title="Width per layer vs step")
    if names:
        ax.legend(fontsize=7, ncol=2)
    save(fig, "width_vs_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, [r["loss"] for r in rows], color="C0", lw=0.8, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="C1",
                label="val loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss and accuracy vs step")
    ax2 = ax.twinx()
    if evals:
        ax2.plot([r["step"] for r in evals], [r["eval_acc"] for r in evals], "s--", color="C2",
                 label="val accuracy")
    ax2.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    save(fig, "loss_acc_vs_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, [1000 * r["step_time_s"] for r in rows], color="C3", lw=0.8)
    _mark_events(ax, prune_steps)
    ax.set(xlabel="step", ylabel="step time (ms)", title="Step time vs step")
    save(fig, "step_time_vs_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["params"] for r in evals], [r["eval_acc"] for r in evals], "o-", color="C4")
    ax.set(xlabel="parameters", ylabel="val accuracy", title="Parameters vs accuracy")
    save(fig, "params_vs_acc.png")
    return paths


def summary_markdown(run_dir: Path, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """report.md: headline numbers, pruning events and the width of every group at start/end."""
    from secateur.trainer.loop import step_time_windows

    first, last = rows[0], rows[-1]
    evals = [r for r in rows if r["eval_acc"] is not None]
    early, late = step_time_windows(rows)
    pruned = [e for e in events if e["kind"] == "prune"]
    params_end = pruned[-1]["params_after"] if pruned and pruned[-1]["step"] >= last["step"] \
        else last["params"]
    lines = [
        f"# Run report: {run_dir.name}", "",
        "| quantity | value |", "|---|---|",
        f"| steps | {last['step']} |",
        f"| parameters at start | {first['params']:,} |",
        f"| parameters at end | {params_end:,} ({100 * params_end / first['params']:.1f}% of start) |",
        f"| final val accuracy | {evals[-1]['eval_acc']:.4f} |" if evals else "| final val accuracy | n/a |",
        f"| final val loss | {evals[-1]['eval_loss']:.4f} |" if evals else "| final val loss | n/a |",
        f"| mean step time, first steps | {1000 * early:.2f} ms |",
        f"| mean step time, last steps | {1000 * late:.2f} ms |",
        f"| late / early step time | {late / early:.3f} |", "",
        "## Pruning events", "",
    ]
    if pruned:
        lines += ["| step | params before | params after | groups that shrank |", "|---|---|---|---|"]
        for e in pruned:
            changed = ", ".join(f"{n} {b}->{a}" for n, b, a in e["groups"] if a != b) or "none"
            lines.append(f"| {e['step']} | {e['params_before']:,} | {e['params_after']:,} | {changed} |")
    else:
        lines.append("No pruning events.")
    widths_end = pruned[-1]["groups"] if pruned else []
    if first["widths"]:
        end = {n: a for n, _, a in widths_end} or last["widths"]
        lines += ["", "## Width per group", "", "| group | start | end |", "|---|---|---|"]
        lines += [f"| {n} | {w} | {end.get(n, last['widths'].get(n))} |" for n, w in first["widths"].items()]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}](plots/{p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.md; returns the report path."""
    from secateur.trainer.checkpoint import CheckpointError

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise CheckpointError(f"{run_dir} has no metrics.csv (is it a secateur run directory?)")
    rows = read_metrics(run_dir)
    if not rows:
        raise CheckpointError(f"{run_dir}/metrics.csv has no rows yet")
    events = read_events(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    make_plots(rows, events, plots)
    report = run_dir / "report.md"
    report.write_text(summary_markdown(run_dir, rows, events))
    return report
