"""Command line: `secateur train|resume|prune|export|report|data|bench`.

Launch `train` as one process, or one process per rank with `torchrun --nproc_per_node N` or
`deepspeed --num_gpus N` (the launcher's --local_rank is accepted anywhere on the line). Bad
configs, missing data and unusable run directories end with one `error: ...` line on stderr and
exit code 2, before any file is created or deleted. A write that fails later (disk full, quota,
read-only) ends with one line and exit code 4.

A user's work is never lost (secateur.trainer.runfolder): `train` refuses an --out holding a
previous run or other files unless --overwrite is given, and then replaces only what secateur
wrote there; `prune`/`export` write new folders only; one process at a time writes a run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from secateur.trainer.export import LOAD_SNIPPET

EXIT_USAGE = 2
EXIT_WRITE_FAILED = 4      # as secateur.trainer.loop's EXIT_SAVE_FAILED: a write the disk refused


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error: ...` line (and exit code 2) like every other
    refusal of the command line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)


def _local_rank(value: str) -> int:
    from secateur.trainer.config import ConfigError

    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ConfigError(f"--local_rank must be a non-negative integer, got {value!r}")
    return rank


def _strip_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove `--local_rank N` / `--local_rank=N` (added by the deepspeed launcher) from argv.
    Raises ConfigError (one line) for a value that is not a non-negative integer."""
    out, local_rank, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            local_rank = _local_rank(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank = _local_rank(argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out, local_rank


def _default_env() -> None:
    # quiet, predictable defaults; a user's own settings win
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    cache = Path.cwd() / ".cache" / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and cache.is_dir():
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import logging
    import warnings

    # torch says "No CUDA runtime is found" on every CPU run (DeepSpeed's op loader asks it)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_training(cfg, run_dir: Path, local_rank: int | None, resume: bool, prepared=None,
                  overwrite: bool = False, config_path: str | None = None) -> int:
    from secateur.data import DataError
    from secateur.trainer import runfolder
    from secateur.trainer.checkpoint import CheckpointError
    from secateur.trainer.config import ConfigError
    from secateur.trainer.engine import destroy_process_group, init_distributed, shutdown_distributed
    from secateur.trainer.loop import Trainer, format_summary

    info = init_distributed(local_rank)
    try:
        # rank 0 locks the folder (and sets an earlier run aside); every rank learns the outcome
        runfolder.open_run(run_dir, info, resume=resume, overwrite=overwrite,
                           config_path=config_path, handoff=True)
        try:
            trainer = Trainer(cfg, run_dir, info, resume=resume, prepared=prepared)
        except (ConfigError, DataError, CheckpointError):
            raise
        except ValueError as err:          # a setting only the built model can refuse
            raise ConfigError(f"the run could not start: {' '.join(str(err).split())}") from None
        runfolder.started(run_dir)         # from here on the earlier run is gone
        summary = trainer.train()
        trainer.close()
    except BaseException:
        runfolder.close_run(run_dir)       # a start that failed: the folder as it was
        destroy_process_group()            # no barrier: the other ranks may never reach it
        raise
    runfolder.close_run(run_dir)
    shutdown_distributed(cfg.train.collective_timeout_s)
    if info.is_main:
        print(format_summary(summary), flush=True)
    return 0


def _with_max_steps(cfg, max_steps: int | None):
    """`--max-steps N`: train to step N instead of train.max_steps (validated like the file)."""
    from secateur.trainer.config import ConfigError

    if max_steps is None:
        return cfg
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be a positive number of steps, got {max_steps}")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": max_steps})})


def cmd_train(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.trainer import runfolder
    from secateur.trainer.config import load_and_check
    from secateur.trainer.setup import preflight

    cfg = _with_max_steps(load_and_check(args.config, args.set or []), args.max_steps)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    # the folder may take this run (reads only; checked again under its lock), then the model
    # runs on the data: all before any file is touched
    runfolder.plan_fresh_run(out, overwrite=args.overwrite, config_path=args.config)
    prepared = preflight(cfg, args.config)
    return _run_training(cfg, out, local_rank, resume=False, prepared=prepared, overwrite=args.overwrite,
                         config_path=args.config)


def cmd_resume(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.trainer import checkpoint as ckpt
    from secateur.trainer import runfolder
    from secateur.trainer.config import ConfigError, load_and_check

    run_dir = Path(args.run_dir)
    runfolder.check_run_to_resume(run_dir)
    latest = ckpt.latest(run_dir)                 # fail early, with one line, if nothing to resume
    cfg = _with_max_steps(load_and_check(run_dir / "config.yaml", args.set or []), args.max_steps)
    if args.max_steps is not None:
        step = int(ckpt.read_meta(latest)["step"])
        if args.max_steps <= step:
            raise ConfigError(f"--max-steps {args.max_steps} is not after the checkpoint's step "
                              f"{step}: nothing to train")
    return _run_training(cfg, run_dir, local_rank, resume=True)


def cmd_data(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.data import writers

    if args.what == "fashion-mnist-png":
        counts = writers.write_fashion_mnist_png(args.out, train_limit=args.train_limit,
                                                 val_limit=args.val_limit)
    else:
        counts = writers.write_kjv(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                            for k, v in counts.items()))
    return 0


def cmd_prune(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.trainer.config import ConfigError, RatioRule, ThresholdRule
    from secateur.trainer.oneshot import prune_run

    if (args.ratio is None) == (args.threshold is None):
        raise ConfigError("give exactly one of --ratio R or --threshold METHOD=VALUE")
    try:
        if args.ratio is not None:
            rule = RatioRule(kind="ratio", ratio=args.ratio, scope=args.scope or "per_layer")
        else:
            method, _, value = args.threshold.partition("=")
            rule = ThresholdRule(kind="threshold", method=method, value=float(value),
                                 scope=args.scope or "per_layer")
    except Exception as err:  # pydantic ValidationError or float(): one line for the user
        msg = getattr(err, "errors", None)
        text = msg()[0]["msg"].removeprefix("Value error, ") if callable(msg) else str(err)
        raise ConfigError(f"bad pruning rule: {text}") from None
    for flag, value in (("--calib-batches", args.calib_batches), ("--min-units", args.min_units),
                        ("--eval-batches", args.eval_batches)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    try:
        crit_args = json.loads(args.criterion_args) if args.criterion_args else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--criterion-args is not valid JSON ({err.msg} at character "
                          f"{err.pos}): {args.criterion_args}") from None
    if not isinstance(crit_args, dict):
        raise ConfigError(f"--criterion-args must be a JSON object such as '{{\"seed\": 1}}', "
                          f"got {args.criterion_args}")
    # "heads,mlp" and "--units heads --units mlp" alike; the kinds are checked by prune_run
    units = None if args.units is None else [u.strip() for a in args.units for u in a.split(",") if u.strip()]
    s = prune_run(args.run_dir, args.out, args.criterion, rule, calib_batches=args.calib_batches,
                  min_units=args.min_units, criterion_args=crit_args, eval_batches=args.eval_batches,
                  unit_kinds=units)
    changed = ", ".join(f"{n} {b}->{a}" for n, b, a in s["groups"] if a != b) or "no group shrank"
    print(f"pruned {args.run_dir} with {args.criterion}: params {s['params_before']:,} -> "
          f"{s['params_after']:,} ({100 * s['params_after'] / s['params_before']:.1f}%), val acc "
          f"{s['acc_before']:.4f} -> {s['acc_after']:.4f}, val loss {s['eval_loss_before']:.4f} -> "
          f"{s['eval_loss_after']:.4f}\n  {changed}\n  written to {s['out']}")
    return 0


def _record_in_run(run_dir: Path, written: list[Path]) -> None:
    """Add what a command wrote inside the run folder to its manifest (so that a later
    `train --overwrite` replaces it, and only it)."""
    from secateur.trainer import runfolder

    if runfolder.folder_kind(run_dir) != "run":
        return
    root = run_dir.resolve()
    inside = []
    for p in written:
        try:
            inside.append(p.resolve().relative_to(root))
        except ValueError:
            continue
    if inside:
        runfolder.record(run_dir, inside)


def cmd_export(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.trainer.export import export_run

    out, note = export_run(args.run_dir, args.out, overwrite=args.overwrite)
    _record_in_run(Path(args.run_dir), [out])
    print(f"exported {out}/secateur.json and {out}/model.safetensors"
          + (f" (no Hugging Face folder: {note})" if note else
             f", and {out}/hf for from_pretrained" if (out / "hf").is_dir() else "") + "; load with:\n")
    print(LOAD_SNIPPET.format(dir=out))
    return 0


def cmd_report(args: argparse.Namespace, local_rank: int | None) -> int:
    from secateur.trainer.report import write_report

    from secateur.trainer.report import PLOTS

    run_dir = Path(args.run_dir)
    plots_were = (run_dir / "plots").is_dir()
    path = write_report(args.run_dir)
    plots = path.parent / "plots"
    # plots/ that the user made stays theirs: then only the PNGs are recorded
    _record_in_run(run_dir, [path] + ([plots / n for n in PLOTS] if plots_were else [plots]))
    print(f"wrote {path} and {path.parent / 'plots'}/*.png")
    return 0


def cmd_bench(args: argparse.Namespace, local_rank: int | None) -> int:
    if args.suite == "kernels":
        from secateur.kernels.bench import main as bench_main   # imported only when asked for

        rc = bench_main(args.rest)
        return int(rc or 0)
    raise AssertionError(args.suite)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="secateur", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train (and prune) a model from a YAML config")
    t.add_argument("--config", required=True, help="run config (YAML)")
    t.add_argument("--out", help="run directory (default runs/<config name>): new or empty, or "
                                 "see --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="train into an --out that holds a previous run (its files, and only "
                        "those secateur wrote, are replaced) or other files (they stay)")
    t.add_argument("--max-steps", type=int, help="train to this step (checks use the file's max_steps)")
    t.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override one config key for this run (YAML value, repeatable), e.g. "
                        "--set optimizer.lr=3e-4 --set pruning.rule.ratio=0.2; recorded in the "
                        "run's config.yaml")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--max-steps", type=int, help="train to this step instead (e.g. to fine-tune "
                                                 "a `secateur prune` result)")
    r.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a key of the run's config (e.g. train.eval_interval=50)")
    r.set_defaults(func=cmd_resume)

    pr = sub.add_parser("prune", help="one-shot prune or fold a run's latest checkpoint")
    pr.add_argument("run_dir")
    pr.add_argument("--out", required=True, help="new (or empty) run directory for the pruned model")
    pr.add_argument("--criterion", required=True,
                    choices=["random", "l2", "activation", "projective", "cob", "cosep", "fold"])
    pr.add_argument("--ratio", type=float, help="fraction of units to remove, in [0, 1)")
    pr.add_argument("--threshold", metavar="METHOD=VALUE",
                    help="prop_of_max|prop_of_avg|prop_of_med|zscore cutoff, e.g. prop_of_max=0.1")
    pr.add_argument("--scope", choices=["global", "per_layer", "per_subspace", "uniform"],
                    help="where the rule applies (default per_layer); uniform: every group of one "
                         "kind and width keeps the same count")
    pr.add_argument("--units", action="append", metavar="KIND[,KIND]",
                    help="prune only groups of these kinds: channels, heads, mlp, hidden "
                         "(repeatable; default all)")
    pr.add_argument("--calib-batches", type=int, default=8,
                    help="training batches used for calibration statistics (default 8)")
    pr.add_argument("--min-units", type=int, default=1)
    pr.add_argument("--criterion-args", help="JSON object of extra criterion arguments")
    pr.add_argument("--eval-batches", type=int, help="limit the before/after validation")
    pr.set_defaults(func=cmd_prune)

    e = sub.add_parser("export", help="write architecture JSON + safetensors weights",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export the latest checkpoint of RUN_DIR as OUT/secateur.json (the "
                                   "architecture, pruned widths included) and OUT/model.safetensors; "
                                   "Hugging Face models whose widths fit their config also as OUT/hf "
                                   "(save_pretrained)."
                                   "\n\nLoad it anywhere secateur is installed:\n\n"
                                   + LOAD_SNIPPET.format(dir="OUT"))
    e.add_argument("run_dir")
    e.add_argument("--out", help="output folder, new or empty (default RUN_DIR/export)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    e.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="plots (PNG) and report.md of a run")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("data", help="write real offline data as files: Fashion-MNIST as PNG "
                                    "image folders, the KJV Bible as text/jsonl")
    d.add_argument("what", choices=["fashion-mnist-png", "kjv"])
    d.add_argument("out", help="new folder (must not exist or be empty)")
    d.add_argument("--train-limit", type=int, help="fashion-mnist-png: images kept per split")
    d.add_argument("--val-limit", type=int)
    d.set_defaults(func=cmd_data)

    b = sub.add_parser("bench", help="benchmarks: `secateur bench kernels [ARGS...]`")
    b.add_argument("suite", choices=["kernels"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the suite")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `secateur` command (and `python -m secateur`)."""
    from secateur.data import DataError
    from secateur.trainer.checkpoint import CheckpointError
    from secateur.trainer.config import ConfigError
    from secateur.trainer.runfolder import is_write_failure

    try:
        argv, local_rank = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        _default_env()
        return args.func(args, local_rank)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as err:
        if not is_write_failure(err):
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: could not write{where}: {err.strerror or err}", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:      # Ctrl-C before training started (the loop handles it after)
        print("interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return 130
