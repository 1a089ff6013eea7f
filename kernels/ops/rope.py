"""Rotary position embedding (RoPE, HF Llama "rotate-half" convention) applied in place to q and k.

Layout: ``q`` is ``[B, S, Hq, D]`` and ``k`` is ``[B, S, Hk, D]`` -- the layout right after the q/k projections
are reshaped, before the transpose to ``[B, H, S, D]`` for attention. Any strides are accepted as long as the
last (head_dim) dimension is contiguous, so views into a fused qkv projection work without a copy.

``cos``/``sin`` are ``[B, S, D]`` (or ``[1, S, D]``, broadcast over the batch) as produced by
:func:`rope_cos_sin` and by HF's ``LlamaRotaryEmbedding`` (the two halves of the last dimension are equal; the
kernel reads only the first half). Per-token ``position_ids`` (packed sequences whose positions restart at 0)
are handled by the caller computing ``cos``/``sin`` from them.

Rotation of each head vector ``x = [x1, x2]`` (halves of size D/2):
``[x1 * cos - x2 * sin, x2 * cos + x1 * sin]``; backward is the inverse rotation (``sin -> -sin``).

In-place: on the Triton path ``apply_rope`` overwrites ``q`` and ``k`` and returns them (autograd knows via
``mark_dirty``); they must therefore not be leaf tensors that require grad. Always use the returned tensors.
cos/sin stay in fp32 and the rotation is computed in fp32 (HF first rounds cos/sin to the activation dtype).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.ops._utils import runnable, use_triton


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_cb,
    stride_cs,
    n_heads,
    half_dim,
    sin_sign,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: cos/sin are loaded once and reused for every head of that token.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half_dim
    cs_off = b * stride_cb + s * stride_cs + d
    cos = tl.load(cos_ptr + cs_off, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = (tl.load(sin_ptr + cs_off, mask=d_mask, other=0.0).to(tl.float32) * sin_sign)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < n_heads) & d_mask[None, :]
    src = x_ptr + b * stride_xb + s * stride_xs + h * stride_xh + d[None, :]
    dst = out_ptr + b * stride_ob + s * stride_os + h * stride_oh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half_dim, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _check_layout(t: torch.Tensor, name: str) -> None:
    if t.dim() != 4 or t.stride(-1) != 1 or t.shape[-1] % 2:
        raise ValueError(
            f"{name} must be [B, S, H, D] with even D and contiguous last dim, got "
            f"shape {tuple(t.shape)} strides {t.stride()}"
        )


def rope_launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """Rotate ``x`` [B, S, H, D] into ``out`` (may alias ``x``); ``inverse`` rotates by ``-angle``."""
    bsz, seq, n_heads, dim = x.shape
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    runnable(_rope_kernel)[(bsz * seq,)](
        x, out, cos, sin, seq,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_cb, cos.stride(1),
        n_heads, dim // 2, -1.0 if inverse else 1.0,
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4,
    )  # fmt: skip


class RoPEFunction(torch.autograd.Function):
    """In-place forward on one tensor (``mark_dirty``), out-of-place inverse rotation in backward.

    One tensor per call, not q and k together: autograd refuses a Function that modifies a *view* in place
    and returns more than one tensor, and q/k are views of the projection outputs. The price is reading the
    cos/sin table twice (2 MB at 8B shapes vs 84 MB of q/k traffic) and one more launch.
    Backward writes a new tensor instead of rotating ``dx`` in place: an upstream node may hand the same
    gradient tensor to several inputs, and overwriting it would corrupt the others.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: ANN001, ANN205
        rope_launch(x, x, cos, sin, inverse=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        dx = dx if dx.stride(-1) == 1 else dx.contiguous()
        dx_out = torch.empty(dx.shape, dtype=dx.dtype, device=dx.device)
        rope_launch(dx, dx_out, cos, sin, inverse=True)
        return dx_out, None, None


def rope_inv_freq(head_dim: int, theta: float = 500000.0, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with optional linear or Llama-3 scaling.

    Mirrors transformers' ``_compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters`` /
    ``_compute_llama3_parameters`` op for op, in float32, so the angles match HF bit for bit.

    Args:
        head_dim: Rotary dimension D (even).
        theta: RoPE base (``rope_theta``); 500000 for Llama 3.
        scaling: None / ``{"rope_type": "default"}``, ``{"rope_type": "linear", "factor": 8.0}``, or Llama 3.1
            scaling: ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions divided by `factor` (Gemma-3's global layers): transformers' linear scaling
        return inv_freq / scaling["factor"]
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r} (only 'default', 'linear' and 'llama3')")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float = 500000.0, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, HF layout (halves duplicated), float32.

    Args:
        position_ids: ``[B, S]`` (or ``[S]``) integer positions; with sequence packing they restart at 0 for each
            packed document.
        head_dim: D.
        theta: RoPE base.
        scaling: See :func:`rope_inv_freq`.

    Returns:
        ``(cos, sin)``, each ``[B, S, D]`` float32 on ``position_ids.device``.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(position_ids.device)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # same single fp32 multiply as HF's matmul
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch HF ``apply_rotary_pos_emb`` for ``[B, S, H, D]`` (out of place, fp32/fp64 math).

    Memory traffic (eager): per tensor ~ rotate_half (cat: read + write), 2 muls, 1 add, plus dtype casts:
    ~8 passes of q/k versus the fused kernel's 1 read + 1 write.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cos.shape[-1] * 2 == q.shape[-1]:  # half-width tables: duplicate like HF
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    c = cos.to(compute).unsqueeze(2)
    s = sin.to(compute).unsqueeze(2)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    qc, kc = q.to(compute), k.to(compute)
    return (qc * c + rotate_half(qc) * s).to(q.dtype), (kc * c + rotate_half(kc) * s).to(k.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to q and k (in place on the Triton path).

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`apply_rope_reference` and returns new tensors, which
    is why callers must use the return value.

    Args:
        q: ``[B, S, Hq, D]`` queries (bf16/fp16/fp32), head_dim contiguous; not a leaf requiring grad.
        k: ``[B, S, Hk, D]`` keys, same dtype, B, S, D as ``q``.
        cos: ``[B, S, D]`` or ``[1, S, D]`` from :func:`rope_cos_sin` (fp32 recommended).
        sin: Same shape as ``cos``.

    Returns:
        ``(q_rot, k_rot)``: the rotated tensors (the very objects ``q`` and ``k`` on the Triton path).
    """
    _check_layout(q, "q")
    _check_layout(k, "k")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.shape != sin.shape or cos.shape[1] != q.shape[1] or cos.shape[-1] not in (q.shape[-1], q.shape[-1] // 2):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match q {tuple(q.shape)}")
    if not use_triton(q, k):
        return apply_rope_reference(q, k, cos, sin)
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return RoPEFunction.apply(q, cos, sin), RoPEFunction.apply(k, cos, sin)
