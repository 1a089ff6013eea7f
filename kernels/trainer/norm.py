"""RMSNorm of the decoder: the fused op (:func:`kernels.ops.rms_norm.rms_norm`) over the last dimension, scaled by
``weight`` (Llama) or ``1 + weight`` (Gemma-2). Used by the layers, the final norm and Qwen3's per-head query and
key norms."""

from __future__ import annotations

import torch
from torch import nn

from kernels.trainer.opset import FUSED_OPS


class RMSNorm(nn.Module):
    """RMSNorm scaling by ``weight`` (Llama) or by ``1 + weight`` (Gemma-2: ``plus_one``, the sum taken in fp32 as
    transformers takes it, so the op multiplies by an fp32 scale)."""

    ops = FUSED_OPS  # apply_method sets the model's OpSet on every block

    def __init__(self, n: int, eps: float, dtype: torch.dtype, device: torch.device, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype, device=device), requires_grad=False)
        self.eps, self.plus_one = eps, plus_one

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # noqa: ANN201
        w = 1.0 + self.weight.float() if self.plus_one else self.weight
        return self.ops.rms_norm(x, w, self.eps, residual)
