"""Benchmark problem sets for evaluation and RL (paper §6.2, §A.2.2): rows of (problem, answer).

    rows = load_rows("HuggingFaceH4/MATH-500", split="test")       # a hub dataset, one split
    rows = load_rows("aime24.jsonl")                                # a local file, offline
    rows = load_rows("gpqa_diamond.csv")                            # GPQA's own CSV: lettered

Hub ids load through the `datasets` library (`load_dataset(id, config, split=...)`), which
knows a repository's splits and configs: a repository with several splits is refused unless
one is named, so a run never trains or evaluates on a merge of train and test. Local
`.jsonl`, `.parquet` and `.csv` files load with no network; a local directory is a dataset
whose files name its splits (train.jsonl, test.jsonl), refused the same way. The paper's
benchmarks: AIME'24 `HuggingFaceH4/aime_2024` (split train), AIME'25 `opencompass/AIME2025`
(configs AIME2025-I and -II, split test), MATH-500 `HuggingFaceH4/MATH-500` (split test),
GPQA-Diamond `Idavidrein/gpqa` (config gpqa_diamond, split train; gated: accept its terms on
the hub and log in, or download the CSV and pass the file).

GPQA rows name the correct and three incorrect answers ("Question", "Correct Answer",
"Incorrect Answer 1..3"). `letter_gpqa` turns each into a multiple-choice problem: the four
options shuffled with a generator seeded by (seed, row index), written "A) ... B) ...", and
the gold answer the correct option's letter, so grading is data/grading.py's "choice" kind.
"""
from __future__ import annotations

import random
from pathlib import Path

GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _one_split(ds, source: str, split: str | None):
    """The rows of one split of a DatasetDict (or a Dataset as is); refuses several splits
    with none named, and an unknown name, listing the splits."""
    if not hasattr(ds, "keys"):  # already one split
        return ds
    names = sorted(ds.keys())
    if split is None:
        if len(names) > 1:
            raise ValueError(f"--data {source}: the dataset has splits {', '.join(names)}; name one with --split")
        split = names[0]
    if split not in ds:
        raise ValueError(f"--data {source}: no split {split!r}; the dataset has {', '.join(names)}")
    return ds[split]


def load_rows(source: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """The rows of a benchmark (paper §6.2): a local .jsonl/.parquet/.csv file, a local
    directory of such files (split by file name), or a hub dataset id through
    `datasets.load_dataset`.

    Args:
        source: path or hub id ("owner/name"). split: the split to read (required when the
            dataset has several). config: the hub dataset's config (subset), if it has several.
    Returns:
        list of dict rows, in the file's order.
    Raises:
        FileNotFoundError: no such local path and the hub lookup failed (one line, the cause).
        ValueError: several splits and none named, an unknown split, an unknown file type.
    """
    from datasets import load_dataset  # imported here: pyarrow and pandas come with it, and only this needs them

    path = Path(source)
    try:
        if path.is_file():
            if path.suffix not in LOCAL_FORMATS:
                raise ValueError(f"--data {source}: expected one of {', '.join(LOCAL_FORMATS)}")
            ds = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split=split or "train")
        elif path.is_dir():
            ds = _one_split(load_dataset(str(path)), source, split)
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            ds = _one_split(load_dataset(source, config), source, split)
        else:
            raise FileNotFoundError(f"--data {source}: no such file or directory, and not a hub id (owner/name)")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # datasets raises many types (network, gated repo, config): one line
        raise FileNotFoundError(f"--data {source!r}: could not load it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return [dict(r) for r in ds]


def is_gpqa(rows: list[dict]) -> bool:
    """Whether rows carry GPQA's columns (the question, the correct and three incorrect answers;
    paper §6.2's GPQA-Diamond). Raises nothing."""
    return bool(rows) and all(c in rows[0] for c in GPQA_COLUMNS)


def letter_gpqa(rows: list[dict], seed: int = 0) -> list[dict]:
    """GPQA rows as lettered multiple-choice problems (paper §A.2.2): {"problem": question and
    options "A) ..." to "D) ..." in an order shuffled by random.Random(f"gpqa:{seed}:{i}"),
    "answer": the correct option's letter}. Row i's order depends only on (seed, i). Raises
    ValueError naming a row whose answers are missing."""
    out = []
    for i, r in enumerate(rows):
        options = [r.get(c) for c in GPQA_COLUMNS[1:]]
        if not r.get("Question") or any(o is None or not str(o).strip() for o in options):
            raise ValueError(f"GPQA row {i + 1}: the question or one of the four answers is missing")
        order = list(range(4))
        random.Random(f"gpqa:{seed}:{i}").shuffle(order)
        lines = [f"{'ABCD'[j]}) {str(options[k]).strip()}" for j, k in enumerate(order)]
        problem = (f"{str(r['Question']).strip()}\n\n" + "\n".join(lines)
                   + "\n\nAnswer with the letter of the correct option.")
        out.append({"problem": problem, "answer": "ABCD"[order.index(0)]})
    return out
