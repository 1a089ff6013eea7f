"""A Llama / Mistral / Qwen2 decoder for training, built on the fused ops in ``kernels.ops``.

It loads the very checkpoint files transformers loads (``config.json`` + safetensors, transformers' tensor names)
and computes the same function as ``AutoModelForCausalLM`` (tests compare logits), with:

- RMSNorm from :func:`kernels.ops.rms_norm.rms_norm`; the residual add before ``post_attention_layernorm`` is fused
  into it. The add at the end of the block stays a plain add so a layer's only input and output is the
  residual stream (one tensor per checkpointed layer, not two).
- RoPE from :mod:`kernels.ops.rope` (``rope_theta``, Llama-3 ``rope_scaling``), positions from ``position_ids``.
- SwiGLU from :func:`kernels.ops.swiglu.swiglu`.
- Attention: ``F.scaled_dot_product_attention``. Unpacked rows use ``is_causal=True`` and ``enable_gqa=True``
  (flash attention on H100, no mask tensor, KV heads not repeated). Right padding needs no mask: pads sit after
  every real token, a causal query never sees a later key, so real tokens' outputs are exactly those of the
  unpadded row (pads' own outputs are junk, and their labels are -100; ``test_convergence`` checks padded vs
  unpadded losses). Packed rows (``position_ids`` given; they restart at 0 per sample) attend only inside their
  sample: on CUDA in bf16/fp16 through variable-length flash attention (``torch.nn.attention.varlen``, the
  flattened batch cut at every position 0: no mask, no wasted blocks; its causal argument is read from the
  installed signature, which moved between torch releases), otherwise (CPU, fp32, a torch without it, or
  ``varlen_attention: false``) with a block-diagonal causal boolean mask built from ``position_ids`` and SDPA's
  memory-efficient kernel (``[B, S, S]`` bool: 8 MB at 2 x 2048).
- LM head + loss: :func:`kernels.ops.fused_linear_cross_entropy.fused_linear_cross_entropy` (no
  ``[tokens, vocab]`` logits on CUDA); the loss is a *sum* so the trainer can divide by the loss tokens of the
  whole optimizer step (what the HF Trainer does with ``num_items_in_batch``).
- LoRA / DoRA / QLoRA linears in :class:`Linear` (see there for dtypes and init); full fine-tuning makes every
  weight trainable.
- Gradient checkpointing per decoder layer (all layers, or ``recompute_layers`` of them) through a small
  reentrant-style autograd Function, :class:`_LayerCheckpoint`: it runs the layer forward without a graph (so
  nothing, not even a weight reference, is kept per layer, and no saved-tensor hooks cost host time),
  optionally keeps the layer input in pinned host memory, and in backward re-fetches, recomputes and
  backpropagates the layer.
- Host offload of frozen weights (LoRA/DoRA on a bf16 base; see README "memory"): ``offload_weights`` streams
  the base weights of N decoder layers from pinned host memory (:class:`WeightStreamer`: copy stream, one layer
  prefetched ahead in the direction of travel), ``offload_embeddings`` does the input-embedding gather on the
  host, ``offload_lm_head`` keeps the frozen LM head on the host and copies it in for the loss only.

On CPU without ``TRITON_INTERPRET=1`` each op runs its PyTorch reference, so the model trains anywhere.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels.ops.lora_linear import lora_linear, lora_linear_group
from kernels.ops.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from kernels.ops.rms_norm import rms_norm, rms_norm_reference
from kernels.ops.rope import apply_rope, apply_rope_reference, rope_cos_sin
from kernels.ops.swiglu import swiglu, swiglu_reference

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES


# ---------------------------------------------------------------------------------------------------------------
# which implementation of each op the blocks call


def _ce_reference(h, w, labels, chunk_size=None, **kw):  # noqa: ANN001, ANN003, ANN202, ARG001 - fused-op signature
    return fused_linear_cross_entropy_reference(h, w, labels, **kw)


@dataclass(frozen=True)
class OpSet:
    """The ops the decoder blocks call. Each field is the fused op (Triton on CUDA) or, when named in
    ``MethodOptions.reference_ops``, its pure-PyTorch reference (fp32 maths, autograd backward, same call
    signature): for bisecting a loss-parity departure op by op on the GPU, at the reference's speed and memory."""

    rms_norm: Any = rms_norm
    rope: Any = apply_rope
    swiglu: Any = swiglu
    fused_linear_cross_entropy: Any = fused_linear_cross_entropy

    @classmethod
    def with_references(cls, names: tuple[str, ...] | list[str]) -> OpSet:
        refs = {"rms_norm": rms_norm_reference, "rope": apply_rope_reference, "swiglu": swiglu_reference,
                "fused_linear_cross_entropy": _ce_reference}
        unknown = sorted(set(names) - set(refs))
        if unknown:
            raise ValueError(f"reference_ops {unknown}: not among {sorted(refs)}")
        return cls(**{n: refs[n] for n in names})


FUSED_OPS = OpSet()


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture values read from a transformers ``config.json`` (llama, mistral, qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        mt = d["model_type"]
        if mt not in ("llama", "mistral", "qwen2"):
            raise NotImplementedError(f"model_type {mt!r}: tunebench trains llama, mistral and qwen2")
        # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
        rp = dict(d.get("rope_parameters") or {})
        theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rp if rp and rp.get("rope_type", "default") != "default" else d.get("rope_scaling")
        heads = int(d["num_attention_heads"])
        attn_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attn_bias,  # qwen2 always has q/k/v bias, no o bias
            o_bias=attn_bias if mt == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            raw=dict(d),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> DecoderConfig:
        return cls.from_dict(json.loads((Path(checkpoint) / "config.json").read_text()))


@dataclass
class MethodOptions:
    """What to train and how (the scenario's method plus trainer knobs).

    Attributes:
        kind: ``full`` | ``lora`` | ``dora`` | ``qlora``.
        lora_r / lora_alpha / lora_dropout / target_modules: PEFT's meaning (scale = alpha / r).
        double_quant: QLoRA: quantise the NF4 absmaxes too.
        lora_dtype: dtype of LoRA A/B (and DoRA magnitude). float32, like PEFT's default
            (``autocast_adapter_dtype=True``); the matmuls run in the activation dtype, as under the HF
            Trainer's bf16 autocast.
        gradient_checkpointing: recompute decoder layers in backward.
        recompute_layers: with gradient checkpointing, how many decoder layers recompute (spread evenly;
            -1 = all). The others keep their activations (~570 MB per layer at the 8B shapes, micro-batch 2 x
            2048), trading memory for the recompute forward (1/4 of the layer's GEMM time). Layers whose
            weights stream from the host always recompute.
        offload_checkpoints: keep checkpointed layer inputs in pinned host memory.
        offload_weights: decoder layers (count, spread evenly; -1 = all) whose frozen base weights stream
            from pinned host memory. Needs gradient checkpointing and a dense frozen base (LoRA/DoRA).
        offload_embeddings: input embedding table on the host (frozen, untied only).
        offload_lm_head: frozen LM head on the host, copied to the GPU for the loss (untied only).
        fused_ce_chunk: tokens per chunk of the fused LM-head + loss (None: the op's default, 1024).
        reference_ops: ops (``rms_norm``, ``rope``, ``swiglu``, ``fused_linear_cross_entropy``) to run as their
            PyTorch references instead (:class:`OpSet`), for isolating a numerical difference on the GPU.
        group_projections: run q/k/v and gate/up, where all of a group carry LoRA of one rank and scale without
            dropout, as one :func:`~kernels.ops.lora_linear.lora_linear_group` call each (one A GEMM, one
            autograd node, dx accumulated in one buffer) instead of one ``lora_linear`` per projection.
        cuda_graph: capture the whole optimizer step as one CUDA graph and replay it
            (:class:`kernels.trainer.train.StepGraph`): no per-kernel host launches. CUDA only; not with host
            offload (its copies and events are host-driven), LoRA dropout (RNG state replayed from the host) or
            packed rows.
        varlen_attention: packed rows on CUDA in bf16/fp16 through variable-length flash attention where this
            torch has it (else, or False: SDPA with a block-diagonal causal mask).
        expandable_segments: the CUDA caching allocator in expandable-segments mode (:func:`configure_allocator`).
    """

    kind: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LINEAR_MODULES
    double_quant: bool = True
    lora_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = True
    recompute_layers: int = -1
    offload_checkpoints: bool = False
    offload_weights: int = 0
    offload_embeddings: bool = False
    offload_lm_head: bool = False
    fused_ce_chunk: int | None = None
    reference_ops: tuple[str, ...] = ()
    group_projections: bool = True
    cuda_graph: bool = False
    varlen_attention: bool = True
    expandable_segments: bool = True
    allocator: str = ""  # what load_model did to the CUDA allocator (configure_allocator); recorded with the run

    @property
    def is_peft(self) -> bool:
        return self.kind in ("lora", "dora", "qlora")


# ---------------------------------------------------------------------------------------------------------------
# linear layers


class _NF4Linear(torch.autograd.Function):
    """Frozen NF4 linear without an adapter (QLoRA with a subset of targets): dequantises again in backward."""

    @staticmethod
    def forward(ctx, x, bias, q):  # noqa: ANN001, ANN205
        ctx.q = q
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        return gy @ dequantize_nf4(ctx.q, gy.dtype), None, None


def peft_lora_a_init(r: int, in_features: int, out_features: int) -> torch.Tensor:
    """LoRA A drawn exactly as PEFT draws it, from the default CPU generator (fp32 ``[r, in]``).

    PEFT builds ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each constructor draws a kaiming-uniform
    weight) and then re-draws A with kaiming-uniform(a=sqrt(5)). Consuming the generator the same way, module
    by module in the same order, gives bit-identical adapters from the same seed, so hf and tunebench runs of a
    scenario start from the same LoRA weights and their loss curves can be compared step by step.
    """
    for shape in ((r, in_features), (out_features, r)):
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
    a = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


class Linear(nn.Module):
    """A linear layer whose base is trainable (full FT), frozen (LoRA/DoRA) or frozen NF4 (QLoRA).

    LoRA follows PEFT: ``y = x W^T + b + (alpha / r) * B(A(dropout(x)))``, ``A`` kaiming-uniform(a=sqrt(5)), ``B``
    zeros, so the model starts exactly at the base. A/B are kept in ``lora_dtype`` (fp32 by default: the AdamW
    update of small bf16 values would round away) and cast to the activation dtype for the matmuls, as
    PEFT + autocast do. LoRA and QLoRA run :func:`kernels.ops.lora_linear.lora_linear` (no dW; the NF4 weight
    is dequantised per GEMM, also in backward); DoRA, which that op does not cover, is plain torch.
    DoRA follows PEFT's ``DoraLinearLayer``: ``m / ||W + s B A||_row`` (norm detached)
    rescales the LoRA-adapted output, ``m`` starts at the row norms of ``W``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.qweight: NF4Tensor | None = None
        self.stream_weight: torch.Tensor | None = None  # device copy of a host-offloaded weight while in use
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.magnitude: nn.Parameter | None = None
        self.lora_r = 0
        self.lora_alpha = 0.0
        self.scaling = 0.0
        self.lora_dropout = 0.0

    # -- construction ---------------------------------------------------------------------------------------------
    def add_lora_(self, r: int, alpha: float, dropout: float, dora: bool, dtype: torch.dtype,
                  dev: torch.device) -> None:
        self.lora_A = nn.Parameter(peft_lora_a_init(r, self.in_features, self.out_features).to(dev, dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        self.lora_r, self.lora_alpha, self.scaling, self.lora_dropout = r, float(alpha), alpha / r, float(dropout)
        if dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self.base_weight().to(dev).float(), dim=1)
                self.magnitude = nn.Parameter(norm.to(dtype))

    def base_weight(self) -> torch.Tensor:
        """The dense base weight (dequantised for NF4: a temporary)."""
        if self.stream_weight is not None:
            return self.stream_weight
        return self.weight if self.weight is not None else dequantize_nf4(self.qweight)

    # -- forward --------------------------------------------------------------------------------------------------
    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return _NF4Linear.apply(x, self.bias, self.qweight)
        return F.linear(x, self.base_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A is None:
            return self._base(x)
        if self.magnitude is None:  # lora_linear casts A/B (lora_dtype) to x's dtype itself
            base = self.qweight if self.qweight is not None else self.base_weight()
            return lora_linear(x, base, self.lora_A, self.lora_B, self.scaling, self.bias, self.lora_dropout,
                               self.training)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        # DoRA (PEFT semantics): base + (m/n - 1) * W xd + (m/n) * s * B A xd, n = ||W + s B A|| detached
        xd = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        w = self.base_weight()
        with torch.no_grad():
            n = torch.linalg.norm(w.to(b.dtype) + self.scaling * (a.t() @ b.t()).t(), dim=1).to(x.dtype)
        mns = self.magnitude.to(x.dtype) / n
        base = self._base(x)
        base_d = base if xd is x else self._base(xd)
        if self.bias is not None:
            base_d = base_d - self.bias
        # same association as PEFT (base + ((m/n - 1) * base_d + (m/n) * lora * s)): keeps fp32 runs bit-close
        return base + ((mns - 1) * base_d + mns * F.linear(F.linear(xd, a), b) * self.scaling)

    def extra_repr(self) -> str:
        kind = "nf4" if self.qweight is not None else str(self.weight.dtype).removeprefix("torch.")
        lora = f", lora_r={self.lora_r}, dora={self.magnitude is not None}" if self.lora_A is not None else ""
        return f"{self.in_features}, {self.out_features}, base={kind}, bias={self.bias is not None}{lora}"


def _groupable(m: Linear) -> bool:
    return m.lora_A is not None and m.magnitude is None and (m.lora_dropout == 0 or not m.training)


def project(x: torch.Tensor, linears: tuple[Linear, ...], group: bool) -> list[torch.Tensor]:
    """``[m(x) for m in linears]``; with ``group`` and every projection a plain LoRA/QLoRA one of the same rank
    and scale without active dropout, as one :func:`lora_linear_group` call (same maths, fewer launches)."""
    if group and all(_groupable(m) for m in linears) and len({(m.lora_r, m.scaling) for m in linears}) == 1:
        return lora_linear_group(x, [m.qweight if m.qweight is not None else m.base_weight() for m in linears],
                                 [m.lora_A for m in linears], [m.lora_B for m in linears], linears[0].scaling,
                                 [m.bias for m in linears])
    return [m(x) for m in linears]


# ---------------------------------------------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    ops = FUSED_OPS  # apply_method sets the model's OpSet on every block

    def __init__(self, n: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # noqa: ANN201
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


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


class MLP(nn.Module):
    ops = FUSED_OPS
    group_projections = True

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(h, i, b, dtype, device)
        self.up_proj = Linear(h, i, b, dtype, device)
        self.down_proj = Linear(i, h, b, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), self.group_projections)
        return self.down_proj(self.ops.swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.self_attn = Attention(cfg, dtype, device)
        self.mlp = MLP(cfg, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, mask)
        x, h = self.post_attention_layernorm(a, residual=h)  # fused: h = h + a; x = norm(h)
        return h + self.mlp(x)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint offload


_COPY_STREAMS: dict[int, Any] = {}


def _copy_stream(device: torch.device):  # noqa: ANN202
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _COPY_STREAMS[idx]


class WeightStreamer:
    """Frozen base weights of some decoder layers in pinned host memory, copied in just before use.

    ``enter(i, direction)`` makes layer ``i``'s weights usable on the compute stream (waiting for its copy) and
    starts copying the next streamed layer in ``direction`` (+1 forward, -1 backward) on a side stream, so the
    copy overlaps this layer's compute; ``exit(i)`` drops the device copies (``record_stream`` keeps the
    allocator from reusing them before the compute stream is done). At most two streamed layers are on the
    device at any time. On a CPU model (tests) the "device copy" is the host tensor itself.
    """

    def __init__(self, model: DecoderModel, layer_ids: list[int], device: torch.device):
        self.device, self.layer_ids = device, sorted(layer_ids)
        self.cuda = device.type == "cuda"
        self.host: dict[int, list[tuple[Linear, torch.Tensor]]] = {}
        for i in self.layer_ids:
            entries = []
            for _, mod in _layer_linears(model.model.layers[i]):
                if mod.weight is None or mod.weight.requires_grad:
                    raise ValueError("offload_weights needs a dense frozen base (LoRA/DoRA, not full or QLoRA)")
                host = mod.weight.data.to("cpu")
                if self.cuda and not host.is_pinned():
                    host = host.pin_memory()
                mod.weight = nn.Parameter(host, requires_grad=False)  # the parameter itself now lives on the host
                entries.append((mod, host))
            self.host[i] = entries
        self.on_device: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.released: Any = None  # compute-stream event after the last released layer's work

    def _issue(self, i: int) -> None:
        if i in self.on_device or i not in self.host:
            return
        if not self.cuda:
            self.on_device[i] = ([h for _, h in self.host[i]], None)
            return
        if self.released is not None:
            # Throttle the CPU: the host runs far ahead of the GPU, and a block freed with record_stream is only
            # reusable once the compute stream has passed it, so without this wait every prefetch issued ahead
            # would take fresh device memory (up to all streamed layers). Waiting for the last released layer
            # bounds the device copies at ~2 layers and still leaves the GPU a layer of queued work.
            self.released.synchronize()
            self.released = None
        stream = _copy_stream(self.device)
        # the copy must not start before the compute stream has finished with the memory it may reuse
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            ts = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
        self.on_device[i] = (ts, stream.record_event())

    def _next(self, i: int, direction: int) -> int | None:
        later = [j for j in self.layer_ids if (j - i) * direction > 0]
        return (min(later) if direction > 0 else max(later)) if later else None

    def enter(self, i: int, direction: int) -> None:
        if i in self.host:
            self._issue(i)
            ts, event = self.on_device[i]
            if event is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(event)
                for t in ts:
                    t.record_stream(cur)
            for (mod, _), t in zip(self.host[i], ts, strict=True):
                mod.stream_weight = t
        nxt = self._next(i, direction)
        if nxt is not None:
            self._issue(nxt)

    def exit(self, i: int, direction: int) -> None:
        if i in self.host:
            for mod, _ in self.host[i]:
                mod.stream_weight = None
            if direction > 0 and i == self.layer_ids[-1]:
                return  # the last streamed layer of the forward is the first one backward needs: keep it
            self.on_device.pop(i, None)
            if self.cuda:
                self.released = torch.cuda.current_stream(self.device).record_event()


def _layer_linears(layer: nn.Module):  # noqa: ANN202
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, Linear)]


class _LayerCheckpoint(torch.autograd.Function):
    """Reentrant-style checkpoint of one decoder layer, with host offload of its input and/or its weights.

    torch's non-reentrant checkpoint holds the layer input alive through its recompute closure (so
    ``save_on_cpu`` around it would offload nothing) and its forward keeps every reference an op stores on
    ``ctx`` (``lora_linear`` keeps its weight): a streamed weight would stay on the GPU until backward. Here
    the forward runs under ``no_grad`` (no graph at all), the input is copied to pinned memory on a side stream
    when asked, and backward brings the input (and the layer's streamed weights) back, recomputes the layer
    with a graph (same RNG state, for dropout) and backpropagates through it; parameters get their gradients
    from that inner backward.
    """

    @staticmethod
    def forward(ctx, call, h, *args):  # noqa: ANN001, ANN205
        ctx.call, ctx.device = call, h.device
        ctx.cpu_rng = torch.get_rng_state() if call.rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(h.device) if (call.rng and h.is_cuda) else None
        with torch.no_grad():
            out = call.run(h, *args, direction=1)
        ctx.event = None
        if call.offload_input and h.is_cuda:
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            stream = _copy_stream(h.device)
            stream.wait_stream(torch.cuda.current_stream(h.device))
            with torch.cuda.stream(stream):
                host.copy_(h, non_blocking=True)
            h.record_stream(stream)  # h's memory is not reused before the copy has read it
            ctx.event = stream.record_event()
            ctx.h = host
        else:
            ctx.h = h.detach()
        ctx.save_for_backward(*args)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        args = ctx.saved_tensors
        if ctx.event is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.event)
            h = ctx.h.to(ctx.device, non_blocking=True)
        else:
            h = ctx.h
        h = h.detach().requires_grad_(True)
        ctx.h = None
        index = None
        if ctx.cuda_rng is not None:
            index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        devices = [index] if index is not None else []
        # RNG replay only where the layer draws random numbers (LoRA dropout): forking the CUDA generator
        # costs host time at every layer of every step
        with torch.random.fork_rng(devices=devices, enabled=ctx.cpu_rng is not None):
            if ctx.cpu_rng is not None:
                torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, index)
            with torch.enable_grad():
                out = ctx.call.run(h, *args, direction=-1, keep=True)
            torch.autograd.backward(out, grad_out)
        ctx.call.release(-1)
        return (None, h.grad) + (None,) * len(args)


class _LayerCall:
    """What :class:`_LayerCheckpoint` runs: ``layer(h, cos, sin, mask)`` with its weights streamed in."""

    def __init__(self, layer: DecoderLayer, index: int, offload_input: bool, streamer: WeightStreamer | None,
                 rng: bool):
        self.layer, self.index = layer, index
        self.offload_input, self.streamer = offload_input, streamer
        self.rng = rng  # the layer draws random numbers (dropout): its recompute must replay the RNG state

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, *,
            direction: int, keep: bool = False) -> torch.Tensor:
        if self.streamer is not None:
            self.streamer.enter(self.index, direction)
        out = self.layer(h, cos, sin, mask)  # mask is passed (saved) only for packed rows
        if not keep:
            self.release(direction)
        return out

    def release(self, direction: int) -> None:
        if self.streamer is not None:
            self.streamer.exit(self.index, direction)


# ---------------------------------------------------------------------------------------------------------------
# the model


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


class DecoderModel(nn.Module):
    """Causal LM with transformers' module names (``model.layers.N...``, ``lm_head``) for loading and saving.

    Args:
        cfg: architecture.
        dtype: storage dtype of the base weights (bf16 on GPU; fp32 in CPU tests).
        device: where the weights live.
    """

    ops = FUSED_OPS

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        device = torch.device(device)
        self.cfg, self.dtype = cfg, dtype
        self.model = nn.Module()
        # _weight: skip nn.Embedding's random init (it would move the RNG that the LoRA init must share with PEFT)
        self.model.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                                 device=device))
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head: nn.Module | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Module()  # a bare module so the tensor is named lm_head.weight, as in transformers
            self.lm_head.weight = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.options = MethodOptions(kind="none")
        self.gradient_checkpointing = False
        self.checkpointed_layers: frozenset[int] | None = None  # None: every layer (when checkpointing)
        self.offload_checkpoints = False
        self.streamer: WeightStreamer | None = None
        self.compute_device: torch.device | None = None if device.type == "meta" else device
        self._lm_head_prefetch: tuple[torch.Tensor, Any] | None = None

    # -- helpers --------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.device_of_compute

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def linears(self):  # noqa: ANN201
        """``(qualified name, Linear)`` for every projection, e.g. ``model.layers.0.self_attn.q_proj``."""
        for name, mod in self.named_modules():
            if isinstance(mod, Linear):
                yield name, mod

    # -- forward --------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, S, H]``. ``position_ids`` given = packed rows (see module docstring)."""
        cfg = self.cfg
        h = self._embed(input_ids)
        self._prefetch_lm_head()
        mask = None
        if position_ids is None:
            cos, sin = self._rope_tables(input_ids.shape[1], input_ids.device)
        else:
            # the layers' "mask" argument: int32 cu_seqlens (varlen) or the [B, S, S] bool mask
            varlen = self.options.varlen_attention and _varlen_ok(h)
            mask = packed_cu_seqlens(position_ids) if varlen else packed_causal_mask(position_ids)
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if ckpt and not h.requires_grad:
            h = h.detach().requires_grad_(True)  # the reentrant-style Function needs a grad-requiring input
        extra = (cos, sin) if mask is None else (cos, sin, mask)
        rng = self.training and self.options.lora_dropout > 0
        for i, layer in enumerate(self.model.layers):
            if ckpt and self.checkpointed_layers is not None and i not in self.checkpointed_layers:
                h = layer(h, cos, sin, mask)  # selective recomputation: this layer keeps its activations
            elif ckpt:
                # our own checkpoint, not torch.utils.checkpoint's non-reentrant one, whose forward builds the
                # graph and runs saved-tensor hooks: host time in a step that is host-bound (kernels/NOTES.md)
                call = _LayerCall(layer, i, self.offload_checkpoints, self.streamer, rng)
                h = _LayerCheckpoint.apply(call, h, *extra)
            elif self.streamer is not None:
                raise RuntimeError("offload_weights streams layers inside checkpointed training steps only; "
                                   "for evaluation, build the model without it")
            else:
                h = layer(h, cos, sin, mask)
        return self.model.norm(h)

    def _rope_tables(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions ``0..seq-1``, kept for the next call of the same length (no host-to-device
        copy of the frequencies per forward: a CUDA graph cannot capture one)."""
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0] != (seq, device):
            pos = torch.arange(seq, device=device)[None]
            cached = ((seq, device), *rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling))
            self.__dict__["_rope_cache"] = cached
        return cached[1], cached[2]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight
        if w.device == input_ids.device:
            return self.model.embed_tokens(input_ids)
        # offloaded (frozen) table: gather the rows on the host, ship [B, S, H] (33 MB at 8B shapes) to the device
        return F.embedding(input_ids.cpu(), w).to(input_ids.device, non_blocking=True)

    def _prefetch_lm_head(self) -> None:
        """Start copying a host-offloaded LM head now, so the copy overlaps the layers' forward."""
        if self.lm_head is None or self.lm_head.weight.device == self.device_of_compute:
            return
        dev = self.device_of_compute
        if dev.type != "cuda":
            self._lm_head_prefetch = (self.lm_head.weight, None)
            return
        stream = _copy_stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            w = self.lm_head.weight.to(dev, non_blocking=True)
        self._lm_head_prefetch = (w, stream.record_event())

    @property
    def device_of_compute(self) -> torch.device:
        """Where activations live (the final norm weight never moves to the host)."""
        return self.compute_device or self.model.norm.weight.device

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
        """Loss (``labels`` given: next-token cross-entropy, labels shifted here) or logits (tests, eval).

        Args:
            input_ids: ``[B, S]`` token ids (right-padded).
            labels: ``[B, S]`` unshifted labels, -100 where no loss (padding, prompt, first token of a sample).
            position_ids: ``[B, S]`` for packed rows only; None for one sample per row.
            reduction: ``"sum"`` (the trainer divides by the optimizer step's loss tokens) or ``"mean"``.

        Returns:
            Scalar fp32 loss, or ``[B, S, vocab]`` logits when ``labels`` is None.
        """
        h = self.hidden_states(input_ids, position_ids)
        w = self.lm_head_weight()
        if self._lm_head_prefetch is not None:
            w, event = self._lm_head_prefetch
            self._lm_head_prefetch = None  # the device copy dies with this forward (the CE op does not keep it)
            if event is not None:
                torch.cuda.current_stream(w.device).wait_event(event)
                w.record_stream(torch.cuda.current_stream(w.device))
        if labels is None:
            return h @ w.t()
        return self.ops.fused_linear_cross_entropy(h, w, labels, ignore_index=-100, reduction=reduction, shift=True,
                                          chunk_size=self.options.fused_ce_chunk)

    # -- read-back ------------------------------------------------------------------------------------------------
    def effective_settings(self) -> dict[str, Any]:
        """Method settings read from the live modules (the keys of ``harness.measuring.effective``)."""
        ckpt = bool(self.gradient_checkpointing and self.training
                    and (self.checkpointed_layers is None or self.checkpointed_layers))
        eff: dict[str, Any] = {"train_mode": bool(self.training), "gradient_checkpointing": ckpt}
        dtypes: dict[torch.dtype, int] = {}  # of the frozen weights; of all weights for full fine-tuning
        all_dtypes: dict[torch.dtype, int] = {}
        quant, dq, compute = None, None, None
        targets, lora = set(), None
        total = trainable = 0
        for p in self.parameters():
            total += p.numel()
            all_dtypes[p.dtype] = all_dtypes.get(p.dtype, 0) + p.numel()
            if p.requires_grad:
                trainable += p.numel()
            elif p.dtype.is_floating_point:
                dtypes[p.dtype] = dtypes.get(p.dtype, 0) + p.numel()
        for name, mod in self.linears():
            if mod.qweight is not None:
                quant, dq, compute = "nf4", mod.qweight.double_quant, mod.qweight.dtype
                total += mod.qweight.packed.numel()  # packed bytes, as bitsandbytes' Params4bit counts
            if mod.lora_A is not None:
                targets.add(name.rsplit(".", 1)[-1])
                lora = mod
        if dtypes or all_dtypes:
            eff["dtype"] = str(max(dtypes or all_dtypes, key=(dtypes or all_dtypes).get)).removeprefix("torch.")
        eff["quantization"] = quant
        if quant is not None:
            eff["double_quant"] = dq
            eff["dtype"] = str(compute).removeprefix("torch.")
        eff["trainable_params"], eff["total_params"] = trainable, total
        if lora is not None:
            eff.update({"lora_r": lora.lora_r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                        "use_dora": lora.magnitude is not None, "target_modules": sorted(targets)})
        return eff


# ---------------------------------------------------------------------------------------------------------------
# loading


def configure_allocator(options: MethodOptions) -> str:
    """Switch this process's CUDA caching allocator to expandable segments (``options.expandable_segments``),
    before the first weight is allocated: the allocator then grows one mapped range instead of caching
    fixed-size segments, so NVML's per-process memory stays near torch's allocated peak (the session-3 sweep:
    0.8 GiB reserved above allocated in the tunebench rows). Left alone where the user set
    ``PYTORCH_CUDA_ALLOC_CONF``/``PYTORCH_ALLOC_CONF`` and with ``cuda_graph`` (the graph's private pool and
    expandable segments have been switched off and on again between torch releases). Returns what was done."""
    import os

    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if user:
        return f"user: {user}"
    if not options.expandable_segments or options.cuda_graph:
        return "default"
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # a torch without the setter, or a refused setting
        return f"default ({type(e).__name__}: {e})"[:200]
    return "expandable_segments:True"


def _safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / n for n in names]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no *.safetensors files")
    return files


def load_model(checkpoint: str | Path, options: MethodOptions, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cuda", seed: int | None = None) -> DecoderModel:
    """Build the model from a transformers checkpoint and apply the method.

    The model is built on the meta device and every tensor is read once, straight to where it will live
    (safetensors ``safe_open``): the compute device, or pinned host memory for what the offload knobs keep on
    the host; QLoRA projections are quantised as they arrive. So loading never needs more device memory than
    training: a 4-bit 8B model never holds its bf16 weights at once, and streamed layers never touch the GPU.

    A checkpoint saved by transformers with bitsandbytes 4-bit nf4 weights (``quantization_config`` in
    ``config.json``, e.g. the ``*-bnb-4bit`` uploads) is read as it is: its packed weights and quant states become
    :class:`NF4Tensor` s without re-quantising (QLoRA only; bitsandbytes itself is not needed).

    Args:
        checkpoint: directory with ``config.json`` and safetensors (what ``AutoModelForCausalLM`` loads).
        options: method and trainer knobs.
        dtype: base weight dtype (QLoRA: the compute dtype of the 4-bit weights).
        device: target device.
        seed: seeds the LoRA init (``torch.manual_seed``) when given.

    Returns:
        The model in train mode, with ``requires_grad`` set for the method.
    """
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    cfg = DecoderConfig.from_checkpoint(checkpoint)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        options.allocator = configure_allocator(options)
    quantize = options.kind == "qlora"
    prequantized = _bnb_4bit(cfg.raw, checkpoint)
    if prequantized and not quantize:
        raise ValueError(f"{checkpoint}: a bitsandbytes 4-bit checkpoint trains with method qlora only "
                         f"(got {options.kind!r})")
    model = DecoderModel(cfg, dtype, torch.device("meta"))
    targets = dict(model.named_parameters())
    linears = dict(model.linears())
    on_host = _host_tensors(cfg, options) if device.type == "cuda" else set()
    files = _safetensors_files(checkpoint)
    bnb_parts = _bnb_quant_states(files, device) if prequantized else {}
    seen = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st_host, \
                safe_open(str(f), framework="pt", device=str(device)) as st_dev:
            for key in st_dev.keys():
                if key == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: some files carry the duplicate
                if _bnb_part(key):
                    continue  # a 4-bit weight's quant state: read with its weight below
                if key not in targets:
                    raise KeyError(f"{f.name}: unexpected tensor {key!r} for {cfg.model_type}")
                mod_name, _, leaf = key.rpartition(".")
                if key in bnb_parts:
                    linears[mod_name].qweight = NF4Tensor.from_bnb_serialized(st_dev.get_tensor(key), bnb_parts[key],
                                                                              dtype)
                    linears[mod_name].weight = None
                elif quantize and leaf == "weight" and mod_name in linears:
                    w = st_dev.get_tensor(key).to(dtype)
                    linears[mod_name].qweight = quantize_nf4(w, double_quant=options.double_quant)
                    linears[mod_name].weight = None
                    del w
                elif key in on_host:
                    _assign(model, key, st_host.get_tensor(key).to(dtype).pin_memory())
                else:
                    _assign(model, key, st_dev.get_tensor(key).to(dtype))
                seen.add(key)
    missing = set(targets) - seen
    if missing:
        raise KeyError(f"{checkpoint}: tensors missing from the checkpoint: {sorted(missing)[:8]}")
    model.compute_device = device
    apply_method(model, options, seed)
    return model


def _bnb_4bit(config: dict[str, Any], checkpoint: Path) -> bool:
    """Whether a checkpoint's ``config.json`` (``config``) says it holds bitsandbytes 4-bit weights."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return False
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise NotImplementedError(f"{checkpoint}: bitsandbytes 8-bit checkpoints are not supported (4-bit nf4 only)")
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _bnb_part(key: str) -> str | None:
    """The suffix if ``key`` is one of the quant-state tensors saved beside a bitsandbytes 4-bit weight."""
    return next((sfx for sfx in NF4Tensor.BNB_SUFFIXES if key.endswith(".weight." + sfx)), None)


def _bnb_quant_states(files: list[Path], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """``{weight key: {suffix: tensor}}`` of every 4-bit weight's quant state, from any shard (they are small)."""
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            for key in st.keys():
                sfx = _bnb_part(key)
                if sfx:
                    out.setdefault(key[: -len(sfx) - 1], {})[sfx] = st.get_tensor(key)
    return out


def _host_tensors(cfg: DecoderConfig, o: MethodOptions) -> set[str]:
    """Names of the tensors the offload knobs keep in host memory."""
    out = set()
    if not o.is_peft:
        return out
    if o.offload_weights and o.kind != "qlora":
        for i in streamed_layer_ids(cfg.num_layers, o.offload_weights):
            for m in ATTN_MODULES:
                out.add(f"model.layers.{i}.self_attn.{m}.weight")
            for m in MLP_MODULES:
                out.add(f"model.layers.{i}.mlp.{m}.weight")
    if not cfg.tie_word_embeddings:
        if o.offload_embeddings:
            out.add("model.embed_tokens.weight")
        if o.offload_lm_head:
            out.add("lm_head.weight")
    return out


def _assign(model: DecoderModel, key: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, leaf, nn.Parameter(t, requires_grad=False))


def apply_method(model: DecoderModel, options: MethodOptions, seed: int | None = None) -> None:
    """Set trainable parameters for the method; add LoRA/DoRA adapters (PEFT init) to the target linears."""
    model.options = options
    ops = OpSet.with_references(options.reference_ops) if options.reference_ops else FUSED_OPS
    for m in model.modules():
        if isinstance(m, (DecoderModel, RMSNorm, Attention, MLP)):
            m.ops = ops
        if isinstance(m, (Attention, MLP)):
            m.group_projections = options.group_projections
    model.gradient_checkpointing = options.gradient_checkpointing
    model.offload_checkpoints = options.offload_checkpoints
    model.checkpointed_layers = None
    if options.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif options.is_peft:
        if seed is not None:
            torch.manual_seed(seed)
        for name, mod in model.linears():
            if name.rsplit(".", 1)[-1] in options.target_modules:
                mod.add_lora_(options.lora_r, options.lora_alpha, options.lora_dropout, options.kind == "dora",
                              options.lora_dtype, model.device_of_compute)
    else:
        raise ValueError(f"unknown method kind {options.kind!r}")
    _apply_offload(model, options)
    model.train()


def streamed_layer_ids(n_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over ``n_layers`` (-1 or >= n_layers: all).

    Spread, not the first ``count``: each streamed layer's copy then overlaps the compute of the resident
    layers before it, instead of a run of streamed layers waiting on the PCIe link back to back.
    """
    if count < 0 or count >= n_layers:
        return list(range(n_layers))
    return sorted({int(k * n_layers / count) for k in range(count)}) if count else []


def checkpointed_layer_ids(n_layers: int, o: MethodOptions) -> frozenset[int] | None:
    """Layers that recompute in backward under ``o`` (None: all of them, the plain case).

    ``recompute_layers`` layers spread evenly (so the kept activations do not pile up in one stretch of the
    forward), always including the layers whose weights stream from the host (they cannot keep a graph that
    holds their device weights).
    """
    k = o.recompute_layers
    if not o.gradient_checkpointing or k < 0 or k >= n_layers:
        return None
    if k == 0:
        raise ValueError("recompute_layers: 0 would switch gradient checkpointing off; set "
                         "train.gradient_checkpointing: false in the scenario for that")
    streamed = set(streamed_layer_ids(n_layers, o.offload_weights))
    if len(streamed) > k:
        raise ValueError(f"recompute_layers: {k} is fewer than the {len(streamed)} layers offload_weights "
                         "streams from the host (those always recompute)")
    ids = set(streamed)
    # then evenly spread layers, then (if those collided with streamed ones) the first free layers
    for c in [*streamed_layer_ids(n_layers, k), *range(n_layers)]:
        if len(ids) >= k:
            break
        ids.add(c)
    return frozenset(ids)


def _apply_offload(model: DecoderModel, o: MethodOptions) -> None:
    frozen_ok = o.is_peft
    if (o.offload_weights or o.offload_embeddings or o.offload_lm_head) and not frozen_ok:
        raise ValueError("offload_weights / offload_embeddings / offload_lm_head apply to frozen weights "
                         "(lora, dora, qlora), not to full fine-tuning")
    tied = model.lm_head is None
    cuda = model.device_of_compute.type == "cuda"
    for flag, holder in ((o.offload_embeddings, model.model.embed_tokens), (o.offload_lm_head, model.lm_head)):
        if flag and not tied and holder.weight.device.type != "cpu":  # load_model already put it there
            host = holder.weight.data.to("cpu")
            holder.weight = nn.Parameter(host.pin_memory() if cuda else host, requires_grad=False)
    if o.offload_weights:
        if not o.gradient_checkpointing:
            raise ValueError("offload_weights needs gradient checkpointing (layers are re-fetched for backward)")
        if o.kind == "qlora":
            raise ValueError("offload_weights streams bf16 weights; QLoRA's 4-bit layers are small enough to stay")
        ids = streamed_layer_ids(model.cfg.num_layers, o.offload_weights)
        model.streamer = WeightStreamer(model, ids, model.device_of_compute)
    model.checkpointed_layers = checkpointed_layer_ids(model.cfg.num_layers, o)
    if o.cuda_graph:
        why = [w for w, bad in (("a CUDA device", model.device_of_compute.type != "cuda"),
                                ("no host offload (offload_*)", o.offload_weights or o.offload_embeddings
                                 or o.offload_lm_head or o.offload_checkpoints),
                                ("lora_dropout 0", o.lora_dropout > 0)) if bad]
        if why:
            raise ValueError(f"cuda_graph needs {' and '.join(why)}")
