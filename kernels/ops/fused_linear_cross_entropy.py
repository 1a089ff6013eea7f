"""Fused linear + cross-entropy (LM head + loss) that never materialises the full ``[tokens, vocab]`` logits.

Per chunk of tokens: ``logits = h_chunk @ W^T (+ b)`` (cuBLAS), then one Triton program per row computes the
online-softmax loss and overwrites the logits *in place* with ``d loss / d logits``; then
``grad_h_chunk = dlogits @ W`` and ``grad_W += dlogits^T @ h_chunk`` (float32 accumulator, only when W needs a
gradient). Gradients are computed during the forward and stored (as in Liger-Kernel), so backward only scales
them by ``grad_output``; peak extra memory is one ``[chunk, vocab]`` logits buffer plus the gradients.

Reduction: ``"mean"`` divides by the number of loss-bearing tokens (``labels != ignore_index``) over the whole
batch, counted once before chunking, so the result does not depend on the chunk size. If every label is ignored
the loss and gradients are 0 (HF's ``F.cross_entropy`` would return NaN). ``"sum"`` with ``num_items_in_batch``
divides the sum by that count instead (the loss tokens of a whole optimizer step, over all its micro-batches), as
transformers' ``ForCausalLMLoss`` does: the kernel then writes ``(softmax - onehot) / num_items`` computed in fp32
and rounds once, as the eager fp32 loss divided before backward does, instead of rounding the unscaled gradients
and multiplying them by a bf16-rounded ``1 / num_items`` in backward (a step-wide gradient scale off by up to 2^-9,
and a second rounding of every gradient element). fp16 is the exception: without loss scaling, small probabilities
divided by a few thousand tokens would fall below fp16's range, so there the division stays in backward.

Soft-capped logits (Gemma-2's ``final_logit_softcapping``): the row kernel caps each logit in fp32 as it reads it,
``cap * tanh(x / cap)``, and multiplies the gradient it writes by the cap's slope ``1 - tanh^2``: no pass more over
the chunk and no other buffer, so a capped head costs what an uncapped one does.

Labels must lie in ``[0, vocab)`` or equal ``ignore_index``; other values are not checked (checking costs a
device sync) and read out of bounds.

The row kernel also serves :mod:`kernels.ops.fused_linear_logprobs` (the preference objectives' LM head): without
its gradient pass (:func:`cross_entropy_rows`, per-row loss only) and with one scale per row (the upstream gradient
of each row's log-prob) in that op's recomputing backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import runnable, use_triton

_BLOCK_V = 4096  # vocab columns per loop step: 16 KiB fp32 of registers per program on H100 (num_warps=8)


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    scale_ptr,
    stride_logits,
    stride_scale,
    n_cols,
    ignore_index,
    softcap,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        if WRITE_GRAD:
            # No loss, zero gradient: the chunk GEMMs downstream read this row.
            for off in range(0, n_cols, BLOCK_V):
                cols = off + cols0
                tl.store(logits_ptr + cols, tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty),
                         mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
        return
    # Pass 1: running max m and running sum d of exp(x - m) (online softmax), all in fp32.
    m = float("-inf")
    d = 0.0
    for off in range(0, n_cols, BLOCK_V):
        cols = off + cols0
        mask = cols < n_cols
        x = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            x = tl.where(mask, softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    x_label = tl.load(logits_ptr + label).to(tl.float32)
    if SOFTCAP:
        x_label = softcap * (2.0 * tl.sigmoid(2.0 * x_label / softcap) - 1.0)
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, lse - x_label)
    if WRITE_GRAD:
        # Pass 2: overwrite logits with scale * (softmax - onehot(label)); one scale, or one per row.
        scale = tl.load(scale_ptr + row * stride_scale)
        inv_d = 1.0 / d
        for off in range(0, n_cols, BLOCK_V):
            cols = off + cols0
            mask = cols < n_cols
            x = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                # capped = cap tanh(x / cap) = cap (2 s - 1) with s = sigmoid(2 x / cap); d capped / dx =
                # 1 - tanh^2 = 4 s (1 - s)
                sg = tl.sigmoid(2.0 * x / softcap)
                p = tl.exp(softcap * (2.0 * sg - 1.0) - m) * inv_d
                grad = tl.where(cols == label, p - 1.0, p) * scale * (4.0 * sg * (1.0 - sg))
            else:
                p = tl.exp(x - m) * inv_d
                grad = tl.where(cols == label, p - 1.0, p) * scale
            tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_fwd_bwd_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                           softcap: float | None = None) -> torch.Tensor:
    """Per-row loss of 2-D ``logits`` (returned, fp32) and, in place, ``logits <- scale * dloss/dlogits``.

    ``scale``: fp32, one element (the whole chunk) or one per row (a per-row upstream gradient). ``softcap``: the
    loss is that of ``cap * tanh(logits / cap)`` (Gemma-2's final logit soft-capping), and the gradient written is
    with respect to the logits before the cap."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    runnable(_cross_entropy_fwd_bwd_kernel)[(n_rows,)](
        logits, labels, loss, scale, logits.stride(0), 1 if scale.numel() > 1 else 0, n_cols, ignore_index,
        float(softcap or 1.0), BLOCK_V=_BLOCK_V, WRITE_GRAD=True, SOFTCAP=softcap is not None, num_warps=8,
    )
    return loss


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                       softcap: float | None = None) -> torch.Tensor:
    """Per-row loss ``logsumexp(row) - row[label]`` of 2-D ``logits`` (fp32; 0 where ignored), logits untouched;
    with ``softcap``, of the capped row ``cap * tanh(row / cap)``.

    The forward half of :func:`cross_entropy_fwd_bwd_`: one read of the chunk, no gradient written."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    runnable(_cross_entropy_fwd_bwd_kernel)[(n_rows,)](
        logits, labels, loss, loss, logits.stride(0), 0, n_cols, ignore_index, float(softcap or 1.0),
        BLOCK_V=_BLOCK_V, WRITE_GRAD=False, SOFTCAP=softcap is not None, num_warps=8,
    )
    return loss


_OUT_DTYPE_ADDMM_OK: bool | None = None  # whether torch.addmm(..., out_dtype=fp32) works here (CUDA, torch>=2.8)


def accumulate_chunk_grads_(dlogits: torch.Tensor, h_c: torch.Tensor, w: torch.Tensor, start: int,
                            grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
                            grad_b: torch.Tensor | None) -> None:
    """One chunk's share of the LM head's gradients from d(loss)/d(logits) of its rows (those from ``start`` on):
    ``grad_h[rows] = dlogits @ w``, ``grad_w += dlogits^T h_c`` and ``grad_b += column sums`` (both fp32
    accumulators); a None gradient is not wanted."""
    if grad_h is not None:
        torch.mm(dlogits, w, out=grad_h[start:start + dlogits.shape[0]])
    if grad_w is not None:
        _addmm_fp32_(grad_w, dlogits.t(), h_c)
    if grad_b is not None:
        grad_b.add_(dlogits.sum(0, dtype=torch.float32))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 ``acc`` and low-precision ``a``, ``b``, without a [M, N] low-precision temp.

    cuBLAS can read bf16 operands and accumulate into an fp32 C directly (``out_dtype``); where that overload
    is missing we fall back to a bf16 product added in fp32 (one extra rounding per chunk).
    """
    global _OUT_DTYPE_ADDMM_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _OUT_DTYPE_ADDMM_OK is not False and acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_ADDMM_OK = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_ADDMM_OK = False
    acc.add_(a @ b)


def default_chunk_size(n_tokens: int, weight_needs_grad: bool) -> int:
    """Tokens per chunk: 1024 with a frozen LM head, 4096 when it is trained.

    Small chunks save memory but cost twice: ``dlogits @ W`` gets only ``chunk/128`` row tiles (1024 -> 8 x 32
    = 256 CTAs, enough for 132 SMs; Liger's 128-token chunks give 32), and with a trainable head each chunk
    re-reads and re-writes the ``[V, H]`` fp32 grad_W accumulator (4.2 GB of traffic, ~1.4 ms at 8B shapes),
    about as long as the chunk's grad_W GEMM itself at 1024 tokens. A 1024-token bf16 logits chunk is 263 MB
    at vocab 128256; 4096 tokens is 1.05 GB (eager materialises ~4x that in fp32).
    """
    return max(1, min(n_tokens, 4096 if weight_needs_grad else 1024))


def fused_linear_cross_entropy_forward(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    need_grad_h: bool,
    need_grad_w: bool,
    need_grad_b: bool,
    num_items: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked loop on 2-D ``h`` [T, H], ``w`` [V, H], 1-D ``labels`` [T]. Returns ``(loss, gh, gw, gb)``.
    ``num_items``: the divisor of a ``"sum"`` (a one-element fp32 device tensor), or None. ``softcap``: the
    logits' soft cap, or None."""
    n_tokens = h.shape[0]
    divisor = _divisor(labels, ignore_index, reduction, num_items)
    scale = 1.0 / divisor  # read by the kernel through a pointer: no host sync for the token count
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad_h else None  # contiguous: mm(out=)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_grad_b else None
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h_c = h[start:end]
        logits = h_c @ w.t() if bias is None else torch.addmm(bias, h_c, w.t())
        loss_rows[start:end] = cross_entropy_fwd_bwd_(logits, labels[start:end], scale, ignore_index, softcap)
        dlogits = logits  # overwritten in place by the kernel
        accumulate_chunk_grads_(dlogits, h_c, w, start, grad_h, grad_w, grad_b)
        del logits, dlogits
    loss = loss_rows.sum() / divisor[0]
    return (
        loss,
        grad_h,
        grad_w.to(w.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )


def _divisor(labels: torch.Tensor, ignore_index: int, reduction: str,
             num_items: torch.Tensor | None) -> torch.Tensor:
    """The one-element fp32 device tensor the summed loss is divided by (1 for a plain sum)."""
    if reduction == "mean":
        if num_items is not None:
            raise ValueError("num_items_in_batch divides a 'sum'; 'mean' counts its own loss tokens")
        return (labels != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)
    if reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items is None:
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    return num_items.to(torch.float32).reshape(1)


def _items_tensor(num_items: int | float | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``num_items_in_batch`` as a one-element fp32 tensor on ``device`` (a fill, not a host-to-device copy)."""
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    return torch.full((1,), float(num_items), dtype=torch.float32, device=device)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are produced in forward; backward multiplies them by ``grad_output``.

    Calling backward twice (``retain_graph=True``) is not supported: the stored gradients are released.
    """

    @staticmethod
    def forward(ctx, h, w, labels, bias, ignore_index, reduction, chunk_size, grad_enabled,  # noqa: ANN001, ANN205
                num_items=None, softcap=None):  # noqa: ANN001
        shape = h.shape
        h2 = h.reshape(-1, shape[-1])
        ctx.post_scale = None
        if num_items is not None and h.dtype == torch.float16:
            # fp16 (no loss scaling here): softmax / num_items of a few thousand tokens falls below fp16's range
            # for small probabilities, so fp16 keeps unscaled gradients and takes 1 / num_items in backward
            ctx.post_scale = 1.0 / num_items.to(torch.float32).reshape(())
            num_items = None
        loss, gh, gw, gb = fused_linear_cross_entropy_forward(
            h2,
            w,
            labels.reshape(-1),
            bias,
            ignore_index,
            reduction,
            chunk_size or default_chunk_size(h2.shape[0], grad_enabled and ctx.needs_input_grad[1]),
            need_grad_h=grad_enabled and ctx.needs_input_grad[0],
            need_grad_w=grad_enabled and ctx.needs_input_grad[1],
            need_grad_b=grad_enabled and bias is not None and ctx.needs_input_grad[3],
            num_items=num_items,
            softcap=softcap,
        )
        ctx.grads = (gh.view(shape) if gh is not None else None, gw, gb)
        return loss if ctx.post_scale is None else loss * ctx.post_scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        gh, gw, gb = ctx.grads
        ctx.grads = None
        if ctx.post_scale is not None:
            grad_output = grad_output * ctx.post_scale
        # grad_output is 1.0 in the usual loss.backward(); multiplying anyway avoids a host sync to check.
        gh = gh * grad_output.to(gh.dtype) if gh is not None else None
        gw = gw * grad_output.to(gw.dtype) if gw is not None else None
        gb = gb * grad_output.to(gb.dtype) if gb is not None else None
        return gh, gw, None, gb, None, None, None, None, None, None


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for next-token prediction: position t gets ``labels[..., t + 1]``, the last position is ignored.

    Shifts along the last dimension, so pass ``[batch, seq]`` labels (a flattened batch would leak the first
    token of one row into the last position of the previous one).
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def reduce_sum(total: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
               num_items_in_batch: int | float | torch.Tensor | None) -> torch.Tensor:
    """A summed loss reduced as ``reduction`` says: ``"sum"`` as it is, or divided by ``num_items_in_batch`` when
    given (as transformers' fixed_cross_entropy: before backward); ``"mean"`` over the loss-bearing labels."""
    if num_items_in_batch is not None:
        if reduction != "sum":
            raise ValueError("num_items_in_batch divides a 'sum'; 'mean' counts its own loss tokens")
        return total / num_items_in_batch
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp_min(1)
    if reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)`` (the references' soft cap), or the logits as they are."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def fused_linear_cross_entropy_reference(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Pure-PyTorch LM-head + cross-entropy in float32 (float64 for float64 inputs), autograd-differentiable;
    ``softcap``: of the capped logits ``cap * tanh(logits / cap)``.

    Memory traffic: materialises ``[T, V]`` fp32 logits (2.1 GB at T=4096, V=128256), reads them for the
    softmax and writes an equally large ``dlogits`` in backward: ~4 x T x V x 4 bytes beyond the GEMMs.
    """
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    if shift:
        labels = shift_labels(labels, ignore_index)
    logits = h.to(compute) @ w.to(compute).t()
    if bias is not None:
        logits = logits + bias.to(compute)
    logits = cap_logits(logits, softcap)
    labels = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, w.shape[0]), labels, ignore_index=ignore_index, reduction="sum"
    )
    return reduce_sum(loss, labels, ignore_index, reduction, num_items_in_batch)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising all logits.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`fused_linear_cross_entropy_reference`, which does
    materialise the logits.

    Args:
        hidden: ``[..., H]`` final hidden states (bf16/fp16/fp32), e.g. ``[batch, seq, H]``.
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``; may be frozen (then no grad_W work).
        labels: Integer tensor with ``hidden.shape[:-1]`` (``[batch, seq]``); ``ignore_index`` marks
            padding / prompt tokens.
        bias: Optional ``[V]`` LM-head bias.
        ignore_index: Label value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (over loss-bearing tokens of the whole batch) or ``"sum"``.
        shift: If True, ``labels`` are the input ids and are shifted here (:func:`shift_labels`): position t
            is trained to predict ``labels[..., t + 1]``.
        chunk_size: Tokens per chunk; default :func:`default_chunk_size`.
        num_items_in_batch: With ``reduction="sum"``: divide the sum by this (a number or a device scalar), with
            the gradients scaled before their rounding to the input dtype (module docstring). The loss tokens
            of a whole optimizer step, as transformers' Trainer passes it.
        softcap: Gemma-2's ``final_logit_softcapping``: the loss of ``softcap * tanh(logits / softcap)``, capped
            in fp32 inside the row kernel (the logits chunk stays in the GEMM's dtype, as the uncapped op's); None:
            no cap.

    Returns:
        Scalar float32 loss.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if shift:
        labels = shift_labels(labels, ignore_index)
    if not use_triton(hidden, weight):
        return fused_linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, reduction,
                                                    num_items_in_batch=num_items_in_batch, softcap=softcap)
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels.contiguous(), bias, ignore_index, reduction, chunk_size,
        # needs_input_grad stays True under torch.no_grad(); this flag lets eval skip the gradient GEMMs.
        torch.is_grad_enabled(),
        _items_tensor(num_items_in_batch, hidden.device),
        softcap,
    )  # fmt: skip
