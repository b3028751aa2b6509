"""Two CPU ranks (torchrun, gloo): after every pruning event both ranks hold the same architecture
and bit-identical weights, although each rank sees different data."""
import json
import os
import socket
import subprocess
import sys

import pytest

from secateur.trainer import checkpoint as ckpt
from test_trainer import tiny_config, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_agree_on_architecture_and_weights_after_each_event(stage, tmp_path):
    cfg = tiny_config(deepspeed={"zero_stage": stage},
                      train={"max_steps": 36, "checkpoint_interval": None, "eval_interval": 12})
    config, run = write_config(tmp_path / "cfg.yaml", cfg), tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*torchrun, "-m", "secateur", "train", "--config", str(config), "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [[json.loads(line) for line in (run / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [e["step"] for e in ranks[0]] == [10, 20, 30]
    assert ranks[0] == ranks[1]                     # same widths, params and weight digests
    widths = [e["widths"] for e in ranks[0]]
    for prev, nxt in zip(widths, widths[1:]):
        assert all(nxt[g] == prev[g] - int(0.25 * prev[g]) for g in prev)
    # the final checkpoint holds both ranks' states and the pruned architecture
    final = ckpt.latest(run)
    assert (final / "rank0.pt").is_file() and (final / "rank1.pt").is_file()
    meta = ckpt.read_meta(final)
    assert meta["world_size"] == 2 and meta["widths"] == widths[-1]
    assert "run finished" in proc.stdout


_SHUTDOWN_SCRIPT = """
import json, os, sys, time
import torch
import torch.distributed as dist
from secateur.trainer.engine import init_distributed, shutdown_distributed
out, mode = sys.argv[1], sys.argv[2]
info = init_distributed()
x = torch.ones(3) * (info.rank + 1)
dist.all_reduce(x)                          # gloo traffic just before the meeting
row = {"sum": x.tolist()}
if info.rank == 1:
    time.sleep(1.5 if mode == "late" else 6.0)
    if mode == "absent":                    # never reaches the meeting
        open(out + "/rank1.json", "w").write(json.dumps(row))
        os._exit(0)
t0 = time.monotonic()
try:
    shutdown_distributed(timeout_s=2.0 if mode == "absent" else None)
except Exception as err:
    row["error"] = type(err).__name__
row.update(waited=time.monotonic() - t0, initialized=dist.is_initialized())
open(out + f"/rank{info.rank}.json", "w").write(json.dumps(row))
if mode == "absent":
    os._exit(0)
"""


def _shutdown_ranks(tmp_path, mode):
    script = tmp_path / "shutdown.py"
    script.write_text(_SHUTDOWN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*torchrun, str(script), str(tmp_path), mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_shutdown_waits_for_every_rank_and_destroys_the_group(tmp_path):
    """Rank 1 reaches the shutdown 1.5 s late: rank 0 waits for it (the meeting is real), and
    both leave with the group destroyed and exit 0."""
    rows = _shutdown_ranks(tmp_path, "late")
    for r in rows:
        assert r["sum"] == [3.0, 3.0, 3.0] and not r["initialized"] and "error" not in r
    assert rows[0]["waited"] > 1.0            # rank 0 waited for the late rank


def test_shutdown_gives_up_on_a_missing_rank_after_its_timeout(tmp_path):
    """Rank 1 never reaches the shutdown: rank 0 raises after its 2 s timeout, not the group's
    30 minutes, with its group torn down all the same."""
    rows = _shutdown_ranks(tmp_path, "absent")
    assert rows[0]["error"] and 1.5 < rows[0]["waited"] < 5.5 and not rows[0]["initialized"]
