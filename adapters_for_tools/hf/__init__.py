"""hf: Hugging Face transformers + PEFT with the HF Trainer — the baseline every speed-up is measured against."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides
from adapters_for_tools.distributed import TRAINER_STRATEGIES


class HfOverrides(Overrides):
    # Liger-Kernel (TrainingArguments.use_liger_kernel: its RMSNorm, SwiGLU, RoPE and fused linear cross-entropy),
    # read back from the live model; needs liger-kernel in the environment (the `base` overlay carries it)
    liger: bool = False
    # extra transformers TrainingArguments, over the scenario's (e.g. {torch_compile: true}); TrainingArguments
    # itself refuses a name it does not know
    training_args: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="hf",
    description="transformers Trainer + PEFT (LoRA, DoRA, QLoRA via bitsandbytes) or full fine-tuning",
    env="base",
    requires=("torch", "transformers", "peft", "accelerate"),
    version_of="transformers",
    notes="QLoRA needs bitsandbytes and a CUDA GPU. `liger: true` needs liger-kernel (the `base` overlay).",
    overrides=HfOverrides,
    objectives_note="the plain Trainer trains sft only; dpo, orpo, kto and grpo run through TRL (framework trl)",
    strategies=TRAINER_STRATEGIES,  # the Trainer runs DDP, FSDP and DeepSpeed under torchrun
)
