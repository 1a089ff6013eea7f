"""trl: TRL's ``SFTTrainer`` (HF Trainer underneath) with PEFT, in its own environment (``env create trl``)."""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="trl",
    description="TRL SFTTrainer + PEFT (LoRA, DoRA, QLoRA via bitsandbytes) or full fine-tuning",
    env="trl",
    requires=("trl", "datasets"),
    version_of="trl",
    notes="Native config: a TRL CLI YAML (`python -m trl.scripts.sft --config trl_sft.yaml`). QLoRA needs CUDA.",
)
