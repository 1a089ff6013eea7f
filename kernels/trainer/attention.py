"""Causal self-attention of the decoder, for unpacked and packed rows.

Unpacked rows: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` (flash attention on CUDA, no mask
tensor, KV heads not repeated). Right padding needs no mask: pads sit after every real token and a causal query
never sees a later key, so real tokens' outputs are exactly those of the unpadded row (pads' own outputs are junk,
and their labels are -100).

Packed rows (``position_ids`` given; they restart at 0 per sample) attend only inside their sample:

- on CUDA in bf16/fp16, where this torch has ``torch.nn.attention.varlen``, and unless ``varlen_attention`` is
  off: variable-length flash attention over the flattened batch cut at every position 0 (no mask, no wasted
  blocks). Its causal argument is read from the installed signature, which moved between torch releases;
- otherwise (CPU, fp32, a torch without it, or ``varlen_attention: false``): SDPA with a ``[B, S, S]``
  block-diagonal causal bool mask built from ``position_ids`` (8 MB at 2 x 2048), KV heads repeated (the masked
  SDPA kernels do not all take ``enable_gqa``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.trainer.config import DecoderConfig
from kernels.trainer.linear import Linear, project
from kernels.trainer.opset import FUSED_OPS


def _find_varlen() -> tuple[Any, dict[str, Any], bool] | None:
    """``(varlen_attn, causal kwargs, takes enable_gqa)`` for the installed torch, or None where it has none.

    torch 2.9-2.10 take ``is_causal=True``; later releases ``window_size=(-1, 0)`` (and ``enable_gqa``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


VARLEN = _find_varlen()


def _varlen_ok(h: torch.Tensor) -> bool:
    """Flash varlen attention exists here and takes these activations (CUDA, bf16/fp16)."""
    return VARLEN is not None and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[N + 1]``: where each packed sample starts in the flattened ``[B * S]`` batch (a sample starts at
    every position 0, so each row starts one and each right pad is a sample of its own), then ``B * S``."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each packed sample: ``[B, S, H, D]`` q and ``[B, S, Hkv, D]`` k/v in, ``[B, S, H, D]``
    out. ``max_q = max_k = S`` is an upper bound of every sample's length (no host sync to find the longest)."""
    fn, causal, takes_gqa = VARLEN
    bsz, seq, n_heads, d = q.shape
    n_kv = k.shape[2]
    q, k, v = q.reshape(bsz * seq, n_heads, d), k.reshape(bsz * seq, n_kv, d), v.reshape(bsz * seq, n_kv, d)
    kw = dict(causal)
    if n_kv != n_heads:
        if takes_gqa:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, seq, seq, **kw).view(bsz, seq, n_heads, d)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]`` bool mask: causal and within the sample (a sample starts where position_ids is 0)."""
    doc = (position_ids == 0).cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


def packed_attention_mask(position_ids: torch.Tensor, h: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The layers' ``mask`` argument for packed rows: int32 cu_seqlens where flash varlen attention runs here
    (``varlen`` asked and available for ``h``), else the ``[B, S, S]`` bool block mask."""
    if varlen and _varlen_ok(h):
        return packed_cu_seqlens(position_ids)
    return packed_causal_mask(position_ids)


class Attention(nn.Module):
    ops = FUSED_OPS
    group_projections = True  # apply_method sets MethodOptions.group_projections on every block

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(h, cfg.num_heads * d, cfg.qkv_bias, dtype, device)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(cfg.num_heads * d, h, cfg.o_bias, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.group_projections)
        q = q.view(bsz, seq, self.n_heads, self.head_dim)
        k = k.view(bsz, seq, self.n_kv, self.head_dim)
        v = v.view(bsz, seq, self.n_kv, self.head_dim)
        q, k = self.ops.rope(q, k, cos, sin)
        if mask is not None and mask.dtype == torch.int32:  # cu_seqlens of packed samples: varlen flash attention
            return self.o_proj(varlen_attention(q, k, v, mask).view(bsz, seq, self.n_heads * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            # The masked (memory-efficient) kernels do not all take enable_gqa: repeat KV heads explicitly.
            rep = self.n_heads // self.n_kv
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim))

