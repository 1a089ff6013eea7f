"""SwiGLU activation ``silu(gate) * up`` (Llama MLP), forward and backward fused elementwise.

The backward recomputes ``sigmoid(gate)`` from the saved inputs instead of saving ``silu(gate)``: one extra
``exp`` per element is free in a memory-bound kernel, and it saves a ``[tokens, intermediate]`` activation.

Layout: ``gate`` and ``up`` of identical shape ``[..., I]``. Inputs that are not contiguous (e.g. the two
halves of a fused ``gate_up`` projection obtained with ``chunk``) are copied to contiguous buffers first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import runnable, use_triton

_BLOCK = 1024  # elements per program: 2 KiB bf16 per operand, enough bytes in flight per SM on H100


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    do = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    du = do * silu
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, du.to(dup_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on contiguous ``gate``/``up``; returns ``silu(gate) * up``."""
    out = torch.empty_like(gate)
    n = gate.numel()
    runnable(_swiglu_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on contiguous tensors; returns ``(dgate, dup)``."""
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    n = gate.numel()
    runnable(_swiglu_bwd_kernel)[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves only the two inputs (no activation)."""

    @staticmethod
    def forward(ctx, gate, up):  # noqa: ANN001, ANN205
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        return swiglu_backward(dout.contiguous(), gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``silu(gate) * up`` in float32 (float64 for float64 inputs), output in the input dtype.

    Memory traffic (eager, n elements): forward reads 2n writes n for silu, reads 2n writes n for the product
    (plus upcast copies); autograd saves silu(gate) (n extra). The fused forward reads 2n, writes n.
    """
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up``.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`swiglu_reference`.

    Args:
        gate: ``[..., I]`` output of the gate projection (bf16/fp16/fp32).
        up: Same shape and dtype as ``gate``: output of the up projection.

    Returns:
        ``[..., I]`` tensor in the input dtype.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
