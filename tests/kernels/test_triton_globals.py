"""Every Triton kernel reads only globals that a compiled kernel may read: other jit functions, modules, and
``tl.constexpr`` values. A plain float or int global works under ``TRITON_INTERPRET=1`` (the CPU tests) and fails
to compile on a GPU (GeGLU's ``sqrt(2/pi)`` did, on the H200), so this is checked here, on the CPU."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import triton.language as tl
from triton.runtime.jit import KernelInterface

import kernels.ops


def _kernels() -> list[tuple[str, object]]:
    out = []
    for info in pkgutil.iter_modules(kernels.ops.__path__):
        mod = importlib.import_module(f"kernels.ops.{info.name}")
        for name, obj in vars(mod).items():
            if not isinstance(obj, KernelInterface):
                continue
            while isinstance(obj, KernelInterface):  # autotuner / heuristics -> jit (or interpreted) -> function
                obj = obj.fn
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                out.append((f"{mod.__name__}.{name}", obj))
    return out


KERNELS = _kernels()


def test_the_ops_have_kernels():
    assert len(KERNELS) >= 10, [k for k, _ in KERNELS]


@pytest.mark.parametrize(("name", "fn"), KERNELS, ids=[k for k, _ in KERNELS])
def test_a_kernel_reads_no_plain_global(name, fn):  # noqa: ANN001
    plain = {g: type(v).__name__ for g in fn.__code__.co_names if g in fn.__globals__
             and not isinstance(v := fn.__globals__[g], tl.constexpr | types.ModuleType | type)
             and not callable(v)}
    assert not plain, f"{name} reads {plain}: make them literals or tl.constexpr(...)"
