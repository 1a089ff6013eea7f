"""tunebench: our own trainer (``kernels/trainer``) on the Triton ops of ``kernels/ops``.

``overrides`` understood (trainer knobs, recorded in the run's ``extra``; see kernels/trainer/README.md):
``recompute_layers: N`` (selective recomputation: N evenly spread layers recompute, the others keep activations),
``offload_checkpoints: true`` (checkpointed layer inputs in pinned host memory), ``offload_weights: N``
(frozen bf16 base weights of N decoder layers streamed from pinned host memory; -1 = all),
``offload_embeddings: true`` / ``offload_lm_head: true`` (frozen, untied tables on the host),
``fused_ce_chunk: N`` (tokens per chunk of the fused LM-head + loss), ``lora_dtype: float32|bfloat16``,
``reference_ops: [rms_norm, rope, swiglu, fused_linear_cross_entropy]`` (run those ops as their PyTorch
references: for bisecting a loss-parity departure op by op), ``group_projections: false`` (one LoRA call per
projection instead of one per q/k/v and gate/up group), ``cuda_graph: true`` (the whole optimizer step captured
as one CUDA graph and replayed), ``varlen_attention: false`` (packed rows through a block mask instead of flash
varlen), ``expandable_segments: false`` (leave the CUDA allocator in its default mode).
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
