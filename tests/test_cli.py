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
