"""The family-specific ops no Triton kernel of ``kernels/ops`` covers yet, in PyTorch: Gemma-2's GeGLU, its
soft-capped attention and its soft-capped LM head (loss and log-probs), and the sliding-window mask.

Each computes in fp32 and rounds once to the activation dtype, like the fused ops' references; each keeps what
its backward needs and no more (kernels/NOTES.md, "Families": what a kernel for each would save).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.ops.fused_linear_cross_entropy import reduce_sum, shift_labels

# fp32 logit elements per chunk of the soft-capped head: 256 MB per [chunk, V] fp32 tensor, of which a chunk's
# forward and backward hold about three (logits, capped logits, their gradient); 262 tokens at Gemma-2's 256000
# vocabulary (the fused op's 1024-token bf16 chunks would be 1 GB per fp32 tensor there)
CHUNK_ELEMENTS = 1 << 26


def softcap_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk of the soft-capped LM head: :data:`CHUNK_ELEMENTS` fp32 logits, at least 64 tokens."""
    return max(1, min(n_tokens, max(64, CHUNK_ELEMENTS // vocab)))


class _GeGLU(torch.autograd.Function):
    """``gelu_tanh(gate) * up``, saving only ``gate`` and ``up`` (the GELU is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up):  # noqa: ANN001, ANN205
        ctx.save_for_backward(gate, up)
        return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.float().detach().requires_grad_(True)
            act = F.gelu(g, approximate="tanh")
            (dact,) = torch.autograd.grad(act, g, dout.float() * up.float())
        return dact.to(gate.dtype), (dout.float() * act.detach()).to(up.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma's gated MLP activation ``gelu(gate, approximate="tanh") * up`` (transformers' ``gelu_pytorch_tanh``).

    Args:
        gate: ``[..., I]`` gate projection.
        up: ``[..., I]`` up projection, same shape and dtype.

    Returns:
        ``[..., I]`` in the inputs' dtype, computed in fp32 and rounded once.
    """
    return _GeGLU.apply(gate, up)


def window_mask(position_ids: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, S, S]`` bool: causal attention restricted to the last ``window`` keys (the query's own included), as
    transformers' sliding-window mask (key allowed when ``q - window < k <= q``), within ``mask``'s samples.

    Args:
        position_ids: ``[B, S]`` (or ``[1, S]``) positions; packed samples restart at 0 and count up in their
            sample, so a position difference is a distance inside one sample.
        window: keys each query sees at most.
        mask: the layers' block-diagonal causal mask of packed rows, or None for one sample per row.
    """
    pos = position_ids
    dist = pos[:, :, None] - pos[:, None, :]
    band = (dist >= 0) & (dist < window)
    return band if mask is None else band & mask


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Eager attention with Gemma-2's logit soft-capping, ``[B, H, S, D]`` q and ``[B, Hkv, S, D]`` k/v in.

    ``scores = cap * tanh(q k^T * scale / cap)``, masked, softmax in fp32 (transformers' ``eager`` Gemma-2
    attention; its ``sdpa`` path ignores the cap); the two GEMMs in the activation dtype. No fused kernel here
    takes a score modifier, so the ``[B, H, S, S]`` scores exist (fp32): the memory lever left (kernels/NOTES.md).

    Args:
        q, k, v: projections after RoPE; KV heads are repeated to the query heads.
        scale: the score scale (Gemma-2: ``query_pre_attn_scalar ** -0.5``).
        softcap: the cap, or None for none.
        mask: ``[B, S, S]`` bool of allowed keys, or None for plain causal attention.

    Returns:
        ``[B, H, S, D]`` in q's dtype.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # the GEMM in the activation dtype (tensor cores), then fp32 for the cap and the softmax, as transformers' eager
    # path computes it (it also scales and caps in bf16; here those run in fp32)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seq = q.shape[2]
    if mask is None:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()[None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _capped_logits(h: torch.Tensor, w: torch.Tensor, cap: float) -> torch.Tensor:
    """fp32 ``cap * tanh(h w^T / cap)``; the GEMM in the activation dtype (bf16 logits, as transformers' LM head),
    so it runs on tensor cores: an fp32 GEMM of Gemma-2-9B's head would take ~10x longer."""
    logits = (h @ w.t()).float()
    return torch.tanh(logits / cap) * cap


def _chunk_ce_sum(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, cap: float,
                  ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(_capped_logits(h, w, cap), labels, ignore_index=ignore_index, reduction="sum")


def softcap_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, *, softcap: float,
                                 ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                                 chunk_size: int | None = None,
                                 num_items_in_batch: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """LM head + Gemma-2's final logit soft-capping + cross-entropy, chunked over tokens (the fused op's call).

    Each chunk's ``[chunk, V]`` fp32 logits are computed under activation checkpointing, so only one chunk's
    exist at a time (:func:`softcap_chunk_size` tokens), in forward and again in backward (an extra head GEMM per
    chunk: the price of not keeping ``[T, V]`` logits). Same meaning of ``shift``, ``reduction`` and
    ``num_items_in_batch`` as :func:`kernels.ops.fused_linear_cross_entropy.fused_linear_cross_entropy`; no loss
    tokens give 0.

    Args:
        h: ``[..., H]`` final-norm hidden states.
        w: ``[V, H]`` LM head.
        labels: ``[...]`` labels (with ``shift``: unshifted, shifted per row here).
        softcap: the cap of the logits.
        ignore_index: label of positions without loss.
        reduction: ``"sum"`` or ``"mean"``.
        shift: shift the labels per row.
        chunk_size: tokens per chunk (None: :func:`softcap_chunk_size`).
        num_items_in_batch: with ``"sum"``: divide by this.

    Returns:
        Scalar fp32 loss.
    """
    if shift:
        labels = shift_labels(labels, ignore_index)
    hf, lf = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    chunk = chunk_size or softcap_chunk_size(hf.shape[0], w.shape[0])
    grad = torch.is_grad_enabled() and (hf.requires_grad or w.requires_grad)
    total = hf.new_zeros((), dtype=torch.float32)
    for s in range(0, hf.shape[0], chunk):
        args = (hf[s:s + chunk], w, lf[s:s + chunk], softcap, ignore_index)
        part = checkpoint(_chunk_ce_sum, *args, use_reentrant=False) if grad else _chunk_ce_sum(*args)
        total = total + part
    return reduce_sum(total, lf, ignore_index, reduction, num_items_in_batch)


def _chunk_logprobs(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, cap: float, ignore_index: int):  # noqa: ANN202
    keep = labels != ignore_index
    logp = torch.log_softmax(_capped_logits(h, w, cap), dim=-1)
    logp = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def softcap_linear_logprobs(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, *, softcap: float,
                            ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Log-probabilities of ``labels`` under soft-capped logits, chunked like :func:`softcap_linear_cross_entropy`
    (the call of :func:`kernels.ops.fused_linear_logprobs.fused_linear_logprobs`): ``[N, H]`` in, ``[N]`` fp32 out,
    0 where the label is ``ignore_index``."""
    chunk = chunk_size or softcap_chunk_size(h.shape[0], w.shape[0])
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    parts = []
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], w, labels[s:s + chunk], softcap, ignore_index)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
