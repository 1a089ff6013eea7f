"""Fused Triton ops for the tunebench trainer, each with a pure-PyTorch reference.

Every public function runs its Triton kernels on CUDA tensors (bf16/fp16/fp32) and on CPU tensors under
``TRITON_INTERPRET=1`` (fp32, tests); on CPU otherwise it falls back to the PyTorch reference.
"""

from kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, shift_labels
from kernels.ops.lora_linear import lora_linear, lora_linear_group
from kernels.ops.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from kernels.ops.rms_norm import rms_norm
from kernels.ops.rope import apply_rope, rope_cos_sin
from kernels.ops.swiglu import swiglu

__all__ = [
    "NF4Tensor",
    "apply_rope",
    "dequantize_nf4",
    "fused_linear_cross_entropy",
    "lora_linear",
    "lora_linear_group",
    "quantize_nf4",
    "rms_norm",
    "rope_cos_sin",
    "shift_labels",
    "swiglu",
]
