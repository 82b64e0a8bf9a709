"""Benchmark problem sets for evaluation and RL (paper §6.2, §A.2.2): rows of (problem, answer).

    rows, report = load_rows("HuggingFaceH4/MATH-500", split="test")   # a hub dataset, one split
    rows, report = load_rows("bench/")                                  # a local directory of splits

Hub ids load through the `datasets` library (`load_dataset(id, config, split=...)`), which
knows a repository's splits and configs: a repository with several splits is refused unless
one is named, so a run never trains or evaluates on a merge of train and test. A local
directory is a dataset whose files name its splits (train.jsonl, test.jsonl), refused the
same way. Local `.jsonl`, `.json`, `.parquet` and `.csv` files are read by data/records.py
(offline, every record checked, with its line number); evaluation.load_problems picks. The paper's
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

import hashlib
import random
from pathlib import Path

from data import records

GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


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


def load_rows(source: str, split: str | None = None, config: str | None = None,
              bad: str = "error") -> tuple[list[records.Row], records.Report]:
    """The rows of a benchmark held by a local directory (split by file name) or a hub dataset
    id, through `datasets.load_dataset` (paper §6.2). A local file is read by data/records.py
    instead (evaluation.load_problems does so), and a path that does not exist and cannot be a
    hub id is never tried on the hub.

    Args:
        source: a directory or hub id ("owner/name"). split: the split to read (required when
            the dataset has several). config: the hub dataset's config (subset), if it has
            several. bad: the policy of the returned Report (rows are checked by the caller).
    Returns:
        (rows, report): rows as records.Row, their place "SOURCE:row N"; report.data_hash is
        "sha256:" over a directory's files, or for a hub id "hub:ID" with the config, the split
        and the datasets library's fingerprint of the files it resolved (which names the commit).
    Raises:
        FileNotFoundError: no such local path, or the hub lookup failed (one line, the cause).
        ValueError: several splits and none named, an unknown split.
    """
    from datasets import load_dataset  # imported here: pyarrow and pandas come with it, and only this needs them

    path = Path(source)
    report = records.Report(source, bad)
    if not path.is_dir() and not records.looks_like_hub_id(source):
        raise FileNotFoundError(f"--data {source}: no such file or directory, and not a hub id (owner/name)")
    try:
        if path.is_dir():
            ds = _one_split(load_dataset(str(path)), source, split)
            files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")]
            report.data_hash = records.files_hash([(str(f.relative_to(path)), hashlib.sha256(f.read_bytes()).hexdigest())
                                                   for f in files])
        else:
            ds = _one_split(load_dataset(source, config), source, split)
            report.data_hash = f"hub:{source} config={config} split={split} fingerprint={getattr(ds, '_fingerprint', None)}"
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # datasets raises many types (network, gated repo, config): one line
        raise FileNotFoundError(f"--data {source!r}: could not load it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return [records.Row(i, f"{source}:row {i + 1}", dict(r)) for i, r in enumerate(ds)], report


def is_gpqa(rows: list[dict]) -> bool:
    """Whether rows carry GPQA's columns (the question, the correct and three incorrect answers;
    paper §6.2's GPQA-Diamond). Raises nothing."""
    return bool(rows) and isinstance(rows[0], dict) and all(c in rows[0] for c in GPQA_COLUMNS)


# GPQA's columns, each a non-empty text (a number is taken as its text)
GPQA_SCHEMA = {"Question": records.text, **{c: records.answer_text for c in GPQA_COLUMNS[1:]}}


def letter_gpqa(row: dict, i: int, seed: int = 0) -> dict:
    """A GPQA row (checked against GPQA_SCHEMA) as a lettered multiple-choice problem (paper
    §A.2.2): {"problem": the question and options "A) ..." to "D) ..." in an order shuffled by
    random.Random(f"gpqa:{seed}:{i}"), "answer": the correct option's letter}. Row i's order
    depends only on (seed, i). Raises nothing for a checked row."""
    options = [str(row[c]).strip() for c in GPQA_COLUMNS[1:]]
    order = list(range(4))
    random.Random(f"gpqa:{seed}:{i}").shuffle(order)
    lines = [f"{'ABCD'[j]}) {options[k]}" for j, k in enumerate(order)]
    problem = f"{str(row['Question']).strip()}\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct option."
    return {"problem": problem, "answer": "ABCD"[order.index(0)]}
