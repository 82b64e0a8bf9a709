"""OpenMementos traces to training batches (paper §3, §4, §A.2.1).

Load records in the `default` schema (problem, response, domain, source, difficulty) from a
.jsonl or .parquet file or a hub dataset id, check each response's block/memento structure
with the same tracker the model masks with, and turn the good ones into ChatML token ids with
labels (-100 on the prompt), truncated and padded per batch.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import list_repo_files, snapshot_download

from blocks import BlockTracker, MementoConfig, MementoTokens
from model import IGNORE_INDEX as IGNORE


def read_records(source: str) -> list[dict]:
    """Records from a local .jsonl / .parquet file (or a directory of them) or a hub dataset id.

    Hub ids ("microsoft/OpenMementos") are fetched with huggingface_hub, parquet files of the
    `default` config only when the repo has config folders. Parquet needs pyarrow (optional:
    `pip install pyarrow`); pandas is not used. Raises FileNotFoundError / ValueError with one
    line naming the problem.
    """
    p = Path(source)
    if p.is_dir():
        files = sorted(list(p.glob("**/*.jsonl")) + list(p.glob("**/*.parquet")))
        if not files:
            raise FileNotFoundError(f"{source}: no .jsonl or .parquet files inside")
        return [r for f in files for r in read_records(str(f))]
    if p.is_file():
        if p.suffix == ".jsonl":
            out = []
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{source}: not a UTF-8 text file; expected JSON lines") from None
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = {"_error": f"{source}:{i}: not JSON"}
                    out.append(rec if isinstance(rec, dict) else {"_error": f"{source}:{i}: not a JSON object"})
            return out
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{source}: reading parquet needs pyarrow (pip install pyarrow)") from None
            return pq.read_table(p).to_pylist()
        raise ValueError(f"{source}: expected a .jsonl or .parquet file")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            files = [f for f in list_repo_files(source, repo_type="dataset") if f.endswith((".parquet", ".jsonl"))]
        except Exception as e:  # the hub client raises many types; the user needs one line
            raise FileNotFoundError(f"--data {source!r}: not a local file, and the hub lookup failed ({type(e).__name__})") from None
        default = [f for f in files if "default" in f.split("/")[:-1]]
        local = snapshot_download(source, repo_type="dataset", allow_patterns=default or files)
        return [r for f in (default or files) for r in read_records(str(Path(local) / f))]
    raise FileNotFoundError(f"--data {source!r}: no such file, and not a hub dataset id of the form 'org/name'")


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
    """ChatML examples with labels, and a report {"kept", "truncated", "skipped", "reasons"}.

    input_ids = chat_prompt(problem) + response + <|im_end|>; labels are -100 on the prompt
    and equal input_ids on the response (§4: loss on every response token, special tokens
    and answer included). The rule for long examples: one longer than max_seq_len is cut at
    the end (counted as "truncated"; an incomplete block is never masked, so the mask stays
    valid); one whose prompt alone fills max_seq_len has nothing to learn and is skipped.
    Malformed traces are skipped and counted, never trained on with a wrong mask. Every kept
    example has at least one labelled token.
    """
    tokens = MementoTokens.from_tokenizer(tok)
    end = tok.token_id("<|im_end|>")
    out, reasons, truncated = [], {}, 0
    for r in records:
        if "_error" in r or not isinstance(r.get("problem"), str) or not isinstance(r.get("response"), str):
            why = r.get("_error", "missing problem/response").split(": ")[-1]
            reasons[why] = reasons.get(why, 0) + 1
            continue
        resp = tok.encode(r["response"])
        problems = validate(resp, tokens)
        if problems:
            why = problems[0].split(" at ")[0]
            reasons[why] = reasons.get(why, 0) + 1
            continue
        prompt = tok.prompt_ids(r["problem"])
        if len(prompt) >= max_seq_len:
            why = "prompt fills --max-seq-len"
            reasons[why] = reasons.get(why, 0) + 1
            continue
        truncated += len(prompt) + len(resp) + 1 > max_seq_len
        ids = (prompt + resp + [end])[:max_seq_len]
        labels = ([IGNORE] * len(prompt) + resp + [end])[:max_seq_len]
        out.append(Example(ids, labels))
    return out, {"kept": len(out), "truncated": truncated, "skipped": sum(reasons.values()), "reasons": reasons}


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
