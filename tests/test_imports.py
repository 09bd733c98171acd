"""The plan of the house, as tests: the import graph of the project's own modules.

- The runtime (everything `train.py` and `eval.py` need to train, export and evaluate: `pgolf/` except
  `pgolf/tools/`, and `callbacks/`) never imports a tool module.
- No import circles between the project's modules.
- No project import inside a function: every dependency is visible at the top of its module.
- Counted code is defined by the same folders (pgolf/export/code.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

from pgolf.export.code import TOOLS_DIR, code_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pgolf", "callbacks")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in p.parts:
                mods[module_name(p)] = p
    for entry in ("train.py", "eval.py"):
        mods[entry.removesuffix(".py")] = ROOT / entry
    return mods


def resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module an import of `name` loads (a module, or the package that defines the name)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, mods: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, module)] imported inside a function)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    inner: list[tuple[int, str]] = []

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pgolf.tools import compare` imports the module pgolf.tools.compare
            return [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        return []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = {m for m in (resolve(n, mods) for n in names(child)) if m}
                if in_function:
                    inner.extend((child.lineno, m) for m in sorted(found))
                else:
                    top.update(found)
            visit(child, fn)

    visit(tree, False)
    return top, inner


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, mods)[0] - {m} for m, p in mods.items()}


def is_tool(module: str) -> bool:
    return module == TOOLS_DIR.replace("/", ".") or module.startswith(TOOLS_DIR.replace("/", ".") + ".")


def test_runtime_never_imports_a_tool():
    g = graph()
    bad = sorted(
        (m, d) for m, deps in g.items() for d in deps if not is_tool(m) and m not in ("train", "eval") and is_tool(d)
    )
    assert not bad, f"runtime modules import tools: {bad}"


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                dfs(d, [*stack, d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# Imports deferred on purpose. The entry points validate the config before they import the runtime (Lightning
# alone takes seconds), so `python train.py --help` or a typo answers at once; nothing else defers a project import.
DEFERRED_OK: set[tuple[str, str]] = {
    ("train", "pgolf.config.runtime"),
    ("train", "pgolf.tools.datasets"),
    ("train", "pgolf.tools.pack"),
    ("train", "pgolf.tools.sweep"),
    ("train", "pgolf.train.run"),
    ("eval", "pgolf.eval.run"),
}


def test_no_project_imports_inside_functions():
    mods = project_modules()
    found = []
    for m, p in mods.items():
        for line, dep in imports_of(p, mods)[1]:
            if (m, dep) not in DEFERRED_OK:
                found.append(f"{p.relative_to(ROOT)}:{line} imports {dep}")
    assert not found, "project imports inside functions:\n" + "\n".join(found)


def test_counted_code_is_the_runtime_folders():
    counted = {module_name(p) for p in code_files(ROOT)}
    mods = project_modules()
    runtime = {m for m in mods if not is_tool(m)}
    assert counted == runtime
    assert not any(is_tool(m) for m in counted)


def test_the_graph_sees_a_tool_import(tmp_path):
    """The checker itself: a runtime-style module importing a tool is reported, a circle is found."""
    mods = {"pgolf.a": tmp_path / "a.py", "pgolf.tools.t": tmp_path / "t.py"}
    (tmp_path / "a.py").write_text("from pgolf.tools import t\n\ndef f():\n    import pgolf.a\n")
    top, inner = imports_of(tmp_path / "a.py", mods)
    assert top == {"pgolf.tools.t"} and inner == [(4, "pgolf.a")]
    assert is_tool("pgolf.tools.t") and not is_tool("pgolf.toolsx")
