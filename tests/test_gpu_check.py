"""`make gpu-check` / `make gpu-wheels` on a CPU machine: the one-line no-GPU exit, a wheel set
that pip installs for cp312 (built from PyPI: this needs network), and the whole command's dry
run (`--allow-cpu --small`: Triton's interpreter, tiny shapes, a 30-step DeepSpeed run)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from secateur.gpucheck import PLATFORMS, TARGET_PYTHON
from secateur.gpucheck import report, run as gc
from secateur.gpucheck import wheels as gw

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def _run(cmd, timeout=120, **kw):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


# ---- no GPU: one line, non-zero, nothing started ----------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is present: the no-GPU exit cannot be exercised here")
def test_without_gpu_one_line_nonzero_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = _run([sys.executable, "-m", "secateur.gpucheck", "--out", str(out)])
    assert p.returncode == gc.EXIT_NO_GPU
    assert len(p.stdout.splitlines()) == 1 and p.stdout.startswith("gpu-check: no CUDA GPU"), p.stdout
    assert p.stderr == ""
    assert not out.exists()
    assert time.perf_counter() - t0 < 30


@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is present: the no-GPU exit cannot be exercised here")
def test_make_gpu_check_without_gpu_uses_plain_python3_and_fails(tmp_path):
    out = tmp_path / "out"
    p = _run(["make", "-s", "gpu-check", f"OUT={out}"])
    assert p.returncode != 0
    assert p.stdout.splitlines() == [l for l in p.stdout.splitlines() if l.startswith("gpu-check: no CUDA GPU")]
    assert len(p.stdout.splitlines()) == 1
    assert not out.exists()
    usage = _run(["make", "-s", "gpu-check"])
    assert usage.returncode != 0 and "usage: make gpu-check OUT=dir" in usage.stdout


@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is present: the no-GPU exit cannot be exercised here")
def test_torch_probe_is_the_second_gate(tmp_path, monkeypatch, capsys):
    """A device node or nvidia-smi without a GPU torch can use: still one line and exit 3."""
    monkeypatch.setattr(gc, "no_gpu_device", lambda: None)
    assert gc.main(["--out", str(tmp_path / "out")]) == gc.EXIT_NO_GPU
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "no CUDA GPU usable from" in lines[0] and "sees no CUDA device" in lines[0]
    assert not (tmp_path / "out").exists()


def test_make_gpu_wheels_runs_the_wheels_module():
    p = _run(["make", "-n", "gpu-wheels", "GPU_WHEELS=/tmp/somewhere"])
    assert p.returncode == 0
    assert "-m secateur.gpucheck.wheels --dest /tmp/somewhere" in p.stdout


def test_unknown_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", "x", "--stages", "tests,nope"])
    assert e.value.code == 2 and "unknown stage(s) nope" in capsys.readouterr().err


# ---- the pieces, without subprocesses ------------------------------------------------------------
def test_wheel_tag_rules():
    ok = ["pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
          "psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl",
          "ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
          "deepspeed-0.19.8-py3-none-any.whl"]
    bad = ["pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.whl",
           "pyyaml-6.0.4-cp312-cp312-macosx_11_0_arm64.whl",
           "x-1.0-cp313-abi3-manylinux_2_28_x86_64.whl",
           "y-1.0-cp312-cp312-manylinux_2_28_aarch64.whl"]
    assert all(gw.cp312_compatible(f) for f in ok)
    assert not any(gw.cp312_compatible(f) for f in bad)
    assert gw.parse_wheel_name(ok[0])["name"] == "pydantic-core"
    assert gc.vkey("4.16.0") > gc.vkey("4.9.1") and gc.vkey("2.11.0+cu130") == (2, 11, 0)
    assert gc.vkey("26.0rc1") == (26, 0) and gc.vkey(None) == ()


def test_test_outcomes_aggregate_per_test_and_group(tmp_path):
    lines = [
        {"nodeid": "tests/test_kernels.py::a", "when": "setup", "outcome": "passed", "duration": 0.1},
        {"nodeid": "tests/test_kernels.py::a", "when": "call", "outcome": "passed", "duration": 0.2},
        {"nodeid": "tests/test_kernels.py::b", "when": "call", "outcome": "failed", "duration": 0.1,
         "message": "AssertionError: Tensor-likes are not close"},
        {"nodeid": "tests/test_kernels.py::c", "when": "setup", "outcome": "failed", "duration": 0.0,
         "message": "fixture broke"},
        {"nodeid": "tests/test_cuda_greedy.py::x_on_gpu", "when": "setup", "outcome": "skipped",
         "duration": 0.0, "message": "Skipped: needs a CUDA GPU"},
        {"nodeid": "tests/test_cuda_greedy.py::host", "when": "call", "outcome": "passed", "duration": 1.0},
        {"nodeid": "tests/test_kernels.py::d", "when": "setup", "outcome": "passed", "duration": 0.0},
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(l) + "\n" for l in lines))
    agg = report.aggregate_tests(f, lambda n: "test_kernels" in n or "on_gpu" in n)
    t = agg["tests"]
    assert t["tests/test_kernels.py::a"] == {"outcome": "passed", "duration": 0.3, "message": ""}
    assert t["tests/test_kernels.py::b"]["outcome"] == "failed"
    assert t["tests/test_kernels.py::c"]["outcome"] == "error"
    assert t["tests/test_kernels.py::d"]["outcome"] == "unfinished"   # killed mid-test
    assert agg["device"] == {"total": 5, "passed": 1, "failed": 1, "error": 1, "skipped": 1, "unfinished": 1}
    assert agg["host"] == {"total": 1, "passed": 1}


def test_event_windows_split_step_times_around_each_event():
    # 1 ms per step before the event at step 10, 0.5 ms after it, 9 ms for the first step after
    rows = [{"step": s, "step_time_s": 0.001 if s <= 10 else (0.009 if s == 11 else 0.0005)}
            for s in range(1, 21)]
    rows[0]["step_time_s"] = 1.0                      # step 1: lazy set-up, left out
    events = [{"kind": "start", "step": 0}, {"kind": "prune", "step": 10, "params_before": 100,
                                             "params_after": 60, "seconds": 0.1}]
    (w,) = report.event_windows(rows, events)
    assert w["before_ms"] == pytest.approx(1.0) and w["n_before"] == 9
    assert w["first_after_ms"] == pytest.approx(9.0)
    assert w["after_ms"] == pytest.approx(0.5) and w["n_after"] == 9
    assert w["after_over_before"] == pytest.approx(0.5)
    assert "step 10: before 1.00, first 9.00, after 0.50 (after/before 0.50), params 100 -> 60" in \
        "\n".join(report.format_windows([w]))


def test_stage_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path / "o"), "--allow-cpu"])
    check = gc.Check(args, {"cuda_available": False})
    try:
        log = tmp_path / "x.log"
        code = ("import subprocess, sys, time\n"
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                "print('child', p.pid, flush=True); time.sleep(60)\n")
        t0 = time.perf_counter()
        rc, timed_out = check.call([sys.executable, "-c", code], log, timeout=3)
        assert timed_out and rc is None and time.perf_counter() - t0 < 20
        pid = int(re.search(r"child (\d+)", log.read_text()).group(1))
        time.sleep(0.5)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert "killed after 3 s" in log.read_text()
    finally:
        import shutil

        shutil.rmtree(check.tmp, ignore_errors=True)


def test_greedy_section_compares_kernel_orders_and_times_against_the_torch_greedy():
    """The GPU branch of the greedy benchmark, with the CUDA kernel replaced by the torch greedy
    itself (f64) and by a wrong order (f32): agreement, the first differing step, speed-ups."""
    from secateur.gpucheck import bench
    from secateur.pruning.projective import greedy

    calls = []

    def kernel(W, r, lam, dtype=None):
        calls.append(dtype)
        order = greedy(W, r, lam, mode="exact", redistribute=False).removed
        return order if dtype is None else order.flip(0)

    (row,) = bench.greedy_ops("cpu", [(12, 20, 5)], bench.Timer("cpu", 0.0), kernel)
    assert row["same_order_f64"] is True and row["torch_cuda_same_order"] is True
    assert row["same_prefix_f32"] == 0
    assert row["torch_cpu"] > 0 and row["cuda_f64"] > 0 and row["speedup_f64_vs_torch_cpu"] > 0
    assert "torch_cuda_error" not in row and {None, torch.float32} <= set(calls)
    (skipped,) = bench.greedy_ops("cpu", [(12, 20, 5)], bench.Timer("cpu", 0.0))
    assert "skipped" in skipped["cuda"] and "cuda_f64" not in skipped


# ---- the wheel set (built from PyPI: network) ------------------------------------------------------
@pytest.fixture(scope="module")
def wheel_set(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheelset") / "gpu-wheels"
    p = _run([sys.executable, "-m", "secateur.gpucheck.wheels", "--dest", str(dest)], timeout=300)
    assert p.returncode == 0, p.stderr + p.stdout
    return dest, p.stdout


def test_wheel_set_has_every_package_as_a_cp312_wheel_under_40_mib(wheel_set):
    dest, stdout = wheel_set
    m = json.loads((dest / "manifest.json").read_text())
    names = sorted(w["name"] for w in m["wheels"])
    expected = sorted({*gw.DOWNLOAD, *gw.BUILD, "secateur"})
    assert names == expected
    files = sorted(p.name for p in dest.glob("*.whl"))
    assert files == sorted(w["file"] for w in m["wheels"])
    for f in files:
        t = gw.parse_wheel_name(f)
        assert gw.cp312_compatible(f), f
        assert "cp312" in t["python"] or "py3" in t["python"] or "abi3" in t["abi"], f
    by_name = {w["name"]: w["file"] for w in m["wheels"]}
    for binary in ("pydantic-core", "pyyaml", "msgpack", "kmedoids"):
        assert "-cp312-cp312-" in by_name[binary]
    for pure in ("deepspeed", "secateur", "pydantic", "torch-pruning"):
        assert by_name[pure].endswith("-py3-none-any.whl")
    assert by_name["deepspeed"].startswith("deepspeed-0.19.8-")
    assert m["total_bytes"] < 40 * 2**20
    assert re.search(r"gpu-wheels: \d+ wheels, total \d+\.\d MiB", stdout.splitlines()[-1])
    assert (dest / ".gitignore").read_text() == "*\n"       # git ignores the folder itself
    for w in m["wheels"]:
        assert gc.sha256(dest / w["file"]) == w["sha256"]


def test_pip_installs_the_set_for_cp312_and_its_requirements_are_covered(wheel_set, tmp_path):
    dest, _ = wheel_set
    m = json.loads((dest / "manifest.json").read_text())
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pins = [f"{w['name']}=={w['version']}" for w in m["wheels"]]
    p = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(dest),
              "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp",
              *plat, "--target", str(tmp_path / "t"), *pins])
    assert p.returncode == 0, p.stderr
    would = p.stdout.split("Would install", 1)[1].split()
    assert len(would) == len(pins)
    # every requirement of every wheel (py3.12 on Linux, no extras) is in the set, on the CUDA
    # machine already, or listed as deliberately left out
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
           "sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux", "extra": ""}
    have = {canonicalize_name(w["name"]) for w in m["wheels"]}
    allowed = have | {canonicalize_name(n) for n in (*gw.PROVIDED, *gw.NOT_SHIPPED)}
    uncovered = set()
    for w in m["wheels"]:
        with zipfile.ZipFile(dest / w["file"]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:"):
                    req = Requirement(line.split(":", 1)[1].strip())
                    if req.marker is None or req.marker.evaluate(env):
                        if canonicalize_name(req.name) not in allowed:
                            uncovered.add(f"{w['name']} -> {req.name}")
    assert not uncovered


def test_wheel_set_data_are_the_quickstart_rows(wheel_set):
    from secateur.data import load_dataset

    dest, _ = wheel_set
    mine = load_dataset("fashion_mnist", root=str(dest / "fashion-mnist"), train_subset=6000, val_subset=1000)
    ref = load_dataset("fashion_mnist", train_subset=6000, val_subset=1000)
    for a, b in ((mine.train, ref.train), (mine.val, ref.val)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_unzip_fallback_installs_like_pip_target(wheel_set, tmp_path):
    dest, _ = wheel_set
    (ds,) = dest.glob("deepspeed-*.whl")
    (hj,) = dest.glob("hjson-*.whl")
    gc.unzip_wheels([ds, hj], tmp_path)
    assert (tmp_path / "deepspeed" / "__init__.py").is_file()
    assert not list(tmp_path.glob("*.data"))          # scripts and data files are left out
    p = subprocess.run([sys.executable, "-c", "import hjson, sys; print(hjson.__file__)"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith(str(tmp_path))


# ---- the whole command, dry run on CPU ------------------------------------------------------------
def test_dry_run_of_the_whole_command_passes(wheel_set, tmp_path):
    dest, _ = wheel_set
    out = tmp_path / "out"
    p = _run([sys.executable, "-m", "secateur.gpucheck", "--allow-cpu", "--small", "--wheels", str(dest),
              "--out", str(out)], timeout=480)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["verdict"] == "pass" and res["meta"]["dry_run"]
    st = res["stages"]
    # bf16 trains on CPU too; fp16 where this CPU does fp16 (oneDNN), else skipped with the reason
    cpu_fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert [st[s]["status"] for s in gc.STAGES] == ["ok"] * 5 + ["ok" if cpu_fp16 else "skipped"]
    if not cpu_fp16:
        assert "fp16 needs a CUDA GPU" in st["train_fp16"]["note"]
    else:                                 # one fp16 step (a CPU emulates fp16 convolutions)
        t16 = res["train_fp16"]          # with an event: the fp16 masters are cut too
        assert t16["steps_done"] == 1 and t16["precision"] == "fp16" and t16["prune_events"] == 1
    # install: every wheel installed for cp312 by pip; the import check ran
    assert st["install"]["installed"] and len(st["install"]["installed"]) == st["install"]["wheels"]
    assert all(st["install"]["imports"][m]["ok"] for m in gc.REQUIRED_IMPORTS)
    # kernel tests ran in the interpreter, results per test
    d = res["tests"]["device"]
    assert d["passed"] >= 50 and not d.get("failed") and not d.get("error")
    assert res["tests"]["tests"]["tests/test_cuda_greedy.py::test_greedy_order_cuda_matches_bruteforce_on_gpu"][
        "outcome"] == "skipped"
    # benchmarks: Triton (interpreter) and torch side by side, the copy reference, Gram, step, greedy
    b = res["bench"]
    assert b["machine"]["interpreter"] and not b["errors"]
    assert b["copy"]["GB/s"] > 0
    ops = {(r["op"], r["dtype"]) for r in b["channel_ops"]}
    assert {("tsra_fwd", "float32"), ("tsra_fwd_bwd", "bfloat16"), ("channel_sq_sum", "float32")} <= ops
    assert all(r["triton"]["GB/s"] > 0 and r["torch"]["GB/s"] > 0 for r in b["channel_ops"])
    assert {"triton", "torch_path", "matmul_ieee"} <= set(b["gram"][0])
    assert b["train_step_stats_overhead"][0]["stats_ms"] > 0
    assert "skipped" in b["greedy"][0]["cuda"] and b["greedy"][0]["torch_cpu"] > 0
    assert b["secateur_bench_kernels"]["ops"]
    # training: DeepSpeed engine, three pruning events, step times before and after each
    t = res["train"]
    assert t["status"] == "ok" and t["engine"].endswith("DeepSpeedEngine") and t["dist"]["backend"] == "gloo"
    assert t["prune_events"] == 3 and t["steps_done"] == 30 and t["params_end"] < t["params_start"]
    assert t["windows"][0]["before_ms"] > 0 and t["windows"][0]["after_ms"] > 0
    tb = res["train_bf16"]                # the same run in bf16: events cut fp32 masters alike
    assert tb["status"] == "ok" and tb["prune_events"] == 3 and tb["params_end"] < tb["params_start"]
    import yaml
    used = yaml.safe_load((out / "train_bf16" / "config.yaml").read_text())
    assert tb["precision"] == "bf16" and used["deepspeed"]["precision"] == "bf16"
    summary = (out / "summary.md").read_text()
    for heading in ("## Kernel tests", "## Benchmarks", "## Training (quickstart)", "step 10: before"):
        assert heading in summary
    assert "verdict: **pass**" in p.stdout
    for f in ("logs/install.log", "logs/tests.log", "logs/bench.log", "logs/train.log", "tests.jsonl",
              "bench.json", "train/metrics.csv", "train/events.jsonl", "train/result.json"):
        assert (out / f).is_file(), f
    assert res["meta"]["seconds"] < 480
