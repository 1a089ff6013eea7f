"""Which implementation of each fused op the decoder blocks call: the Triton op, or its PyTorch reference."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels.ops.fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_reference
from kernels.ops.rms_norm import rms_norm, rms_norm_reference
from kernels.ops.rope import apply_rope, apply_rope_reference
from kernels.ops.swiglu import geglu, geglu_reference, swiglu, swiglu_reference


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
    geglu: Any = geglu  # Gemma's gated MLP (tanh-GELU): the SwiGLU kernels with the other activation
    fused_linear_cross_entropy: Any = fused_linear_cross_entropy
    fused_linear_logprobs: Any = fused_linear_logprobs  # the LM head of the preference objectives

    @classmethod
    def with_references(cls, names: tuple[str, ...] | list[str]) -> OpSet:
        refs = {"rms_norm": rms_norm_reference, "rope": apply_rope_reference, "swiglu": swiglu_reference,
                "geglu": geglu_reference,
                "fused_linear_cross_entropy": _ce_reference, "fused_linear_logprobs": fused_linear_logprobs_reference}
        unknown = sorted(set(names) - set(refs))
        if unknown:
            raise ValueError(f"reference_ops {unknown}: not among {sorted(refs)}")
        return cls(**{n: refs[n] for n in names})

    def with_softcap(self, cap: float) -> OpSet:
        """These ops with an LM head whose logits are soft-capped (Gemma-2's ``final_logit_softcapping``): the loss
        and log-prob ops (fused or reference) called with ``softcap=cap``."""
        return replace(self, fused_linear_cross_entropy=partial(self.fused_linear_cross_entropy, softcap=cap),
                       fused_linear_logprobs=partial(self.fused_linear_logprobs, softcap=cap))


FUSED_OPS = OpSet()
