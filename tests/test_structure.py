"""The repository's import graph, read from the source with ast (nothing is executed): no
module imports an entry-point script, and no import cycle exists. Tests are not modules of the
repository (they exercise the scripts), so they are left out."""
import ast
from pathlib import Path

import pytest
from conftest import REPO

ENTRY_POINTS = {"train_sft", "train_rl", "generate", "eval", "serve"}  # command lines, never imported


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the repository but the tests."""
    out = {}
    for p in REPO.rglob("*.py"):
        rel = p.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or any(part.startswith(".") for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules `name` imports anywhere in its file (top level or in functions).
    A name resolves as Python would when the file runs as a script (its own folder first) or
    as a module of the repository root."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.rsplit(".", 1)[0] if "." in name else ""
    if path.name == "__init__.py":
        package = name
    folder = ".".join(path.relative_to(REPO).parent.parts)
    found = set()
    for node in ast.walk(tree):
        targets, relative = [], False
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base, relative = node.module or "", node.level > 0
            if relative:  # from the package up
                up = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name of `base`
        for t in targets:
            # a script's own folder comes first on sys.path (experiments/ and bench/ scripts)
            local = folder and not relative and f"{folder}.{t.split('.')[0]}" in modules
            hit = _resolve(f"{folder}.{t}" if local else t, modules)
            if hit:
                found.add(hit)
    found.discard(name)
    return found


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a repository module (a.b.c -> a.b if a.b is
    a module and c a name in it), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def test_no_module_imports_an_entry_point_and_there_is_no_cycle():
    modules = _modules()
    assert {"engine", "blocks", "training", "sft", "evaluation", "sampling"} <= set(modules)  # the walk found the library
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    bad = sorted((m, e) for m, deps in graph.items() for e in deps if e in ENTRY_POINTS)
    assert not bad, f"modules importing an entry-point script: {bad}"
    # a cycle: depth-first search with colours
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_graph_walk_sees_imports_and_cycles(tmp_path, monkeypatch):
    """The checker itself: an entry-point import and a cycle written into a throwaway tree are
    both reported (so the test above cannot pass by seeing nothing)."""
    import sys

    this = sys.modules[__name__]
    (tmp_path / "engine.py").write_text("import blocks\n")
    (tmp_path / "blocks.py").write_text("def f():\n    import training\n")
    (tmp_path / "training.py").write_text("from engine import x\n")
    (tmp_path / "sft.py").write_text("import generate\n")
    for n in ("evaluation", "sampling", "generate"):
        (tmp_path / f"{n}.py").write_text("")
    monkeypatch.setattr(this, "REPO", tmp_path)
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["blocks"] == {"training"} and graph["sft"] == {"generate"} and graph["training"] == {"engine"}
    with pytest.raises(AssertionError, match=r"\('sft', 'generate'\)"):
        test_no_module_imports_an_entry_point_and_there_is_no_cycle()
    (tmp_path / "sft.py").write_text("")
    with pytest.raises(AssertionError, match="import cycle: blocks -> training -> engine -> blocks"):
        test_no_module_imports_an_entry_point_and_there_is_no_cycle()
