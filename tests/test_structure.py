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


def top_level_names(root: Path) -> dict[str, str]:
    """The names `import X` resolves to this repository when its root is first on sys.path:
    each top-level .py file and each folder holding Python code (a package, or a namespace
    package such as data/), mapped to the file or folder that provides it."""
    out = {}
    for p in root.iterdir():
        if p.name.startswith(".") or p.name == "__pycache__":
            continue
        if p.is_file() and p.suffix == ".py":
            out[p.stem] = p.name
        elif p.is_dir() and p.name.isidentifier() and any(p.glob("*.py")):
            out[p.name] = p.name + "/"
    return out


def shadowed(root: Path) -> list[str]:
    """One line per top-level name of `root` that an installed distribution also provides."""
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()
    return [f"{path} shadows the top-level name {name!r} of the installed distribution(s) "
            f"{', '.join(sorted(set(provided[name])))}"
            for name, path in sorted(top_level_names(root).items()) if name in provided]


def test_no_top_level_name_shadows_an_installed_distribution():
    names = top_level_names(REPO)
    assert {"model", "engine", "memento_kernels", "data", "tests"} <= set(names)  # the walk sees files and folders
    bad = shadowed(REPO)
    assert not bad, "\n".join(bad)


def test_the_shadowing_check_names_both_sides(tmp_path):
    """A throwaway tree with a top-level kernels/ and a yaml.py (both provided by installed
    distributions: Hugging Face's kernels, which transformers imports, and PyYAML) is reported,
    naming the file and the distribution."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "ours.py").write_text("")
    bad = shadowed(tmp_path)
    assert bad == ["kernels/ shadows the top-level name 'kernels' of the installed distribution(s) kernels",
                   "yaml.py shadows the top-level name 'yaml' of the installed distribution(s) PyYAML"], bad


def test_transformers_qwen3_imports_with_the_repository_first_on_sys_path():
    """What every script run from the root does (its folder is sys.path[0]), in a fresh process:
    importing transformers' Qwen3 model class, which imports Hugging Face's `kernels`, must not
    find a module of ours instead."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from transformers import Qwen3ForCausalLM; import transformers.integrations.hub_kernels; "
            "print(Qwen3ForCausalLM.__module__)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "transformers.models.qwen3.modeling_qwen3"
