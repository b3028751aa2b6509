"""CLI subcommands on a finished run: export (round trip through the printed snippet), report
(PNGs + summary), one-shot prune (and fine-tuning it with resume), bench delegation, launcher
arguments."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from secateur.cli import _strip_local_rank, main
from secateur.trainer import checkpoint as ckpt
from secateur.trainer.export import LOAD_SNIPPET
from secateur.trainer.logs import read_events, read_metrics
from test_trainer import run_in_process, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with three pruning events, and its in-memory model."""
    run = tmp_path_factory.mktemp("cli") / "run"
    tr = run_in_process(tiny_config(), run)
    return run, tr.model.eval()


def test_export_round_trip_reproduces_the_trained_models_outputs(trained, tmp_path, capsys):
    run, model = trained
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    printed = capsys.readouterr().out
    snippet = LOAD_SNIPPET.format(dir=tmp_path / "exp")
    assert snippet in printed
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    # run the printed three lines in a fresh interpreter: nothing but the export folder is used
    script = snippet + f"\nimport torch\ntorch.save(model.eval()(torch.load({str(tmp_path / 'x.pt')!r})), " \
                       f"{str(tmp_path / 'y.pt')!r})\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        expected = model(x)
    got = torch.load(tmp_path / "y.pt")
    # same weights; the fresh interpreter may use another thread count, so allow summation-order noise
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()
    assert json.loads((tmp_path / "exp" / "model.json").read_text()) == model.spec()


def test_export_help_documents_the_load_snippet(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "secateur.load_pruned(\"OUT\")" in capsys.readouterr().out


def test_report_writes_pngs_and_a_summary_matching_the_logs(trained, capsys):
    run, model = trained
    assert main(["report", str(run)]) == 0
    for name in ("params_vs_step.png", "width_vs_step.png", "loss_acc_vs_step.png",
                 "step_time_vs_step.png", "params_vs_acc.png"):
        data = (run / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    md = (run / "report.md").read_text()
    rows, prunes = read_metrics(run), [e for e in read_events(run) if e["kind"] == "prune"]
    end = sum(p.numel() for p in model.parameters())
    assert f"| parameters at start | {rows[0]['params']:,} |" in md
    assert f"| parameters at end | {end:,} (" in md
    assert f"| final val accuracy | {rows[-1]['eval_acc']:.4f} |" in md
    assert md.count("\n| 10 |") + md.count("\n| 20 |") + md.count("\n| 30 |") == len(prunes) == 3


def test_oneshot_prune_writes_a_smaller_run_that_fine_tunes_and_exports(trained, tmp_path, capsys):
    run, model = trained
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--criterion", "l2", "--ratio", "0.5", "--out", str(out),
                 "--calib-batches", "2"]) == 0
    assert "params" in capsys.readouterr().out
    src_widths = ckpt.read_meta(ckpt.latest(run))["widths"]
    pruned, meta = ckpt.load_model(ckpt.latest(out))
    assert meta["widths"] if "widths" in meta else True
    from secateur.trainer.setup import unit_widths
    assert unit_widths(pruned) == {g: w - int(0.5 * w) for g, w in src_widths.items()}
    # fine-tune the pruned model for a few steps, then export it
    step = meta["step"]
    assert main(["resume", str(out), "--max-steps", str(step + 5)]) == 0
    assert ckpt.read_meta(ckpt.latest(out))["step"] == step + 5
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "model.safetensors").is_file()


def test_fold_criterion_merges_units(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "folded"
    assert main(["prune", str(run), "--criterion", "fold", "--ratio", "0.5", "--out", str(out),
                 "--calib-batches", "1"]) == 0
    src = ckpt.read_meta(ckpt.latest(run))["widths"]
    from secateur.trainer.setup import unit_widths
    folded, _ = ckpt.load_model(ckpt.latest(out))
    assert unit_widths(folded) == {g: w - int(0.5 * w) for g, w in src.items()}


def test_prune_with_both_ratio_and_threshold_is_one_line_error(trained, tmp_path, capsys):
    run, _ = trained
    rc = main(["prune", str(run), "--criterion", "l2", "--ratio", "0.5", "--threshold",
               "prop_of_max=0.1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Hugging Face LLaMA (GQA) run whose heads and MLP neurons were already pruned once
    while it trained, so that its checkpoint records a structure of both kinds."""
    import random

    root = tmp_path_factory.mktemp("cli-llama")
    rng = random.Random(0)
    words = "in the beginning god created heaven and earth light was day night waters".split()
    for name, lines in (("train.txt", 300), ("val.txt", 40)):
        (root / name).write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(lines)))
    cfg = {"seed": 0,
           "model": {"hf": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "max_position_embeddings": 64,
                                       "tie_word_embeddings": True}},
                     "task": "causal_lm"},
           "data": {"dataset": "text_files", "train_files": str(root / "train.txt"),
                    "val_files": str(root / "val.txt"), "tokenizer": "bpe", "vocab_size": 128,
                    "block_size": 16, "batch_size": 4, "eval_batch_size": 8},
           "optimizer": {"name": "adamw", "lr": 1e-3},
           "pruning": {"criterion": "l2", "units": ["heads", "mlp"],
                       "rule": {"kind": "ratio", "ratio": 0.5, "scope": "uniform"},
                       "schedule": {"kind": "oneshot", "at": 2}},
           "train": {"max_steps": 3, "eval_interval": 3, "eval_batches": 1, "progress": False, "threads": 1}}
    run_in_process(cfg, root / "run")
    return root / "run"


def _llama_widths(model) -> dict[str, int]:
    """{"heads": query projection rows, "mlp": gate projection rows} of every layer, read off the
    modules themselves."""
    return {f"{i}.{kind}": (layer.self_attn.q_proj if kind == "heads" else layer.mlp.gate_proj).out_features
            for i, layer in enumerate(model.model.layers) for kind in ("heads", "mlp")}


def test_prune_units_mlp_changes_only_the_mlp_widths(llama_run, tmp_path, capsys):
    out = tmp_path / "mlp-only"
    assert main(["prune", str(llama_run), "--criterion", "l2", "--ratio", "0.5", "--scope", "uniform",
                 "--units", "mlp", "--out", str(out), "--calib-batches", "1", "--eval-batches", "1"]) == 0
    assert "val loss" in capsys.readouterr().out
    src_meta = ckpt.read_meta(ckpt.latest(llama_run))
    src_model, _ = ckpt.load_model(ckpt.latest(llama_run))
    new_model, meta = ckpt.load_model(ckpt.latest(out))
    before, after = _llama_widths(src_model), _llama_widths(new_model)
    assert before == {"0.heads": 16, "0.mlp": 32, "1.heads": 16, "1.mlp": 32}   # the training event
    assert after == {k: w - int(0.5 * w) if k.endswith("mlp") else w for k, w in before.items()}
    # the recorded structure agrees: head groups keep the source's units, MLP groups keep half
    kept = meta["structure"]
    for name, units in src_meta["structure"].items():
        if name.endswith("self_attn"):
            assert kept[name] == units
        elif "mlp" in name:
            assert len(kept[name]) == len(units) - int(0.5 * len(units))
            assert set(kept[name]) <= set(units)
    assert meta["oneshot"]["units"] == ["mlp"]


def test_prune_units_with_an_unknown_kind_is_one_line_error(llama_run, tmp_path, capsys):
    for units in ("mpl", "heads,bogus", ","):
        rc = main(["prune", str(llama_run), "--criterion", "l2", "--ratio", "0.5", "--units", units,
                   "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: units"), err
        assert not (tmp_path / "x").exists()


def test_bench_kernels_delegates_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("secateur.kernels.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "secateur.kernels.bench", fake)
    assert main(["bench", "kernels", "--json", "out.json", "--quick"]) == 0
    assert seen["argv"] == ["--json", "out.json", "--quick"]


def test_launcher_local_rank_is_accepted_anywhere():
    assert _strip_local_rank(["--local_rank=1", "train", "--config", "c.yaml"]) == \
        (["train", "--config", "c.yaml"], 1)
    assert _strip_local_rank(["train", "--local_rank", "0", "--config", "c.yaml"]) == \
        (["train", "--config", "c.yaml"], 0)


def test_module_entry_point_shows_help():
    proc = subprocess.run([sys.executable, "-m", "secateur", "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0
    for cmd in ("train", "resume", "prune", "export", "report", "bench"):
        assert cmd in proc.stdout
