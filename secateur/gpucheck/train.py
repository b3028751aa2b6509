"""gpu-check's training stage: `python -m secateur.gpucheck.train --out DIR --run-dir RUN
[--data FOLDER] [--small] [--precision bf16|fp16] [--steps N]`.

Runs configs/quickstart.yaml (Fashion-MNIST from FOLDER, the rows the wheel set carries) through
the real trainer: one process, a DeepSpeed engine over NCCL on a GPU (gloo on CPU), pruning
events that shrink the model and rebuild the engine. Prints each event and the median step time
before and after it; writes DIR/result.json plus the run's metrics.csv, events.jsonl,
summary.json and config.yaml (checkpoints stay in RUN).

--precision bf16|fp16 asks for a mixed-precision run (deepspeed.precision; fp32 masters and
moments cut at each event, fp16 with loss scaling); where the config validation rejects it (fp16
on a CPU without fp16 support) the stage records itself as skipped with that reason. --small (the CPU dry run): 30 steps, events
at 10, 20, 30."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from secateur.gpucheck.report import format_windows, run_dir_result

REPO = Path(__file__).resolve().parents[2]
COPIED = ("metrics.csv", "events.jsonl", "summary.json", "config.yaml")


def make_config(path: Path, data_root: str | None, small: bool, precision: str, steps: int | None) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    if data_root:
        data["data"]["root"] = data_root
    train = data.setdefault("train", {})
    train["progress"] = False
    if small:   # a shared 2-core CPU: one thread per process is several times faster than two
        train.update(max_steps=30, eval_interval=30, threads=1)
        data["data"]["batch_size"] = 32
        data["pruning"]["schedule"] = {"kind": "iterative", "start": 10, "end": 30, "every": 10}
        data.setdefault("lr_schedule", {})["warmup_steps"] = 5
    if steps is not None:
        train["max_steps"] = steps
        if small and steps < 10:    # a few steps: an event at each, so the cut still runs
            data["pruning"]["schedule"] = {"kind": "iterative", "start": 1, "end": steps, "every": 1}
            data["lr_schedule"]["warmup_steps"] = 0
            train["eval_interval"] = steps
    if precision != "fp32":
        data.setdefault("deepspeed", {})["precision"] = precision
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m secateur.gpucheck.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--run-dir", required=True, help="the trainer's run directory (checkpoints go here)")
    ap.add_argument("--data", help="Fashion-MNIST folder (default: the config's, i.e. the Debian files)")
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--steps", type=int)
    args = ap.parse_args(argv)
    out, run_dir = Path(args.out), Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"status": "failed", "config": args.config, "precision": args.precision}
    rc = 1
    t0 = time.perf_counter()
    try:
        from secateur.trainer.config import ConfigError, check_config, parse_config

        data = make_config(Path(args.config), args.data, args.small, args.precision, args.steps)
        try:
            cfg = parse_config(data, Path(args.config).name)
            check_config(cfg, Path(args.config).name)
        except ConfigError as err:
            if args.precision == "fp32":
                raise
            result.update(status="skipped", reason=f"the config validation rejects it: {err}")
            print(f"train: {args.precision} run skipped ({err})", flush=True)
            return 0
        result["max_steps"] = cfg.train.max_steps

        from secateur.trainer.engine import destroy_process_group, init_distributed, shutdown_distributed
        from secateur.trainer.loop import Trainer, format_summary

        info = init_distributed(None)
        result["dist"] = {"backend": info.backend, "world_size": info.world_size, "device": str(info.device)}
        try:
            trainer = Trainer(cfg, run_dir, info)
            eng = trainer.engine.engine
            result["engine"] = f"{type(eng).__module__}.{type(eng).__name__}"
            summary = trainer.train()
            trainer.close()
        except BaseException:
            destroy_process_group()
            raise
        shutdown_distributed(cfg.train.collective_timeout_s)
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
        print(format_summary(summary), flush=True)
        result["status"] = "ok"
        rc = 0
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        result["seconds"] = time.perf_counter() - t0
        if result["status"] != "skipped":
            result.update(run_dir_result(run_dir))
            if result.get("windows"):
                print("\n".join(format_windows(result["windows"])), flush=True)
            for name in COPIED:
                if (run_dir / name).is_file():
                    shutil.copy2(run_dir / name, out / name)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return rc


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    sys.exit(main())
