"""Shared helpers of the experiments/ scripts: paths, checkpoint loading, statistics, machine info.

Every experiment script puts the repository root on sys.path through this module, so
`python experiments/<name>.py` works from the repository root without installing anything.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from blocks import MementoTokens  # noqa: E402
from checkpoint import local_checkpoint  # noqa: E402
from model import Qwen3  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

RESULTS = REPO / "experiments" / "results"

TRAIN_HINT = "make them with `python train_sft.py --stage 1` then `python train_sft.py --stage 2`"


def load_checkpoint(path: str, what: str, script: str):
    """(model, tokenizer) of a local checkpoint directory or training run written by train_sft.py.

    Args:
        path: a checkpoint (config.json, model.safetensors, tokenizer.json) or a run directory
            (its newest complete checkpoint is read).
        what: a name for the message ("--stage2"). script: the calling script's name.
    Returns:
        (model.Qwen3 in eval mode, float32, CPU; tokenizer.Tokenizer with the memento tokens).
    Raises:
        SystemExit with one line naming the missing checkpoint and how to make it.
    """
    try:
        p = local_checkpoint(path)
    except FileNotFoundError:
        sys.exit(f"{script}: {what} checkpoint {path!r} not found; {TRAIN_HINT} (or pass {what} DIR)")
    try:
        model = Qwen3.from_pretrained(p, dtype=torch.float32, device="cpu").eval()
        tok = Tokenizer.from_dir(p)
        MementoTokens.from_tokenizer(tok)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"{script}: cannot load {what} checkpoint {path!r}: {e}; {TRAIN_HINT}")
    return model, tok


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for the default z).

    Returns (low, high) in [0, 1]; (0.0, 1.0) when n == 0. Preferred to the normal
    approximation because it stays inside [0, 1] and is not degenerate at k = 0 or k = n.
    """
    if n == 0:
        return 0.0, 1.0
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes.

    b, c: discordant pair counts (A right / B wrong, and A wrong / B right). Returns the
    binomial(b + c, 1/2) two-sided tail probability, capped at 1; 1.0 when b + c == 0.
    """
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def machine_info() -> dict:
    """What ran the experiment: CPU model (as lscpu reports it), cores, torch version, threads."""
    model_name = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_model": model_name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}


def pyplot(script: str):
    """matplotlib.pyplot with the Agg backend, or None (after one line on stderr) when
    matplotlib is not installed: plots are optional, the JSON results are not."""
    try:  # optional: plots only
        import matplotlib
    except ImportError:
        print(f"{script}: matplotlib is not installed, skipping the plots (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
