"""The projection layer of the decoder: a linear whose base is trainable (full), frozen (LoRA / DoRA) or frozen NF4
(QLoRA), with PEFT's LoRA init and maths, and :func:`project` for grouped q/k/v and gate/up calls."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ops.lora_linear import lora_linear, lora_linear_group, reusing_dequantised
from kernels.ops.nf4 import NF4Tensor, dequantize_nf4


class _NF4Linear(torch.autograd.Function):
    """Frozen NF4 linear without an adapter (QLoRA with a subset of targets): dequantises again in backward, or,
    inside :func:`~kernels.ops.lora_linear.reuse_dequantised` (a checkpointed layer's recompute), keeps the
    forward's dequantised weight on ctx for backward's ``gy W`` and drops it there."""

    @staticmethod
    def forward(ctx, x, bias, q):  # noqa: ANN001, ANN205
        w = dequantize_nf4(q, x.dtype)
        ctx.q, ctx.kept = q, (w if reusing_dequantised() else None)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        w, ctx.kept = ctx.kept, None
        if w is None or w.dtype != gy.dtype:
            w = dequantize_nf4(ctx.q, gy.dtype)
        return gy @ w, None, None


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
    is dequantised per GEMM, also in backward, except in a checkpointed layer's recompute:
    :func:`~kernels.ops.lora_linear.reuse_dequantised`); DoRA, which that op does not cover, is plain torch.
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
        self.adapter_disabled = False  # set by adapters_disabled(): the frozen base alone (a reference pass)

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
        if self.lora_A is None or self.adapter_disabled:
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
    return (m.lora_A is not None and not m.adapter_disabled and m.magnitude is None
            and (m.lora_dropout == 0 or not m.training))


def project(x: torch.Tensor, linears: tuple[Linear, ...], group: bool) -> list[torch.Tensor]:
    """``[m(x) for m in linears]``; with ``group`` and every projection a plain LoRA/QLoRA one of the same rank
    and scale without active dropout, as one :func:`lora_linear_group` call (same maths, fewer launches)."""
    if group and all(_groupable(m) for m in linears) and len({(m.lora_r, m.scaling) for m in linears}) == 1:
        return lora_linear_group(x, [m.qweight if m.qweight is not None else m.base_weight() for m in linears],
                                 [m.lora_A for m in linears], [m.lora_B for m in linears], linears[0].scaling,
                                 [m.bias for m in linears])
    return [m(x) for m in linears]


@contextlib.contextmanager
def adapters_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the :class:`Linear` layers among ``modules`` (e.g. ``model.modules()``) as their frozen base alone.

    LoRA / DoRA / QLoRA projections skip A/B (and DoRA's magnitude) while inside, so the same model computes the
    base model's function: the reference of DPO from the same weights, with no second copy of the model (what
    PEFT's ``disable_adapter()`` does for TRL). Full fine-tuning has no adapter to switch off: nothing changes.
    """
    linears = [m for m in modules if isinstance(m, Linear) and m.lora_A is not None]
    for m in linears:
        m.adapter_disabled = True
    try:
        yield
    finally:
        for m in linears:
            m.adapter_disabled = False
