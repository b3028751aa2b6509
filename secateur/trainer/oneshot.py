"""`secateur prune`: one-shot pruning or folding of a run's latest checkpoint, no training.

Calibration batches come from the run's own training data (its config is inside the checkpoint);
the result is a new run directory whose checkpoint holds the pruned architecture and weights,
ready for `secateur export`, or `secateur resume NEW_DIR --max-steps N` to fine-tune it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from secateur.trainer import checkpoint as ckpt
from secateur.trainer.config import (ConfigError, OneshotSchedule, PruningConfig, RatioRule,
                                     ThresholdRule, check_config, check_criterion_args,
                                     parse_config)
from secateur.trainer.loop import seed_everything
from secateur.build import forward, is_hf
from secateur.trainer.setup import (dataset_from_config, eval_totals, example_batch, example_input,
                                    param_count, pruner_from_config)


def prune_run(run_dir: str | Path, out_dir: str | Path, criterion: str,
              rule: RatioRule | ThresholdRule, calib_batches: int = 8, min_units: int = 1,
              criterion_args: dict[str, Any] | None = None, eval_batches: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Prune the latest checkpoint of `run_dir` once and write the result to `out_dir`.

    calib_batches: training batches (data.batch_size each, in file order) fed through the model
    in eval mode to collect the criterion's statistics. Returns a summary dict
    (params and validation accuracy before/after, per-group widths).

    `out_dir` must be new or empty, and not `run_dir` (secateur.trainer.runfolder); it is locked
    while it is written. Bad arguments raise ConfigError (one line) before anything is written.
    """
    from secateur.build import construct
    from secateur.trainer.export import replay_structure
    from secateur.pruning import structure
    from secateur.trainer import runfolder

    for name, value in (("calib_batches", calib_batches), ("min_units", min_units),
                        ("eval_batches", eval_batches)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    criterion_args = check_criterion_args(criterion, criterion_args or {}, "--criterion-args")
    out = Path(out_dir)
    runfolder.check_new_folder(out, "--out", source=run_dir)
    src = ckpt.latest(run_dir)
    meta = ckpt.read_meta(src)
    cfg = parse_config(meta["config"], f"{src}/meta.json")
    check_config(cfg, f"{src}/meta.json")
    pcfg = PruningConfig(criterion=criterion, criterion_args=criterion_args, rule=rule,
                         schedule=OneshotSchedule(kind="oneshot", at=max(1, int(meta["step"]))),
                         min_units=min_units)
    seed_everything(seed)
    ds = dataset_from_config(cfg)
    x_example = example_batch(ds)
    if meta.get("spec"):
        model, _ = ckpt.load_model(src)
        pruner = None
    else:   # the original architecture, traced, cut to the recorded structure: origins stay original
        model = construct(meta["source"], pretrained=False)
        pruner = pruner_from_config(pcfg, model, example_input(model, x_example))
        if meta.get("structure"):
            replay_structure(model, pruner.groups, meta, None)
        model.load_state_dict(ckpt.model_state_dict(src))
    val_idx = torch.arange(len(ds.val))
    bs = cfg.data.eval_batch_size

    def accuracy() -> float:
        t = eval_totals(model, ds.val, val_idx, bs, eval_batches)
        return t[1].item() / max(t[2].item(), 1.0)

    acc_before, params_before = accuracy(), param_count(model)
    if pruner is None:
        pruner = pruner_from_config(pcfg, model, example_input(model, x_example))
    t0 = time.perf_counter()
    model.eval()
    hf = is_hf(model)
    with torch.no_grad():
        for b in range(calib_batches):
            idx = torch.arange(b * cfg.data.batch_size, (b + 1) * cfg.data.batch_size) % len(ds.train)
            x, y = ds.train.batch(idx)
            if pruner.needs_targets:
                pruner.observe_targets(y)
            forward(model, x, hf)
    report = pruner.prune(None)
    seconds = time.perf_counter() - t0
    acc_after, params_after = accuracy(), param_count(model)
    groups = [(str(n), int(b), int(a)) for n, b, a in report]

    runfolder.check_new_folder(out, "--out", source=run_dir)   # still new, after the work
    with runfolder.locked(out):
        runfolder.record(out, runfolder.run_files())      # first: the folder is secateur's run
        new_cfg = cfg.model_copy(update={"pruning": None})
        (out / "config.yaml").write_text(yaml.safe_dump(new_cfg.model_dump(mode="json"), sort_keys=False))
        step = int(meta["step"])
        if meta.get("spec"):
            arch = {"spec": model.spec()}
        else:
            arch = {"source": meta["source"], "structure": structure.record(pruner.groups),
                    "structure_ignored_layers": []}
        ckpt.write_weights_checkpoint(out, step, model, {
            **arch, "config": new_cfg.model_dump(mode="json"), "step": step,
            "world_size": 1, "params": params_after, "initial_params": meta.get("initial_params", params_before),
            "pruned_from": str(src), "oneshot": {"criterion": criterion, "rule": rule.model_dump(),
                                            "calib_batches": calib_batches}},
            example=None if meta.get("spec") else x_example)
        summary = {"source": str(src), "out": str(out), "criterion": criterion, "rule": rule.model_dump(),
                   "params_before": params_before, "params_after": params_after,
                   "acc_before": acc_before, "acc_after": acc_after, "groups": groups, "seconds": seconds}
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps({"kind": "prune", "step": step, "time": time.time(), "oneshot": True,
                                "params_before": params_before, "params_after": params_after,
                                "groups": groups, "seconds": seconds}) + "\n")
    return summary
