"""Checkpoints on disk: finding them, reading and writing safetensors, and never a half-written one.

A checkpoint is a directory in Hugging Face layout (config.json, model.safetensors or shards
with an index, tokenizer files). A training run writes a run directory of them (paper §4
trains for hours; a run must survive a kill at any moment):

    out/stage1/
        step-000100/      complete checkpoints, each written to a temp dir and renamed
        step-000200/
        latest -> step-000200     a symlink, replaced by one rename (never missing)
        metrics.jsonl

Anything that takes a checkpoint (`--init-from`, `--checkpoint`) accepts the run directory and
reads its newest complete checkpoint. Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json"]
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint after `step` optimizer steps: step-000123."""
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------- finding

def run_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (a step dir only ever appears
    complete: it is renamed into place after everything in it was written)."""
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in run.iterdir() if (m := STEP_DIR.match(d.name)) and (d / "config.json").is_file()]
    return [d for _, d in sorted(found)]


def local_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint a local directory stands for: itself if it holds config.json, else the
    newest complete checkpoint of the training run it is.

    Raises FileNotFoundError with one line when it is neither (or does not exist)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r}: no such directory")
    if (p / "config.json").is_file():
        return p
    steps = run_checkpoints(p)
    if steps:
        return steps[-1]
    raise FileNotFoundError(f"{str(p)!r}: neither a checkpoint (no config.json) nor a training run with a "
                            "complete step-* checkpoint")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint (or training run) directory, or a hub id downloaded to the HF cache.

    The hub is only asked when the string looks like "org/name" and no such local path
    exists; then a failure names both (a mistyped local path reads as a missing directory,
    not as a hub problem). Raises FileNotFoundError with one line.
    """
    p = Path(path_or_hub_id)
    s = str(path_or_hub_id)
    if p.exists():
        return local_checkpoint(p)
    hub_like = s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))
    if not hub_like:
        raise FileNotFoundError(f"{s!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; the user needs one line
        parent = p.parent
        near = f" ({parent}/ holds: {', '.join(sorted(x.name for x in parent.iterdir())[:8])})" if parent.is_dir() else ""
        raise FileNotFoundError(f"{s!r}: no such local directory{near}, and no hub model of that name "
                                f"({type(e).__name__})") from None


# ----------------------------------------------------------------------------- safetensors

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards with an index).

    Raises FileNotFoundError when there are no weights, ValueError (one line) when a file is
    truncated or not safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        try:
            with safe_open(path / f, framework="pt") as fh:
                for k in fh.keys():
                    state[k] = fh.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / f}: unreadable safetensors file ({str(e).splitlines()[0]}); "
                             "the checkpoint is incomplete or corrupt") from None
    return state


def write_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    """Write tensors as model.safetensors, or as shards of at most max_shard_bytes with an index."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_json(path: Path, obj) -> None:
    """JSON file written to a temp name and renamed over `path` (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- atomic writes

def _default_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(parent: Path, pattern: str) -> None:
    # Temp dirs and links left by a killed writer (one writer per directory is assumed).
    for stale in parent.glob(pattern):
        if stale.is_symlink() or stale.is_file():
            stale.unlink(missing_ok=True)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class atomic_dir:
    """Context manager: yields a fresh temp dir that becomes `target` when the block succeeds.

    A new `target` appears by one rename. An existing one is swapped with the new one in one
    step where the OS can (Linux renameat2), so `target` is never missing; elsewhere by two
    renames. Files already in `target` that the block does not write (a tokenizer saved
    separately) are carried over, stale weights are not. On an exception the temp dir is
    removed and `target` is left as it was; temp dirs left by a killed writer are removed by
    the next write. Directories get the default permissions (umask), not mkdtemp's 0700.
    """

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, f".{self.target.name}.tmp-*")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=parent))
        os.chmod(self.tmp, _default_dir_mode())
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        target = self.target
        if target.is_dir():
            for f in target.iterdir():
                stale_weights = f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"
                if f.is_file() and not stale_weights and not (self.tmp / f.name).exists():
                    shutil.copy2(f, self.tmp / f.name)
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.is_dir() and not target.is_symlink() and _exchange(self.tmp, target):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the old checkpoint
        else:
            old = target.with_name(f".{target.name}.tmp-old")
            if target.exists() or target.is_symlink():
                os.replace(target, old)
            os.replace(self.tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
        return False


def publish(run: Path, name: str, write: Callable[[Path], None], keep: int) -> Path:
    """Add checkpoint `name` to run directory `run` and point `run/latest` at it.

    write(tmp) fills a temp directory, which is renamed to run/name only when complete; then
    a new symlink replaces `latest` by one rename. Of the step-* checkpoints, the newest
    `keep` stay. At every moment `run` holds complete checkpoints only and `latest` names one
    of them. Returns run/name. Raises ValueError if keep < 1.
    """
    if keep < 1:
        raise ValueError(f"publish: keep must be >= 1, got {keep}")
    run.mkdir(parents=True, exist_ok=True)
    _remove_stale(run, ".step-*.tmp-*")
    _remove_stale(run, f".{LATEST}.tmp")
    with atomic_dir(run / name) as tmp:
        write(tmp)
    link = run / f".{LATEST}.tmp"
    os.symlink(name, link)
    os.replace(link, run / LATEST)
    _fsync_dir(run)
    for old in run_checkpoints(run)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return run / name
