"""OpenMementos traces to training batches (paper §3, §4, §A.2.1).

Load records in the `default` schema (problem, response, domain, source, difficulty) from a
.jsonl or .parquet file or a hub dataset id through data/records.py (which checks each
response's block/memento structure with the same tracker the model masks with), and turn
the good ones into ChatML token ids with labels (-100 on the prompt), truncated and padded
per batch. The problem is tokenized as plain text (tokenizer.prompt_ids): a control token
written in it stays text; the response keeps its special tokens, which are the format.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import list_repo_files, snapshot_download

from blocks import BlockTracker, MementoConfig, MementoTokens
from data import records
from data.records import trace_reason
from model import IGNORE_INDEX as IGNORE


def read_records(source: str, bad: str = "skip") -> tuple[list[records.Row], records.Report]:
    """The traces of a local .jsonl / .json / .csv / .parquet file (or a directory of them) or
    of a hub dataset id, each checked against records.TRACE (a non-empty `problem`, a
    `response` in the memento format: data/records.py); bad ones are skipped and counted
    (bad="skip") or stop the run (bad="error").

    Hub ids ("microsoft/OpenMementos") are fetched with huggingface_hub, parquet files of the
    `default` config only when the repo has config folders; report.data_hash is then
    "hub:ID@COMMIT". A path that does not exist and cannot be a hub id ("data/x.jsonl") is
    never tried on the hub. Parquet needs pyarrow (optional: `pip install pyarrow`).
    Returns (rows, report). Raises records.DataError (a ValueError) / FileNotFoundError with
    one line naming the problem, ImportError for parquet without pyarrow.
    """
    if Path(source).exists() or not records.looks_like_hub_id(source):
        return records.load(source, records.TRACE, bad)
    try:
        files = [f for f in list_repo_files(source, repo_type="dataset") if f.endswith((".parquet", ".jsonl"))]
    except Exception as e:  # the hub client raises many types; the user needs one line
        raise FileNotFoundError(f"{source}: no such local path, and the hub lookup failed ({type(e).__name__})") from None
    default = [f for f in files if "default" in f.split("/")[:-1]]
    local = Path(snapshot_download(source, repo_type="dataset", allow_patterns=default or files))
    report = records.Report(source, bad)
    # snapshot_download returns .../snapshots/<commit>: the revision read
    rows = records.read_files([local / f for f in default or files], report, data_hash=f"hub:{source}@{local.name}")
    return records.validate(rows, records.TRACE, report), report


@dataclass
class Example:
    """One tokenized trace: input_ids and labels, both list[int] of equal length."""

    input_ids: list[int]
    labels: list[int]


def validate(response_ids: list[int], tokens: MementoTokens) -> list[str]:
    """Structure problems of a tokenized response (§3): stray delimiters, blocks left open or
    without a memento, no completed block, no </think>. Empty list = well-formed."""
    tr = BlockTracker(tokens, MementoConfig(keep_last_n_blocks=0, require_assistant_section=False))
    for t in response_ids:
        tr.step(t)
    problems = tr.problems()
    if not tr.completed:
        problems.append("no completed block")
    if tokens.think_end not in response_ids:
        problems.append("no </think>")
    return problems


def tokenize(records: list[dict], tok, max_seq_len: int) -> tuple[list[Example], dict]:
    """ChatML examples with labels, and a report {"kept", "truncated", "skipped", "reasons":
    {reason: [index in `records`, ...]}}.

    input_ids = prompt_ids(problem) + response + <|im_end|> (the problem as plain text, the
    response with its special tokens); labels are -100 on the prompt and equal input_ids on
    the response (§4: loss on every response token, special tokens and answer included). The
    rule for long examples: one longer than max_seq_len is cut at the end (counted as
    "truncated"; an incomplete block is never masked, so the mask stays valid); one whose
    prompt alone fills max_seq_len has nothing to learn and is skipped. A record that is not
    a trace (data/records.py checks them as they are read, with their line numbers; this is
    the guard for records built in code) is skipped and counted, never trained on with a
    wrong mask. Every kept example has at least one labelled token.
    """
    tokens = MementoTokens.from_tokenizer(tok)
    end = tok.token_id("<|im_end|>")
    out, reasons, truncated = [], {}, 0
    for i, r in enumerate(records):
        why = None
        if not isinstance(r.get("problem"), str) or not isinstance(r.get("response"), str):
            why = "missing problem/response"
        else:
            resp, prompt = tok.encode(r["response"]), tok.prompt_ids(r["problem"])
            problems = validate(resp, tokens)
            if problems:
                why = trace_reason(problems[0])
            elif len(prompt) >= max_seq_len:
                why = "prompt fills --max-seq-len"
        if why is not None:
            reasons.setdefault(why, []).append(i)
            continue
        truncated += len(prompt) + len(resp) + 1 > max_seq_len
        ids = (prompt + resp + [end])[:max_seq_len]
        labels = ([IGNORE] * len(prompt) + resp + [end])[:max_seq_len]
        out.append(Example(ids, labels))
    return out, {"kept": len(out), "truncated": truncated, "skipped": sum(map(len, reasons.values())),
                 "reasons": reasons}


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: input_ids [B, T] int64 (pad_id), labels [B, T]
    int64 (-100 on padding). Right padding needs no mask: causal attention never lets a real
    token see a later pad."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.int64)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so --resume and
    every process of a distributed run agree on it."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order
