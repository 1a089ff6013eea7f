"""litgpt: LitGPT's own LoRA/QLoRA and full fine-tuning (Lightning Fabric), in its own environment.

``python -m harness env create litgpt``. The HF checkpoint is converted with LitGPT's own converter and trained
by ``litgpt.finetune.lora`` / ``litgpt.finetune.full`` in-process; see ``adapter.py`` for where the common hook
sits and ``config.py`` for what differs from the scenario.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides


class LitgptOverrides(Overrides):
    # keyword arguments of LitGPT's finetune setup(...) in its CLI YAML form (litgpt_finetune.yaml), over the
    # scenario's; setup() refuses names it does not take
    setup: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="litgpt",
    description="LitGPT finetune_lora / finetune_full (Lightning Fabric; QLoRA via bitsandbytes precision plugin)",
    env="litgpt",
    methods=frozenset({"lora", "qlora", "full"}),
    families=frozenset({"llama"}),  # Llama-shaped config.json -> LitGPT Config (LLaMAMLP, RMSNorm, llama3 RoPE)
    requires=("litgpt", "lightning"),
    version_of="litgpt",
    notes="Native config: a LitGPT CLI YAML (`litgpt finetune_lora CKPT --config litgpt_finetune.yaml`). "
          "LoRA and full verified on CPU (float32); QLoRA needs CUDA (bitsandbytes). No gradient checkpointing and no "
          "gradient clipping in LitGPT's single-device finetune scripts (runs asking for them are marked invalid).",
    overrides=LitgptOverrides,
)
