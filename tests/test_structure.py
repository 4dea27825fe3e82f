"""The layout rules: who imports whom (every import, lazy ones included), and scripts that are only scripts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama_ref", "counters")
# Outside the counting core: the command line, its commands and the studies built on the counts.
UPPER = ("counters.cli", "counters.commands", "counters.studies")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that importing ``name`` runs, anywhere in the file (function-level imports
    included): importing ``a.b.c`` runs ``a/__init__``, ``a.b/__init__`` and ``a.b.c`` (a module's own parent
    packages are running already)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # "from . import table" imports a module
    out: set[str] = set()
    for m in found:
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            mod = ".".join(parts[:k])
            if mod in MODULES and mod != name and not name.startswith(mod + "."):
                out.add(mod)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
CORE = sorted(m for m in GRAPH if m.startswith("counters") and not m.startswith(UPPER) and m != "counters")


def test_llama_ref_never_imports_counters():
    bad = {m: sorted(i for i in deps if i.startswith("counters")) for m, deps in GRAPH.items()
           if m.startswith("llama_ref")}
    assert not {m: d for m, d in bad.items() if d}


def test_the_counting_core_never_imports_the_studies_the_commands_or_the_cli():
    assert {"counters.table", "counters.analytic", "counters.crosscheck", "counters.tp"} <= set(CORE)
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith(UPPER)) for m in CORE}
    assert not {m: d for m, d in bad.items() if d}


def test_the_counting_core_learns_tensor_parallelism_from_its_own_plan():
    """No core module imports llama_ref.parallel: which rows split and which collectives they send is the
    table's own TP plan; ranks are built by the commands."""
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith("llama_ref.parallel")) for m in CORE}
    assert not {m: d for m, d in bad.items() if d}


def test_the_model_file_reads_alone():
    """The forward's code: one file of at most 600 lines that imports no loader, no parallelism, no counter."""
    assert len(MODULES["llama_ref.model"].read_text().splitlines()) <= 600
    assert GRAPH["llama_ref.model"] == {"llama_ref.config", "llama_ref.guards", "llama_ref.rope_scaling",
                                        "llama_ref.shapes"}


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_anywhere():
    """Every module of both packages, every import counted (lazy ones and package __init__s included)."""
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_importlib_tricks(pkg):
    for path in sorted((ROOT / pkg).rglob("*.py")):
        text = path.read_text()
        assert "importlib" not in text and "spec_from_file_location" not in text, path


SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


GUARD = "counters.interrupt"  # stdlib only: imported first, so that Ctrl-C while torch loads is one line


def _imported(nodes) -> set:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_only_scripts(script):
    """A script runs a ``main`` from the packages: no code of its own that a test or another script would
    have to import by path, and no ``sys.path`` edits. It imports that ``main`` (and torch with it) inside
    ``exit_on_interrupt``, whose module is the only one of ours imported at the top."""
    text = script.read_text()
    assert "sys.path" not in text and "importlib" not in text
    tree = ast.parse(text, filename=str(script))
    imported = _imported(ast.walk(tree))
    ours = {m for m in imported if m.split(".")[0] in PACKAGES}
    assert imported - ours <= {"sys"}, f"{script.name} imports {sorted(imported - ours - {'sys'})}"
    mains = ours - {GUARD}
    assert GUARD in ours and len(mains) == 1 and [m for m in mains][0] in GRAPH, f"{script.name} imports {sorted(ours)}"
    assert _imported(tree.body) == {"sys", GUARD}, f"{script.name}: the main is imported at the top, unguarded"
    assert f'exit_on_interrupt("{script.name}")' in text
    functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not functions, f"{script.name} defines {functions}: that code belongs in a package"


def test_entry_points_import_nothing_heavy():
    """What runs before the guard (the console entry point's module, the scripts' guard) loads no torch."""
    import subprocess
    import sys

    code = ("import sys, counters.cli, counters.interrupt; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'llama_ref', 'numpy')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"bench.py", "compare_hf.py", "make_synthetic_checkpoint.py",
                                           "tp_check.py", "validate_gpu.py"}
