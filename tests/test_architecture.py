"""Architecture rules, checked on the source with `ast` (no imports, well under a second):

1. No import cycle among peer_attention's modules (triton_kernels/ is peer_attention.triton_kernels)
   nor among bench/'s modules. Every import statement counts, module-level and function-local alike
   (a function-local import that closes a cycle is a cycle that has been hidden, not broken), except
   imports under `if TYPE_CHECKING:` (never executed). Edges go to the module an import names:
   `from .x import y` -> x (or x.y when y is a submodule); the implicit import of parent packages
   is not counted (every submodule would otherwise "cycle" through its package's __init__).
   Allowed lazy imports: none. (An optional heavy dependency outside the package, e.g. diffusers or
   flash_attn, is no edge of this graph, so it needs no entry.)
2. No module uses another module's private name: neither `from X import _name` nor `X._name` (also
   through chains such as `pa.dispatch._name`) where X is a module of peer_attention or bench other
   than the importing one. Dunder names are fine; private *modules* of the package (e.g.
   peer_attention._C, the compiled extension) are package-internal, not another module's private
   name. torch's and triton's private APIs are out of scope (only names bound to our modules are
   followed).
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# No known violations are tolerated: every cycle and cross-module private name fails the tests.
PENDING_CYCLES: Set[Tuple[str, ...]] = set()
PENDING_PRIVATE: Set[Tuple[str, str]] = set()


# ---- the module table -----------------------------------------------------------------------

def _module_files() -> Dict[str, str]:
    """{dotted module name: path} of peer_attention (triton_kernels/ as peer_attention.triton_kernels)
    and bench."""
    files: Dict[str, str] = {}
    for top, package in (("peer_attention", "peer_attention"), ("triton_kernels", "peer_attention.triton_kernels"),
                         ("bench", "bench")):
        base = os.path.join(ROOT, top)
        for dirpath, dirnames, filenames in os.walk(base):
            # the worktree's peer_attention/triton_kernels symlink is the same files as triton_kernels/
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                 and not os.path.islink(os.path.join(dirpath, d)))
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                stem = name[:-3]
                dotted = ".".join(parts if stem == "__init__" else parts + [stem])
                files[dotted] = os.path.join(dirpath, name)
    return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES.get(module, "").endswith("__init__.py")


def _resolve(module: str, level: int, target: Optional[str]) -> str:
    """The absolute name of `from <level dots><target> import ...` inside `module`."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if _is_package(module) else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _ours(name: str) -> bool:
    return name.split(".")[0] in ("peer_attention", "bench")


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every executed import of one module: edges to our modules, the names they bind, and the
    private names taken from other modules."""

    def __init__(self, module: str):
        self.module = module
        self.edges: List[Tuple[str, int]] = []                 # (target module, line)
        self.bound: Dict[str, str] = {}                        # local name -> our module it is bound to
        self.private: List[Tuple[int, str]] = []               # (line, what)

    def visit_If(self, node: ast.If) -> None:
        if _under_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _ours(alias.name):
                continue
            self._edge(alias.name, node.lineno)
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:  # `import a.b` binds `a`
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _resolve(self.module, node.level, node.module)
        if not _ours(source):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if _private_module(full) and full not in MODULES:  # the compiled extension: no edge
                continue
            if full in MODULES:  # a submodule
                self._edge(full, node.lineno)
                self.bound[alias.asname or alias.name] = full
                continue
            self._edge(source, node.lineno)
            if _private(alias.name) and source != self.module and not _private_module(full):
                self.private.append((node.lineno, f"from {source} import {alias.name}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self._module_of(node.value)
        if owner is not None and owner != self.module and _private(node.attr) \
                and not _private_module(f"{owner}.{node.attr}"):
            self.private.append((node.lineno, f"{_dotted(node.value)}.{node.attr} ({owner}.{node.attr})"))
        self.generic_visit(node)

    def _module_of(self, node: ast.expr) -> Optional[str]:
        """The module of ours an expression names (`pa`, `pa.dispatch`), else None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            parent = self._module_of(node.value)
            if parent is not None and f"{parent}.{node.attr}" in MODULES:
                return f"{parent}.{node.attr}"
        return None

    def _edge(self, target: str, line: int) -> None:
        # the deepest of our modules that the name reaches (`a.b.name` where name is a function)
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != self.module:
            self.edges.append((target, line))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(full: str) -> bool:
    """A private module of the package (e.g. peer_attention._C, the compiled extension): internal
    to the package, not another module's private name."""
    return full in MODULES or full == "peer_attention._C"


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "..."


def _scan() -> Dict[str, _Imports]:
    result = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        visitor = _Imports(module)
        visitor.visit(tree)
        result[module] = visitor
    return result


SCAN = _scan()


def _cycles(prefix: str) -> List[Tuple[str, ...]]:
    """The strongly connected components (Tarjan) of more than one module, or a module importing
    itself, among the modules whose name starts with `prefix`."""
    nodes = [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]
    graph = {m: sorted({t for t, _ in SCAN[m].edges if t in nodes}) for m in nodes}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[Tuple[str, ...]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def _describe_cycle(component: Tuple[str, ...]) -> str:
    members = set(component)
    lines = []
    for m in component:
        for target, line in SCAN[m].edges:
            if target in members:
                lines.append(f"  {os.path.relpath(MODULES[m], ROOT)}:{line} imports {target}")
    return " <-> ".join(component) + "\n" + "\n".join(sorted(set(lines)))


def _private_uses(prefix: str) -> List[Tuple[str, int, str]]:
    """(path, line, what) of every private name of another module used in the tree `prefix`."""
    found = []
    for module, visitor in SCAN.items():
        if module == prefix or module.startswith(prefix + "."):
            path = os.path.relpath(MODULES[module], ROOT).replace(os.sep, "/")
            found += [(path, line, what) for line, what in visitor.private]
    return sorted(found)


def _pending(use: Tuple[str, int, str]) -> bool:
    return (use[0], use[2]) in PENDING_PRIVATE


# ---- the tests ------------------------------------------------------------------------------

def test_the_scan_sees_both_trees():
    assert "peer_attention.dispatch" in MODULES and "bench.runner" in MODULES
    assert "peer_attention.triton_kernels.fwd" in MODULES
    assert SCAN["bench.runner"].edges, "the scan found no import in bench/runner.py"


@pytest.mark.parametrize("prefix", ["peer_attention", "bench"])
def test_no_import_cycle(prefix):
    cycles = [c for c in _cycles(prefix) if c not in PENDING_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(_describe_cycle(c) for c in cycles)


@pytest.mark.parametrize("prefix", ["peer_attention", "bench"])
def test_no_private_name_of_another_module(prefix):
    uses = [u for u in _private_uses(prefix) if not _pending(u)]
    assert not uses, "private names of other modules:\n" + "\n".join(f"  {p}:{n}: {what}" for p, n, what in uses)


# ---- the checker itself ---------------------------------------------------------------------

def _visit(module: str, source: str) -> _Imports:
    visitor = _Imports(module)
    visitor.visit(ast.parse(source))
    return visitor


def test_the_checker_sees_what_it_must_and_nothing_else():
    v = _visit("peer_attention.api", "\n".join([
        "from .dispatch import _check_name, available_backends",       # private: yes
        "from . import ops",
        "import peer_attention as pa",
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "    from .ops import Problem",                                 # not executed: no edge
        "def f():",
        "    from .double_backward import double_backward",             # function-local: an edge
        "    ops._eager['x'] = 1",                                       # private: yes
        "    pa.dispatch._ops",                                          # private through a chain
        "    ops.__name__, torch._C, pa.api._helper",                   # dunder, not ours, same module
        "    pa._C",                                                     # the private extension module
    ]))
    targets = {t for t, _ in v.edges}
    assert targets == {"peer_attention.dispatch", "peer_attention.ops", "peer_attention",
                       "peer_attention.double_backward"}
    assert [what.split(" ")[0] for _, what in v.private] == [
        "from", "ops._eager", "pa.dispatch._ops"]


def test_distributed_is_a_lazy_attribute_of_the_package():
    """`peer_attention.distributed` works after `import peer_attention`, but only its first use
    imports it (a subprocess: this session may have imported it already)."""
    import subprocess
    import sys

    code = ("import sys, peer_attention as pa\n"
            "assert 'peer_attention.distributed' not in sys.modules, 'imported eagerly'\n"
            "assert 'distributed' in dir(pa)\n"
            "assert pa.distributed is sys.modules['peer_attention.distributed']\n"
            "assert callable(pa.distributed.context_parallel_sdpa)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
