"""hf: Hugging Face transformers + PEFT with the HF Trainer — the baseline every speed-up is measured against."""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="hf",
    description="transformers Trainer + PEFT (LoRA, DoRA, QLoRA via bitsandbytes) or full fine-tuning",
    env="base",
    requires=("torch", "transformers", "peft", "accelerate"),
    version_of="transformers",
    notes="QLoRA needs bitsandbytes and a CUDA GPU.",
)
