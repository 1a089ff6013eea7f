"""llamafactory: LLaMA-Factory 0.9.5's ``run_exp`` (YAML-style args), in-process, in its own environment."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides
from adapters_for_tools.distributed import TRAINER_STRATEGIES


class LlamaFactoryOverrides(Overrides):
    # Liger-Kernel (enable_liger_kernel: its RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, patched in before
    # the model loads); needs liger-kernel (the `base` overlay every environment sees carries it)
    liger: bool = False
    # LLaMA-Factory's offloading checkpoints (use_unsloth_gc: each checkpointed layer's input kept in host memory;
    # Unsloth itself not needed): leaner, slower
    unsloth_gc: bool = False
    # entries of llamafactory.yaml, over the scenario's; LLaMA-Factory's argument parser checks them
    llamafactory: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="llamafactory",
    description="LLaMA-Factory (run_exp: pt stage for text), LoRA/DoRA/QLoRA or full fine-tuning",
    env="llamafactory",
    devices=frozenset({"cuda"}),
    requires=("llamafactory",),
    version_of="llamafactory",
    notes="Native config: llamafactory.yaml (`python -m llamafactory.cli train llamafactory.yaml`). Text data "
          "only (alpaca/messages render through LLaMA-Factory templates: reported as not honoured). CUDA only.",
    overrides=LlamaFactoryOverrides,
    strategies=TRAINER_STRATEGIES,  # DDP by the launch (its FORCE_TORCHRUN); FSDP and DeepSpeed as its arguments
)
