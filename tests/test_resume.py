"""A run SIGKILLed at a random step after a checkpoint and continued with `secateur resume` ends
with weights bit-identical to the uninterrupted run (deterministic CPU settings)."""
import os
import random
import signal
import subprocess
import sys
import time

import torch

from secateur.trainer import checkpoint as ckpt
from secateur.trainer.logs import read_metrics
from test_trainer import tiny_config, write_config

CFG = tiny_config(
    pruning={"schedule": {"kind": "iterative", "start": 20, "end": 140, "every": 30}},
    train={"max_steps": 300, "eval_interval": 50, "checkpoint_interval": 25})


def _secateur(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "secateur", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _rows(run) -> int:
    try:
        return max(0, len((run / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_killed_run_resumes_to_bit_identical_weights(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", CFG)
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _secateur("train", "--config", str(config), "--out", str(full))

    kill_at = random.Random(os.getpid()).randint(30, 150)      # after the step-25 checkpoint
    proc = _secateur("train", "--config", str(config), "--out", str(killed))
    deadline = time.time() + 240
    while _rows(killed) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, \
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-1500:]}"
    reached = _rows(killed)
    assert 25 <= int(ckpt.latest(killed).name.split("_")[1]) <= reached < CFG["train"]["max_steps"]

    resumed = _secateur("resume", str(killed))
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-2000:]
    assert ref.wait(timeout=240) == 0, ref.stderr.read().decode()[-2000:]

    a = ckpt.model_state_dict(ckpt.latest(full))
    b = ckpt.model_state_dict(ckpt.latest(killed))
    assert ckpt.read_meta(ckpt.latest(full))["spec"] == ckpt.read_meta(ckpt.latest(killed))["spec"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the logs read as one run: the same losses for every step, each step once
    la, lb = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in lb] == list(range(1, 301))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
