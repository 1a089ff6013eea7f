"""Gated MLP activations, forward and backward fused elementwise: SwiGLU ``silu(gate) * up`` (Llama, Mistral,
Qwen, Phi-3, Mixtral) and GeGLU ``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``), one kernel pair with the
activation as a compile-time switch.

The backward recomputes the activation of ``gate`` from the saved inputs instead of saving it: a few more
transcendental ops per element are free in a memory-bound kernel, and it saves a ``[tokens, intermediate]``
activation. The tanh-GELU is written with ``sigmoid(2y) = (1 + tanh(y)) / 2`` (one ``exp``, no cancellation).

Layout: ``gate`` and ``up`` of identical shape ``[..., I]``. Inputs that are not contiguous (e.g. the two
halves of a fused ``gate_up`` projection obtained with ``chunk``) are copied to contiguous buffers first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import runnable, use_triton

_BLOCK = 1024  # elements per program: 2 KiB bf16 per operand, enough bytes in flight per SM on H100


_SILU, _GELU_TANH = 0, 1


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, WANT_GRAD: tl.constexpr):
    """``(act(g), d act / dg)`` in fp32 (the derivative only when ``WANT_GRAD``; else 0)."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig)) if WANT_GRAD else 0.0
    else:
        # gelu_tanh(g) = g (1 + tanh(y)) / 2 with y = sqrt(2/pi) (g + 0.044715 g^3), and (1 + tanh(y)) / 2 is
        # sigmoid(2y): no 1 + tanh cancellation in the negative tail, where both the GELU and its slope vanish.
        # The constants are literals (sqrt(2/pi) = 0.7978845608028654): a compiled kernel reads no plain globals
        s = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
        act = g * s
        # d/dg: s + g * (1 - tanh(y)^2) / 2 * y', and (1 - tanh^2) / 2 = 2 s (1 - s)
        dact = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g) if WANT_GRAD else 0.0
    return act, dact


@triton.jit
def _gated_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, ACT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, ACT, False)
    tl.store(out_ptr + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr,
                      ACT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    do = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offs, (do * u * dact).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (do * act).to(dup_ptr.dtype.element_ty), mask=mask)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, act: int = _SILU) -> torch.Tensor:
    """Launch the forward kernel on contiguous ``gate``/``up``; returns ``act(gate) * up``."""
    out = torch.empty_like(gate)
    n = gate.numel()
    runnable(_gated_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, ACT=act, num_warps=4)
    return out


def gated_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   act: int = _SILU) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on contiguous tensors; returns ``(dgate, dup)``."""
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    n = gate.numel()
    runnable(_gated_bwd_kernel)[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK, ACT=act,
                                                           num_warps=4)
    return dgate, dup


class GatedActFunction(torch.autograd.Function):
    """Autograd wrapper: saves only the two inputs (no activation)."""

    @staticmethod
    def forward(ctx, gate, up, act):  # noqa: ANN001, ANN205
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return gated_forward(gate, up, act)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        return (*gated_backward(dout.contiguous(), gate, up, ctx.act), None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``silu(gate) * up`` in float32 (float64 for float64 inputs), output in the input dtype.

    Memory traffic (eager, n elements): forward reads 2n writes n for silu, reads 2n writes n for the product
    (plus upcast copies); autograd saves silu(gate) (n extra). The fused forward reads 2n, writes n.
    """
    compute = _compute_dtype(gate)
    return (torch.nn.functional.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``gelu(gate, approximate="tanh") * up`` in float32 (float64 for float64 inputs), output in the
    input dtype: transformers' ``gelu_pytorch_tanh`` gated MLP in fp32, rounded once."""
    compute = _compute_dtype(gate)
    return (torch.nn.functional.gelu(gate.to(compute), approximate="tanh") * up.to(compute)).to(gate.dtype)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up``.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`swiglu_reference`.

    Args:
        gate: ``[..., I]`` output of the gate projection (bf16/fp16/fp32).
        up: Same shape and dtype as ``gate``: output of the up projection.

    Returns:
        ``[..., I]`` tensor in the input dtype.
    """
    _check(gate, up)
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return GatedActFunction.apply(gate, up, _SILU)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU: ``gelu(gate, approximate="tanh") * up`` (Gemma-2 / Gemma-3's MLP), the SwiGLU kernels with the
    tanh-GELU in place of SiLU; same memory (only ``gate`` and ``up`` saved) and the same traffic.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`geglu_reference`.

    Args:
        gate: ``[..., I]`` output of the gate projection (bf16/fp16/fp32).
        up: Same shape and dtype as ``gate``.

    Returns:
        ``[..., I]`` tensor in the input dtype.
    """
    _check(gate, up)
    if not use_triton(gate, up):
        return geglu_reference(gate, up)
    return GatedActFunction.apply(gate, up, _GELU_TANH)
