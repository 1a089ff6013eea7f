"""The family-specific attention parts in PyTorch: Gemma-2's soft-capped eager attention and the sliding-window
mask (kernels/NOTES.md, "Families": where each runs).

The attention computes its scores in fp32 and rounds once to the activation dtype, like the fused ops' references.
"""

from __future__ import annotations

import torch


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
