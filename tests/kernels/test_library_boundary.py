"""``kernels/`` is a library of its own: no module in it imports the harness or the adapters built on it.

Every import is checked: at module level and inside functions, ``import x`` and ``from x import y``, relative
imports resolved against the importing module's package. ``if TYPE_CHECKING:`` blocks count too: even an
annotation-only dependency on the application would tie the library to it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPLICATION = ("harness", "adapters_for_tools")


def imported_modules(source: str, package: list[str], filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, wherever it stands.

    Args:
        source: Python source text.
        package: the dotted package the file belongs to, as parts (``["kernels", "trainer"]`` for
            ``kernels/trainer/model.py``); relative imports are resolved against it.
        filename: for syntax errors.

    Returns:
        One entry per imported module: ``from x import y`` gives ``x`` (``y`` is in it); ``from . import y``
        gives the package's ``y``.
    """
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    raise ValueError(f"{filename}:{node.lineno}: relative import beyond the top-level package")
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module:
                out.append((node.lineno, module))
            else:  # `from . import y`, `from .. import y`: y is a module of that package
                out += [(node.lineno, f"{module}.{a.name}".lstrip(".")) for a in node.names]
    return out


def boundary_violations(repo: Path, library: str = "kernels") -> list[str]:
    """``file:line: imports module`` for every import in ``repo/library`` that reaches the application."""
    bad = set()
    for path in sorted((repo / library).rglob("*.py")):
        rel = path.relative_to(repo)
        for line, module in imported_modules(path.read_text(), list(rel.parent.parts), str(rel)):
            if module.split(".")[0] in APPLICATION:
                bad.add(f"{rel}:{line}: imports {module}")
    return sorted(bad)


def test_kernels_import_nothing_from_the_application():
    bad = boundary_violations(REPO)
    assert not bad, "kernels/ must not import the harness or the adapters:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "line", "found"),
    [
        ("from harness.inputs.data import collate\n", 3, "harness.inputs.data"),
        ("import harness.inputs.data as d\n", 3, "harness.inputs.data"),
        ("def f():\n    import adapters_for_tools.tunebench.adapter\n", 4, "adapters_for_tools.tunebench.adapter"),
        ("class C:\n    def f(self):\n        from harness.measuring import meter\n", 5, "harness.measuring"),
        ("from ...harness import common\n", 3, "harness"),  # in kernels/trainer/: three dots = the repository root
        ("from ... import adapters_for_tools\n", 3, "adapters_for_tools"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harness.spec import scenario\n", 5,
         "harness.spec"),
    ],
)
def test_every_kind_of_import_is_caught_with_file_and_line(tmp_path, source, line, found):  # noqa: ANN001
    pkg = tmp_path / "kernels" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("import torch\n\n" + source)
    (pkg / "ok.py").write_text("import torch\nfrom kernels.ops import rms_norm\nfrom . import x\nfrom .. import ops\n")
    bad = boundary_violations(tmp_path)
    assert bad == [f"kernels/trainer/x.py:{line}: imports {found}"]


def test_relative_imports_resolve_against_the_package():
    src = "from . import config\nfrom ..ops import nf4\nfrom .batches import collate\n"
    assert imported_modules(src, ["kernels", "trainer"]) == [
        (1, "kernels.trainer.config"), (2, "kernels.ops"), (3, "kernels.trainer.batches")]
