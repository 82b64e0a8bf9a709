"""docs/tutorial.md runs, and shows what the code prints now (issue 38).

The tutorial's ```python blocks are executed in order, in one fresh Python process on the CPU
(one torch thread, the Triton kernels under the interpreter), sharing one namespace, as a
reader typing them into one session from the repository root would. What each block prints
is compared with the ```text block that follows it in the tutorial; a python block with no
text block after it must print nothing, and a text block that follows no python block is an
error (every output shown is checked). Lines are compared exactly, except for trailing
whitespace (Markdown editors strip it). The pictures the run draws go to a temporary folder
($MEMENTO_TUTORIAL_IMG) and are compared with the committed ones in docs/img, byte for byte
when the matplotlib that drew those is the one installed (the lock pins it), else by size.

To refresh after a deliberate change (then read the diff: the text around each output
explains it):

    python tests/test_tutorial.py --images    # redraw docs/img/*.png
    python tests/test_tutorial.py --outputs   # rewrite the ```text blocks with what the code prints
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
IMG = REPO / "docs" / "img"

# Runs each block (read from stdin as JSON) in one namespace with its stdout captured; writes
# {"outputs": [...], "error": traceback or None} to the file named by argv[1]. Code is compiled
# with the tutorial's line numbers, so a traceback names docs/tutorial.md:LINE.
DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
ns = {"__name__": "__tutorial__"}
outputs, error = [], None
for b in blocks:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile("\n" * b["line"] + b["code"], b["file"], "exec"), ns)
    except BaseException:
        outputs.append(buf.getvalue())
        error = f"block at {b['file']}:{b['line']}:\n" + traceback.format_exc()
        break
    outputs.append(buf.getvalue())
with open(sys.argv[1], "w") as f:
    json.dump({"outputs": outputs, "error": error}, f)
"""


@dataclass
class Block:
    line: int                 # line of the opening fence (0-based): the code starts on the next
    code: str
    shown: str | None         # the text block after it, or None
    shown_span: tuple[int, int] | None  # (first, last) 0-based lines of the text block's body


def parse(text: str) -> list[Block]:
    """The python blocks of a Markdown text, each with the text block that follows it.
    Raises ValueError for an unclosed fence or a text block that follows no python block."""
    lines = text.split("\n")
    blocks: list[Block] = []
    i, last_was_python = 0, False
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            if lines[i].strip():
                last_was_python = False
            i += 1
            continue
        lang, start = fence.group(1), i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{TUTORIAL.name}:{start + 1}: a ``` fence is never closed")
        body = "\n".join(lines[start + 1:j])
        if lang == "python":
            blocks.append(Block(start, body + "\n", None, None))
            last_was_python = True
        elif lang == "text":
            if not last_was_python:
                raise ValueError(f"{TUTORIAL.name}:{start + 1}: a ```text block that follows no ```python block "
                                 "(every output shown must be one the test checks)")
            blocks[-1].shown, blocks[-1].shown_span = body, (start + 1, j - 1)
            last_was_python = False
        else:
            last_was_python = False
        i = j + 1
    return blocks


def run(blocks: list[Block], img_dir: Path, timeout: int = 600) -> dict:
    """Execute the blocks in one fresh process on the CPU; {"outputs", "error"}."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEMENTO_ATTN_BACKEND", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               MEMENTO_TUTORIAL_IMG=str(img_dir), PYTHONPATH=str(REPO), PYTHONHASHSEED="0")
    payload = json.dumps([{"line": b.line + 1, "code": b.code, "file": str(TUTORIAL.relative_to(REPO))} for b in blocks])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(result)], input=payload, text=True, cwd=REPO, env=env,
                              capture_output=True, timeout=timeout)
        if not result.exists():
            raise RuntimeError(f"the tutorial's process died (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def normalize(s: str) -> list[str]:
    return [line.rstrip() for line in s.rstrip("\n").split("\n")] if s.strip() else []


def images(text: str) -> list[tuple[int, str]]:
    """(0-based line, file name) of every picture the tutorial shows from img/."""
    return [(n, m.group(1)) for n, line in enumerate(text.split("\n")) for m in re.finditer(r"!\[[^\]]*\]\(img/([\w.-]+)\)", line)]


def png_software(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get("Software")


# ------------------------------------------------------------------ the test


def test_parse_pairs_each_output_with_its_code_and_refuses_orphans():
    text = "x\n```python\nprint(1)\n```\n\n```text\n1\n```\n```python\na = 2\n```\nprose\n"
    b = parse(text)
    assert [(x.code, x.shown) for x in b] == [("print(1)\n", "1"), ("a = 2\n", None)]
    for bad in ("```text\n1\n```\n", "```python\nx\n```\nprose\n```text\n1\n```\n", "```python\nx\n"):
        try:
            parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"parse accepted {bad!r}")


def test_tutorial_runs_and_shows_what_the_code_prints(tmp_path):
    text = TUTORIAL.read_text(encoding="utf-8")
    blocks = parse(text)
    assert len(blocks) >= 20 and sum(b.shown is not None for b in blocks) >= 15, "the tutorial lost its code"
    result = run(blocks, tmp_path)
    mismatches = []
    for b, out in zip(blocks, result["outputs"]):
        got, want = normalize(out), normalize(b.shown or "")
        if got != want:
            import difflib

            diff = "\n".join(difflib.unified_diff(want, got, "shown in the tutorial", "printed now", lineterm=""))
            mismatches.append(f"docs/tutorial.md:{b.line + 1}: the output shown differs from what the code prints:\n{diff}")
    assert result["error"] is None, result["error"] + ("\n" + "\n".join(mismatches) if mismatches else "")
    assert len(result["outputs"]) == len(blocks)
    assert not mismatches, "\n\n".join(mismatches) + "\n(after a deliberate change: python tests/test_tutorial.py --outputs)"

    # the pictures: each shown one exists, has a caption, and is what this run drew
    shown = images(text)
    assert len(shown) >= 3, shown
    lines = text.split("\n")
    for n, name in shown:
        caption = next((l for l in lines[n + 1:] if l.strip()), "")
        assert caption.startswith("*") and caption.rstrip().endswith("*"), f"docs/tutorial.md:{n + 2}: {name} has no caption"
        drawn, committed = tmp_path / name, IMG / name
        assert drawn.exists(), f"the tutorial shows img/{name} but its code did not draw it"
        assert committed.exists(), f"docs/img/{name} is not committed (python tests/test_tutorial.py --images)"
        from PIL import Image

        with Image.open(drawn) as a, Image.open(committed) as c:
            assert a.size == c.size, f"docs/img/{name}: {c.size} committed, {a.size} drawn now"
        if png_software(committed) == png_software(drawn):  # the same matplotlib: the same bytes
            assert drawn.read_bytes() == committed.read_bytes(), (
                f"docs/img/{name} is not what the tutorial draws now (python tests/test_tutorial.py --images)")
    drawn_names = {p.name for p in tmp_path.glob("*.png")}
    assert drawn_names == {name for _, name in shown}, f"pictures drawn but not shown, or shown but not drawn: {drawn_names}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_tutorials_links_lead_somewhere():
    """Every relative link of the tutorial names a file of the repository, and every #anchor a
    heading of its target (the tutorial's own table of contents included)."""
    text = TUTORIAL.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 20
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (TUTORIAL.parent / path).resolve() if path else TUTORIAL
        assert target.exists(), f"docs/tutorial.md links to {link}, which does not exist"
        if anchor:
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.M)]
            assert anchor in headings, f"docs/tutorial.md links to {link}: no such heading in {target.name}"


# ------------------------------------------------------------------ refreshing


def main(argv: list[str]) -> None:
    if not argv or set(argv) - {"--images", "--outputs"}:
        sys.exit("usage: python tests/test_tutorial.py [--images] [--outputs]")
    text = TUTORIAL.read_text(encoding="utf-8")
    blocks = parse(text)
    with tempfile.TemporaryDirectory() as tmp:
        img_dir = IMG if "--images" in argv else Path(tmp)
        img_dir.mkdir(parents=True, exist_ok=True)
        result = run(blocks, img_dir)
    if result["error"]:
        sys.exit(result["error"])
    if "--outputs" in argv:
        lines = text.split("\n")
        # from the end, so earlier line numbers stay valid
        for b, out in reversed(list(zip(blocks, result["outputs"]))):
            new = normalize(out)
            if b.shown_span is not None:
                first, last = b.shown_span
                lines[first:last + 1] = new
            elif new:
                end = b.line + b.code.count("\n") + 1  # the closing fence
                lines[end + 1:end + 1] = ["", "```text", *new, "```"]
        TUTORIAL.write_text("\n".join(lines), encoding="utf-8")
        print(f"rewrote the outputs of {TUTORIAL.relative_to(REPO)}")
    if "--images" in argv:
        print(f"drew {', '.join(sorted(p.name for p in IMG.glob('*.png')))} in {IMG.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
