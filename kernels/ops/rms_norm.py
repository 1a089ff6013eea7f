"""RMSNorm (Llama style), optionally fused with the residual add that precedes it in every decoder block.

``y = x * rsqrt(mean(x^2) + eps) * w`` computed in float32, stored in the input dtype. With ``residual``:
``h = x + residual`` (rounded to the input dtype, exactly like the unfused ``residual + hidden`` in HF Llama),
``y = rms_norm(h)``; both ``y`` and ``h`` are returned, ``h`` being the residual stream for the next block.

Difference from HF ``LlamaRMSNorm``: HF rounds the normalised activations to bf16 *before* multiplying by the
weight; we multiply in fp32 and round once, which is at least as accurate (<= 1 bf16 ulp apart).

Layout: any ``[..., N]`` tensor whose last dimension is contiguous (other strides are passed to the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import num_programs, row_settings, runnable, use_triton

BWD_PROGRAMS_PER_SM = 8


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    rstd_ptr,
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,  # a flag, not a size: only two variants ever compile
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the storage dtype before normalising so fused == unfused bit for bit on h.
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    h_ptr,
    w_ptr,
    rstd_ptr,
    dres_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_h,
    stride_dres,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DRES: tl.constexpr,  # a flag: add the gradient arriving through the residual-stream output
    BLOCK_N: tl.constexpr,
):
    # Persistent grid: each program walks a contiguous slab of rows and keeps its dw partial sum in
    # registers, so dw costs one [programs, N] fp32 write instead of an atomic per row.
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Fixed trip count with a row mask (not range(row_start, min(...))): identical in compiled and interpreted mode.
    for i in range(0, rows_per_program):
        row = row_start + i
        mask = col_mask & (row < n_rows)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        xhat = h * rstd
        dxhat = dy * w
        # d/dh of h*rstd(h): rstd * (dxhat - xhat * mean(dxhat * xhat))
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
        if HAS_DRES:
            dx += tl.load(dres_ptr + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``[..., N]`` as 2-D rows; copy only if the last dimension is strided."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_forward(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on 2-D ``x`` (+ ``residual``); returns ``(y, h, rstd)``, ``h is x`` if no residual."""
    n_rows, n_cols = x.shape
    block, num_warps = row_settings(n_cols)
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        h = torch.empty_like(x)
        res, stride_res = residual, residual.stride(0)
    else:
        h, res, stride_res = x, x, 0
    runnable(_rms_norm_fwd_kernel)[(n_rows,)](
        x, res, w, y, h, rstd,
        x.stride(0), stride_res, y.stride(0), h.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=num_warps,
    )  # fmt: skip
    return y, h, rstd


def rms_norm_backward(
    dy: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on 2-D tensors. Returns ``(dx, dw)``; ``dx`` includes ``dres`` when given."""
    n_rows, n_cols = h.shape
    block, num_warps = row_settings(n_cols)
    # 8 programs per SM ([8 x 132, N] fp32 dw partials, 17 MB at N = 4096): more rows' loads in flight than one
    # program per SM walking ~31 rows; both measure the same on an H100, the kernel is at its floor either way
    # (kernels/NOTES.md, rms_norm)
    n_prog = num_programs(h.device, n_rows, per_sm=BWD_PROGRAMS_PER_SM)
    rows_per_program = triton.cdiv(n_rows, n_prog)
    dx = torch.empty_like(h)
    dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=h.device)
    runnable(_rms_norm_bwd_kernel)[(n_prog,)](
        dy, h, w, rstd, dres if dres is not None else dy, dx, dw_partial,
        dy.stride(0), h.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DRES=dres is not None, BLOCK_N=block, num_warps=num_warps,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(w.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves ``h`` (the normalised input) and the fp32 ``rstd`` per row (4 bytes/row)."""

    @staticmethod
    def forward(ctx, x, w, residual, eps):  # noqa: ANN001, ANN205
        # x/residual arrive as 2-D rows; the public wrapper reshapes *outside* the Function so that views of the
        # outputs can later be modified in place (autograd forbids that for views created inside a Function).
        y, h, rstd = rms_norm_forward(x, w, eps, residual)
        ctx.save_for_backward(h, w, rstd)
        ctx.has_residual = residual is not None
        if residual is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dres=None):  # noqa: ANN001, ANN205
        h, w, rstd = ctx.saved_tensors
        dres = _rows(dres) if dres is not None else None
        dx, dw = rms_norm_backward(_rows(dy), h, w, rstd, dres)
        # x and residual receive the same gradient (d(x + r)/dx = d(x + r)/dr = 1).
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm_reference(
    x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch RMSNorm (float32 math, float64 when given float64), differentiable by autograd.

    Memory traffic (eager, M x N bf16): reads x (+ residual), writes h; then upcast copy, square, mean,
    multiply chains: ~6-8 passes of M x N versus the fused kernel's read 2 (x, r) + write 2 (y, h).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x + residual if residual is not None else x
    hc = h.to(compute)
    y = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps) * w.to(compute)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama RMSNorm with optional fused residual add.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`rms_norm_reference` (same maths, autograd).

    Args:
        x: ``[..., N]`` activations (bf16/fp16/fp32); last dimension must be the contiguous one for a zero-copy
            launch (otherwise it is copied).
        weight: ``[N]`` scale.
        eps: Added to the mean square before the reciprocal square root.
        residual: Optional ``[..., N]`` residual stream, same dtype/shape as ``x``.

    Returns:
        ``y`` (same shape/dtype as ``x``) when ``residual`` is None, else ``(y, x + residual)``.
    """
    if not use_triton(x, weight, residual):
        return rms_norm_reference(x, weight, eps, residual)
    shape = x.shape
    out = RMSNormFunction.apply(_rows(x), weight, _rows(residual) if residual is not None else None, eps)
    if residual is None:
        return out.view(shape)
    return out[0].view(shape), out[1].view(shape)
