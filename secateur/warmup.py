"""Warm DeepSpeed's op cache: the first `init_distributed` JIT-builds `deepspeed_shm_comm`.

Run once per machine (`make warm`) so tests and the demo do not pay ~75 s on first use.

Build locks. torch JIT-builds an op in TORCH_EXTENSIONS_DIR/<op>/ under a `lock` file there.
torch before 2.14 uses a lock whose mere existence blocks (FileBaton): a build killed half-way
leaves the file behind and every later run waits for it forever, silently. `check_build_locks`
(called before DeepSpeed starts, by `init_distributed` and here) finds such locks: one that no
process on this machine holds open is stale (its owner is gone) and is removed with a one-line
warning; one that a live process holds is reported in one line (a build in progress, or a
stopped process). Newer torch holds an OS lock (flock) that the kernel drops when its owner
dies; a leftover file then blocks nobody and is left alone, and a held lock is reported.
Owners are found through /proc (Linux, processes of the same user). Without /proc a lock is
taken for stale once neither it nor its build folder has changed for `idle_s` seconds. A cache
shared between machines (a network home folder) cannot see other machines' builders: give each
machine its own TORCH_EXTENSIONS_DIR.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def extensions_root() -> Path:
    """Where torch JIT-builds C++ ops: TORCH_EXTENSIONS_DIR, else torch's per-user default
    (whose op folders sit one level deeper, under a python/accelerator folder)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def existence_locks() -> bool:
    """True when this torch's JIT build lock blocks by the file's mere existence (FileBaton),
    False when it is an OS lock released when its holder dies (torch >= 2.14)."""
    from torch.utils import cpp_extension

    return not hasattr(cpp_extension, "FileLock")


def lock_holders(path: Path) -> set[int] | None:
    """Ids of the processes on this machine that hold `path` open (None: /proc is unavailable)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target, me, pids = os.path.realpath(path), os.getpid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = list(os.scandir(f"/proc/{entry.name}/fd"))
        except OSError:
            continue                       # gone, or another user's process
        for fd in fds:
            try:
                if os.readlink(fd.path) == target:
                    pids.add(int(entry.name))
                    break
            except OSError:
                pass
    return pids


def _flock_held(path: Path) -> bool:
    """Whether another process holds an OS lock (flock) on `path`."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _idle_seconds(folder: Path) -> float:
    """Seconds since anything in `folder` (the lock included) last changed."""
    newest = max((p.stat().st_mtime for p in [folder, *folder.iterdir()] if p.exists()), default=0.0)
    return time.time() - newest


def check_build_locks(root: Path | None = None, existence: bool | None = None,
                      idle_s: float = 600.0) -> list[Path]:
    """Find torch extension build locks under `root` (default: `extensions_root()`) before
    DeepSpeed builds or loads its ops; remove stale ones (module docstring) with a one-line
    warning each, and report in one line a lock that a live process holds.

    existence: whether locks block by existing (default: what this torch does). Returns the
    lock files removed."""
    root = Path(root) if root is not None else extensions_root()
    if not root.is_dir():
        return []
    existence = existence_locks() if existence is None else existence
    removed = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        if not existence:
            if _flock_held(lock):
                _say(f"note: another process is building the torch extension in {lock.parent} "
                     f"(lock {lock}); waiting for it")
            continue
        holders = lock_holders(lock)
        if holders:
            _say(f"note: process {', '.join(map(str, sorted(holders)))} holds the torch "
                 f"extension build lock {lock}; waiting for it (end that process if it hangs)")
            continue
        if holders is None and _idle_seconds(lock.parent) < idle_s:
            _say(f"warning: torch extension build lock {lock} exists and its owner cannot be "
                 f"checked here; remove it if no build is running")
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue                       # its owner finished meanwhile
        removed.append(lock)
        _say(f"warning: removed a stale torch extension build lock {lock} (its owner is gone: "
             f"a build was killed); the op is built again")
    return removed


def shm_op_missing(root: Path | None = None) -> bool:
    """True when DeepSpeed's CPU communication op has not been built into `root` yet (the
    first CPU run then spends one to two minutes compiling it)."""
    root = Path(root) if root is not None else extensions_root()
    return not any([*root.glob(f"{SHM_OP}*/{SHM_OP}*.so"), *root.glob(f"*/{SHM_OP}*/{SHM_OP}*.so")])


def prepare_op_cache(cpu: bool) -> None:
    """Before DeepSpeed starts: clear stale build locks; on CPU, say in one line when its op is
    about to be compiled (a silent minute or two otherwise looks like a hang)."""
    check_build_locks()
    if cpu and shm_op_missing():
        _say(f"note: building DeepSpeed's {SHM_OP} op into {extensions_root()} (once, 1-2 minutes)")


def main() -> None:
    """Build DeepSpeed's op once (a 1-rank process group on this machine)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        os.environ.setdefault(key, value)
    import torch

    prepare_op_cache(cpu=not torch.cuda.is_available())
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    dist.barrier()
    dist.destroy_process_group()
    print("deepspeed op cache warm:", os.environ.get("TORCH_EXTENSIONS_DIR", "(default)"))


if __name__ == "__main__":
    main()
