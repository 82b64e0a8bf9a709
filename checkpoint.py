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
Also here: a Qwen3's HF files (config and tensor checks, model.Qwen3.from_pretrained and
save_pretrained call them) and the memento tokens' vocabulary setup (paper §A.2.1).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blocks import BLOCK_END, BLOCK_START, SUMMARY_END, SUMMARY_START

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

# ----------------------------------------------------------------------------- HF model files


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of a model's config and weights (paper §A.2.2: results must name the weights
    they came from): config.json's dict, then every tensor of the state dict in name order, its
    name, dtype, shape and bytes. Two checkpoints with the same fingerprint hold the same
    weights wherever they sit on disk; retraining into the same directory changes it. Reads
    every weight once (about 10 s for 16 GB). Raises nothing."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_model(model_cls, config_cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """A model.Qwen3 from an HF checkpoint (single or sharded safetensors), a training run or a
    hub id; what Qwen3.from_pretrained does. model_cls / config_cls: model.Qwen3 and
    model.Qwen3Config (passed in, so that this module does not import the model).

    Weights are read with safetensors (no pickle) and cast to `dtype`; the config's
    torch_dtype keeps the dtype they were stored in. Raises FileNotFoundError for an unknown
    path or id, ValueError for a bad or non-Qwen3 config, an unreadable weights file, a
    missing tensor, a tensor of the wrong shape or an unexpected tensor.
    """
    path = resolve_checkpoint(path_or_hub_id)
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: not a config object")
    cfg = config_cls.from_dict(raw, source=str(cfg_file))
    with torch.device("meta"):
        model = model_cls(cfg)
    state = read_safetensors(path)
    expected = dict(model.state_dict(keep_vars=True))
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy
    state = model_cls.state_from_hf(state, cfg, str(path))  # HF's tensor names -> the model's fused ones
    for name, p in expected.items():
        if name not in state:
            raise ValueError(f"{path}: checkpoint is missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(p.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:3]}; is this a Qwen3 checkpoint?")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device)


def write_model(model, out_dir: Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                state: dict | None = None) -> None:
    """Write config.json and the weights of a model.Qwen3 into an existing directory (no
    atomicity here: Qwen3.save_pretrained and training checkpoints wrap it in atomic_dir).

    state: the weights to write, by parameter name (default the model's state_dict; a sharded
    training run passes the full state it gathered), written under Hugging Face's tensor names
    (the model's state_to_hf: fused projections split). dtype: the stored dtype; default
    config.torch_dtype, i.e. the dtype the weights came in (a bf16 hub checkpoint trained in
    fp32 is saved in bf16, a model built here in fp32 in fp32). With max_shard_bytes, weights
    are split into model-0000k-of-0000n.safetensors plus model.safetensors.index.json.
    Raises ValueError for a config.torch_dtype or dtype that is not a float dtype.
    """
    if dtype is None:
        dtype = getattr(torch, str(model.config.torch_dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"save: dtype {dtype!r} is not a floating-point torch dtype (config.torch_dtype="
                         f"{model.config.torch_dtype!r}); pass dtype=torch.bfloat16 or torch.float32")
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    state = type(model).state_to_hf(state or model.state_dict(), model.config)  # Hugging Face's names on disk
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_safetensors(state, out_dir, max_shard_bytes)


# ----------------------------------------------------------------------------- vocabulary (§A.2.1)


def resize_token_embeddings(model, new_vocab: int) -> None:
    """Grow (never shrink) a model.Qwen3's embedding and untied lm_head to `new_vocab` rows.

    New rows are zero here; `add_memento_tokens` initializes the ones it uses.
    Raises ValueError when asked to shrink.
    """
    old = model.config.vocab_size
    if new_vocab < old:
        raise ValueError(f"resize_token_embeddings: cannot shrink vocab from {old} to {new_vocab}")
    if new_vocab == old:
        return
    emb = model.model.embed_tokens.weight
    new_emb = nn.Embedding(new_vocab, emb.shape[1], device=emb.device, dtype=emb.dtype)
    with torch.no_grad():
        new_emb.weight.zero_()
        new_emb.weight[:old] = emb
    model.model.embed_tokens = new_emb
    if model.config.tie_word_embeddings:
        model.lm_head.weight = new_emb.weight
    else:
        w = model.lm_head.weight
        head = nn.Linear(w.shape[1], new_vocab, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.weight[:old] = w
        model.lm_head = head
    model.config.vocab_size = new_vocab


# The words each memento token's embedding starts from (paper §A.2.1).
MEMENTO_TOKEN_SEEDS = {
    BLOCK_START: ["block", "start", "begin", "section", "step"],
    BLOCK_END: ["block", "end", "finish", "section", "done"],
    SUMMARY_START: ["summary", "summarize", "brief", "recap", "overview"],
    SUMMARY_END: ["summary", "end", "finish", "done", "complete"],
}


def add_memento_tokens(model, tokenizer, noise_std: float = 0.01, seed: int = 0) -> dict[str, int]:
    """Register the four memento tokens and initialize their rows (paper §A.2.1).

    Each word is encoded in its mid-sentence form " word" (leading space); a word that
    becomes several tokens contributes the mean of its pieces' rows. A new token's row is
    the mean over its five words plus N(0, noise_std²) noise, in the input embedding and,
    when untied, in lm_head (tied models share the row). Tokens the tokenizer already has
    keep their ids; rows are (re)initialized only for tokens that were missing. The
    embedding grows if a new id falls beyond vocab_size.

    Args:
        model: a model.Qwen3 (modified in place).
        tokenizer: a tokenizer.Tokenizer (modified in place).
    Returns:
        {token: id} for the four tokens.
    """
    missing = [t for t in MEMENTO_TOKEN_SEEDS if t not in tokenizer.special_ids]
    ids = tokenizer.add_special_tokens(list(MEMENTO_TOKEN_SEEDS))
    need = max(ids.values()) + 1
    if need > model.config.vocab_size:
        resize_token_embeddings(model, need)
    g = torch.Generator().manual_seed(seed)
    tables = [model.model.embed_tokens.weight]
    if not model.config.tie_word_embeddings:
        tables.append(model.lm_head.weight)
    with torch.no_grad():
        for tok in missing:
            for table in tables:
                word_rows = [table[tokenizer.encode(" " + w)].float().mean(0) for w in MEMENTO_TOKEN_SEEDS[tok]]
                mean = torch.stack(word_rows).mean(0)
                noise = torch.randn(mean.shape, generator=g) * noise_std
                table[ids[tok]] = (mean + noise.to(mean.device)).to(table.dtype)
    return {t: ids[t] for t in MEMENTO_TOKEN_SEEDS}
