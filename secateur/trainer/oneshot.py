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

from pydantic import ValidationError

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
              seed: int = 0, unit_kinds: list[str] | None = None) -> dict[str, Any]:
    """Prune the latest checkpoint of `run_dir` once and write the result to `out_dir`.

    calib_batches: training batches (data.batch_size each, in file order) fed through the model
    in eval mode to collect the criterion's statistics. unit_kinds: prune only groups of these
    kinds ("channels", "heads", "mlp", "hidden"; the config's `pruning.units`), None: all.
    Returns a summary dict: params, validation accuracy (next-token accuracy for a causal LM) and
    mean validation loss per target (eval_loss_*; its exp is the perplexity) before/after, and
    per-group widths (name, before, after) of the pruned groups.

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
    if unit_kinds is not None and not unit_kinds:
        raise ConfigError("units: name at least one kind (channels, heads, mlp, hidden)")
    try:
        pcfg = PruningConfig(criterion=criterion, criterion_args=criterion_args, rule=rule,
                             schedule=OneshotSchedule(kind="oneshot", at=max(1, int(meta["step"]))),
                             min_units=min_units, units=unit_kinds)
    except ValidationError as err:   # as a config's pruning.units would be refused
        e = err.errors()[0]
        raise ConfigError(f"{e['loc'][0]}: {e['msg']}, got {e['input']!r}") from None
    seed_everything(seed)
    ds = dataset_from_config(cfg)
    x_example = example_batch(ds)
    replayed: dict[str, list[int]] | None = None
    if meta.get("spec"):
        model, _ = ckpt.load_model(src)
        pruner = None
    elif unit_kinds is not None and meta.get("structure"):
        # the recorded structure may name groups of other kinds than those pruned now: replay it
        # through every traced group, prune the cut model, then map kept units back to originals
        model = construct(meta["source"], pretrained=False)
        replayed = structure.record(replay_structure(model, None, meta, example_input(model, x_example)))
        model.load_state_dict(ckpt.model_state_dict(src))
        pruner = None
    else:   # the original architecture, traced, cut to the recorded structure: origins stay original
        model = construct(meta["source"], pretrained=False)
        pruner = _pruner(pcfg, model, x_example, src)
        if meta.get("structure"):
            replay_structure(model, pruner.groups, meta, None)
        model.load_state_dict(ckpt.model_state_dict(src))
    val_idx = torch.arange(len(ds.val))
    bs = cfg.data.eval_batch_size

    def evaluate() -> tuple[float, float]:
        """(accuracy, mean loss per target) on the validation split."""
        t = eval_totals(model, ds.val, val_idx, bs, eval_batches)
        n = max(t[2].item(), 1.0)
        return t[1].item() / n, t[0].item() / n

    (acc_before, loss_before), params_before = evaluate(), param_count(model)
    if pruner is None:
        pruner = _pruner(pcfg, model, x_example, src)
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
    (acc_after, loss_after), params_after = evaluate(), param_count(model)
    groups = [(str(n), int(b), int(a)) for n, b, a in report]

    if meta.get("spec"):
        arch = {"spec": model.spec()}
    else:
        kept = structure.record(pruner.groups)
        if replayed is not None:   # positions in the replayed model -> original units
            kept = {**replayed, **{n: [replayed[n][i] for i in k] for n, k in kept.items()}}
        arch = {"source": meta["source"], "structure": kept,
                "structure_ignored_layers": meta.get("structure_ignored_layers", [])
                if replayed is not None else []}
    write_pruned_run(out, run_dir, src, meta, cfg, model, arch,
                     {"criterion": criterion, "rule": rule.model_dump(), "calib_batches": calib_batches,
                      "units": unit_kinds},
                     params_before, params_after, groups, seconds,
                     example=None if meta.get("spec") else x_example)
    summary = {"source": str(src), "out": str(out), "criterion": criterion, "rule": rule.model_dump(),
               "units": unit_kinds, "params_before": params_before, "params_after": params_after,
               "acc_before": acc_before, "acc_after": acc_after, "eval_loss_before": loss_before,
               "eval_loss_after": loss_after, "groups": groups, "seconds": seconds}
    return summary


def write_pruned_run(out: Path, run_dir: str | Path, src: Path, meta: dict[str, Any], cfg: Any,
                     model: torch.nn.Module, arch: dict[str, Any], how: dict[str, Any],
                     params_before: int, params_after: int, groups: list, seconds: float,
                     example: Any = None) -> None:
    """Write a one-shot cut of checkpoint `src` (of run `run_dir`, config `cfg`) as a new run in
    `out`: the config without pruning, a weights checkpoint at the source's step holding `arch`
    (`spec`, or `source` + `structure`) and `how` the cut was made (meta "oneshot"), and its event
    in events.jsonl; `secateur resume out` then fine-tunes it (a fresh optimizer). `out` must still
    be new (runfolder.check_new_folder) and is locked while written."""
    from secateur.trainer import runfolder

    runfolder.check_new_folder(out, "--out", source=run_dir)   # still new, after the work
    with runfolder.locked(out):
        runfolder.record(out, runfolder.run_files())      # first: the folder is secateur's run
        new_cfg = cfg.model_copy(update={"pruning": None})
        (out / "config.yaml").write_text(yaml.safe_dump(new_cfg.model_dump(mode="json"), sort_keys=False))
        step = int(meta["step"])
        ckpt.write_weights_checkpoint(out, step, model, {
            **arch, "config": new_cfg.model_dump(mode="json"), "step": step,
            "world_size": 1, "params": params_after, "initial_params": meta.get("initial_params", params_before),
            "pruned_from": str(src), "oneshot": how}, example=example)
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps({"kind": "prune", "step": step, "time": time.time(), "oneshot": True,
                                "params_before": params_before, "params_after": params_after,
                                "groups": groups, "seconds": seconds}) + "\n")


def _pruner(pcfg: PruningConfig, model: torch.nn.Module, x_example: Any, src: Path) -> Any:
    """pruner_from_config, with a model that has nothing to prune (no group of the asked kinds)
    as one line."""
    try:
        return pruner_from_config(pcfg, model, example_input(model, x_example))
    except ValueError as err:
        if str(err).startswith(("unit_kinds:", "model: no prunable")):
            raise ConfigError(f"{src}: {err}") from None
        raise
