"""`python3 -m secateur.gpucheck --out DIR` (`make gpu-check OUT=DIR`): the stages listed in
secateur/gpucheck/__init__.py, each a child process with its own timeout, in one budget.

Exit status: 0 all stages passed (or were skipped for a stated reason), 1 a stage failed or timed
out, 2 usage error, 3 no CUDA GPU for this python (one line, nothing started, DIR not created).
Standard library only: this runs before the wheel set is installed."""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from secateur.gpucheck import BUDGET_S, KERNEL_TEST_FILES, PLATFORMS, STAGE_TIMEOUTS, TARGET_PYTHON
from secateur.gpucheck.report import aggregate_tests, run_dir_result, summary_markdown
from secateur.gpucheck.wheels import sha256

REPO = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3
STAGES = ("install", "tests", "bench", "train", "train_bf16", "train_fp16")
REQUIRED_IMPORTS = ("pydantic", "yaml", "tqdm", "deepspeed", "torch_pruning", "safetensors", "torch",
                    "triton", "numpy", "secateur", "secateur.kernels", "secateur.trainer.loop",
                    "secateur.trainer.engine")
OPTIONAL_IMPORTS = ("cupy", "kmedoids", "kneed")   # the CUDA C kernel; CoSeP (kneed needs scipy)

PROBE = r"""
import json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    memory_GiB=round(p.total_memory / 2**30, 1))
except Exception as err:
    info.update(torch=None, cuda_available=False, torch_error=f"{type(err).__name__}: {err}")
for name in ("triton", "numpy", "cupy", "pytest"):
    try:
        info[name] = getattr(__import__(name), "__version__", "?")
    except Exception:
        info[name] = None
print(json.dumps(info))
"""

INSTALLED = r"""
import json, sys, importlib.metadata as md
out = {}
for n in sys.argv[1:]:
    try:
        out[n] = md.version(n)
    except md.PackageNotFoundError:
        out[n] = None
print(json.dumps(out))
"""

IMPORT_CHECK = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        out[name] = {"ok": True, "version": getattr(m, "__version__", None), "file": getattr(m, "__file__", None)}
    except Exception as err:
        out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
try:
    from secateur.kernels.cuda import greedy_projective as gp
    out["greedy_projective.cu"] = {"ok": gp.SOURCE_PATH.is_file(), "file": str(gp.SOURCE_PATH)}
except Exception as err:
    out["greedy_projective.cu"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
print("IMPORT_CHECK " + json.dumps(out))
"""


def no_gpu_device() -> str | None:
    """Why this machine certainly has no NVIDIA GPU (no device node, no nvidia-smi), else None."""
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
        return None
    return "no NVIDIA device (/dev/nvidia*) and no nvidia-smi"


def probe(python: str, timeout: float = 90) -> dict:
    """torch / CUDA / triton / cupy as `python` sees them (a child process, so nothing leaks)."""
    try:
        p = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                           cwd=tempfile.gettempdir())
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError, OSError) as err:
        return {"cuda_available": False, "torch_error": f"probe failed: {type(err).__name__}"}


def vkey(version: str | None) -> tuple[int, ...]:
    out = []
    for part in re.split(r"[.+\-]", version or ""):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def unzip_wheels(files: list[Path], target: Path) -> None:
    """`pip install --target` without pip: a wheel's files, its .data/purelib|platlib moved to
    the top (scripts, headers and data files are not needed on PYTHONPATH)."""
    for f in files:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                if info.is_dir() or not parts[-1]:
                    continue
                dest = target.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))


class Check:
    def __init__(self, args: argparse.Namespace, env_info: dict) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.dry = args.allow_cpu and not env_info.get("cuda_available")
        self.small = args.small or self.dry
        self.python = sys.executable
        self.wheels = Path(args.wheels).resolve()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.tmp = Path(tempfile.mkdtemp(prefix="secateur-gpucheck-"))
        self.site = self.tmp / "site"
        self.site_on_path = False
        self.res: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": self.dry,
                                   "small": self.small, "budget_s": args.budget, "argv": sys.argv[1:],
                                   "git": self._git()},
                          "env": env_info, "stages": {}}

    # ---- helpers -----------------------------------------------------------------------
    @staticmethod
    def _git() -> dict:
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "secateur", "tests"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return {"commit": head or None, "dirty": bool(dirty)}
        except (OSError, subprocess.TimeoutExpired):
            return {"commit": None, "dirty": None}

    def env(self, site: bool | None = None) -> dict:
        env = dict(os.environ)
        paths = [str(REPO)] + ([str(self.site)] if (self.site_on_path if site is None else site) else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
        env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
        env.pop("SECATEUR_BACKEND", None)      # Triton on CUDA tensors, the torch path on CPU ones
        if self.dry:
            env.update(DS_ACCELERATOR="cpu", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
            cache = REPO / ".cache" / "torch_extensions"       # `make warm`'s DeepSpeed op cache
            if "TORCH_EXTENSIONS_DIR" not in env and cache.is_dir():
                env["TORCH_EXTENSIONS_DIR"] = str(cache)
        else:
            env["DS_ACCELERATOR"] = "cuda"
            env.pop("TRITON_INTERPRET", None)
            env["TORCH_EXTENSIONS_DIR"] = str(self.tmp / "torch_extensions")   # no stale CPU builds
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, cmd: list[str], log: Path, timeout: float, env: dict | None = None,
             cwd: Path | None = None) -> tuple[int | None, bool]:
        """Run cmd (own process group), output appended to log; (returncode, timed_out)."""
        timeout = max(1.0, min(timeout, self.left()))
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or self.env(),
                                 cwd=cwd or REPO, start_new_session=True)
            try:
                return p.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(p.pid, sig)
                        p.wait(timeout=wait)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
                f.write(f"\n[gpu-check] killed after {timeout:.0f} s (stage timeout)\n")
                return None, True

    def stage(self, name: str, fn) -> None:
        t0 = time.monotonic()
        log = self.out / "logs" / f"{name}.log"
        limit = min(STAGE_TIMEOUTS[name], self.left())
        if name not in self.args.stages:
            st = {"status": "skipped", "note": "not selected (--stages)"}
        elif limit < 5:
            st = {"status": "skipped", "note": "no time left in the budget"}
        else:
            try:
                st = fn(log, limit)
            except Exception as err:       # a bug here must not cost the other stages
                st = {"status": "failed", "note": f"gpu-check error: {type(err).__name__}: {err}"}
        st["seconds"] = round(time.monotonic() - t0, 1)
        st["timeout_s"] = round(limit, 1)
        if log.is_file():
            st["log"] = str(log.relative_to(self.out))
        self.res["stages"][name] = st
        print(f"[gpu-check] {name}: {st['status']} ({st['seconds']:.1f} s) {st.get('note', '')}".rstrip(),
              flush=True)
        if st["status"] not in ("ok", "skipped") and log.is_file():   # the cause, where only stdout is seen
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"    | {line[:240]}" for line in tail), flush=True)
        self.save()

    def save(self) -> None:
        self.res["meta"]["seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.res, indent=1, default=str) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(self.res))

    # ---- stages ------------------------------------------------------------------------
    def install(self, log: Path, limit: float) -> dict:
        end = time.monotonic() + limit
        manifest_path = self.wheels / "manifest.json"
        if not manifest_path.is_file():
            return {"status": "failed", "note": f"no wheel set at {self.wheels}: run `make gpu-wheels` on a "
                                                "machine with network and carry the folder (gpu-wheels)"}
        manifest = json.loads(manifest_path.read_text())
        self.res["meta"]["wheels_commit"] = (manifest.get("git") or {}).get("commit")
        self.res["meta"]["wheels_created"] = manifest.get("created")
        bad = [w["file"] for w in manifest["wheels"]
               if not (self.wheels / w["file"]).is_file() or sha256(self.wheels / w["file"]) != w["sha256"]]
        if bad:
            return {"status": "failed", "note": f"wheel files missing or changed: {', '.join(bad)}"}
        st: dict = {"status": "ok", "wheels": len(manifest["wheels"])}
        self.site.mkdir()
        if self.dry:
            # this interpreter is not the target one: install the whole set *for* cp312 (pip checks
            # every tag), but keep it off PYTHONPATH; the stages use this environment's packages
            chosen = manifest["wheels"]
            plat = [a for p in PLATFORMS for a in ("--platform", p)]
            extra = ["--python-version", TARGET_PYTHON, "--implementation", "cp", "--only-binary=:all:", *plat]
        else:
            names = [w["name"] for w in manifest["wheels"]]
            raw = subprocess.run([self.python, "-c", INSTALLED, *names], capture_output=True, text=True,
                                 cwd=self.tmp, timeout=60).stdout
            have = json.loads(raw.strip().splitlines()[-1])
            chosen, kept = [], {}
            for w in manifest["wheels"]:
                mine = have.get(w["name"])
                if w["name"] == "secateur" or mine is None or vkey(mine) < vkey(w["version"]):
                    chosen.append(w)
                else:
                    kept[w["name"]] = mine
            st["kept"] = kept
            extra = []
        st["installed"] = [f"{w['name']}=={w['version']}" for w in chosen]
        files = [str(self.wheels / w["file"]) for w in chosen]
        pip_ok = subprocess.run([self.python, "-m", "pip", "--version"], capture_output=True,
                                timeout=60).returncode == 0
        if pip_ok:
            rc, timed_out = self.call([self.python, "-m", "pip", "install", "--no-index", "--no-deps",
                                       "--no-compile", "--disable-pip-version-check", "--target",
                                       str(self.site), *extra, *files], log, end - time.monotonic())
            if rc != 0:
                return {**st, "status": "timeout" if timed_out else "failed", "note": "pip install failed"}
        elif self.dry:
            return {**st, "status": "failed", "note": "no pip in this python"}
        else:
            unzip_wheels([Path(f) for f in files], self.site)
            st["method"] = "unzip (no pip in this python)"
        # the deployed set on its own (the machine's packages plus DIR, not the source tree)
        env = self.env(site=not self.dry)
        env["PYTHONPATH"] = str(self.site) if not self.dry else str(REPO)
        rc, timed_out = self.call([self.python, "-c", IMPORT_CHECK, *REQUIRED_IMPORTS, *OPTIONAL_IMPORTS],
                                  log, end - time.monotonic(), env=env, cwd=self.tmp)
        found = [ln for ln in log.read_text().splitlines() if ln.startswith("IMPORT_CHECK ")]
        imports = json.loads(found[-1][len("IMPORT_CHECK "):]) if found else {}
        st["imports"] = imports
        for mod in ("deepspeed", "pydantic"):
            self.res["env"][mod] = imports.get(mod, {}).get("version")
        missing = [m for m in REQUIRED_IMPORTS if not imports.get(m, {}).get("ok")]
        optional = [m for m in (*OPTIONAL_IMPORTS, "greedy_projective.cu") if not imports.get(m, {}).get("ok")]
        self.site_on_path = not self.dry
        notes = [f"{len(chosen)} of {len(manifest['wheels'])} wheels installed"
                 + (" for cp312 (dry run: not importable by this python)" if self.dry else "")]
        if not self.dry:
            notes.append(f"{len(st['kept'])} kept (the machine has them)")
        if missing:
            st["status"] = "failed"
            notes.append(f"import failed: {', '.join(missing)}")
        if optional:
            notes.append(f"not usable from the wheel set: {', '.join(optional)}")
        if timed_out:
            st["status"] = "timeout"
        st["note"] = "; ".join(notes)
        return st

    def tests(self, log: Path, limit: float) -> dict:
        jsonl = self.out / "tests.jsonl"
        jsonl.unlink(missing_ok=True)
        env = self.env()
        env["SECATEUR_GPUCHECK_TESTS_JSONL"] = str(jsonl)
        rc, timed_out = self.call([self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                                   "secateur.gpucheck.pytest_plugin", *KERNEL_TEST_FILES], log, limit, env=env)

        def is_device(nodeid: str) -> bool:
            return nodeid.startswith("tests/test_kernels.py") or "on_gpu" in nodeid

        agg = aggregate_tests(jsonl, is_device)
        self.res["tests"] = agg
        d, h = agg["device"], agg["host"]
        ok = (d["total"] > 0 and d.get("passed", 0) > 0 and not d.get("failed") and not d.get("error")
              and not d.get("unfinished") and (self.dry or not d.get("skipped")))
        note = (f"device {d.get('passed', 0)}/{d['total']} passed"
                + (f", {d['skipped']} skipped" if d.get("skipped") else "")
                + f"; host-side {h.get('passed', 0)}/{h['total']} passed")
        if h.get("failed") or h.get("error"):
            note += " (host-side failures: nvcc or g++ missing on this machine?)"
        status = "timeout" if timed_out else ("ok" if ok else "failed")
        return {"status": status, "note": note, "returncode": rc}

    def bench(self, log: Path, limit: float) -> dict:
        out = self.out / "bench.json"
        cmd = [self.python, "-m", "secateur.gpucheck.bench", "--out", str(out)] + (["--small"] if self.small else [])
        rc, timed_out = self.call(cmd, log, limit)
        if out.is_file():
            self.res["bench"] = json.loads(out.read_text())
        errors = (self.res.get("bench") or {}).get("errors") or {}
        note = f"sections failed: {', '.join(errors)}" if errors else ""
        return {"status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"), "note": note,
                "returncode": rc}

    def _train(self, key: str, log: Path, limit: float, extra: list[str]) -> dict:
        out, run_dir = self.out / key, self.tmp / f"run-{key}"
        data = self.wheels / "fashion-mnist"
        cmd = [self.python, "-m", "secateur.gpucheck.train", "--out", str(out), "--run-dir", str(run_dir),
               *(["--data", str(data)] if data.is_dir() else []), *(["--small"] if self.small else []), *extra]
        rc, timed_out = self.call(cmd, log, limit)
        result_file = out / "result.json"
        if result_file.is_file():
            result = json.loads(result_file.read_text())
        else:       # killed: what the run directory says so far
            result = {"status": "timeout" if timed_out else "failed", **run_dir_result(run_dir)}
            if timed_out:
                out.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.csv", "events.jsonl"):
                    if (run_dir / name).is_file():
                        shutil.copy2(run_dir / name, out / name)
        self.res[key] = result
        status = "timeout" if timed_out else result.get("status", "failed")
        if status == "skipped":
            return {"status": "skipped", "note": result.get("reason", "")[:200]}
        d = result.get("dist", {})
        note = (f"{result.get('steps_done', 0)} steps, {result.get('prune_events', 0)} events, "
                f"backend {d.get('backend')}")
        s = result.get("summary")
        if s:
            note += (f", step time early {1e3 * s['step_time_early_s']:.2f} ms -> late "
                     f"{1e3 * s['step_time_late_s']:.2f} ms")
        if result.get("error"):
            note += f"; {result['error'][:150]}"
        if status == "ok" and not self.dry and d.get("backend") != "nccl":
            status, note = "failed", note + "; expected NCCL on a GPU"
        return {"status": status, "note": note, "returncode": rc}

    def train(self, log: Path, limit: float) -> dict:
        return self._train("train", log, limit, ["--steps", str(self.args.steps)] if self.args.steps else [])

    def train_bf16(self, log: Path, limit: float) -> dict:
        return self._train("train_bf16", log, limit, ["--precision", "bf16"] + ([] if self.small else ["--steps", "300"]))

    def train_fp16(self, log: Path, limit: float) -> dict:
        # a CPU emulates fp16 convolutions (~7 s a step here): the dry run checks one step with an event
        return self._train("train_fp16", log, limit, ["--precision", "fp16", "--steps", "1" if self.small else "300"])

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        mode = "dry run on CPU (Triton interpreter, small shapes)" if self.dry else f"GPU {self.res['env'].get('gpu')}"
        print(f"[gpu-check] {mode}; budget {self.args.budget:.0f} s; results in {self.out}", flush=True)
        try:
            for name in STAGES:
                self.stage(name, getattr(self, name))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        failed = [n for n, s in self.res["stages"].items() if s["status"] not in ("ok", "skipped")]
        self.res["verdict"] = "FAIL: " + ", ".join(failed) if failed else "pass"
        self.save()
        print(summary_markdown(self.res), end="", flush=True)
        print(f"[gpu-check] {self.res['verdict']} in {self.res['meta']['seconds']:.0f} s; "
              f"wrote {self.out}/results.json and summary.md", flush=True)
        return EXIT_FAILED if failed else EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m secateur.gpucheck",
                                 description="prove secateur's kernels on a CUDA machine (see README, GPU check)")
    ap.add_argument("--out", required=True, help="output folder (results.json, summary.md, logs/)")
    ap.add_argument("--wheels", default=str(REPO / "gpu-wheels"), help="the wheel set (make gpu-wheels)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without a GPU, run everything on the CPU (Triton interpreter): the dry run")
    ap.add_argument("--small", action="store_true", help="small shapes and a 30-step training run")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S})")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    ap.add_argument("--steps", type=int, help="training steps (default: the quickstart's)")
    args = ap.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.allow_cpu:
        reason = no_gpu_device()
        if reason:
            print(f"gpu-check: no CUDA GPU on this machine ({reason}); nothing was run", flush=True)
            return EXIT_NO_GPU
    info = probe(sys.executable)
    if not info.get("cuda_available") and not args.allow_cpu:
        why = info.get("torch_error") or f"torch {info.get('torch')} sees no CUDA device"
        print(f"gpu-check: no CUDA GPU usable from {sys.executable} ({why}); nothing was run", flush=True)
        return EXIT_NO_GPU
    return Check(args, info).run()
