"""Small helpers shared by the ops: backend choice, launch settings.

Why a launch-time backend choice: ``triton.jit`` decides between the compiled ``JITFunction`` and the
CPU ``InterpretedFunction`` when the decorator runs, i.e. when a module is imported, while ``TRITON_INTERPRET``
may change after that (a test switches it with ``monkeypatch``; a program imports ``kernels.ops`` before setting
it). ``runnable`` re-wraps the kernel's Python function for the mode asked for at *launch* time (and lets
interpreted kernels call triton's own ``@jit`` helpers even if ``triton.language`` was imported in compiled mode),
which makes the choice independent of import order. The interpreter's modules (and numpy) are imported only when
a kernel is interpreted.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

# Liger-Kernel's limit: a single row block above 64K elements spills registers badly on H100.
MAX_FUSED_SIZE = 65536


def interpret_mode() -> bool:
    """True when the Triton CPU interpreter is requested (same truthy spellings as triton's knobs)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the public ops should launch Triton kernels for these tensors.

    CUDA tensors always use Triton. CPU tensors use Triton only under ``TRITON_INTERPRET=1`` (tests);
    otherwise the public ops fall back to their pure-PyTorch reference so the trainer still runs on CPU.
    """
    if interpret_mode():
        return True
    return all(t.is_cuda for t in tensors if t is not None)


@functools.cache
def _wrap(fn, interpret: bool):  # noqa: ANN001, ANN202 - fn is a plain Python function
    """Build (once) a JIT or interpreted kernel for ``fn``; triton.jit reads TRITON_INTERPRET right now."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn) if interpret else triton.runtime.jit.JITFunction(fn)


def _patch_interpreter_index() -> None:
    """Make the CPU interpreter's scalar ``__index__`` work with NumPy >= 2.4 (idempotent, interpreter only).

    triton 3.6's interpreter stores a scalar kernel argument as a 1-element array and implements
    ``tensor.__index__`` as ``int(array)``, which NumPy 2.4 rejects ("only 0-dimensional arrays can be
    converted"), so any ``for i in range(0, n_runtime)`` loop fails under ``TRITON_INTERPRET=1``. We wrap the
    interpreter's per-launch patch to install a size-1-safe ``__index__``. Compiled (GPU) kernels are untouched.
    """
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_tunebench_index_patched", False):
        return
    try:
        int(np.array([1]))
        return  # this NumPy still accepts it: nothing to fix
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # noqa: ANN001, ANN202
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._tunebench_index_patched = True


@contextlib.contextmanager
def _jit_helpers_interpretable():
    """Let interpreted kernels call ``@triton.jit`` helpers that were built in compiled mode.

    If ``triton`` was imported before ``TRITON_INTERPRET=1`` was set, its standard library (``tl.sum``,
    ``tl.max``, ``tl.sigmoid``, ...) consists of ``JITFunction`` objects, which refuse to be called from Python.
    During an interpreted launch we route such calls to an interpreted twin of the same function.
    """
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call(self, *args, **kwargs):  # noqa: ANN001, ANN202
        return _wrap(self.fn, True)(*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


class _InterpretedLaunch:
    """``kernel[grid](...)`` wrapper that runs an interpreted kernel inside :func:`_jit_helpers_interpretable`."""

    def __init__(self, kernel) -> None:  # noqa: ANN001
        self.kernel = kernel

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        launch = self.kernel[grid]

        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with _jit_helpers_interpretable():
                return launch(*args, **kwargs)

        return run


def runnable(kernel):  # noqa: ANN001, ANN201 - a @triton.jit object in, a launchable kernel out
    """Return ``kernel`` in the flavour (compiled or interpreted) that the environment asks for now."""
    from triton.runtime.interpreter import InterpretedFunction

    if not interpret_mode():
        return kernel if not isinstance(kernel, InterpretedFunction) else _wrap(kernel.fn, False)
    _patch_interpreter_index()
    return _InterpretedLaunch(kernel if isinstance(kernel, InterpretedFunction) else _wrap(kernel.fn, True))


def row_settings(n_cols: int) -> tuple[int, int]:
    """Block size (next power of two >= n_cols) and warp count for one-row-per-program kernels."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row length {n_cols} exceeds the fused limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def num_programs(device: torch.device, n_rows: int, per_sm: int = 1) -> int:
    """Persistent-grid size: ``per_sm`` programs per SM on CUDA; a few on the CPU interpreter (each a Python loop).

    ``per_sm`` > 1 keeps more rows' loads in flight per SM when each program walks its rows one after another.
    """
    progs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm if device.type == "cuda" else 4
    return max(1, min(progs, n_rows))
