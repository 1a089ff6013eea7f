"""axolotl: Axolotl 0.19's own training entry point (YAML config), in-process, in its own environment."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides
from adapters_for_tools.distributed import TRAINER_STRATEGIES


class AxolotlOverrides(Overrides):
    # Liger-Kernel through Axolotl's plugin (axolotl.integrations.liger.LigerPlugin with liger_rope, liger_rms_norm,
    # liger_glu_activation, liger_fused_linear_cross_entropy); its fused LoRA kernels are on either way (its default)
    liger: bool = False
    # entries of axolotl.yml, over the scenario's; Axolotl's own config validation checks them
    axolotl: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="axolotl",
    description="Axolotl (YAML config -> axolotl.train.train), LoRA/DoRA/QLoRA or full fine-tuning",
    env="axolotl",
    devices=frozenset({"cuda"}),
    requires=("axolotl",),
    version_of="axolotl",
    notes="Native config: axolotl.yml (`python -m axolotl.cli.train axolotl.yml`). Its Triton LoRA kernels stay "
          "at Axolotl's defaults (on for LoRA/QLoRA), read back from the live model. CUDA only.",
    overrides=AxolotlOverrides,
    strategies=TRAINER_STRATEGIES,  # DDP by the launch; FSDP and DeepSpeed from its YAML
    launcher="accelerate",  # `axolotl train` starts its ranks with accelerate launch
)
