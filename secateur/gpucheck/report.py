"""gpu-check's bookkeeping, standard library only (the orchestrator imports it before anything is
installed): test results from the pytest plugin's JSON lines, step times around pruning events from
a run's metrics.csv / events.jsonl, and summary.md."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Callable


# ---- tests --------------------------------------------------------------------------------
def aggregate_tests(jsonl: Path, is_device_test: Callable[[str], bool]) -> dict[str, Any]:
    """One outcome per test (failed / error / skipped / passed) from the plugin's phase records.
    Device tests are those that exercise a kernel on the device (or, in the dry run, Triton's
    interpreter); the others are host-side checks (nvcc / g++ builds, argument checks)."""
    tests: dict[str, dict] = {}
    lines = jsonl.read_text().splitlines() if jsonl.is_file() else []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        t = tests.setdefault(rec["nodeid"], {"outcome": None, "duration": 0.0, "message": ""})
        t["duration"] += rec.get("duration", 0.0)
        if rec["outcome"] == "failed":
            t["outcome"] = "failed" if rec["when"] == "call" else "error"
            t["message"] = rec.get("message", "")
        elif rec["outcome"] == "skipped" and t["outcome"] not in ("failed", "error"):
            t["outcome"], t["message"] = "skipped", rec.get("message", "")
        elif rec["when"] == "call" and t["outcome"] is None:
            t["outcome"] = "passed"
    for t in tests.values():
        t["outcome"] = t["outcome"] or "unfinished"
        t["duration"] = round(t["duration"], 3)
    out: dict[str, Any] = {"tests": tests}
    for group, pick in (("device", True), ("host", False)):
        sel = {k: v for k, v in tests.items() if is_device_test(k) == pick}
        counts: dict[str, int] = {}
        for v in sel.values():
            counts[v["outcome"]] = counts.get(v["outcome"], 0) + 1
        out[group] = {"total": len(sel), **counts}
    return out


# ---- training -----------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            try:
                rows.append({"step": int(raw["step"]), "step_time_s": float(raw["step_time_s"]),
                             "params": int(raw["params"]),
                             "eval_acc": float(raw["eval_acc"]) if raw.get("eval_acc") else None})
            except (KeyError, TypeError, ValueError):
                continue          # a row cut short by a kill
    return rows


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _median_ms(xs: list[float]) -> float | None:
    return 1e3 * statistics.median(xs) if xs else None


def event_windows(rows: list[dict[str, Any]], events: list[dict[str, Any]], width: int = 40) -> list[dict]:
    """Median step time before and after each pruning event. A metrics row's step_time_s is that
    step's optimizer step, taken before the event at that step; so `before` is steps
    (s - width, s], `first_after` step s + 1 (new shapes: engine rebuilt, kernels compiled for
    them), `after` steps s + 2 .. min(next event, s + 1 + width). Step 1 (lazy set-up) is left out."""
    t = {r["step"]: r["step_time_s"] for r in rows}
    prunes = [e for e in events if e.get("kind") == "prune"]
    steps = [int(e["step"]) for e in prunes]
    last = max(t) if t else 0
    out = []
    for i, (s, e) in enumerate(zip(steps, prunes)):
        prev = steps[i - 1] + 1 if i else 1
        nxt = steps[i + 1] if i + 1 < len(steps) else last
        before = [t[k] for k in range(max(prev + 1, s - width + 1, 2), s + 1) if k in t]
        after = [t[k] for k in range(s + 2, min(nxt, s + 1 + width) + 1) if k in t]
        b, a = _median_ms(before), _median_ms(after)
        out.append({"step": s, "params_before": e.get("params_before"), "params_after": e.get("params_after"),
                    "before_ms": b, "first_after_ms": 1e3 * t[s + 1] if s + 1 in t else None,
                    "after_ms": a, "after_over_before": a / b if a and b else None,
                    "event_s": e.get("seconds"), "n_before": len(before), "n_after": len(after)})
    return out


def format_windows(windows: list[dict]) -> list[str]:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["step time around pruning events (median ms per step; 'first' = the first step after):"]
    for w in windows:
        ratio = "" if w["after_over_before"] is None else f" (after/before {w['after_over_before']:.2f})"
        params = ("" if w["params_before"] is None else
                  f", params {w['params_before']:,} -> {w['params_after']:,}")
        lines.append(f"  step {w['step']}: before {ms(w['before_ms'])}, first {ms(w['first_after_ms'])}, "
                     f"after {ms(w['after_ms'])}{ratio}{params}")
    return lines


def run_dir_result(run_dir: Path) -> dict[str, Any]:
    """What a (possibly unfinished) run directory says: steps done, events, step-time windows."""
    rows = read_metrics(run_dir / "metrics.csv")
    events = read_events(run_dir / "events.jsonl")
    res: dict[str, Any] = {"steps_done": rows[-1]["step"] if rows else 0,
                           "prune_events": sum(1 for e in events if e.get("kind") == "prune"),
                           "windows": event_windows(rows, events)}
    if rows:
        res["params_start"], res["params_end"] = rows[0]["params"], rows[-1]["params"]
        evals = [r["eval_acc"] for r in rows if r["eval_acc"] is not None]
        res["last_eval_acc"] = evals[-1] if evals else None
    prunes = [e for e in events if e.get("kind") == "prune" and e.get("params_after") is not None]
    if prunes and rows and prunes[-1]["step"] >= rows[-1]["step"]:
        res["params_end"] = prunes[-1]["params_after"]      # the last event came after the last row
    summary = run_dir / "summary.json"
    if summary.is_file():
        res["summary"] = json.loads(summary.read_text())
        res["params_end"] = res["summary"].get("params_end", res.get("params_end"))
    return res


# ---- summary.md ---------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table (preceded by a blank line), or nothing without rows."""
    if not rows:
        return []
    return ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def summary_markdown(res: dict[str, Any]) -> str:
    meta = res.get("meta", {})
    env = res.get("env", {})
    mode = ("dry run on CPU (Triton interpreter, small shapes: timings mean nothing)"
            if meta.get("dry_run") else "GPU")
    out = [f"# secateur gpu-check: {env.get('gpu') or 'no GPU'} ({meta.get('date', '?')})", "",
           f"- mode: {mode}; verdict: **{res.get('verdict', '?')}**",
           f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
           f"triton {env.get('triton')}, cupy {env.get('cupy')}, deepspeed {env.get('deepspeed', '-')}",
           f"- repository {meta.get('git', {}).get('commit') or '?'}; wheel set "
           f"{meta.get('wheels_commit') or '-'}; whole command {_f(meta.get('seconds'), '.1f')} s", "",
           "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, st in res.get("stages", {}).items():
        out.append(f"| {name} | {st.get('status')} | {_f(st.get('seconds'), '.1f')} | "
                   f"{(st.get('note') or '').replace('|', '/')} |")

    tests = res.get("tests")
    if tests:
        d, h = tests.get("device", {}), tests.get("host", {})
        out += ["", "## Kernel tests", "",
                f"device tests: {d.get('passed', 0)}/{d.get('total', 0)} passed, {d.get('failed', 0)} failed, "
                f"{d.get('error', 0)} errors, {d.get('skipped', 0)} skipped; host-side checks: "
                f"{h.get('passed', 0)}/{h.get('total', 0)} passed"]
        bad = [(k, v) for k, v in tests.get("tests", {}).items()
               if v["outcome"] not in ("passed",)]
        for k, v in bad[:30]:
            out.append(f"- {v['outcome']}: `{k}` {v['message'][:200]}")

    b = res.get("bench")
    if b:
        out += ["", "## Benchmarks (Triton vs torch on the device)", ""]
        cp = b.get("copy")
        if cp:
            out.append(f"device-to-device copy: **{cp['GB/s']:.4g} GB/s** ({cp['buffer_MiB']} MiB buffer, "
                       "read + write)")
        out += _table(["op", "dtype", "shape", "Triton ms", "GB/s", "of copy", "torch ms", "GB/s",
                       "Triton speed-up"],
                      [[r["op"], r["dtype"], tuple(r["shape"]), f"{r['triton']['ms']:.3g}",
                        f"{r['triton']['GB/s']:.3g}",
                        "-" if r["triton"].get("of_copy") is None else f"{100 * r['triton']['of_copy']:.0f}%",
                        f"{r['torch']['ms']:.3g}", f"{r['torch']['GB/s']:.3g}", f"x{r['speedup']:.2f}"]
                       for r in b.get("channel_ops") or []])
        gram_cols = ("triton", "torch_path", "matmul_ieee", "matmul_tf32", "matmul_bf16")
        out += _table(["Gram", "dtype", "Triton TFLOP/s", "torch path", "matmul IEEE fp32", "matmul TF32",
                       "matmul bf16"],
                      [[tuple(g["shape"]), g["dtype"],
                        *(f"{g[k]['TFLOP/s']:.3g}" if k in g else "-" for k in gram_cols)]
                       for g in b.get("gram") or []])
        out += _table(["training step", "batch", "params", "no stats ms", "fused stats ms", "overhead"],
                      [[s["model"], s["batch"], f"{s['params']:,}", f"{s['plain_ms']:.3f}", f"{s['stats_ms']:.3f}",
                        f"{s['overhead_pct']:+.1f}%"] for s in b.get("train_step_stats_overhead") or []])
        out += _table(["greedy n x m, r", "torch host ms", "torch device ms", "CUDA C f64 ms", "CUDA C f32 ms",
                       "f64 speed-up vs host", "same order f64"],
                      [[f"{g['n']} x {g['m']}, {g['r']}", _f(g.get("torch_cpu")),
                        _f(g.get("torch_cuda")) if "torch_cuda_error" not in g else "error (below)",
                        _f(g.get("cuda_f64")) if "cuda_f64" in g else g.get("cuda", "-"), _f(g.get("cuda_f32")),
                        _f(g.get("speedup_f64_vs_torch_cpu")), _f(g.get("same_order_f64"), "")]
                       for g in b.get("greedy") or []])
        for g in b.get("greedy") or []:
            if g.get("torch_cuda_error"):
                out.append(f"- torch greedy on the device, n = {g['n']}: {g['torch_cuda_error']}")
        for k, v in (b.get("errors") or {}).items():
            out.append(f"- bench section {k} failed: {v}")

    for key, title in (("train", "Training (quickstart)"), ("train_bf16", "Training (bf16)"),
                       ("train_fp16", "Training (fp16, loss scaling)")):
        t = res.get(key)
        if not t:
            continue
        out += ["", f"## {title}", ""]
        if t.get("status") == "skipped":
            out.append(f"skipped: {t.get('reason')}")
            continue
        d = t.get("dist", {})
        out.append(f"{t.get('steps_done', 0)} steps through {t.get('engine', '?')} (backend {d.get('backend')}, "
                   f"world size {d.get('world_size')}, {d.get('device')}), {t.get('prune_events', 0)} pruning "
                   f"events, params {_f(t.get('params_start'), ',')} -> {_f(t.get('params_end'), ',')}, "
                   f"last val acc {_f(t.get('last_eval_acc'), '.4f')}")
        s = t.get("summary")
        if s:
            out.append(f"step time early {1e3 * s['step_time_early_s']:.2f} ms, late {1e3 * s['step_time_late_s']:.2f} ms "
                       f"(late/early {s['step_time_late_over_early']:.2f}); {s['seconds']:.1f} s for the run")
        if t.get("windows"):
            out += ["", "```", *format_windows(t["windows"]), "```"]
        if t.get("error"):
            out.append(f"error: {t['error']}")
    return "\n".join(out) + "\n"
