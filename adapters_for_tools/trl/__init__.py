"""trl: TRL's ``SFTTrainer`` (HF Trainer underneath) with PEFT, and its ``DPOTrainer``, ``ORPOTrainer``,
``KTOTrainer`` and ``GRPOTrainer`` for the other objectives, in its own environment (``env create trl``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides
from adapters_for_tools.distributed import TRAINER_STRATEGIES


class TrlOverrides(Overrides):
    # Liger-Kernel (SFTConfig.use_liger_kernel: its RMSNorm, SwiGLU and RoPE; TRL keeps its own fused LM head),
    # read back from the live model; needs liger-kernel (the `base` overlay every environment sees carries it)
    liger: bool = False
    # entries of the TRL SFT script's YAML (trl_sft.yaml), over the scenario's; TRL's parser refuses unknown ones
    sft: dict[str, Any] = Field(default_factory=dict)
    # entries of a dpo/orpo/kto/grpo run's YAML (trl_<kind>.yaml, adapters_for_tools/trl/rl_config.py) over the
    # scenario's; TRL's parser refuses unknown ones
    objective_config: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="trl",
    description="TRL SFTTrainer + PEFT (LoRA, DoRA, QLoRA via bitsandbytes) or full fine-tuning; DPO, ORPO, KTO "
                "and GRPO through TRL's own trainers",
    env="trl",
    requires=("trl", "datasets"),
    version_of="trl",
    notes="Native config: a TRL CLI YAML (`python -m trl.scripts.sft --config trl_sft.yaml`; dpo, kto, grpo: "
          "trl.scripts.<kind>; orpo: adapters_for_tools.trl.rerun_orpo). QLoRA needs CUDA.",
    objectives=frozenset({"sft", "dpo", "orpo", "kto", "grpo"}),
    overrides=TrlOverrides,
    strategies=TRAINER_STRATEGIES,  # the Trainer runs DDP, FSDP and DeepSpeed under torchrun
)
