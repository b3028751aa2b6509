"""Run folders that never lose a user's work: what secateur wrote there, and who is writing.

Besides what a run writes (`RUN_FILES` of secateur.trainer.loop), a run folder RUN holds:

    .secateur-run.json   the manifest: every path (relative to RUN) that secateur wrote there
                         (the run's own files, and what `report` and `export` added). A fresh
                         `train --overwrite` replaces exactly these and nothing else.
    .secateur.lock       while a process writes the run: its pid, host and start time. The
                         process holds it with flock until it exits (even a SIGKILLed process
                         lets go), and deletes it on a normal exit. A lock left by a process that
                         is gone is taken over with a one-line warning.
    .secateur-replaced/  only while a fresh `train --overwrite` starts: the earlier run, moved
                         aside; put back when the new run fails to start, deleted once it runs.

The rules, checked before anything on disk changes (each refusal is one `RunFolderError` line):

- `train --out RUN`: RUN absent or empty: a new run. RUN holds a previous secateur run: refused
  without --overwrite; with it, the paths the manifest names are replaced (for a run written
  before manifests existed: the files a training run writes), every other file stays. RUN holds
  other files: refused without --overwrite; with it they stay, and a file of the user's with a
  name a run writes (config.yaml, metrics.csv, ...) is refused rather than written over. A
  --config file inside RUN that the run would write over or delete is refused.
- `prune --out` / `export --out`: absent or empty only (an earlier export: export --overwrite);
  prune's --out may not be its source run.
- Everywhere: RUN is a file, RUN (or its nearest existing parent) is not writable, or another
  live process holds RUN's lock: refused.

Under a multi-rank launch only rank 0 checks, locks and writes; the outcome is broadcast, so
every rank raises the same error or none does.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from secateur.trainer.checkpoint import CKPT_DIR, FORMAT as CKPT_FORMAT, CheckpointError

MANIFEST = ".secateur-run.json"
MANIFEST_FORMAT = "secateur-run/1"
LOCK = ".secateur.lock"
ASIDE = ".secateur-replaced"
EXPORT_MARKER = "secateur.json"
# what a training run wrote before manifests existed: a fresh --overwrite run replaces these in
# such a folder (report.md, plots/ and export/ may be the user's there, so they stay)
LEGACY_RUN_FILES = ("checkpoints", "ranks", "metrics.csv", "events.jsonl", "config.yaml",
                    "summary.json")


class RunFolderError(CheckpointError):
    """A folder that cannot be used as asked (one-line message; the CLI exits 2)."""


def run_files() -> tuple[str, ...]:
    """Top-level names a training run writes (secateur.trainer.loop.RUN_FILES)."""
    from secateur.trainer.loop import RUN_FILES

    return tuple(RUN_FILES)


# ---- what is in a folder ------------------------------------------------------------------
def _entries(folder: Path) -> list[str]:
    """Top-level names in `folder`, secateur's lock left out, hidden names last ([] when it
    does not exist)."""
    try:
        return sorted((n for n in os.listdir(folder) if n != LOCK), key=lambda n: (n[:1] == ".", n))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _safe_rel(entry: Any) -> str | None:
    """`entry` as a clean relative POSIX path inside a folder, or None (absolute, '..', empty)."""
    if not isinstance(entry, str) or not entry or "\\" in entry or "\x00" in entry:
        return None
    p = PurePosixPath(entry)
    if p.is_absolute() or any(part in ("", ".", "..") for part in entry.split("/")):
        return None
    return p.as_posix()


def read_manifest(folder: str | Path) -> list[str] | None:
    """The paths the folder's manifest names (validated: relative, inside the folder), or None
    when there is no readable manifest."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        paths = data["paths"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(paths, list):
            return None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return sorted({p for p in map(_safe_rel, paths) if p is not None})


def _write_manifest(folder: Path, paths: Iterable[str]) -> None:
    data = {"format": MANIFEST_FORMAT,
            "about": "paths secateur wrote in this folder; `secateur train --overwrite` replaces "
                     "these and nothing else",
            "paths": sorted({p for p in map(_safe_rel, paths) if p is not None})}
    tmp = folder / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def record(folder: str | Path, paths: Iterable[str | Path]) -> None:
    """Add `paths` (relative to `folder`, or absolute paths inside it) to the folder's manifest,
    creating it when missing. Paths outside the folder are ignored."""
    folder = Path(folder)
    root = Path(os.path.abspath(folder))
    rels = []
    for p in map(Path, paths):
        if p.is_absolute():
            try:
                p = Path(os.path.abspath(p)).relative_to(root)
            except ValueError:
                continue
        rel = _safe_rel(p.as_posix())
        if rel is not None:
            rels.append(rel)
    _write_manifest(folder, (read_manifest(folder) or []) + rels)


def _is_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("format") == CKPT_FORMAT
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def folder_kind(folder: str | Path) -> str | None:
    """What secateur wrote `folder` as: "run", "export", "checkpoint" (one step's folder),
    "checkpoints" (a run's checkpoints folder), or None (anything else, or absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / MANIFEST).is_file() or (folder / ASIDE).is_dir() or \
            (folder / CKPT_DIR / "latest").is_file():
        return "run"
    if (folder / "config.yaml").is_file() and any(
            _exists(folder / n) for n in ("metrics.csv", "events.jsonl", CKPT_DIR)):
        return "run"
    if (folder / EXPORT_MARKER).is_file():
        return "export"
    if _is_checkpoint(folder):
        return "checkpoint"
    if (folder / "latest").is_file() and any(p.name.startswith("step_") for p in folder.iterdir()):
        return "checkpoints"
    return None


def owned(folder: str | Path) -> list[str]:
    """Relative paths secateur wrote in `folder` that exist: what its manifest names, or for a
    run written before manifests existed the files a training run writes; an interrupted
    start's `.secateur-replaced/` too. [] for a folder that is no run."""
    folder = Path(folder)
    if folder_kind(folder) != "run":
        return []
    listed = read_manifest(folder)
    if listed is None:
        listed = list(LEGACY_RUN_FILES)
    out = [p for p in listed if _exists(folder / p)]
    if (folder / ASIDE).is_dir():
        out.append(ASIDE)
    return sorted(set(out))


# folder_kind in words
_KIND_WORDS = {"run": "a secateur run", "export": "a secateur export",
               "checkpoint": "a secateur checkpoint", "checkpoints": "a run's checkpoints folder"}


def _describe_run(folder: Path) -> str:
    try:
        name = (folder / CKPT_DIR / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if name.startswith("step_") and name[5:].isdigit():
        return f"latest checkpoint at step {int(name[5:])}"
    return "no checkpoint yet"


# ---- checks (read only) ---------------------------------------------------------------------
def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse `path` when it is a file, or when it (or its nearest existing parent) is not a
    writable folder. Reads only."""
    path = Path(path)
    if _exists(path) and not path.is_dir():
        raise RunFolderError(f"{flag} {path} is a file, not a folder")
    probe = path
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only_fs(probe) else "no write permission"
        raise RunFolderError(f"{flag} {path}: {probe} is not writable ({why})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _config_hit(out: Path, config_path: str | Path | None, doomed: Iterable[str]) -> str | None:
    """The entry of `out` (a name the run writes, or a path it deletes) that holds `config_path`,
    or None when the config is elsewhere."""
    if config_path is None:
        return None
    try:
        rel = Path(config_path).resolve().relative_to(out.resolve())
    except (ValueError, OSError):
        return None
    parts = rel.parts
    for d in doomed:
        dp = PurePosixPath(d).parts
        if parts[:len(dp)] == dp:
            return d
    return None


def plan_fresh_run(out: str | Path, overwrite: bool = False,
                   config_path: str | Path | None = None) -> list[str]:
    """Check that a fresh training run may write into `out` (see the module docstring) and
    return the paths of an earlier run it replaces ([] for a new or empty folder). Reads only.
    Raises RunFolderError (one line)."""
    out = Path(out)
    check_writable(out)
    holder = lock_holder(out)
    if holder is not None:
        raise RunFolderError(f"{out} is in use by {holder}; wait for it to end or choose "
                             "another --out")
    names = _entries(out)
    writes = set(run_files())
    mine = owned(out)
    hit = _config_hit(out, config_path, sorted(writes | set(mine)))
    if hit is not None and names:
        what = "writes" if hit in writes else "would delete"
        raise RunFolderError(f"--config {config_path} lies inside --out {out}, in {hit}, which "
                             f"the run {what}; copy the config out of the folder first")
    if not names:
        return []
    kind = folder_kind(out)
    if kind in ("checkpoint", "checkpoints"):
        raise RunFolderError(f"{out} is {_KIND_WORDS[kind]}, inside a run; choose another --out")
    if not overwrite:
        if kind == "run":
            raise RunFolderError(f"{out} holds a previous secateur run ({_describe_run(out)}); "
                                 "pass --overwrite to replace it (only the files secateur wrote "
                                 "there are deleted) or choose another --out")
        what = _KIND_WORDS.get(kind or "", "no secateur run")
        raise RunFolderError(f"{out} is not empty and holds {what} ({len(names)} entries, e.g. "
                             f"{names[0]}); pass --overwrite to train into it anyway (files "
                             "secateur did not write stay) or choose another --out")
    top_mine = {p for p in mine if "/" not in p}
    clash = sorted(n for n in names if n in writes and n not in top_mine)
    if clash:
        raise RunFolderError(f"{out / clash[0]} was not written by secateur (no run manifest "
                             "names it) and a run would write over it; move it away or choose "
                             "another --out")
    return mine


def check_new_folder(out: str | Path, flag: str = "--out", source: str | Path | None = None,
                     replaceable: str | None = None, overwrite: bool = False) -> None:
    """Refuse `out` as the folder a command writes unless it is absent or empty. `source` (the
    run read from) is refused as well; a folder of kind `replaceable` (e.g. "export") is
    accepted with `overwrite`. Reads only. Raises RunFolderError (one line)."""
    out = Path(out)
    check_writable(out, flag)
    if source is not None and _exists(Path(source)) and out.resolve() == Path(source).resolve():
        raise RunFolderError(f"{flag} {out} is the source run itself; choose a new folder")
    holder = lock_holder(out)
    if holder is not None:
        raise RunFolderError(f"{out} is in use by {holder}; choose another {flag}")
    names = _entries(out)
    if not names:
        return
    kind = folder_kind(out)
    what = _KIND_WORDS.get(kind or "", "files of its own")
    if replaceable is not None and kind == replaceable:
        if overwrite:
            return
        raise RunFolderError(f"{flag} {out} holds an earlier {replaceable}; pass --overwrite to "
                             "replace it or choose a new folder")
    raise RunFolderError(f"{flag} {out} is not empty: it holds {what} ({len(names)} entries, "
                         f"e.g. {names[0]}); choose a new or empty folder")


def check_run_to_resume(run_dir: str | Path) -> None:
    """Refuse resuming `run_dir` when it is not a writable folder or another process holds its
    lock. Reads only. Raises RunFolderError (one line)."""
    run_dir = Path(run_dir)
    if _exists(run_dir) and not run_dir.is_dir():
        raise RunFolderError(f"run directory {run_dir} is a file, not a folder")
    if not run_dir.is_dir():
        return                       # checkpoint.latest says so in its own words
    check_writable(run_dir, "run directory")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunFolderError(f"{run_dir} is in use by {holder}; wait for it to end")


# ---- the lock -------------------------------------------------------------------------------
def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the lock's owner still runs: True/False on this host, None on another."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def _describe_owner(owner: dict[str, Any]) -> str:
    pid, host = owner.get("pid", "?"), owner.get("host", "?")
    since = owner.get("time")
    when = (" since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            if isinstance(since, (int, float)) else "")
    return f"process {pid} on {host}{when}"


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode()) if raw.strip() else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _flock(fd: int, shared: bool = False) -> bool | None:
    """Try to lock `fd` without waiting: True (got it), False (another holds it), None (the
    file system does not support flock)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None


@dataclass
class _Held:
    fd: int
    ino: int
    pid: int


_LOCKS: dict[str, _Held] = {}


def _key(folder: Path) -> str:
    return str(Path(os.path.abspath(folder)))


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock ("process 123 on host since ...") when another live process
    does; None when it is free, stale, or held by this process. Reads only."""
    folder = Path(folder)
    if _key(folder) in _LOCKS:
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        got = _flock(fd, shared=True)
        owner = _read_owner(fd)
        if got is True:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        if got is False:
            return _describe_owner(owner)
        alive = _owner_alive(owner) if owner else False
        return None if alive is False else _describe_owner(owner)
    finally:
        os.close(fd)


def acquire_lock(folder: str | Path) -> None:
    """Take `folder`'s lock for this process (the folder must exist); a no-op when this process
    holds it already. A lock whose owner is gone is taken over with a one-line warning. Raises
    RunFolderError when another live process holds it."""
    folder = Path(folder)
    key = _key(folder)
    if key in _LOCKS:
        return
    path = folder / LOCK
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            got = _flock(fd)
            owner = _read_owner(fd)
            if got is False:
                raise RunFolderError(f"{folder} is in use by {_describe_owner(owner)}; wait for "
                                     "it to end or choose another folder")
            if got is None and owner and _owner_alive(owner) is not False:
                raise RunFolderError(
                    f"{folder} is locked by {_describe_owner(owner)} ({path}); if that process "
                    "is gone, delete the lock file")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:             # its holder deleted it while we opened it: try again
                os.close(fd)
                continue
            if owner and owner.get("pid") not in (None, os.getpid()):
                print(f"warning: {folder}: taking over the lock of {_describe_owner(owner)}, "
                      "which is no longer running", file=sys.stderr, flush=True)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                  "start_ticks": _start_ticks(os.getpid()),
                  "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            _LOCKS[key] = _Held(fd, os.fstat(fd).st_ino, os.getpid())
            return
        except BaseException:
            if key not in _LOCKS:
                os.close(fd)
            raise
    raise RunFolderError(f"{folder}: could not take its lock ({path} keeps changing)")


def release_lock(folder: str | Path) -> None:
    """Let go of `folder`'s lock if this process holds it (the lock file is deleted)."""
    held = _LOCKS.pop(_key(Path(folder)), None)
    if held is None or held.pid != os.getpid():
        return
    path = Path(folder) / LOCK
    try:
        if os.stat(path).st_ino == held.ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(held.fd)


def drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the lock descriptors inherited from the
    parent without unlocking (the lock belongs to the parent's open file), so a SIGKILLed run
    leaves no child holding its folder's lock while the child notices and exits."""
    for key, held in list(_LOCKS.items()):
        if held.pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(held.fd)
            del _LOCKS[key]


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Create `folder` if needed and hold its lock inside the block (a command that writes a new
    folder: `prune`). A folder this call created is removed again when the lock is refused."""
    folder = Path(folder)
    created = not _exists(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        acquire_lock(folder)
    except BaseException:
        if created:
            folder.rmdir()
        raise
    try:
        yield folder
    finally:
        release_lock(folder)


@atexit.register
def _release_all() -> None:
    for key in list(_LOCKS):
        release_lock(key)


# ---- a run's folder, opened for writing ---------------------------------------------------------
@dataclass
class _Open:
    folder: Path
    main: bool
    created: bool = False                  # this open created the folder
    kept: set[str] = field(default_factory=set)       # top-level names left in place (the user's)
    moved: list[str] = field(default_factory=list)    # paths moved to ASIDE
    manifest_was: bytes | None = None      # resume: the manifest and config.yaml as they were
    config_was: bytes | None = None
    resume: bool = False
    armed: bool = False                    # from here on a failed start is undone
    handoff: bool = False
    started: bool = False


_OPEN: dict[str, _Open] = {}


def _agree(message: str | None, dist_info: Any) -> str | None:
    """Rank 0's outcome (an error message or None) on every rank."""
    if dist_info is None or dist_info.world_size <= 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def _outermost(paths: Iterable[str]) -> list[str]:
    """`paths` without those inside another listed path."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _set_aside(state: _Open, paths: list[str]) -> None:
    folder = state.folder
    aside = folder / ASIDE
    if ASIDE in paths:           # left by a start that was killed: the new --overwrite replaces it
        shutil.rmtree(aside)
        paths = [p for p in paths if p != ASIDE]
    if (folder / MANIFEST).is_file():
        paths = paths + [MANIFEST]
    paths = _outermost(paths)
    if not paths:
        return
    aside.mkdir()
    for p in paths:
        (aside / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / p, aside / p)
        state.moved.append(p)


def _restore(state: _Open) -> None:
    """Undo a start that failed: remove what it wrote, put the earlier run back."""
    folder = state.folder
    if not state.armed:
        return
    if state.resume:
        if state.config_was is not None:
            (folder / "config.yaml").write_bytes(state.config_was)
        if state.manifest_was is None:
            (folder / MANIFEST).unlink(missing_ok=True)
        return
    for name in set(run_files()) | {MANIFEST}:
        if name not in state.kept:
            _remove(folder / name)
    aside = folder / ASIDE
    for p in reversed(state.moved):
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(aside / p, folder / p)
    if state.moved:
        shutil.rmtree(aside, ignore_errors=True)


def _open_main(folder: Path, resume: bool, overwrite: bool, config_path: str | Path | None) -> _Open:
    state = _Open(folder, main=True, resume=resume)
    if resume:
        check_run_to_resume(folder)
        acquire_lock(folder)
        try:
            manifest = folder / MANIFEST
            state.manifest_was = manifest.read_bytes() if manifest.is_file() else None
            config = folder / "config.yaml"
            state.config_was = config.read_bytes() if config.is_file() else None
            state.armed = True
            if state.manifest_was is None:          # a run written before manifests existed
                _write_manifest(folder, run_files())
        except BaseException:
            release_lock(folder)
            raise
        return state
    plan_fresh_run(folder, overwrite, config_path)
    state.created = not _exists(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        acquire_lock(folder)
        plan = plan_fresh_run(folder, overwrite, config_path)   # again, now that nobody else writes
        state.kept = {n for n in _entries(folder) if n not in plan and n != MANIFEST}
        state.armed = True
        _set_aside(state, plan)
        _write_manifest(folder, run_files())
    except BaseException:
        try:
            _restore(state)
        finally:
            _close_folder(state)
        raise
    return state


def _close_folder(state: _Open) -> None:
    release_lock(state.folder)
    if state.created:
        try:
            state.folder.rmdir()                  # only when the failed start left it empty
        except OSError:
            pass


def open_run(run_dir: str | Path, dist_info: Any = None, resume: bool = False,
             overwrite: bool = False, config_path: str | Path | None = None,
             handoff: bool = False) -> None:
    """Open RUN_DIR for a run on every rank: rank 0 checks the folder (module docstring), takes
    its lock, and for a fresh run moves an earlier run aside (`overwrite`) and writes the
    manifest; every rank then raises the same RunFolderError, or none does.

    `handoff=True` (the CLI, which opens the folder before building the Trainer): the next
    call for this folder (the Trainer's own) returns at once. After the Trainer is built call
    `started`; `close_run` at the end (a start that failed is undone there)."""
    folder = Path(run_dir)
    key = _key(folder)
    state = _OPEN.get(key)
    if state is not None and state.handoff:
        state.handoff = False
        return
    main = dist_info is None or dist_info.is_main
    message = None
    if main:
        try:
            state = _open_main(folder, resume, overwrite, config_path)
        except RunFolderError as err:
            message = str(err)
        except OSError as err:
            message = f"{folder}: {err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
        except Exception as err:          # said on every rank, rather than leaving them waiting
            message = f"{folder}: could not open the run folder: {type(err).__name__}: {err}"
    else:
        state = _Open(folder, main=False, resume=resume)
    message = _agree(message, dist_info)
    if message is not None:
        raise RunFolderError(message)
    state.handoff = handoff
    _OPEN[key] = state


def started(run_dir: str | Path) -> None:
    """The run in RUN_DIR is built and about to train: an earlier run set aside is deleted."""
    state = _OPEN.get(_key(Path(run_dir)))
    if state is None or state.started:
        return
    state.started = True
    if state.main and state.moved:
        shutil.rmtree(state.folder / ASIDE, ignore_errors=True)


def close_run(run_dir: str | Path) -> None:
    """The run in RUN_DIR ended (or failed): a start that failed before `started` is undone (an
    earlier run set aside comes back, byte for byte), and the lock is released."""
    state = _OPEN.pop(_key(Path(run_dir)), None)
    if state is None or not state.main:
        return
    try:
        if not state.started:
            _restore(state)
    finally:
        _close_folder(state)


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is a write the user can fix: disk full, quota, read-only, permissions."""
    return isinstance(err, OSError) and err.errno in (
        errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
