"""Run logs: metrics.csv (one row per step), events.jsonl (pruning events, checkpoints, evals),
a tqdm progress bar and human-readable lines. Written by the main rank only."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

METRIC_FIELDS = ["step", "loss", "lr", "params", "step_time_s", "eval_loss", "eval_acc", "widths"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of dicts with numbers parsed (empty cells -> None, widths -> dict)."""
    path = Path(run_dir) / "metrics.csv"
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "widths":
                    row[k] = json.loads(v) if v else {}
                elif v in ("", None):
                    row[k] = None
                elif k in ("step", "params"):
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_csv(path: Path, last_step: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and int(ln.split(",", 1)[0]) <= last_step]
    path.write_text("".join(keep))


def _truncate_jsonl(path: Path, last_step: int) -> None:
    keep = [ln for ln in path.read_text().splitlines(keepends=True)
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    path.write_text("".join(keep))


class RunLog:
    """Appends to RUN_DIR/metrics.csv and RUN_DIR/events.jsonl and drives the progress bar.

    With `resume_step` set, rows and events after that step (written before a crash) are dropped
    first, so the files match an uninterrupted run.
    """

    def __init__(self, run_dir: Path, max_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = None
        if not enabled:
            return
        metrics, events = self.run_dir / "metrics.csv", self.run_dir / "events.jsonl"
        if resume_step is not None and metrics.is_file():
            _truncate_csv(metrics, resume_step)
        if resume_step is not None and events.is_file():
            _truncate_jsonl(events, resume_step)
        new = not metrics.is_file() or metrics.stat().st_size == 0
        self._metrics = open(metrics, "a", newline="")
        self._writer = csv.DictWriter(self._metrics, fieldnames=METRIC_FIELDS)
        if new:
            self._writer.writeheader()
        self._events = open(events, "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5, unit="step")

    def step(self, step: int, loss: float, lr: float, params: int, step_time_s: float,
             widths: dict[str, int], eval_loss: float | None = None,
             eval_acc: float | None = None) -> None:
        """One metrics row; refresh the bar (step, loss, params, step time)."""
        if not self.enabled:
            return
        self._writer.writerow({
            "step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}", "params": params,
            "step_time_s": f"{step_time_s:.6g}",
            "eval_loss": "" if eval_loss is None else f"{eval_loss:.6g}",
            "eval_acc": "" if eval_acc is None else f"{eval_acc:.6g}",
            "widths": json.dumps(widths, separators=(",", ":")),
        })
        self._metrics.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", params=f"{params:,}",
                                 step_ms=f"{1000 * step_time_s:.1f}", refresh=False)
            self.bar.update(1)

    def event(self, kind: str, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **fields}
        self._events.write(json.dumps(rec, default=str) + "\n")
        self._events.flush()

    def say(self, line: str) -> None:
        """A human-readable line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled or self._metrics.closed:
            return
        if self.bar is not None:
            self.bar.close()
        self._metrics.close()
        self._events.close()


def format_prune_event(step: int, groups: list[tuple[str, int, int]], params_before: int,
                       params_after: int) -> str:
    """One line: which groups lost how many units, and the parameter count before/after."""
    changed = [f"{name} {b}->{a}" for name, b, a in groups if a != b]
    pct = 100.0 * params_after / max(params_before, 1)
    head = (f"[prune] step {step}: params {params_before:,} -> {params_after:,} ({pct:.1f}%), "
            f"{len(changed)}/{len(groups)} groups shrank")
    return head + (": " + ", ".join(changed) if changed else "")
