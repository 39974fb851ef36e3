"""The package's import structure (CONTRIBUTING.md, "Layout"): no import cycles among the modules of aunn_fast
(kernels/ and bench/ install as aunn_fast.kernels and aunn_fast.bench); the kernels depend on nothing of
aunn_fast but its base layer, which depends on nothing else of it; importing the kernels changes nothing."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"aunn_fast": ROOT / "aunn_fast", "aunn_fast.kernels": ROOT / "kernels", "aunn_fast.bench": ROOT / "bench"}
# the modules of aunn_fast the kernels may import: plain types and operand rounding, importing nothing else
BASE_LAYER = {"aunn_fast.config", "aunn_fast.errors", "aunn_fast.params", "aunn_fast.rounding"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _import_time_nodes(statements: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at import: the module's own, and those in its top-level if/try blocks, except
    ``if TYPE_CHECKING:`` (imports for annotations only)."""
    nodes = []
    for node in statements:
        nodes.append(node)
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            nodes += _import_time_nodes(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            nodes += _import_time_nodes(
                node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
            )
    return nodes


def _imports(name: str, path: Path, modules: dict[str, Path], top_level: bool) -> set[str]:
    """The package modules `name` imports: at import time only (top_level), or anywhere in it."""
    tree = ast.parse(path.read_text())
    nodes = _import_time_nodes(tree.body) if top_level else list(ast.walk(tree))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        # (a module's own ancestor packages are initialised before it: not an edge)
        found |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return found


def test_no_import_cycles():
    """At import time (a function's own import, run when called, is no cycle)."""
    modules = _modules()
    graph = {name: _imports(name, path, modules, top_level=True) for name, path in modules.items()}
    cycles = set()
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.add(frozenset(trail))
                elif nxt not in trail and nxt > start:  # each cycle found once, from its smallest member
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, [sorted(c) for c in cycles]


def test_kernels_depend_only_on_the_base_layer():
    """Not on the model, the backends or the reference (the oracle they are tested against), even lazily."""
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(name, path, modules, top_level=False)
        if name.startswith("aunn_fast.kernels"):
            outside = {m for m in imported if not m.startswith("aunn_fast.kernels")} - BASE_LAYER - {"aunn_fast"}
            assert not outside, f"{name} imports {sorted(outside)}"
        if name in BASE_LAYER:
            assert not imported - BASE_LAYER, f"{name} imports {sorted(imported - BASE_LAYER)}"


def test_importing_the_kernels_changes_nothing():
    """No import side effects: Triton's interpreter is patched by the first interpreted launch, not by an import;
    importing the configuration loads no Triton."""
    code = (
        "import sys; import aunn_fast.kernels.config; assert 'triton' not in sys.modules, 'config loads triton'\n"
        "from triton.runtime import interpreter; before = interpreter._patch_lang_tensor\n"
        "import aunn_fast.kernels.common, aunn_fast.kernels.mlp_forward, aunn_fast.kernels.ops\n"
        "assert interpreter._patch_lang_tensor is before, 'an import patched the interpreter'"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
