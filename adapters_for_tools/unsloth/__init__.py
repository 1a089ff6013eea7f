"""unsloth: Unsloth's FastLanguageModel + TRL's SFTTrainer (patched by Unsloth), in its own environment."""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="unsloth",
    description="Unsloth FastLanguageModel (LoRA, QLoRA, full fine-tuning) trained by TRL SFTTrainer",
    env="unsloth",
    methods=frozenset({"full", "lora", "qlora"}),  # no DoRA in Unsloth's fast path
    devices=frozenset({"cuda"}),
    requires=("unsloth",),
    version_of="unsloth",
    notes="Imported before transformers/TRL/PEFT (it patches them). Gradient checkpointing: Unsloth's own "
          "('unsloth', offloads activations). Compiles decoder blocks during the first steps: warm up longer.",
)
