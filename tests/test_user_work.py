"""Never losing a user's work (issue 11): every bad input is one `error:` line and exit code 2
before anything on disk changes (the folder's content compared byte for byte before and after);
`train --overwrite` replaces only what secateur wrote; `prune`/`export` write new folders only;
a run folder is locked against a second process; a failed write is one line, no traceback."""
import copy
import errno
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secateur.cli import main
from secateur.trainer import checkpoint as ckpt
from secateur.trainer import runfolder
from test_trainer import tiny_config, write_config

SMALL = tiny_config(train={"max_steps": 4, "eval_interval": 4, "checkpoint_interval": None},
                    pruning={"schedule": {"kind": "oneshot", "at": 2}})
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> sha256 of a file, "dir", or "link:<target>"."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run the CLI in this process: (exit code, non-empty stderr lines)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:            # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def assert_refused(rc: int, lines: list[str], needle: str = "") -> None:
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0] and needle in lines[0], lines


def cfg_with(path: tuple, value) -> dict:
    """SMALL with the key at `path` set to `value`."""
    cfg = copy.deepcopy(SMALL)
    *parents, last = path
    functools.reduce(lambda node, key: node.setdefault(key, {}), parents, cfg)[last] = value
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished tiny run, trained through the CLI (step 4, its lock released)."""
    root = tmp_path_factory.mktemp("user_work")
    config = write_config(root / "small.yaml", SMALL)
    assert main(["train", "--config", str(config), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the finished run, with files of the user's own beside secateur's."""
    dest = tmp_path / "run"
    shutil.copytree(base, dest, symlinks=True)
    (dest / "notes.md").write_text("my notes\n")
    (dest / "plots").mkdir()
    (dest / "plots" / "mine.png").write_bytes(b"\x89PNG not really")
    (dest / "export").mkdir()
    (dest / "export" / "keep.txt").write_text("an export folder the user made\n")
    return dest


# ---- train: bad input into a previous run, even with --overwrite --------------------------------
BAD_TRAIN = {
    "widths_as_int": (cfg_with(("model", "args", "hidden"), 32), "hidden"),
    "zero_width": (cfg_with(("model", "args", "hidden"), [0]), "positive widths"),
    "dropout_out_of_range": (cfg_with(("model", "args", "dropout"), 2.0), "dropout"),
    "criterion_args_not_taken": (cfg_with(("pruning", "criterion_args"), {"foo": 1}), "'foo'"),
    "criterion_args_wrong_type": (
        cfg_with(("pruning",), {**SMALL["pruning"], "criterion": "random",
                                "criterion_args": {"seed": "abc"}}), "expects an integer"),
    "criterion_args_bad_value": (
        cfg_with(("pruning",), {**SMALL["pruning"], "criterion": "projective",
                                "criterion_args": {"mode": "fast"}}), "mode must be"),
    "deepspeed_fp16_true": (cfg_with(("deepspeed", "extra"), {"fp16": True}), "fp16"),
    "deepspeed_section_not_a_mapping": (
        cfg_with(("deepspeed", "extra"), {"activation_checkpointing": True}), "must be a mapping"),
    "agp_target_0": (cfg_with(("pruning", "schedule"), {"kind": "agp", "start": 1, "end": 3,
                                                        "every": 1, "target": 0.0}),
                     "target must be in (0, 1)"),
    "threshold_removes_every_unit": (
        cfg_with(("pruning", "rule"), {"kind": "threshold", "method": "prop_of_avg",
                                       "value": 100}), "would remove every unit"),
    "zscore_above_the_mean": (
        cfg_with(("pruning", "rule"), {"kind": "threshold", "method": "zscore", "value": 0.5}),
        "zscore must be <= 0"),
    "batch_larger_than_data": (cfg_with(("data", "batch_size"), 100_000), "larger than"),
    "subset_larger_than_data": (cfg_with(("data", "train_subset"), 100_000), "subset size"),
    # refused by the pruner once the model is built: the earlier run is put back byte for byte
    "pruning_layer_unknown": (cfg_with(("pruning", "layers"), ["nope"]), "could not start"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_input_leaves_the_previous_run_untouched(case, run, tmp_path, capsys):
    cfg, needle = BAD_TRAIN[case]
    config = write_config(tmp_path / "bad.yaml", cfg)
    before = tree(run)
    rc, lines = cli(["train", "--config", config, "--out", run, "--overwrite"], capsys)
    assert_refused(rc, lines, needle)
    assert tree(run) == before


@pytest.mark.parametrize("extra, needle", [
    (["--max-steps", "0"], "--max-steps must be a positive"),
    (["--max-steps", "-5"], "--max-steps must be a positive"),
    (["--local_rank", "abc"], "--local_rank must be"),
    (["--max-steps", "x"], "invalid int value"),
])
def test_bad_train_flags_leave_the_previous_run_untouched(extra, needle, run, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", SMALL)
    before = tree(run)
    rc, lines = cli(["train", "--config", config, "--out", run, "--overwrite", *extra], capsys)
    assert_refused(rc, lines, needle)
    assert tree(run) == before


def test_train_refuses_a_previous_run_or_other_files_without_overwrite(run, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", SMALL)
    before = tree(run)
    rc, lines = cli(["train", "--config", config, "--out", run], capsys)
    assert_refused(rc, lines, "holds a previous secateur run (latest checkpoint at step 4)")
    assert "--overwrite" in lines[0] and tree(run) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    rc, lines = cli(["train", "--config", config, "--out", mine], capsys)
    assert_refused(rc, lines, "not empty")
    assert tree(mine) == {"data.csv": hashlib.sha256(b"1,2\n").hexdigest()}

    # with --overwrite a file of the user's that a run would write over is still refused
    (mine / "metrics.csv").write_text("my metrics\n")
    before = tree(mine)
    rc, lines = cli(["train", "--config", config, "--out", mine, "--overwrite"], capsys)
    assert_refused(rc, lines, "metrics.csv was not written by secateur")
    assert tree(mine) == before


def test_out_that_is_a_file_and_config_inside_out_are_refused(run, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", SMALL)
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, lines = cli(["train", "--config", config, "--out", afile], capsys)
    assert_refused(rc, lines, "is a file")
    assert afile.read_text() == "x"
    # the run's own config.yaml as --config: the new run would write over it
    before = tree(run)
    rc, lines = cli(["train", "--config", run / "config.yaml", "--out", run, "--overwrite"], capsys)
    assert_refused(rc, lines, "lies inside --out")
    assert tree(run) == before


def test_overwrite_replaces_only_what_secateur_wrote(run, capsys):
    assert main(["report", str(run)]) == 0         # report.md + PNGs into the user's plots/
    write_config(run / "my.yaml", SMALL)             # a config inside --out, not a run file
    user = {p: h for p, h in tree(run).items()
            if p in ("notes.md", "plots", "plots/mine.png", "export", "export/keep.txt", "my.yaml")}
    old = ckpt.model_state_dict(ckpt.latest(run))
    assert main(["train", "--config", str(run / "my.yaml"), "--out", str(run), "--overwrite",
                 "--set", "seed=1"]) == 0
    after = tree(run)
    assert {p: after.get(p) for p in user} == user   # the user's files, byte for byte
    assert not (run / "report.md").exists() and sorted(os.listdir(run / "plots")) == ["mine.png"]
    assert not any(n.startswith(".secateur-replaced") or n == runfolder.LOCK for n in os.listdir(run))
    new = ckpt.model_state_dict(ckpt.latest(run))
    assert any(not (a == b).all() for a, b in zip(old.values(), new.values()) if a.shape == b.shape)


def test_overwrite_into_a_folder_of_other_files_keeps_them(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "x.txt").write_text("keep me\n")
    before = tree(mine)
    config = write_config(tmp_path / "c.yaml", SMALL)
    assert main(["train", "--config", str(config), "--out", str(mine), "--overwrite"]) == 0
    after = tree(mine)
    assert {p: after[p] for p in before} == before
    assert ckpt.latest(mine).name == "step_00000004"


# ---- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, needle", [("-5", "--max-steps must be a positive"),
                                           ("0", "--max-steps must be a positive"),
                                           ("3", "is not after the checkpoint's step 4")])
def test_resume_with_bad_max_steps_changes_nothing(steps, needle, run, capsys):
    before = tree(run)
    rc, lines = cli(["resume", run, "--max-steps", steps], capsys)
    assert_refused(rc, lines, needle)
    assert tree(run) == before


# ---- prune and export -------------------------------------------------------------------------
@pytest.fixture
def export_dir(base, tmp_path) -> Path:
    out = tmp_path / "exported"
    assert main(["export", str(base), "--out", str(out)]) == 0
    return out


def test_prune_and_export_refuse_existing_folders(run, base, export_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    prune = ["prune", run, "--criterion", "l2", "--ratio", "0.5"]
    cases = [
        (prune + ["--out", run], "is the source run itself"),
        (prune + ["--out", base], "holds a secateur run"),
        (prune + ["--out", export_dir], "holds a secateur export"),
        (prune + ["--out", other], "holds files of its own"),
        (prune + ["--out", afile], "is a file"),
        (prune + ["--out", tmp_path / "p", "--criterion-args", "{bad"], "not valid JSON"),
        (prune + ["--out", tmp_path / "p", "--criterion-args", "[1]"], "must be a JSON object"),
        (prune + ["--out", tmp_path / "p", "--criterion-args", '{"foo": 1}'], "'foo'"),
        (prune + ["--out", tmp_path / "p", "--criterion-args", '{"tensors": 3}'], "a string"),
        (prune + ["--out", tmp_path / "p", "--calib-batches", "0"], "--calib-batches must be"),
        (prune + ["--out", tmp_path / "p", "--min-units", "0"], "--min-units must be"),
        (prune[:4] + ["--threshold", "prop_of_avg=100", "--out", tmp_path / "p"],
         "would remove every unit"),
        (["export", run, "--out", base], "holds a secateur run"),
        (["export", run, "--out", export_dir], "pass --overwrite to replace it"),
        (["export", run, "--out", afile], "is a file"),
        (["export", run, "--out", other], "holds files of its own"),
    ]
    folders = [run, base, export_dir, other, tmp_path / "p"]
    before = [tree(f) for f in folders]
    for argv, needle in cases:
        rc, lines = cli(argv, capsys)
        assert_refused(rc, lines, needle)
    assert [tree(f) for f in folders] == before and afile.read_text() == "x"
    assert not (tmp_path / "p").exists()
    # an earlier export is replaced with --overwrite
    assert main(["export", str(run), "--out", str(export_dir), "--overwrite"]) == 0


# ---- the lock ---------------------------------------------------------------------------------
HOLD = ("import sys; from secateur.trainer import runfolder; runfolder.acquire_lock(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read()")


def test_a_locked_run_refuses_a_second_process_and_a_stale_lock_is_taken_over(run, tmp_path,
                                                                               capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run)
        config = write_config(tmp_path / "c.yaml", SMALL)
        for argv in (["train", "--config", config, "--out", run, "--overwrite"],
                     ["resume", run, "--max-steps", "6"]):
            rc, lines = cli(argv, capsys)
            assert_refused(rc, lines, f"is in use by process {holder.pid} on ")
        assert tree(run) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / runfolder.LOCK).exists()          # released at its exit

    # a lock left behind by a process that is gone: taken over with a one-line warning
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (run / runfolder.LOCK).write_text(f'{{"pid": {gone.stdout.strip()}, "host": '
                                      f'"{os.uname().nodename}"}}\n')
    rc, lines = cli(["resume", run, "--max-steps", "6"], capsys)
    assert rc == 0, lines
    assert [ln for ln in lines if "lock" in ln] == [
        f"warning: {run}: taking over the lock of process {gone.stdout.strip()} on "
        f"{os.uname().nodename}, which is no longer running"]
    assert ckpt.latest(run).name == "step_00000006" and not (run / runfolder.LOCK).exists()


# ---- writes that fail ---------------------------------------------------------------------------
def test_read_only_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", SMALL)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro
                        else real(p, mode, **kw))
    rc, lines = cli(["train", "--config", config, "--out", ro / "run"], capsys)
    assert_refused(rc, lines, "is not writable")
    assert list(ro.iterdir()) == []


def test_disk_full_while_logging_is_one_line_and_releases_the_lock(tmp_path, monkeypatch,
                                                                   capsys):
    from secateur.trainer import logs

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "metrics.csv"))

    monkeypatch.setattr(logs.RunLog, "step", full)
    config = write_config(tmp_path / "c.yaml", SMALL)
    out = tmp_path / "run"
    rc, lines = cli(["train", "--config", config, "--out", out], capsys)
    assert rc == 4 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "No space left on device" in lines[0] and "metrics.csv" in lines[0]
    assert not (out / runfolder.LOCK).exists()


def test_disk_full_while_exporting_is_one_line(base, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "exp"
    rc, lines = cli(["export", base, "--out", out], capsys)
    assert lines == [f"error: could not write ({out / 'model.safetensors'}): No space left on "
                     "device"] and rc == 4


# ---- through the console entry point: no traceback ------------------------------------------
@pytest.mark.parametrize("case", ["widths_as_int", "deepspeed_fp16_true"])
def test_console_refusal_is_one_line_without_traceback(case, run, tmp_path):
    config = write_config(tmp_path / "bad.yaml", BAD_TRAIN[case][0])
    before = tree(run)
    proc = subprocess.run([sys.executable, "-m", "secateur", "train", "--config", str(config),
                           "--out", str(run), "--overwrite"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in proc.stderr and tree(run) == before
