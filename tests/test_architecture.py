"""The shape of the code, enforced: imports point one way, nothing imports in a cycle.

Every ``import`` of a project module is counted, at module level and inside functions alike (an import moved
into a function still runs, so it still closes a cycle). Only ``if TYPE_CHECKING:`` blocks are left out: they
never run. The layer order is the one docs/architecture.md describes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "adapters_for_tools", "kernels")

# harness sub-packages, low to high: a module imports from its own layer or a lower one.
HARNESS_LAYERS = ("common", "inputs", "spec", "measuring", "storing", "running", "analysis", "reporting", "cli")
# The adapters' light side (registry, contract, each adapter's __init__) is read by validation, so it sits just
# under harness.spec; an adapter's heavy side runs inside the worker, over the measuring layer.
ADAPTER_LIGHT_RANK = HARNESS_LAYERS.index("spec") - 0.5
ADAPTER_HEAVY_RANK = HARNESS_LAYERS.index("measuring") + 0.5
TOP_RANK = len(HARNESS_LAYERS)  # harness/__init__.py, harness/__main__.py


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int, bool]] = []

    def resolve(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            func = in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for a in child.names:
                    if (m := resolve(a.name)) and a.name.split(".")[0] in PACKAGES:
                        out.append((m, child.lineno, in_func))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] not in PACKAGES:
                    continue
                for a in child.names:  # `from pkg import module` imports the module
                    if (m := resolve(f"{target}.{a.name}")) and m == f"{target}.{a.name}":
                        out.append((m, child.lineno, in_func))
                    elif m := resolve(target):
                        out.append((m, child.lineno, in_func))
            visit(child, func)

    visit(tree, False)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = _modules()
    return {name: _imports(path, name, known) for name, path in known.items()}


def _rank(mod: str) -> float | None:
    parts = mod.split(".")
    if parts[0] == "harness":
        if len(parts) == 1 or parts[1] == "__main__":
            return TOP_RANK
        return HARNESS_LAYERS.index(parts[1]) if parts[1] in HARNESS_LAYERS else None
    if parts[0] == "adapters_for_tools":
        heavy = len(parts) >= 3 and parts[2] not in ("__init__",) and parts[-1] != "__init__"
        return ADAPTER_HEAVY_RANK if heavy else ADAPTER_LIGHT_RANK
    return None


def test_every_harness_module_is_in_a_layer():
    stray = [m for m in _modules() if m.startswith("harness.") and _rank(m) is None]
    assert not stray, f"modules outside the layers {HARNESS_LAYERS}: {stray}"


def test_kernels_import_nothing_from_the_application(graph):
    bad = [f"{m}:{line} imports {t}" for m, deps in graph.items() if m.split(".")[0] == "kernels"
           for t, line, _ in deps if t.split(".")[0] != "kernels"]
    assert not bad, "kernels/ is a library of its own:\n" + "\n".join(bad)


def test_imports_point_down_the_layers(graph):
    bad = []
    for m, deps in graph.items():
        rm = _rank(m)
        if rm is None:
            continue
        for t, line, _ in deps:
            rt = _rank(t)
            if rt is not None and rt > rm:
                bad.append(f"{m}:{line} (layer {rm}) imports {t} (layer {rt})")
    assert not bad, "imports must point down the layers:\n" + "\n".join(bad)


def test_no_adapter_imports_another(graph):
    bad = []
    for m, deps in graph.items():
        p = m.split(".")
        if p[0] != "adapters_for_tools" or len(p) < 2 or not (REPO / "adapters_for_tools" / p[1]).is_dir():
            continue
        for t, line, _ in deps:
            q = t.split(".")
            if q[0] == "adapters_for_tools" and len(q) > 1 and (REPO / "adapters_for_tools" / q[1]).is_dir() \
                    and q[1] != p[1]:
                bad.append(f"{m}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph):
    edges = {m: {t for t, _, _ in deps if t != m} for m, deps in graph.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_source_file_over_600_lines():
    big = [f"{p.relative_to(REPO)}: {n} lines" for pkg in (*PACKAGES, "tests") for p in (REPO / pkg).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 600]
    assert not big, "\n".join(big)


def test_function_level_project_imports_say_why(graph):
    """An import of a project module inside a function is allowed only with a comment on its line saying why
    (e.g. a module that must load after a toolkit patched the world); never to dodge a cycle."""
    bad = []
    for m, path in _modules().items():
        lines = path.read_text().splitlines()
        for t, line, in_func in graph[m]:
            if in_func and "#" not in lines[line - 1]:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {t} inside a function without a reason")
    assert not bad, "\n".join(sorted(set(bad)))
