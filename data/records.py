"""Input files: one reader per format, every record checked before it is used (paper §3's
trace data, §A.2.2's benchmarks).

Every script reads its data here (train_sft.py and train_rl.py --data / --val-data, eval.py
--data and its results file, generate.py --replay and --prompts-file, `python -m
data.pipeline` --input and --output), so a file means the same thing to all of them:

    JSONL    (.jsonl, or a .json that is not one JSON array) one JSON object per line. A line
             ends at "\\n" only: a raw U+2028 inside a JSON string, which json.dumps(...,
             ensure_ascii=False) writes, stays in its line (str.splitlines would cut there). A
             "\\r" before the "\\n" (CRLF) and a U+FEFF (BOM) at the start of a line are
             dropped; blank lines are ignored. A line that is not UTF-8 is one bad record.
    JSON     (.json) one array of objects; a record's place is "row N".
    CSV      (.csv) a header row, then one record per row (GPQA's release); values are text.
    parquet  (.parquet, needs pyarrow) one record per row; a record's place is "row N".
    prompts  (generate.py --prompts-file) a text file read as JSONL is: each non-blank line is
             one prompt as plain text, or, when it starts with "{", a JSON object whose
             `problem` is the prompt.

Each record is then checked against a schema, {field: check}: a check takes the field's value
and returns it (a number answer as its text) or raises Bad. Every problem is one line,

    FILE:LINE: field: what is wrong (detail)

What a bad record does is the Report's policy (`--bad-records`): "error" raises DataError at
the first one; "skip" drops it and counts it by reason with its place (Report.summary names the
first five). Problems with a whole file (missing, unreadable, an unknown suffix, a CSV without a
header) are errors under both policies.

`Report.data_hash` names the data a run read: "sha256:" and the SHA-256 of the file's bytes (of
the very bytes parsed), or of the sorted (path, SHA-256) list of a directory's files. A run keeps
it with its run-defining settings, so results made from other data are never mixed in.

Text in data is text: a problem or prompt that writes a control token (`<|im_end|>`,
`<|block_start|>`, `<think>`) is passed on as written and tokenized as plain text
(tokenizer.prompt_ids); only a trace's `response` carries the format's special tokens.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from blocks import MEMENTO_TOKENS, THINK_END, BlockTracker, MementoConfig, MementoTokens

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
BAD_RECORDS = ("error", "skip")  # the --bad-records policies (Report.reject)
BOM = "\ufeff"
SKIP_HINT = "--bad-records skip skips such records"


class DataError(ValueError):
    """A data file the run cannot use: one line naming the file (and line, field)."""


class Bad(Exception):
    """What is wrong with one record or value: `reason` groups skips ("answer: missing"),
    `detail` is added to the error line only (a position, a parser's message)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class Row(NamedTuple):
    """One record: n, its 0-based index among the source's records (blank lines not counted,
    bad records counted, so it does not move when a record is skipped); where, its place for
    messages ("FILE:LINE" or "FILE:row N"); data, the record (dict)."""

    n: int
    where: str
    data: dict


@dataclass
class Report:
    """What reading a source kept and skipped. bad: the policy ("error" or "skip"); hint: what
    the error line suggests; data_hash: the source's content hash (see the module docstring);
    skipped: {reason: [place, ...]} in file order."""

    source: str
    bad: str = "error"
    hint: str = SKIP_HINT
    data_hash: str | None = None
    kept: int = 0
    skipped: dict = field(default_factory=dict)

    def reject(self, where: str, reason: str, detail: str = "") -> None:
        """A bad record: raise DataError (policy "error", one line) or count it (policy "skip")."""
        if self.bad == "error":
            raise DataError(f"{where}: {reason}{f' ({detail})' if detail else ''}; {self.hint}")
        self.count(where, reason)

    def count(self, where: str, reason: str) -> None:
        """A record left out under either policy (a prompt longer than --max-seq-len)."""
        self.skipped.setdefault(reason, []).append(where)

    @property
    def n_skipped(self) -> int:
        """Records skipped, all reasons together."""
        return sum(map(len, self.skipped.values()))

    def summary(self) -> str:
        """One line: "FILE: 2 records skipped: not JSON: 1 (line 4); answer: missing: 1 (line 9)",
        the first five places of each reason."""
        parts = []
        for reason, places in self.skipped.items():
            shown = [p.removeprefix(f"{self.source}:") for p in places[:5]]
            shown = [f"line {p}" if p.isdigit() else p for p in shown]
            parts.append(f"{reason}: {len(places)} ({', '.join(shown)}{', ...' if len(places) > 5 else ''})")
        return f"{self.source}: {self.n_skipped} records skipped: {'; '.join(parts)}"


# ----------------------------------------------------------------------------- checks of one value

def kind(v: Any) -> str:
    """A JSON value's kind in words ("null", "a boolean", "a number", "a string", "a list", "an object")."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


def string(v: Any) -> str:
    """Any string. Raises Bad."""
    if not isinstance(v, str):
        raise Bad(f"{kind(v)}, expected a string")
    return v


def text(v: Any) -> str:
    """A string with something besides whitespace in it. Raises Bad."""
    if not string(v).strip():
        raise Bad("empty")
    return v


def _number_text(v: Any) -> str | None:
    """A finite number (not a boolean) as its decimal text, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        raise Bad("not a finite number")
    return str(v)


def answer_text(v: Any) -> str:
    """A non-empty string (stripped) or a finite number as its text (42 -> "42"). Raises Bad."""
    number = _number_text(v)
    if number is not None:
        return number
    if not isinstance(v, str):
        raise Bad(f"{kind(v)}, expected a string or a number")
    if not v.strip():
        raise Bad("empty")
    return v.strip()


def answer(v: Any) -> str | tuple[str, ...]:
    """A reference answer (§A.2.2): a non-empty string, a number (compared as its text: 42 ->
    "42"), or a non-empty list of those, the acceptable answers (any one graded correct), as
    a tuple. Booleans, objects and nested lists are refused. Raises Bad."""
    if not isinstance(v, list):
        return answer_text(v)
    if not v:
        raise Bad("an empty list, expected at least one acceptable answer")
    out = []
    for i, x in enumerate(v, 1):
        try:
            out.append(answer_text(x))
        except Bad as b:
            raise Bad(f"item {i}: {b.reason}") from None
    return tuple(out)


def count(v: Any) -> int:
    """An integer >= 0 (not a boolean). Raises Bad."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise Bad(f"{kind(v)}, expected an integer")
    if v < 0:
        raise Bad("negative, expected an integer >= 0")
    return v


def is_number(v: Any) -> bool:
    """Whether v is a finite number (not a boolean). Raises nothing."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def number(v: Any) -> int | float:
    """A finite number (not a boolean). Raises Bad."""
    if not is_number(v):
        raise Bad(f"{kind(v)}, expected a finite number" if isinstance(v, float) else f"{kind(v)}, expected a number")
    return v


def boolean(v: Any) -> bool:
    """true or false. Raises Bad."""
    if not isinstance(v, bool):
        raise Bad(f"{kind(v)}, expected true or false")
    return v


def key(v: Any) -> str | int:
    """An id: a string or an integer (not a boolean). Raises Bad."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise Bad(f"{kind(v)}, expected a string or an integer")
    return v


def one_of(*values: str) -> Callable[[Any], str]:
    """A check accepting exactly one of `values`."""
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in values:
            raise Bad(f"{json.dumps(v) if isinstance(v, str) else kind(v)}, expected one of {', '.join(values)}")
        return v
    return check


def nullable(check: Callable) -> Callable:
    """`check`, or null (the field must be present)."""
    def inner(v: Any):
        return None if v is None else check(v)
    return inner


def optional(check: Callable) -> Callable:
    """`check`, or null, or the field absent."""
    inner = nullable(check)
    inner.optional = True
    return inner


# The response of an OpenMementos trace (§3), its structure read by the tracker the model masks
# with (blocks.BlockTracker): the special tokens are found in the text, each fed at its
# character offset, so a problem names a place in the string.
_TEXT_IDS = MementoTokens(0, 1, 2, 3, 4, (5,))
_SPECIALS = {t: i for i, t in enumerate((*MEMENTO_TOKENS, THINK_END))}
_SPECIAL_RE = re.compile("|".join(map(re.escape, _SPECIALS)))


def trace_problems(response: str) -> list[str]:
    """Why a response is not a well-formed memento trace (§3): the tracker's problems (a block
    never closed, nested, a memento without a block, ...), "no completed block", "no
    </think>", positions as character offsets; empty when well-formed. The same rules as
    data/openmementos.validate on token ids. Raises nothing for a str."""
    tr = BlockTracker(_TEXT_IDS, MementoConfig(0, require_assistant_section=False))
    for m in _SPECIAL_RE.finditer(response):
        tr.pos = m.start()
        tr.step(_SPECIALS[m.group()])
    problems = tr.problems()
    if not tr.completed:
        problems.append("no completed block")
    if THINK_END not in response:
        problems.append("no </think>")
    return problems


def trace_reason(problem: str) -> str:
    """A tracker problem without its positions, to count skips by ("block never closed")."""
    return re.sub(r" (?:opened )?at \d+(?:-\d+)?", "", problem)


def trace(v: Any) -> str:
    """A response in the memento format (§3; trace_problems). Raises Bad naming the first problem."""
    problems = trace_problems(string(v))
    if problems:
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise Bad(trace_reason(problems[0]), f"{problems[0]}, offsets in characters{more}")
    return v


TRACE = {"problem": text, "response": trace}   # OpenMementos `default` (§3): training, --replay
PROMPT = {"problem": text}                      # a JSON line of --prompts-file


def check(record: dict, schema: dict) -> dict:
    """The record with each schema field checked (and converted: an answer number to its
    text); fields not in the schema pass as they are. Raises Bad("field: what is wrong")."""
    out = dict(record)
    for name, chk in schema.items():
        if name not in record:
            if getattr(chk, "optional", False):
                continue
            raise Bad(f"{name}: missing")
        try:
            out[name] = chk(record[name])
        except Bad as b:
            raise Bad(f"{name}: {b.reason}", b.detail) from None
    return out


def validate(rows: list[Row], schema: dict, report: Report) -> list[Row]:
    """The rows whose record passes `schema`; each other one goes to report.reject (an error or
    a counted skip, by its policy). Sets report.kept."""
    out = []
    for r in rows:
        try:
            out.append(r._replace(data=check(r.data, schema)))
        except Bad as b:
            report.reject(r.where, b.reason, b.detail)
    report.kept = len(out)
    return out


# ----------------------------------------------------------------------------- reading files

def read_bytes(path: Path) -> bytes:
    """A file's bytes. Raises DataError (one line) when it is missing, a directory or unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None


def _has_lone_surrogate(obj: Any) -> bool:
    # "\ud800" is valid JSON but not Unicode text (it cannot be encoded); walked without
    # recursion, as a deeply nested value that json accepted must not overflow here
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            todo += x
    return False


def parse_object(line: str) -> dict:
    """One JSON object from a line of text. Raises Bad("not JSON" | "not a JSON object" | "not
    valid Unicode")."""
    try:
        v = json.loads(line)
    except json.JSONDecodeError as e:
        raise Bad("not JSON", f"{e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # an integer of 4,300+ digits; nesting too deep
        raise Bad("not JSON", str(e).split(":")[0] or type(e).__name__) from None
    if not isinstance(v, dict):
        raise Bad("not a JSON object", kind(v))
    if _has_lone_surrogate(v):
        raise Bad("not valid Unicode", "a \\ud800-\\udfff escape outside a surrogate pair")
    return v


def lines(data: bytes):
    """(line number, text) of each non-blank line of JSONL bytes, split at b"\\n" only, a
    trailing "\\r" and a leading BOM dropped; a line that is not UTF-8 comes as (number, Bad)."""
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8").removeprefix(BOM)
        except UnicodeDecodeError as e:
            yield i, Bad("not UTF-8 text", f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line")
            continue
        if line.strip():
            yield i, line


def jsonl_rows(name: str, data: bytes, report: Report, start: int = 0) -> list[Row]:
    """The records of JSONL bytes (`lines`' rules), their place "NAME:LINE"; a line that is not
    a JSON object goes to report.reject and stays with data None, so n never moves."""
    rows = []
    for i, line in lines(data):
        where = f"{name}:{i}"
        try:
            if isinstance(line, Bad):
                raise line
            rows.append(Row(start + len(rows), where, parse_object(line)))
        except Bad as b:
            rows.append(Row(start + len(rows), where, None))  # a bad record keeps its index
            report.reject(where, b.reason, b.detail)
    return rows


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _json_array(name: str, data: bytes, report: Report, start: int) -> list[Row]:
    try:
        items = json.loads(_text(name, data))
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}: not a JSON array ({str(e).splitlines()[0]})") from None
    if not isinstance(items, list):
        raise DataError(f"{name}: {kind(items)}, expected a JSON array of objects or JSON lines")
    rows = []
    for i, item in enumerate(items, 1):
        rows.append(Row(start + i - 1, f"{name}:row {i}", item if isinstance(item, dict) else None))
        if not isinstance(item, dict):
            report.reject(rows[-1].where, "not a JSON object", kind(item))
        elif _has_lone_surrogate(item):
            rows[-1] = rows[-1]._replace(data=None)
            report.reject(rows[-1].where, "not valid Unicode", "a \\ud800-\\udfff escape outside a surrogate pair")
    return rows


def _csv(name: str, data: bytes, report: Report, start: int) -> list[Row]:
    reader = csv.reader(io.StringIO(_text(name, data), newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{name}: empty, expected a header row then one row per record")
        rows, line = [], reader.line_num
        for values in reader:
            where = f"{name}:{line + 1}"  # the row's first line (a quoted value may span lines)
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            n = start + len(rows)
            if len(values) != len(header):
                rows.append(Row(n, where, None))
                report.reject(where, f"{len(values)} values, the header has {len(header)}")
            else:
                rows.append(Row(n, where, dict(zip(header, values))))
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: not CSV ({e})") from None
    return rows


def _parquet(name: str, data: bytes, report: Report, start: int) -> list[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return [Row(start + i, f"{name}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


def read_file(path: Path, report: Report, start: int = 0) -> tuple[list[Row], str]:
    """The records of one local file, in its format by suffix (FORMATS), and the SHA-256 (hex)
    of its bytes. A record that is not an object (or not JSON, not UTF-8) goes to
    report.reject and stays in the list with data None, so that n (counted from `start`)
    never moves. Raises DataError for the file as a whole (see read_bytes, an
    unknown suffix, no CSV header), ImportError for parquet without pyarrow."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: expected a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file")
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    suffix, name = path.suffix.lower(), str(path)
    if suffix == ".csv":
        return _csv(name, data, report, start), digest
    if suffix == ".parquet":
        return _parquet(name, data, report, start), digest
    if suffix == ".json" and data.lstrip(BOM.encode() + b" \t\r\n").startswith(b"["):
        return _json_array(name, data, report, start), digest
    return jsonl_rows(name, data, report, start), digest


def read_files(files: list[Path], report: Report, data_hash: str | None = None, base: Path | None = None) -> list[Row]:
    """The records of several files in order (n continuing across them); report.data_hash is
    `data_hash`, else "sha256:" of the one file's bytes, or files_hash of the files' names
    (relative to `base`, so that a moved directory keeps its hash) and SHA-256s."""
    rows, digests = [], []
    for f in files:
        more, digest = read_file(f, report, start=len(rows))
        rows += more
        digests.append((str(Path(f).relative_to(base)) if base else str(f), digest))
    report.data_hash = data_hash or ("sha256:" + digests[0][1] if len(digests) == 1 else files_hash(digests))
    return [r for r in rows if r.data is not None]


def files_hash(digests: list[tuple[str, str]]) -> str:
    """The content hash of several files: "sha256:" of their sorted "name\\0SHA-256\\n" lines."""
    return "sha256:" + hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in sorted(digests)).encode()).hexdigest()


def looks_like_hub_id(source: str) -> bool:
    """Whether `source` may name a hub repository ("owner/name") rather than a local path: one
    slash, no data-file suffix, not starting with ".", "/" or "~", and no local folder of the
    owner's name. A path that fails this and does not exist is never tried on the hub."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        return False
    return Path(source).suffix.lower() not in FORMATS and not Path(source.split("/")[0]).is_dir()


def load(source: str, schema: dict, bad: str = "error", *, hint: str = SKIP_HINT) -> tuple[list[Row], Report]:
    """The checked records of a local file, or of every data file under a local directory (in
    sorted order), and their Report (policy `bad`). Raises DataError (one line) for a missing
    path or a file that cannot be read as a whole, or at the first bad record under "error";
    ImportError for parquet without pyarrow."""
    p = Path(source)
    report = Report(str(p), bad, hint)  # str(p): as the places name the file
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in FORMATS and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))  # no temp files
        if not files:
            raise DataError(f"{source}: a directory with no {', '.join(FORMATS)} file in it")
    elif p.exists():
        files = [p]
    else:
        raise DataError(f"{source}: no such file or directory")
    return validate(read_files(files, report, base=p if p.is_dir() else None), schema, report), report


def read_prompts(path: str, bad: str = "error") -> tuple[list[Row], Report]:
    """The prompts of generate.py --prompts-file: each non-blank line (JSONL's line rules) is a
    prompt as plain text, or, when it starts with "{", a JSON object checked against PROMPT
    ({"problem": a non-empty string}). Records are {"problem": text}. Raises DataError as `load`."""
    path = str(Path(path))
    report = Report(path, bad)
    data = read_bytes(Path(path))
    rows, n = [], 0
    for i, line in lines(data):
        where, n = f"{path}:{i}", n + 1
        try:
            if isinstance(line, Bad):
                raise line
            rows.append(Row(n - 1, where, check(parse_object(line), PROMPT) if line.lstrip().startswith("{")
                            else {"problem": line}))
        except Bad as b:
            report.reject(where, b.reason, b.detail)
    report.kept, report.data_hash = len(rows), "sha256:" + hashlib.sha256(data).hexdigest()
    return rows, report

