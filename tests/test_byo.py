"""Bring your own model and data, as a user runs it: the README's example and the shipped configs
(short variants through `--set`) train and shrink; a SIGKILLed run of a Hugging Face model and of a
torchvision model resumes bit for bit; exports load in one call (and through transformers' own
loader when the widths fit the config)."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from secateur.data import writers
from secateur.trainer import checkpoint as ckpt
from secateur.trainer.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-data")
    writers.write_kjv(str(root / "kjv"))
    writers.write_fashion_mnist_png(str(root / "fm"), train_limit=400, val_limit=100)
    return root


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def secateur(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "secateur", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=_env(), timeout=timeout)


def _spawn(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "secateur", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sets(pairs: dict) -> list[str]:
    out = []
    for k, v in pairs.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def short(name: str, d: Path) -> dict:
    """A shipped config's short variant: small widths, a few steps, events every 2 steps."""
    events = {"pruning.schedule.start": 2, "pruning.schedule.end": 6, "pruning.schedule.every": 2,
              "train.eval_interval": 4, "train.eval_batches": 2}
    return {
        "llama_kjv.yaml": {"data.train_files": f"{d}/kjv/train.txt", "data.val_files": f"{d}/kjv/val.txt",
                           "data.vocab_size": 512, "data.block_size": 32, "data.batch_size": 4,
                           "model.hf.config.hidden_size": 64, "model.hf.config.intermediate_size": 128,
                           "model.hf.config.num_hidden_layers": 2, **events},
        "minilm_kjv.yaml": {"data.train_files": f"{d}/kjv/books_train.jsonl",
                            "data.val_files": f"{d}/kjv/books_val.jsonl", "data.max_length": 32,
                            "data.batch_size": 8, **events, "pruning.schedule.end": 4},
        "mobilenet_fmnist.yaml": {"data.root": f"{d}/fm/train", "data.val_root": f"{d}/fm/val",
                                  "data.batch_size": 16, "model.args.width_mult": 0.25, **events},
    }[name]


@pytest.mark.parametrize("name,steps", [("llama_kjv.yaml", 8), ("minilm_kjv.yaml", 5),
                                        ("mobilenet_fmnist.yaml", 7)])
def test_shipped_config_trains_shrinks_and_exports(name, steps, data, tmp_path):
    run, exp = tmp_path / "run", tmp_path / "exp"
    sets = short(name, data)
    proc = secateur("train", "--config", REPO / "configs" / name, "--out", run, "--max-steps", steps,
                    *_sets(sets), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    prunes = [e for e in events if e["kind"] == "prune"]
    assert len(prunes) >= 2
    assert all(e["params_after"] <= e["params_before"] for e in prunes), prunes
    assert sum(e["params_after"] < e["params_before"] for e in prunes) >= 2, prunes   # AGP starts at 0
    if name != "mobilenet_fmnist.yaml":      # heads and MLP neurons both shrink, in every layer
        widths = ckpt.read_meta(ckpt.latest(run))["widths"]
        keys = ("self_attn", "mlp") if name == "llama_kjv.yaml" else ("attention", "intermediate")
        for kind in keys:
            first = json.loads((run / "events.jsonl").read_text().splitlines()[0])["widths"]
            shrunk = {n: (first[n], widths[n]) for n in widths if kind in n}
            assert shrunk and all(b < a for a, b in shrunk.values()), (kind, shrunk)
            assert len({b for _, b in shrunk.values()}) == 1, shrunk        # uniform
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params_end"] < summary["params_start"]
    saved = yaml.safe_load((run / "config.yaml").read_text())      # the overrides are recorded
    assert saved["data"]["batch_size"] == sets["data.batch_size"]
    assert saved["pruning"]["schedule"]["every"] == 2

    proc = secateur("export", run, "--out", exp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import secateur as sc
    model = sc.load_pruned(exp)
    weights = ckpt.model_state_dict(ckpt.latest(run))
    assert model.state_dict().keys() == weights.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert sum(p.numel() for p in model.parameters()) == summary["params_end"]
    arch = json.loads((exp / "secateur.json").read_text())
    if name == "llama_kjv.yaml":
        # every layer kept the same widths (uniform scope): transformers' own loader reads hf/
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(exp / "hf", local_files_only=True).eval()
        ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits,
                                       rtol=0, atol=1e-5)
        assert hf.config.intermediate_size < 128
        assert (exp / "tokenizer" / "tokenizer.json").is_file()
        # the run's tokenizer sits in hf/ too, and transformers' AutoTokenizer encodes as the run did
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer
        text = "In the beginning God created the heaven and the earth."
        own = Tokenizer.from_file(str(exp / "tokenizer" / "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(exp / "hf", local_files_only=True)
        assert auto(text, add_special_tokens=False)["input_ids"] == own.encode(text, add_special_tokens=False).ids
        assert auto.pad_token == "<pad>"
    if name == "minilm_kjv.yaml":     # heads pruned, hidden size kept: BertConfig cannot say that
        assert not (exp / "hf").exists() and "head" in arch["hf_note"]


def _rows(run: Path) -> int:
    try:
        return max(0, len((run / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("name,steps,every", [("llama_kjv.yaml", 24, 4), ("mobilenet_fmnist.yaml", 24, 3)])
def test_killed_run_of_an_hf_and_a_torchvision_model_resumes_bit_for_bit(name, steps, every, data, tmp_path):
    sets = {**short(name, data), "train.deterministic": True, "train.checkpoint_interval": every,
            "train.progress": False, "pruning.schedule.end": steps // 2, "pruning.schedule.every": 4,
            "train.eval_interval": 10}
    if name == "mobilenet_fmnist.yaml":
        sets["data.batch_size"] = 8          # num_workers: 2 and augmentation stay on
    cfg = REPO / "configs" / name
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _spawn("train", "--config", cfg, "--out", full, "--max-steps", steps, *_sets(sets), cwd=tmp_path)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]

    kill_at = random.Random(os.getpid()).randint(every + 2, steps // 2 + 4)   # after a checkpoint
    proc = _spawn("train", "--config", cfg, "--out", killed, "--max-steps", steps, *_sets(sets),
                  cwd=tmp_path)
    deadline = time.time() + 600
    while _rows(killed) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill: {proc.stderr.read().decode()[-1500:]}"
    assert every <= int(ckpt.latest(killed).name.split("_")[1]) < steps

    resumed = _spawn("resume", killed, "--max-steps", steps, cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    a, b = ckpt.latest(full), ckpt.latest(killed)
    assert a.name == b.name == f"step_{steps:08d}"
    assert ckpt.read_meta(a)["structure"] == ckpt.read_meta(b)["structure"]
    wa, wb = ckpt.model_state_dict(a), ckpt.model_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in lb] == list(range(1, steps + 1))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert lb[-1]["params"] < lb[0]["params"]


def _readme_blocks() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    py = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    yml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return py, yml


def test_readme_example_runs_as_written(data, tmp_path, monkeypatch):
    py, yml = _readme_blocks()
    (tmp_path / "nets.py").write_text(py)
    cfg = yaml.safe_load(yml)
    assert len(yml.strip().splitlines()) <= 12
    os.symlink(data / "fm", tmp_path / "data-fm")
    cfg["data"].update(root="data-fm/train", val_root="data-fm/val", batch_size=16)
    (tmp_path / "my_run.yaml").write_text(yaml.safe_dump(cfg))
    proc = secateur("train", "--config", "my_run.yaml", "--out", "runs/mine", "--max-steps", 6,
                    "--set", "pruning.schedule.start=2", "--set", "pruning.schedule.end=4",
                    "--set", "pruning.schedule.every=2", "--set", "optimizer.lr=3e-3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/mine/summary.json").read_text())
    assert summary["params_end"] < summary["params_start"]
    assert yaml.safe_load((tmp_path / "runs/mine/config.yaml").read_text())["optimizer"]["lr"] == 3e-3
    assert secateur("resume", "runs/mine", "--max-steps", 8, cwd=tmp_path).returncode == 0
    assert secateur("export", "runs/mine", "--out", "exported", cwd=tmp_path).returncode == 0
    # one-shot pruning of the traced model writes a run that loads and resumes with its new widths
    proc = secateur("prune", "runs/mine", "--out", "runs/cut", "--criterion", "l2", "--ratio", "0.25",
                    "--calib-batches", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.chdir(tmp_path)                     # the target nets.py:small_net is relative
    cut, meta = ckpt.load_model(ckpt.latest(tmp_path / "runs/cut"))
    assert sum(p.numel() for p in cut.parameters()) == meta["params"] < \
        json.loads((tmp_path / "runs/mine/summary.json").read_text())["params_end"]
    assert secateur("resume", "runs/cut", "--max-steps", 9, cwd=tmp_path).returncode == 0
    load = subprocess.run([sys.executable, "-c", "import secateur, torch; m = secateur.load_pruned('exported'); "
                           "print(sum(p.numel() for p in m.parameters()), tuple(m(torch.randn(2, 1, 28, 28)).shape))"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert load.returncode == 0, load.stderr[-2000:]
    n, shape = load.stdout.split(" ", 1)
    assert int(n) == json.loads((tmp_path / "runs/mine/summary.json").read_text())["params_end"]
    assert shape.strip() == "(2, 10)"


@pytest.mark.parametrize("override,expect", [
    ("model.target=no_such_module.nets:Net", "model.target: cannot import 'no_such_module.nets'"),
    ("model.args.depth=3", "model.args: "),
    ("model.target=torch.nn:Linear", "model.args: torch.nn:Linear has no argument 'width'"),
    ("model.args.width=-1", "model: nets.py:small_net(**args) failed"),
])
def test_a_model_that_cannot_be_built_or_run_is_one_line_before_any_file(override, expect, data, tmp_path):
    py, yml = _readme_blocks()
    (tmp_path / "nets.py").write_text(py)
    cfg = yaml.safe_load(yml)
    cfg["data"].update(root=str(data / "fm/train"), val_root=str(data / "fm/val"))
    (tmp_path / "my_run.yaml").write_text(yaml.safe_dump(cfg))
    proc = secateur("train", "--config", "my_run.yaml", "--out", "runs/x", "--set", override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expect in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_text_data_into_a_vision_model_is_refused_before_any_file(data, tmp_path):
    cfg = yaml.safe_load((REPO / "configs/mobilenet_fmnist.yaml").read_text())
    cfg["data"] = {"dataset": "text_files", "train_files": str(data / "kjv/books_train.jsonl"),
                   "val_files": str(data / "kjv/books_val.jsonl"), "label_column": "label"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = secateur("train", "--config", "c.yaml", "--out", "runs/x", cwd=tmp_path)
    assert proc.returncode == 2 and "one forward on a batch of text_files failed" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


HF_TASKS = {
    # a masked LM from a config, trained on the KJV text it tokenises with its own BPE
    "masked_lm": ({"hf": {"config": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "max_position_embeddings": 64}}, "task": "masked_lm"},
                  lambda d: {"dataset": "text_files", "train_files": f"{d}/kjv/val.txt",
                             "task": "masked_lm", "vocab_size": 300, "max_length": 32, "batch_size": 8}),
    # a ViT from a config on the image folder
    "image_classification": ({"hf": {"config": {"model_type": "vit", "image_size": 32, "patch_size": 8,
                                                "hidden_size": 32, "intermediate_size": 64,
                                                "num_hidden_layers": 2, "num_attention_heads": 4}}},
                             lambda d: {"dataset": "image_folder", "root": f"{d}/fm/train",
                                        "val_root": f"{d}/fm/val", "channels": 3, "image_size": 32,
                                        "batch_size": 8}),
}


@pytest.mark.parametrize("task", sorted(HF_TASKS))
def test_hugging_face_tasks_train_prune_resume_and_export(task, data, tmp_path):
    model, data_cfg = HF_TASKS[task]
    cfg = {"model": model, "data": data_cfg(data),
           "pruning": {"criterion": "activation", "units": ["heads", "mlp"],
                       "rule": {"kind": "ratio", "ratio": 0.25, "scope": "uniform"},
                       "schedule": {"kind": "iterative", "start": 2, "end": 4, "every": 2}},
           "train": {"max_steps": 5, "eval_interval": 5, "eval_batches": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = secateur("train", "--config", "c.yaml", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["params_end"] < summary["params_start"]
    widths = ckpt.read_meta(ckpt.latest(tmp_path / "run"))["widths"]
    heads = [w for n, w in widths.items() if "attention" in n]
    assert heads and set(heads) == {3}    # 4 heads -> 3 at step 2; floor(0.25 * 3) = 0 at step 4
    assert secateur("resume", "run", "--max-steps", 7, cwd=tmp_path).returncode == 0
    proc = secateur("export", "run", "--out", "exp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import secateur as sc
    m = sc.load_pruned(tmp_path / "exp")
    assert sum(p.numel() for p in m.parameters()) == \
        json.loads((tmp_path / "run/summary.json").read_text())["params_end"]


def test_two_ranks_prune_a_traced_hugging_face_model_identically(data, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = {**short("llama_kjv.yaml", data), "train.progress": False}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    proc = subprocess.run([*torchrun, "-m", "secateur", "train", "--config", str(REPO / "configs/llama_kjv.yaml"),
                           "--out", "run", "--max-steps", "6", *_sets(sets)], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / "run/ranks" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [e["step"] for e in ranks[0]] == [2, 4, 6]
    assert ranks[0] == ranks[1]                     # same widths, parameter counts and weight digests
    assert ranks[0][-1]["params"] < ranks[0][0]["params"]


def test_a_task_that_does_not_fit_the_data_is_one_line_before_any_file(data, tmp_path):
    sets = {**short("llama_kjv.yaml", data), "model.task": "sequence_classification"}
    proc = secateur("train", "--config", REPO / "configs/llama_kjv.yaml", "--out", "runs/x", *_sets(sets),
                    cwd=tmp_path)
    assert proc.returncode == 2 and "check model.task" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_distillation_from_a_snapshot_teacher_changes_training_and_resumes_exactly(data, tmp_path):
    sets = {**short("llama_kjv.yaml", data), "train.deterministic": True, "train.progress": False,
            "lr_schedule.decay_steps": 8, "train.checkpoint_interval": 1}
    kd = {**sets, "distill": {"teacher": "snapshot", "temperature": 2.0, "weight": 0.7}}
    cfg = REPO / "configs/llama_kjv.yaml"
    runs = {}
    for name, s, steps in (("plain", sets, 8), ("full", kd, 8), ("part", kd, 5)):
        proc = secateur("train", "--config", cfg, "--out", name, "--max-steps", steps, *_sets(s), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / name
    proc = secateur("resume", "part", "--max-steps", 8, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {n: [r["loss"] for r in read_metrics(p)] for n, p in runs.items()}
    # the teacher is taken at the first event (step 2): identical losses before, not after
    assert losses["full"][:2] == losses["plain"][:2] and losses["full"][2:] != losses["plain"][2:]
    assert losses["part"] == losses["full"]
    assert (ckpt.latest(runs["full"]) / "teacher.safetensors").is_file()
    wa, wb = ckpt.model_state_dict(ckpt.latest(runs["full"])), ckpt.model_state_dict(ckpt.latest(runs["part"]))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
