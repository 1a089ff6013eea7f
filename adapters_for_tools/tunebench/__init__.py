"""tunebench: our own trainer (``kernels/trainer``) on the Triton ops of ``kernels/ops``.

``overrides`` understood (trainer knobs, recorded in the run's ``extra``):
``offload_checkpoints: true`` (checkpointed layer inputs in pinned host memory), ``fused_ce_chunk: N`` (tokens
per chunk of the fused LM-head + loss), ``lora_dtype: float32|bfloat16`` (LoRA A/B storage).
"""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="tunebench",
    description="tunebench's Triton-fused trainer (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy, LoRA, NF4)",
    env="base",
    requires=("torch", "triton", "safetensors", "transformers"),
    version_of="tunebench",
    notes="On CPU the ops run their PyTorch references (TRITON_INTERPRET=1 runs the Triton interpreter instead).",
)
