"""Config validation: every bad config is one `error:` line on stderr and exit code 2, before any
training work; good configs in configs/ validate."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from secateur.cli import main
from secateur.trainer.config import load_config, load_and_check

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "model": {"name": "MLP", "args": {"hidden": [16]}},
    "data": {"dataset": "digits", "batch_size": 8},
    "pruning": {"criterion": "l2", "rule": {"kind": "ratio", "ratio": 0.2},
                "schedule": {"kind": "oneshot", "at": 2}},
    "train": {"max_steps": 4},
}


def _with(path: tuple, value) -> dict:
    cfg = copy.deepcopy(BASE)
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return cfg


BAD = {
    "unknown_top_level_key": (_with(("learning_rate",), 0.1), "unknown key 'learning_rate'"),
    "unknown_nested_key": (_with(("train", "max_step"), 3), "unknown key 'train.max_step'"),
    "ratio_above_one": (_with(("pruning", "rule", "ratio"), 1.5), "ratio must be in [0, 1)"),
    "ratio_equal_one": (_with(("pruning", "rule", "ratio"), 1.0), "ratio must be in [0, 1)"),
    "ratio_negative": (_with(("pruning", "rule", "ratio"), -0.1), "ratio must be in [0, 1)"),
    "threshold_removes_every_unit": (
        _with(("pruning", "rule"), {"kind": "threshold", "method": "prop_of_max", "value": 1.0}),
        "would remove every unit"),
    "agp_target_one": (
        _with(("pruning", "schedule"), {"kind": "agp", "start": 1, "end": 3, "every": 1, "target": 1.0}),
        "target must be in (0, 1)"),
    "zero_stage_7": (_with(("deepspeed",), {"zero_stage": 7}), "zero_stage must be 0, 1, 2 or 3"),
    "cifar10_without_files": (_with(("data",), {"dataset": "cifar10", "root": "/nonexistent/cifar"}),
                              "CIFAR-10 not found"),
    "fashion_mnist_path_missing": (_with(("data",), {"dataset": "fashion_mnist", "root": "/nonexistent/fm"}),
                                   "Fashion-MNIST not found"),
    "unknown_criterion": (_with(("pruning", "criterion"), "magic"), "pruning.criterion"),
    "schedule_after_training": (_with(("pruning", "schedule", "at"), 99), "after train.max_steps"),
}


def _run_cli(argv, capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_error_with_exit_code_2(case, tmp_path, capsys):
    cfg, needle = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, lines = _run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0]
    assert not (tmp_path / "run").exists()          # nothing was started


def test_missing_config_file_is_one_line_error(tmp_path, capsys):
    rc, lines = _run_cli(["train", "--config", str(tmp_path / "absent.yaml")], capsys)
    assert rc == 2 and len(lines) == 1 and "does not exist" in lines[0]


def test_invalid_yaml_is_one_line_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n  name: x")
    rc, lines = _run_cli(["train", "--config", str(tmp_path / "c.yaml")], capsys)
    assert rc == 2 and len(lines) == 1 and "not valid YAML" in lines[0]


def test_unknown_model_argument_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(("model", "args", "hiden"), [8])))
    rc, lines = _run_cli(["train", "--config", str(path)], capsys)
    assert rc == 2 and len(lines) == 1 and "'hiden'" in lines[0]


def test_resume_of_a_folder_without_checkpoint_is_one_line_error(tmp_path, capsys):
    rc, lines = _run_cli(["resume", str(tmp_path)], capsys)
    assert rc == 2 and len(lines) == 1 and "no checkpoint" in lines[0]


def test_console_entry_point_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(("pruning", "rule", "ratio"), 2.0)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "secateur", "train", "--config", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# these read files that `secateur data` writes: they run, on such files, in tests/test_byo.py
WRITTEN_DATA = {"llama_kjv.yaml", "minilm_kjv.yaml", "mobilenet_fmnist.yaml"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path) if path.name in WRITTEN_DATA else load_and_check(path)
    assert cfg.train.max_steps > 0
