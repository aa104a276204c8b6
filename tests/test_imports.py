"""No import cycle among the package's modules (function-local imports included): each layer
imports only the layers below it (docs/architecture.md)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "peer_attention"


def _modules():
    """{module name: path} of peer_attention/ (its triton_kernels link not followed: the Triton
    package has its own tests)."""
    found = {}
    for folder, _dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def _outside(module):
    """A module these tests leave out: the compiled extension, the triton_kernels link."""
    return module == f"{PACKAGE}._C" or module.startswith(f"{PACKAGE}.triton_kernels")


def _imports(module, path, modules):
    """The package modules `module` imports. `from . import x` counts as importing x (not the
    package) where x is a module."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    base = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = (".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                      if node.level else node.module)
            subs = [f"{target}.{a.name}" for a in node.names]
            deps.update(s for s in subs if s in modules)
            if target in modules and not all(s in modules or _outside(s) for s in subs):
                deps.add(target)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in modules)
    deps.discard(module)
    return deps


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, path, modules) for m, path in modules.items()}
    state, cycles = {}, []

    def visit(m, trail):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
