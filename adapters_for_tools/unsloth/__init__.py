"""unsloth: Unsloth's FastLanguageModel + TRL's SFTTrainer (patched by Unsloth), and the DPOTrainer, ORPOTrainer,
KTOTrainer and GRPOTrainer Unsloth patches for the other objectives, in its own environment."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides


class UnslothOverrides(Overrides):
    # Unsloth's checkpoint mode, for from_pretrained and get_peft_model: "unsloth" (its own, offloading the
    # checkpointed activations to the host), true (Transformers' implementation, on the GPU: faster), false (none).
    # Unset: "unsloth" when the scenario checkpoints, else false (config.py). Read back from the live model.
    use_gradient_checkpointing: bool | Literal["unsloth"] | None = None
    # Unsloth's compile of each decoder layer as one region (its UNSLOTH_BLOCK_COMPILE variable, set before the model
    # loads): unset, Unsloth decides (on where its torch supports it); false turns it off, where Inductor cannot
    # compile a family's block. Read back from the live model's decoder-layer classes.
    block_compile: bool | None = None
    # TRL SFTConfig entries, over the scenario's
    sft: dict[str, Any] = Field(default_factory=dict)
    # entries of a dpo/orpo/kto/grpo run's config (Unsloth's patched DPOConfig / ORPOConfig / KTOConfig /
    # GRPOConfig; the `<kind>` keys of unsloth_<kind>.json, adapters_for_tools/unsloth/rl_config.py) over the
    # scenario's; the config refuses unknown ones
    objective_config: dict[str, Any] = Field(default_factory=dict)


INFO = AdapterInfo(
    name="unsloth",
    description="Unsloth FastLanguageModel (LoRA, QLoRA, full fine-tuning) trained by TRL SFTTrainer; DPO, ORPO, KTO "
                "and GRPO through the TRL trainers Unsloth patches",
    env="unsloth",
    methods=frozenset({"full", "lora", "qlora"}),  # no DoRA in Unsloth's fast path
    devices=frozenset({"cuda"}),
    requires=("unsloth",),
    version_of="unsloth",
    objectives=frozenset({"sft", "dpo", "orpo", "kto", "grpo"}),
    notes="Imported before transformers/TRL/PEFT (it patches them). Gradient checkpointing: Unsloth's own "
          "('unsloth', offloads activations; plain below 512-token rows, by Unsloth's own rule). Compiles decoder "
          "blocks during the first steps: warm up longer.",
    overrides=UnslothOverrides,
    strategies_note="Unsloth's open-source version trains on one GPU only",
)
