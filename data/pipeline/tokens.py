"""Token counting for the pipeline (block sizes, fragment merging; paper §3).

Without a tokenizer the pipeline uses an approximation: ceil(UTF-8 bytes / 4) tokens,
the usual rule of thumb for BPE vocabularies on English text and LaTeX (it overestimates
on plain English words a little and underestimates on dense math a little). Pass
--tokenizer PATH (an HF tokenizer.json) for exact counts through the repository's own
tokenizer.py.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

__all__ = ["approx_tokens", "make_token_counter"]


def approx_tokens(text: str) -> int:
    """Approximate token count of `text`: ceil(len(utf-8 bytes) / 4) tokens (0 for "")."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def make_token_counter(tokenizer_path: str | None = None) -> Callable[[str], int]:
    """A function text -> number of tokens.

    Args: tokenizer_path: None for `approx_tokens`; else a path to an HF tokenizer.json,
        loaded with the repository's tokenizer.py (imported only here, lazily).
    Raises: FileNotFoundError if the file is missing; ImportError with a one-line hint if
        tokenizer.py cannot be imported (run from the repository root).
    """
    if tokenizer_path is None:
        return approx_tokens
    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such file; pass the path of an HF tokenizer.json")
    repo_root = str(Path(__file__).resolve().parents[2])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    try:
        from tokenizer import Tokenizer
    except ImportError as e:
        raise ImportError(f"--tokenizer needs the repository's tokenizer.py "
                          f"(from tokenizer import Tokenizer) under {repo_root}: {e}") from e
    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text))
