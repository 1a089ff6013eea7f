"""Fused linear + label log-probabilities (LM head + ``log p(label)`` per row) without the full ``[rows, vocab]``
logits, and their per-sequence sums: what preference losses (DPO, ORPO, KTO) are built on.

Forward, per chunk of rows: ``logits = h_chunk @ W^T (+ b)`` (cuBLAS), then one Triton program per row computes
``log p(label) = logits[label] - logsumexp(logits)`` online in fp32 (the forward half of the fused cross-entropy
kernel, :func:`kernels.ops.fused_linear_cross_entropy.cross_entropy_rows`: one read of the chunk, nothing written
back). Only ``h``, ``W`` and the labels are kept for backward.

Backward *recomputes* each chunk's logits and lets the same kernel overwrite them in place with
``d loss / d logits = g_row * (onehot(label) - softmax)`` (its gradient pass with a per-row scale ``-g_row``, the
upstream gradient of each row's log-prob), then ``grad_h_chunk = dlogits @ W`` and ``grad_W += dlogits^T h_chunk``
(fp32 accumulator, only when W needs a gradient). Unlike the cross-entropy op, the gradients cannot be produced in
the forward: a preference loss's gradient per row (``-beta * sigmoid(-beta * margin)`` for DPO) is known only once
every row of the pair has been scored. Peak extra memory: one ``[chunk, vocab]`` logits buffer in each direction;
the price is one more ``[chunk, H] x [H, V]`` GEMM per chunk in backward (3 head GEMMs instead of 2).

Rows whose label is ``ignore_index`` get log-prob 0 and no gradient. Labels must lie in ``[0, vocab)`` otherwise
(not checked: a check costs a device sync).
"""

from __future__ import annotations

import torch

from kernels.ops._utils import use_triton
from kernels.ops.fused_linear_cross_entropy import (
    accumulate_chunk_grads_,
    cap_logits,
    cross_entropy_fwd_bwd_,
    cross_entropy_rows,
    default_chunk_size,
)


def _chunk_logits(h_c: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h_c @ w.t() if bias is None else torch.addmm(bias, h_c, w.t())


def fused_linear_logprobs_forward(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                                  ignore_index: int, chunk_size: int, softcap: float | None = None) -> torch.Tensor:
    """fp32 ``[T]`` label log-probs of 2-D ``h`` [T, H] under ``h @ w.T (+ bias)`` (soft-capped where ``softcap``
    is given), one ``[chunk, V]`` at a time."""
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        end = min(start + chunk_size, h.shape[0])
        logits = _chunk_logits(h[start:end], w, bias)
        torch.neg(cross_entropy_rows(logits, labels[start:end], ignore_index, softcap), out=logp[start:end])
        del logits
    return logp


def fused_linear_logprobs_backward(
    grad_logp: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int,
    need_grad_h: bool,
    need_grad_w: bool,
    need_grad_b: bool,
    softcap: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_h, grad_w, grad_b)`` of ``sum(grad_logp * logp)``, recomputing each chunk's logits."""
    # the kernel writes scale * (softmax - onehot); d logp / d logits = onehot - softmax, hence the minus
    scale = grad_logp.detach().to(torch.float32).neg().contiguous()
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_grad_b else None
    for start in range(0, h.shape[0], chunk_size):
        end = min(start + chunk_size, h.shape[0])
        h_c = h[start:end]
        dlogits = _chunk_logits(h_c, w, bias)
        cross_entropy_fwd_bwd_(dlogits, labels[start:end], scale[start:end], ignore_index, softcap)  # in place
        accumulate_chunk_grads_(dlogits, h_c, w, start, grad_h, grad_w, grad_b)
        del dlogits
    return (grad_h,
            grad_w.to(w.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: label log-probs in forward (chunked), gradients by recomputation in backward."""

    @staticmethod
    def forward(ctx, h, w, labels, bias, ignore_index, chunk_size, softcap=None):  # noqa: ANN001, ANN205
        shape = h.shape
        h2 = h.reshape(-1, shape[-1])
        labels = labels.reshape(-1)
        chunk = chunk_size or default_chunk_size(h2.shape[0], ctx.needs_input_grad[1])
        logp = fused_linear_logprobs_forward(h2, w, labels, bias, ignore_index, chunk, softcap)
        ctx.save_for_backward(h2, w, labels, bias)  # references, no copies (dropped at once under no_grad)
        ctx.meta = (shape, ignore_index, chunk, softcap)
        return logp.view(shape[:-1])

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: ANN001, ANN205
        h2, w, labels, bias = ctx.saved_tensors
        shape, ignore_index, chunk, softcap = ctx.meta
        gh, gw, gb = fused_linear_logprobs_backward(
            grad_logp.reshape(-1), h2, w, labels, bias, ignore_index, chunk,
            need_grad_h=ctx.needs_input_grad[0], need_grad_w=ctx.needs_input_grad[1],
            need_grad_b=bias is not None and ctx.needs_input_grad[3], softcap=softcap,
        )  # fmt: skip
        return (gh.view(shape) if gh is not None else None), gw, None, gb, None, None, None


def fused_linear_logprobs_reference(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,  # noqa: ARG001 - the fused op's signature
    softcap: float | None = None,
) -> torch.Tensor:
    """Pure-PyTorch label log-probs in float32 (float64 for float64 inputs), autograd-differentiable; ``softcap``:
    under the capped logits ``cap * tanh(logits / cap)``.

    Memory traffic: materialises ``[T, V]`` logits and their log-softmax in fp32 (2 x 2.1 GB at T=4096,
    V=128256), and in backward an equally large gradient: ~4 x T x V x 4 bytes beyond the GEMMs.
    """
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    logits = h.to(compute) @ w.to(compute).t()
    if bias is not None:
        logits = logits + bias.to(compute)
    logits = cap_logits(logits, softcap)
    keep = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T (+ bias))[label]`` per row, without materialising all logits.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`fused_linear_logprobs_reference`, which does
    materialise the logits.

    Args:
        hidden: ``[..., H]`` hidden states (bf16/fp16/fp32) of the rows to score (labels already aligned: row t
            scores ``labels[t]``; shift beforehand for next-token prediction).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``; may be frozen (then no grad_W work).
        labels: integer tensor with ``hidden.shape[:-1]``; ``ignore_index`` rows score 0 and get no gradient.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: label value of rows that are not scored.
        chunk_size: rows per chunk; default :func:`~kernels.ops.fused_linear_cross_entropy.default_chunk_size`.
        softcap: the logits' soft cap (``softcap * tanh(logits / softcap)``, Gemma-2), capped inside the row
            kernel; None: no cap.

    Returns:
        float32 log-probs with ``labels``' shape.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if not use_triton(hidden, weight):
        return fused_linear_logprobs_reference(hidden, weight, labels, bias, ignore_index, softcap=softcap)
    return FusedLinearLogprobsFunction.apply(hidden, weight, labels.contiguous(), bias, ignore_index, chunk_size,
                                             softcap)


def sequence_logprobs(token_logprobs: torch.Tensor, sequence_ids: torch.Tensor, n_sequences: int,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence sums of per-row log-probs: ``out[s] = sum over rows r with sequence_ids[r] == s``.

    Args:
        token_logprobs: ``[T]`` fp32 log-probs (:func:`fused_linear_logprobs`).
        sequence_ids: ``[T]`` int64, which sequence each row belongs to (``0 <= id < n_sequences``).
        n_sequences: how many sequences.
        weights: optional ``[T]`` per-row factors (e.g. ``1 / length`` for a per-sequence mean).

    Returns:
        ``[n_sequences]`` fp32 (0 for a sequence without rows); differentiable (backward is a gather).
    """
    values = token_logprobs if weights is None else token_logprobs * weights
    return values.new_zeros(n_sequences).index_add(0, sequence_ids, values)
