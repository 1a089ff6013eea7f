"""Causal self-attention of the decoder, for unpacked and packed rows.

Unpacked rows: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` (no mask tensor, KV heads not
repeated; torch's order picks the kernel, cuDNN's fused attention on Hopper with torch 2.13; with
``attention_backend: cudnn``, cuDNN's first wherever it takes the inputs: :func:`causal_sdpa`). Right padding needs
no mask: pads sit after every real token and a causal query never sees a later key, so real tokens' outputs are
exactly those of the unpadded row (pads' own outputs are junk, and their labels are -100).

Packed rows (``position_ids`` given; they restart at 0 per sample) attend only inside their sample:

- on CUDA in bf16/fp16, where this torch has ``torch.nn.attention.varlen``, and unless ``varlen_attention`` is
  off: variable-length flash attention over the flattened batch cut at every position 0 (no mask, no wasted
  blocks). Its causal argument is read from the installed signature, which moved between torch releases;
- otherwise (CPU, fp32, a torch without it, or ``varlen_attention: false``): SDPA with a ``[B, S, S]``
  block-diagonal causal bool mask built from ``position_ids`` (8 MB at 2 x 2048), KV heads repeated (the masked
  SDPA kernels do not all take ``enable_gqa``).

Preference pairs packed with their prompt once (:class:`SharedPrompts`) take two varlen calls, or their own mask.

Layers with soft-capped scores (Gemma-2) or a sliding window shorter than the rows take FlexAttention on CUDA in
bf16/fp16 (:mod:`kernels.trainer.flex`): their ``mask`` argument is then a block mask.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.trainer.config import DecoderConfig
from kernels.trainer.flex import flex_attend, is_block_mask
from kernels.trainer.linear import Linear, project
from kernels.trainer.norm import RMSNorm
from kernels.trainer.opset import FUSED_OPS
from kernels.trainer.torch_ops import softcap_attention


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

# attention_backend "cudnn": torch's SDPA backends in this order of priority (cuDNN first; torch's own order after)
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def _backend_order(backend: str, on_cuda: bool) -> contextlib.AbstractContextManager[None]:
    """Where ``backend`` is ``"cudnn"`` on CUDA: SDPA's backends in :data:`CUDNN_FIRST`'s priority; else torch's own."""
    return sdpa_kernel(CUDNN_FIRST, set_priority=True) if backend == "cudnn" and on_cuda else contextlib.nullcontext()


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
                scale: float | None = None) -> torch.Tensor:
    """Causal SDPA over ``[B, heads, S, D]`` (KV heads fewer than q's: grouped-query, not repeated). ``backend``
    ``"cudnn"`` on CUDA asks for cuDNN's fused attention first (torch takes the next backend where cuDNN refuses the
    inputs); otherwise torch's own order. :func:`dense_attention_impl` says which runs. The backward runs the
    forward's backend (the op's saved state is that backend's)."""
    with _backend_order(backend, q.is_cuda):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1],
                                              scale=scale)


_KERNELS = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
            SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}


def dense_attention_impl(backend: str, n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device | str, seq: int = 256) -> str:
    """What :func:`causal_sdpa` runs for a model's shapes here, for the run's record: the kernel SDPA's dispatcher
    picks for such inputs in that backend's order (``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``,
    ``sdpa-math``), with `` (cudnn refused)`` where ``"cudnn"`` was asked for on CUDA and another runs. torch's own
    order differs between releases and GPUs (torch 2.13 on Hopper already picks cuDNN), so ``auto`` is recorded by
    what it picks too."""
    device = torch.device(device)
    q = torch.empty(1, n_heads, seq, head_dim, dtype=dtype, device=device)
    kv = torch.empty(1, n_kv, seq, head_dim, dtype=dtype, device=device)
    with _backend_order(backend, device.type == "cuda"):
        chosen = SDPBackend(torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=n_kv != n_heads))
    impl = f"sdpa-{_KERNELS.get(chosen, chosen.name.lower())}"
    if backend == "cudnn" and device.type == "cuda" and chosen != SDPBackend.CUDNN_ATTENTION:
        impl += " (cudnn refused)"
    return impl


def _varlen_ok(h: torch.Tensor) -> bool:
    """Flash varlen attention exists here and takes these activations (CUDA, bf16/fp16)."""
    return VARLEN is not None and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[N + 1]``: where each packed sample starts in the flattened ``[B * S]`` batch (a sample starts at
    every position 0, so each row starts one and each right pad is a sample of its own), then ``B * S``."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
            max_k: int) -> torch.Tensor:
    """Flash varlen attention on ``[tokens, heads, D]`` tensors, causal (bottom-right aligned where a sample has more
    keys than queries, as flash attention aligns it), GQA by argument or by repeating KV heads."""
    fn, causal, takes_gqa = VARLEN
    n_heads, n_kv = q.shape[1], k.shape[1]
    kw = dict(causal)
    if n_kv != n_heads:
        if takes_gqa:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each packed sample: ``[B, S, H, D]`` q and ``[B, S, Hkv, D]`` k/v in, ``[B, S, H, D]``
    out. ``max_q = max_k = S`` is an upper bound of every sample's length (no host sync to find the longest)."""
    bsz, seq, n_heads, d = q.shape
    n_kv = k.shape[2]
    q, k, v = q.reshape(bsz * seq, n_heads, d), k.reshape(bsz * seq, n_kv, d), v.reshape(bsz * seq, n_kv, d)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, seq, seq).view(bsz, seq, n_heads, d)


@dataclass
class SharedPrompts:
    """Preference pairs packed in one row as ``[prompt, chosen, rejected]`` each, the prompt once for both
    completions: chosen tokens attend to the prompt and to the chosen tokens before them, rejected tokens to the
    prompt and to the rejected tokens before them (position ids continue from the prompt in both), so every token
    computes what it would in its own ``prompt + completion`` sequence.

    On the flash varlen path that is two calls: one over ``[prompt + chosen]`` and ``[rejected]`` segments of the
    row (the rejected tokens' outputs there are discarded), one with the rejected tokens as queries over their
    pair's prompt and rejected keys (gathered), causal aligned bottom-right. Elsewhere: a ``[1, T, T]`` bool mask.

    Attributes:
        doc: ``[T]`` the pair of each token of the row.
        branch: ``[T]`` 0 prompt, 1 chosen, 2 rejected.
        cu_main: int32 starts of the ``[prompt + chosen]`` and ``[rejected]`` segments, then ``T``.
        rejected: ``[n_r]`` row positions of the rejected tokens (the second call's queries).
        keys: row positions of each pair's prompt then its rejected tokens (the second call's keys).
        cu_q / cu_k: int32 cumulative query / key counts per pair of the second call.
        max_main / max_q / max_k: longest segment of each.
    """

    doc: torch.Tensor
    branch: torch.Tensor
    cu_main: torch.Tensor
    rejected: torch.Tensor
    keys: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_main: int
    max_q: int
    max_k: int

    def to(self, device: torch.device | str) -> SharedPrompts:
        return SharedPrompts(**{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                                for k, v in vars(self).items()})

    def mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[1, T, T]`` bool: same pair, key in the prompt or the query's own branch, key position <= query's."""
        pos = position_ids.reshape(-1)
        same = (self.doc[:, None] == self.doc[None, :]) & (pos[None, :] <= pos[:, None])
        return (same & ((self.branch[None, :] == 0) | (self.branch[None, :] == self.branch[:, None])))[None]


def shared_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: SharedPrompts) -> torch.Tensor:
    """:class:`SharedPrompts` attention through flash varlen: ``[1, T, H, D]`` q, ``[1, T, Hkv, D]`` k/v in."""
    _, seq, n_heads, d = q.shape
    q, k, v = q[0], k[0], v[0]
    main = _varlen(q, k, v, s.cu_main, s.cu_main, s.max_main, s.max_main)
    rejected = _varlen(q.index_select(0, s.rejected), k.index_select(0, s.keys), v.index_select(0, s.keys),
                       s.cu_q, s.cu_k, s.max_q, s.max_k)
    return main.index_copy(0, s.rejected, rejected).view(1, seq, n_heads, d)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]`` bool mask: causal and within the sample (a sample starts where position_ids is 0)."""
    doc = (position_ids == 0).cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


def packed_attention_mask(position_ids: torch.Tensor, h: torch.Tensor, varlen: bool,
                          shared: SharedPrompts | None = None) -> torch.Tensor | SharedPrompts:
    """The layers' ``mask`` argument for packed rows: int32 cu_seqlens where flash varlen attention runs here
    (``varlen`` asked and available for ``h``), else the ``[B, S, S]`` bool block mask. With ``shared`` prompts:
    the :class:`SharedPrompts` itself on the varlen path, else its bool mask."""
    if shared is not None:
        return shared if varlen and _varlen_ok(h) else shared.mask(position_ids)
    if varlen and _varlen_ok(h):
        return packed_cu_seqlens(position_ids)
    return packed_causal_mask(position_ids)


class Attention(nn.Module):
    """Self-attention with transformers' projection names: ``q_proj``/``k_proj``/``v_proj`` or Phi-3's fused
    ``qkv_proj`` (kept fused: PEFT puts one LoRA pair on it), and ``o_proj``; Qwen3's and Gemma-3's ``q_norm`` /
    ``k_norm``.

    The ``mask`` argument, which the model makes once per forward for each kind of layer, picks the path:

    - a FlexAttention block mask (:mod:`kernels.trainer.flex`; on CUDA in bf16/fp16 for a layer with Gemma-2's
      soft cap or a sliding window shorter than the rows, unless ``MethodOptions.flex_attention`` is off): compiled
      FlexAttention with the cap as its score modifier, the score scale, GQA, and causal + window + packed samples
      in the block mask; no ``[B, H, S, S]`` tensor;
    - None: causal SDPA (flash attention on CUDA), or with a soft cap
      :func:`~kernels.trainer.torch_ops.softcap_attention` (eager, fp32 scores);
    - int32 ``cu_seqlens`` or :class:`SharedPrompts`: packed samples through flash varlen attention;
    - a ``[B, S, S]`` bool mask (packed samples and / or a window, off the flex path): masked SDPA, or eager
      soft-capped attention under it.
    """

    ops = FUSED_OPS
    group_projections = True  # apply_method sets MethodOptions.group_projections on every block
    attention_backend = "auto"  # MethodOptions.attention_backend, set by apply_method
    qk_norm = False

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.fused_qkv = cfg.fused_qkv
        if cfg.fused_qkv:
            # registered in transformers' order (Phi3Attention makes o_proj first): PEFT initialises LoRA in
            # module order, and the same seed must give the same adapters
            self.o_proj = Linear(cfg.num_heads * d, h, cfg.o_bias, dtype, device)
            self.qkv_proj = Linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, cfg.qkv_bias, dtype, device)
            return
        self.q_proj = Linear(h, cfg.num_heads * d, cfg.qkv_bias, dtype, device)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(cfg.num_heads * d, h, cfg.o_bias, dtype, device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3, Gemma-3: after o_proj, as transformers registers them (the parameters' order)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device, cfg.norm_plus_one)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device, cfg.norm_plus_one)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused_qkv:
            return project(x, (self.q_proj, self.k_proj, self.v_proj), self.group_projections)
        qkv = self.qkv_proj(x)
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # slices, not split(): RoPE rotates q and k in place, which autograd allows on single-output views only
        return qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(bsz, seq, self.n_heads, self.head_dim)
        k = k.view(bsz, seq, self.n_kv, self.head_dim)
        v = v.view(bsz, seq, self.n_kv, self.head_dim)
        if self.qk_norm:  # over each head's head_dim (the fused op normalises the last dimension)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rope(q, k, cos, sin)
        if isinstance(mask, SharedPrompts):  # preference pairs sharing their prompt: two varlen flash calls
            return self.o_proj(shared_prompt_attention(q, k, v, mask).view(bsz, seq, self.n_heads * self.head_dim))
        flex = is_block_mask(mask)  # a soft cap or a window on CUDA: FlexAttention
        if not flex and mask is not None and mask.dtype == torch.int32:  # cu_seqlens of packed samples: varlen flash
            return self.o_proj(varlen_attention(q, k, v, mask).view(bsz, seq, self.n_heads * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if flex:
            o = flex_attend(q, k, v, mask, self.scale, self.softcap)
        elif self.softcap is not None:
            o = softcap_attention(q, k, v, self.scale or self.head_dim ** -0.5, self.softcap, mask)
        elif mask is None:
            o = causal_sdpa(q, k, v, self.attention_backend, self.scale)
        else:
            # The masked (memory-efficient) kernels do not all take enable_gqa: repeat KV heads explicitly.
            rep = self.n_heads // self.n_kv
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim))
