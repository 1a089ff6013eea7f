"""llamafactory: LLaMA-Factory 0.9.5's ``run_exp`` (YAML-style args), in-process, in its own environment."""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="llamafactory",
    description="LLaMA-Factory (run_exp: pt stage for text), LoRA/DoRA/QLoRA or full fine-tuning",
    env="llamafactory",
    devices=frozenset({"cuda"}),
    requires=("llamafactory",),
    version_of="llamafactory",
    notes="Native config: llamafactory.yaml (`python -m llamafactory.cli train llamafactory.yaml`). Text data "
          "only (alpaca/messages render through LLaMA-Factory templates: reported as not honoured). CUDA only.",
)
