"""A run continued on another number of ranks (2 -> 1, 1 -> 2; torchrun, gloo): right after the
restore every rank holds the saved model, fp32 masters and optimizer moments bit for bit (oracle:
the checkpoint's whole-tensor state file), the pruner's statistics summed into rank 0, the global
data position and the schedule position; training then goes on through further pruning events,
with the ranks agreeing after each one.

Run as `python tests/test_elastic.py RUN MAX_STEPS` (under torchrun) this file is the resumed run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# run as a script (the resumed ranks), this checkout's package and test helpers come first
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from secateur.trainer import checkpoint as ckpt            # noqa: E402
from secateur.trainer.engine import FULL_STATE_FILE         # noqa: E402
from secateur.trainer.logs import read_events, read_metrics  # noqa: E402
from test_trainer import tiny_config, write_config          # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS...` on `nproc` ranks (torchrun; a plain process for one rank)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def resumed_run(run: Path, max_steps: int) -> None:
    """The resumed run on this rank: check the restored state, train on, write the checks."""
    from secateur.trainer.config import parse_config, read_yaml
    from secateur.trainer.engine import init_distributed, shutdown_distributed
    from secateur.trainer.loop import Trainer

    raw = read_yaml(run / "config.yaml")
    raw["train"]["max_steps"] = max_steps
    info = init_distributed()
    tr = Trainer(parse_config(raw), run, info, resume=True)
    where = tr.ckpt_path
    meta = ckpt.read_meta(where)
    saved = torch.load(where / FULL_STATE_FILE, weights_only=True)
    params = dict(tr.model.named_parameters())
    masters, optim = tr.engine.full_master_params(), tr.engine.full_optimizer_state()
    old = [ckpt.read_rank_state(where, r) for r in range(meta["world_size"])]
    stats = {k: (sum(o["pruner"]["stats"][k] for o in old) if info.rank == 0
                 else torch.zeros_like(v)) for k, v in old[0]["pruner"]["stats"].items()}
    module = ckpt.model_state_dict(where)
    checks = {
        "world_sizes": [meta["world_size"], info.world_size],
        "masters": sorted(saved["masters"]) == sorted(n for n, p in params.items())
        and all(_same(masters[params[n]], t) for n, t in saved["masters"].items()),
        "moments": sorted(saved["optimizer"]) == sorted(params)
        and all(set(st) == set(optim[params[n]]) and all(_same(optim[params[n]][k], v) for k, v in st.items())
                for n, st in saved["optimizer"].items()),
        "weights": all(_same(t, module[n]) for n, t in tr.model.state_dict().items()),
        "pruner_stats": all(_same(tr.pruner.stats()[k], v) for k, v in stats.items()),
        "schedule": (tr.pruner.events_done, tr.pruner.step) == (old[0]["pruner"]["events_done"],
                                                                old[0]["pruner"]["step"]),
        "data": tr.stream.state_dict() == old[0]["data"],
        "step": tr.step == meta["step"],
        "engine_steps": tr.engine.engine.global_steps == saved["extras"]["counters"]["global_steps"],
    }
    tr.train()
    tr.close()
    shutdown_distributed()
    (run / f"resumed_rank{info.rank}.json").write_text(json.dumps(checks))


CFG = tiny_config(
    pruning={"criterion": "activation", "rule": {"kind": "ratio", "ratio": 0.25},
             "schedule": {"kind": "iterative", "start": 10, "end": 30, "every": 10}},
    train={"max_steps": 25, "checkpoint_interval": None, "eval_interval": 25})


@pytest.mark.parametrize("saved_ranks,ranks,stage,precision", [(2, 1, 2, "bf16"), (1, 2, 1, "fp32")])
def test_run_continues_on_another_number_of_ranks(saved_ranks, ranks, stage, precision, tmp_path):
    cfg = {**CFG, "deepspeed": {"zero_stage": stage, "precision": precision}}
    config, run = write_config(tmp_path / "cfg.yaml", cfg), tmp_path / "run"
    _launch(saved_ranks, "-m", "secateur", "train", "--config", str(config), "--out", str(run))
    assert ckpt.read_meta(ckpt.latest(run))["world_size"] == saved_ranks
    _launch(ranks, __file__, str(run), "40")

    for r in range(ranks):
        checks = json.loads((run / f"resumed_rank{r}.json").read_text())
        assert checks.pop("world_sizes") == [saved_ranks, ranks]
        assert checks == {k: True for k in checks}, (r, checks)
    # one log, each step once; the event at step 30 happened on the new ranks, which agree
    assert [row["step"] for row in read_metrics(run)] == list(range(1, 41))
    assert [e["step"] for e in read_events(run) if e["kind"] == "prune"] == [10, 20, 30]
    entries = [[json.loads(line) for line in (run / "ranks" / f"rank{r}.jsonl").read_text().splitlines()
                if json.loads(line)["step"] == 30] for r in range(ranks)]
    assert all(len(e) == 1 for e in entries) and all(e == entries[0] for e in entries)
    final = ckpt.latest(run)
    assert ckpt.read_meta(final)["world_size"] == ranks and ckpt.read_meta(final)["step"] == 40
    assert sorted(p.name for p in final.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(ranks)]


if __name__ == "__main__":
    resumed_run(Path(sys.argv[1]), int(sys.argv[2]))
