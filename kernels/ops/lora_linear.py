"""LoRA / QLoRA linear layer with a hand-written backward that never computes the frozen weight's gradient.

``y = x W^T (+ bias) + scale * (dropout(x) A^T) B^T`` with ``W [out, in]`` frozen (dense, or an
:class:`~kernels.ops.nf4.NF4Tensor` for QLoRA), ``A [r, in]``, ``B [out, r]``.

Backward computes only ``dx = dy W + scale * mask/(1-p) * ((dy B) A)``, ``dA = scale * (dy B)^T x_drop``,
``dB = scale * dy^T (x_drop A^T)`` and ``dbias`` -- never ``dW``.

Everything here is cuBLAS GEMMs on purpose: at Llama-8B shapes every product is either large (x W^T:
2 x 4096 x 4096 x 14336 = 481 GFLOP) or has K or N = r = 16, where a hand-written Triton GEMM would not beat
cuBLAS. What the structure saves:

* ``scale * xa @ B^T`` is accumulated into the base output by ``addmm_`` (beta = 1): the LoRA branch costs
  no extra pass over ``y``; likewise ``(dy B) A`` into ``dx`` when there is no dropout.
* Saved for backward: ``x`` (usually already alive: shared with the other projections reading the same
  normed activations), a bool dropout mask (1 byte/elt instead of the 2-byte dropped copy autograd would keep),
  and ``xa = x_drop A^T`` (``[T, r]``, tiny). PEFT additionally saves the dropped ``x`` and ``dy B`` paths twice.
* QLoRA: the NF4 weight is dequantised into a temporary, used by one GEMM and freed at once; backward
  dequantises again (117 MB write + read per 4096 x 14336 projection, ~0.08 ms at 3 TB/s against a 0.6 ms
  GEMM) instead of keeping a bf16 copy alive across the whole forward.

Where further fusion would pay (not done): dropout applied in the prologue of the ``x A^T`` GEMM (no
``x_drop`` temporary), and NF4 dequantisation inside the GEMM's weight-tile load (no temporary at all;
the ~13% dequant overhead above disappears). DoRA is not implemented.
"""

from __future__ import annotations

import torch

from kernels.ops._utils import use_triton
from kernels.ops.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool keep-mask with keep probability ``1 - p``; draws fp32 uniforms so RNG use is dtype-independent."""
    return torch.rand(shape, dtype=torch.float32, device=device) >= p


def _base_weight(weight: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(weight, dtype) if isinstance(weight, NF4Tensor) else weight


class LoRALinearFunction(torch.autograd.Function):
    """Autograd wrapper; ``weight`` is passed as a plain object so autograd never tracks it."""

    @staticmethod
    def forward(ctx, x2, lora_a, lora_b, bias, weight, scale, dropout_p, mask):  # noqa: ANN001, ANN205
        # 2-D in, 2-D out: the public wrapper reshapes outside the Function so that views of the output can be
        # modified in place later (e.g. RoPE on q_proj(x).view(B, S, H, D)); autograd forbids that otherwise.
        w = _base_weight(weight, x2.dtype)
        y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
        del w  # NF4: the dequantised copy dies here; backward recomputes it
        x_drop = x2 * mask / (1.0 - dropout_p) if mask is not None else x2
        xa = x_drop @ lora_a.t()
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, mask, xa, lora_a, lora_b)
        ctx.weight, ctx.scale, ctx.dropout_p = weight, scale, dropout_p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x2, mask, xa, lora_a, lora_b = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        dy2 = dy
        need_dx, need_da, need_db, need_dbias = ctx.needs_input_grad[:4]
        dyb = dy2 @ lora_b if (need_dx or need_da) else None  # [T, r]
        dx = da = db = dbias = None
        if need_db:
            db = (dy2.t() @ xa).mul_(scale)
        if need_da:
            x_drop = x2 * mask / (1.0 - p) if mask is not None else x2
            da = (dyb.t() @ x_drop).mul_(scale)
            del x_drop
        if need_dx:
            w = _base_weight(ctx.weight, dy.dtype)
            dx = dy2 @ w
            del w
            if mask is None:
                dx.addmm_(dyb, lora_a, alpha=scale)
            else:
                dx.add_((dyb @ lora_a).mul_(mask).mul_(scale / (1.0 - p)))
        if need_dbias and ctx.has_bias:
            dbias = dy2.sum(0)
        return dx, da, db, dbias, None, None, None, None


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Pure-PyTorch LoRA linear in float32 (float64 for float64 ``x``), autograd-differentiable (W detached).

    Memory traffic beyond the GEMMs (eager PEFT-style): the dropout output (T x in, saved by autograd), the
    ``[T, out]`` LoRA output and the add into ``y`` (read 2, write 1 of T x out).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_nf4_reference(weight, compute) if isinstance(weight, NF4Tensor) else weight
    xc = x.to(compute)
    y = xc @ w.detach().to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    x_drop = xc * mask / (1.0 - dropout_p) if mask is not None else xc
    y = y + scale * ((x_drop @ lora_a.to(compute).t()) @ lora_b.to(compute).t())
    return y.to(x.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """LoRA (or QLoRA, with an NF4 base weight) linear layer.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`lora_linear_reference` (NF4 weights dequantised by
    the PyTorch reference); same maths and the same dropout mask stream.

    Args:
        x: ``[..., in]`` activations (bf16/fp16/fp32).
        weight: Frozen base weight ``[out, in]`` in ``x``'s dtype, or an :class:`NF4Tensor` of that shape.
            A dense weight with ``requires_grad=True`` is rejected (its gradient would silently be missing).
        lora_a: ``[r, in]`` LoRA A, same dtype as ``x``.
        lora_b: ``[out, r]`` LoRA B, same dtype as ``x``.
        scale: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        bias: Optional ``[out]`` bias (trainable or frozen).
        dropout_p: LoRA dropout probability on the input of A.
        training: Dropout is applied only when True.

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear never computes dW: freeze the base weight (requires_grad_(False))")
    mask = dropout_mask(x.shape, dropout_p, x.device) if (training and dropout_p > 0) else None
    p = dropout_p if mask is not None else 0.0
    if not use_triton(x):
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias, mask, p)
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = mask.reshape(x2.shape) if mask is not None else None
    y = LoRALinearFunction.apply(x2, lora_a, lora_b, bias, weight, scale, p, mask2)
    return y.view(*x.shape[:-1], y.shape[-1])
