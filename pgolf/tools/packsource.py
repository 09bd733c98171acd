"""The source side of the packer (pgolf/tools/pack.py): which runtime modules an entry imports, and their
source made small with the standard library's `ast`.

- `runtime_modules`: the modules of the runtime folders (pgolf/export/code.py), by dotted name; a
  package is `name.__init__`.
- `collect`: the modules reachable from an entry over its imports (module level and inside functions;
  each import also loads the packages above the module). An import that only registers something (its
  bound name is never used in the importing module, or only in function annotations) of a module in `drop`
  is removed from the source first, so an eval mode or an optional part the experiment does not use is not
  packed; so is the registration of an unused eval mode whose module another mode needs
  (`register(Mode("ttt", ...))` in pgolf/eval/ttt.py, whose helpers phased TTT imports), and with it, through
  `shake`, the mode's run function and rule. A tool module is never reachable
  (tests/test_imports.py); meeting one raises PackError.
- `minify`: docstrings, comments, function annotations and `if __name__ == "__main__":` blocks removed,
  then `shake` drops the top-level functions and classes that no packed code names, `unparse` writes the
  tree back, and python-minifier (a maintained minifier, https://github.com/dflook/python-minifier)
  renames local variables and the module-level names nothing outside the module can name (`kept_globals`),
  folds constants and writes the smallest layout (`compact`; no literal hoisting: it makes the compressed
  file larger). Class-level annotations stay (dataclass fields and the typed config schema need them); so
  does every statement that runs at import. python-minifier takes about a second over a whole experiment,
  so its output is cached per module source (`$XDG_CACHE_HOME/pgolf/minify`, keyed by the source, the
  names kept, the minifier's version and options and the Python version).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.metadata
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import python_minifier

from pgolf.export.code import RUNTIME_DIRS, TOOLS_DIR, code_files
from pgolf.io import atomic_write_bytes

INIT = "__init__"
# Decorators that only wrap the function or class they decorate (no registration): a definition they
# decorate may be dropped when nothing names it. Any other decorator keeps its definition.
PURE_DECORATORS = {
    "dataclass",
    "dataclasses.dataclass",
    "contextmanager",
    "contextlib.contextmanager",
    "torch.no_grad",
    "torch.inference_mode",
    "functools.cache",
    "functools.lru_cache",
    "cache",
    "lru_cache",
}
# Imported only by features a packed run does not use: W&B (the packed script logs to logs/{RUN_ID}.txt).
OPTIONAL_PACKAGES = ("wandb",)
WORD = re.compile(r"[A-Za-z_]\w*")


class PackError(ValueError):
    """The runtime cannot be packed as it is (a tool module reached, a relative import, a missing entry)."""


@dataclass
class Module:
    """One packed module: its dotted key (`pgolf.eval` is `pgolf.eval.__init__`), its tree, the project
    modules it imports and the third-party top-level names it imports at module level."""

    key: str
    tree: ast.Module
    imports: set[str] = field(default_factory=set)
    external: set[str] = field(default_factory=set)


def runtime_modules(root: Path) -> dict[str, Path]:
    """{dotted key: file} of the runtime folders under `root` (packages as `name.__init__`), tools excluded:
    `code_files` without the entry points."""
    out = {}
    for p in code_files(root):
        rel = p.relative_to(root)
        if rel.parts[0] in RUNTIME_DIRS:
            out[".".join(rel.with_suffix("").parts)] = p
    return out


def is_tool(name: str) -> bool:
    tools = TOOLS_DIR.replace("/", ".")
    return name == tools or name.startswith(tools + ".")


def dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def module_of(name: str, keys: dict) -> str | None:
    """The runtime module key an import of `name` loads (the module, or the package defining the name)."""
    while name:
        if name in keys:
            return name
        if f"{name}.{INIT}" in keys:
            return f"{name}.{INIT}"
        name = name.rpartition(".")[0]
    return None


def with_packages(key: str, keys: dict) -> set[str]:
    """`key` and the `__init__` of every package above it that exists in `keys`."""
    out = {key}
    parts = key.removesuffix("." + INIT).split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i]) + "." + INIT
        if pkg in keys:
            out.add(pkg)
    return out


def import_targets(node: ast.Import | ast.ImportFrom, where: str) -> list[tuple[str, str | None]]:
    """[(imported dotted name, the name it binds or None)] of one import statement. Raises PackError for a
    relative import (the runtime uses absolute imports only)."""
    if isinstance(node, ast.Import):
        return [(a.name, a.asname) for a in node.names]
    if node.level:
        raise PackError(f"{where}: relative import at line {node.lineno}; the packer resolves absolute imports")
    out = [(node.module, None)]
    return out + [(f"{node.module}.{a.name}", a.asname or a.name) for a in node.names]


def used_names(tree: ast.AST, annotations: bool = True) -> set[str]:
    """Every Name and the dotted form of every attribute chain read in `tree`; with `annotations` False,
    not those read only in function annotations (`strip` removes them)."""
    skip = set() if annotations else {id(n) for a in _function_annotations(tree) for n in ast.walk(a)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and (d := dotted(n)):
            out.add(d)
    return out


def _function_annotations(tree: ast.AST) -> list[ast.expr]:
    """The argument and return annotations of every function in `tree`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            out += [x.annotation for x in args if x is not None and x.annotation is not None]
            if node.returns is not None:
                out.append(node.returns)
    return out


def drop_registrations(tree: ast.Module, keys: dict, drop: set[str]) -> None:
    """Remove from `tree`'s module-level imports those of modules in `drop` whose bound names the module
    never uses (`from pgolf.eval import slot  # registers its modes`), and the names imported from such a
    module that only function annotations use (`from pgolf.model.decode import DecodeCache` for
    `cache: DecodeCache | None`; `strip` removes the annotations); an import whose name is used stays."""
    hits = [s for s in tree.body if isinstance(s, ast.Import | ast.ImportFrom) and _imports_any(s, keys, drop)]
    if not hits:
        return
    used, annotated = used_names(tree, annotations=False), used_names(tree)
    kept = []
    for stmt in tree.body:
        if any(stmt is h for h in hits):
            stmt = _without_dropped(stmt, keys, drop, used, annotated)
        if stmt is not None:
            kept.append(stmt)
    tree.body = kept


def _imports_any(stmt: ast.Import | ast.ImportFrom, keys: dict, drop: set[str]) -> bool:
    return not getattr(stmt, "level", 0) and any(module_of(name, keys) in drop for name, _ in import_targets(stmt, ""))


def _without_dropped(
    stmt: ast.Import | ast.ImportFrom, keys: dict, drop: set[str], used: set[str], annotated: set[str]
):
    """`stmt` less its aliases of a module of `drop` that bind a name `used` (outside function annotations)
    lacks: a module, or a name the annotations use (`annotated`); None if empty."""
    aliases = []
    for a in stmt.names:
        name = a.name if isinstance(stmt, ast.Import) else f"{stmt.module}.{a.name}"
        bound = a.asname or (a.name if isinstance(stmt, ast.ImportFrom) else a.name)
        is_module = module_of(name, keys) == name or module_of(name, keys) == f"{name}.{INIT}"
        in_use = bound in used or any(u.startswith(bound + ".") for u in used)
        droppable = is_module or bound in annotated
        if not (droppable and module_of(name, keys) in drop and not in_use):
            aliases.append(a)
    if not aliases:
        return None
    stmt.names = aliases
    return stmt


def drop_mode_registrations(tree: ast.Module, modes: set[str]) -> None:
    """Remove from `tree` the module-level registrations of the eval modes `modes`: the statements
    `register(Mode("<name>", ...))` of pgolf/eval/registry.py whose name is in `modes`."""
    tree.body = [s for s in tree.body if _registered_mode(s) not in modes]


def _registered_mode(stmt: ast.stmt) -> str | None:
    """The mode name of a `register(Mode("<name>", ...))` statement, else None."""
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if not (isinstance(call, ast.Call) and dotted(call.func) == "register" and len(call.args) == 1):
        return None
    mode = call.args[0]
    if isinstance(mode, ast.Call) and dotted(mode.func) == "Mode" and mode.args:
        name = mode.args[0]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            return name.value
    return None


def scan_imports(mod: Module, keys: dict) -> None:
    """Fill `mod.imports` (runtime modules) and `mod.external` (third-party top-level names but the
    OPTIONAL_PACKAGES), imported anywhere in the module. Raises PackError for a tool module."""
    for node, _ in _imports_with_scope(mod.tree):
        for name, _ in import_targets(node, mod.key):
            top = name.partition(".")[0]
            target = module_of(name, keys)
            if is_tool(name):
                raise PackError(f"{mod.key} imports the tool {name}; the runtime never imports pgolf/tools")
            if target is not None:
                mod.imports |= with_packages(target, keys)
            elif top not in (*RUNTIME_DIRS, *OPTIONAL_PACKAGES) and top not in sys.stdlib_module_names:
                mod.external.add(top)


def _imports_with_scope(tree: ast.AST, in_function: bool = False):
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _imports_with_scope(child, fn)


def collect(
    entry: str, keys: dict[str, Path], drop: set[str] = frozenset(), unregister: set[str] = frozenset()
) -> dict[str, Module]:
    """The modules reachable from `entry` (a key of `keys`), in a stable order (sorted keys), their imports
    of `drop` removed where they only register, and the registrations of the eval modes `unregister`
    removed. Raises PackError."""
    if entry not in keys:
        raise PackError(f"the entry module {entry} is not in the runtime folders")
    seen: dict[str, Module] = {}
    todo = sorted(with_packages(entry, keys))
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        tree = ast.parse(keys[key].read_text(encoding="utf-8"), filename=str(keys[key]))
        drop_registrations(tree, keys, set(drop))
        drop_mode_registrations(tree, set(unregister))
        mod = Module(key, tree)
        scan_imports(mod, keys)
        seen[key] = mod
        todo += sorted(mod.imports - set(seen))
    return {k: seen[k] for k in sorted(seen)}


# ---- making the source small -------------------------------------------------------------------------------
def strip(tree: ast.Module) -> ast.Module:
    """Docstrings, function annotations and `if __name__ == "__main__":` blocks removed (comments are not in
    the tree). Class-level annotations (dataclass fields) stay."""
    tree.body = [s for s in tree.body if not _is_main_guard(s)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
    return tree


def _is_main_guard(stmt: ast.stmt) -> bool:
    t = stmt.test if isinstance(stmt, ast.If) else None
    return (
        isinstance(t, ast.Compare)
        and dotted(t.left) == "__name__"
        and len(t.comparators) == 1
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "__main__"
    )


def references(tree: ast.AST) -> set[str]:
    """Every identifier `tree` may refer to a definition by: names, attribute names, imported names, and
    the identifier-like words of string constants (`__all__`, `getattr` by name)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.alias):
            out.add(n.name.rpartition(".")[2])
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.update(WORD.findall(n.value))
    return out


def _removable(node: ast.stmt) -> bool:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("__"):
        return False
    decorators = [dotted(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
    return all(d in PURE_DECORATORS for d in decorators)


def shake(trees: dict[str, ast.Module], extra_refs: set[str] = frozenset()) -> int:
    """Drop the top-level functions and classes (undecorated, or with PURE_DECORATORS) whose name nothing
    kept refers to (`references`, across all `trees`, plus `extra_refs`); to a fixed point. Names are
    matched across modules, so a name used anywhere keeps every definition of it. Returns how many were
    dropped."""
    defs = [(key, node) for key, t in trees.items() for node in t.body if _removable(node)]
    live = set(extra_refs)
    for t in trees.values():
        for node in t.body:
            if not _removable(node):
                live |= references(node)
    grown = True
    done: set[int] = set()
    while grown:
        grown = False
        for _, node in defs:
            if id(node) not in done and node.name in live:
                done.add(id(node))
                live |= references(node)
                grown = True
    dead = {id(node) for _, node in defs if node.name not in live}
    for t in trees.values():
        t.body = [n for n in t.body if id(n) not in dead] or [ast.Pass()]
    return len(dead)


def unparse(tree: ast.Module) -> str:
    """The source of `tree` with one space per indentation level (four in ast.unparse) and no blank lines;
    left as ast.unparse writes it when a string literal spans lines."""
    src = ast.unparse(tree)
    if ('"""' in src or "'''" in src) and _multiline_string(src):  # ast.unparse escapes newlines otherwise
        return src + "\n"
    lines = []
    for line in src.splitlines():
        body = line.lstrip(" ")
        if body:  # blank lines carry nothing outside a string literal
            lines.append(" " * ((len(line) - len(body)) // 4) + body)
    return "\n".join(lines) + "\n"


def _multiline_string(src: str) -> bool:
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    return any(t.type == tokenize.STRING and t.start[0] != t.end[0] for t in tokens)


MINIFIER_VERSION = importlib.metadata.version("python-minifier")
# python-minifier's settings: module-level names are renamed too, but those another packed module, the config
# or the bootstrap may name (`compact`'s `keep`), every class (its name shows in reprs, pickles and Lightning's
# callback state keys) and every word of the module's own string literals (`__all__`, getattr by name) stay;
# class attribute annotations stay (dataclass fields); literals are not hoisted into names (lzma/brotli
# compress repeated literals better than the extra assignments).
MINIFIER_OPTIONS = dict(
    remove_literal_statements=True,
    hoist_literals=False,
    rename_locals=True,
    rename_globals=True,
    remove_annotations=python_minifier.RemoveAnnotationsOptions(remove_class_attribute_annotations=False),
)


CACHE_CHECK = "# sha256:"  # the last line of a cache entry: the checksum of the lines above it


def cache_dir() -> Path:
    """Where `compact` keeps python-minifier's output: `$XDG_CACHE_HOME/pgolf/minify` (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgolf" / "minify"


def compact(src: str, keep: set[str] = frozenset()) -> str:
    """`src` through python-minifier (`MINIFIER_OPTIONS`), its module-level names renamed but those of `keep`
    (`kept_globals`), read from / written to the cache (`cache_dir`; an entry is the output and a last line
    with its sha256). An entry that cannot be read, whose checksum does not match or that cannot be written
    is recomputed; the result is the same either way."""
    keep = sorted(keep)
    key = "\0".join([MINIFIER_VERSION, repr(MINIFIER_OPTIONS), sys.version, repr(keep), src])
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()}.py"
    try:
        cached, _, check = path.read_text(encoding="utf-8").rpartition(CACHE_CHECK)
        if check == hashlib.sha256(cached.encode()).hexdigest() + "\n":
            return cached
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    out = python_minifier.minify(src, preserve_globals=keep, **MINIFIER_OPTIONS).rstrip("\n") + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, f"{out}{CACHE_CHECK}{hashlib.sha256(out.encode()).hexdigest()}\n".encode())
    except OSError:
        pass
    return out


def global_names(tree: ast.Module) -> set[str]:
    """The names `tree` binds at module level: definitions, imports and assignment targets (the names of
    `global` statements inside functions are not included: `kept_globals` adds them)."""
    out = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        n = todo.pop()
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(n.name)
        elif isinstance(n, ast.Import | ast.ImportFrom):
            out |= {a.asname or a.name.partition(".")[0] for a in n.names}
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif not isinstance(n, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            todo.extend(ast.iter_child_nodes(n))
    return out


def kept_globals(tree: ast.Module, named: set[str]) -> set[str]:
    """The module-level names of `tree` (`global_names` and those of `global` statements) python-minifier
    must not rename: those of `named` (what the other packed modules, the config's words and the bootstrap's
    entry may name: `references`), every class, the words of the module's own string literals; and Python's
    builtins (python-minifier would bind short aliases of them per module, which makes the file shorter and
    its compressed payload longer)."""
    names, keep = global_names(tree), set(named)
    for n in ast.walk(tree):
        if isinstance(n, ast.ClassDef):
            keep.add(n.name)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            keep.update(WORD.findall(n.value))
        elif isinstance(n, ast.Global):
            names.update(n.names)
    return (names & keep) | set(dir(builtins))


def shaken(modules: dict[str, Module], extra_refs: set[str] = frozenset()) -> dict[str, ast.Module]:
    """{key: tree} of the collected modules, `strip`ped and `shake`n (`extra_refs`: names used from outside)."""
    trees = {k: strip(m.tree) for k, m in modules.items()}
    shake(trees, extra_refs)
    return trees


def minify(modules: dict[str, Module], extra_refs: set[str] = frozenset()) -> dict[str, str]:
    """{key: small source} of the collected modules (`shaken`, `unparse`, `compact` with `kept_globals`)."""
    trees = shaken(modules, extra_refs)
    refs = {k: references(t) for k, t in trees.items()}
    out = {}
    for k, t in trees.items():
        named = set(extra_refs).union(*(r for j, r in refs.items() if j != k))
        out[k] = compact(unparse(t), kept_globals(t, named))
    return out
