"""axolotl: Axolotl 0.19's own training entry point (YAML config), in-process, in its own environment: sft, and
dpo, orpo and kto through its ``rl:`` configs."""

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


def rl_refusal(sc) -> str | None:
    """Why Axolotl's ``rl:`` configuration (``rl_config.py``) cannot run the scenario's objective as asked, or None."""
    ob = sc.objective
    reference = ob.reference_for(sc.method.is_peft)
    if ob.kind in ("dpo", "kto") and sc.method.is_peft and reference == "copy":
        return (f"{ob.kind} reference 'copy' beside adapters: Axolotl 0.19's config schema drops "
                "rl_adapter_ref_model (the key its docs name for it), so it never loads the copy and its trainer "
                "disables the adapters instead (reference adapter_disabled)")
    if ob.kind != "kto":
        return None
    if ob.loss_type != "kto":
        return (f"kto loss_type {ob.loss_type!r}: Axolotl's rl: kto has no loss-type key (its KTO trainer runs "
                "TRL's default loss, kto)")
    if reference == "precomputed":
        return ("kto reference 'precomputed': Axolotl passes precompute_ref_log_probs to its DPO trainer only, not "
                "to its KTO trainer")
    if reference == "copy":
        return ("kto reference 'copy' (full fine-tuning): Axolotl builds its KTO trainer without the reference copy "
                "it loads, and TRL then loads a float32 copy of its own")
    return None


INFO = AdapterInfo(
    name="axolotl",
    description="Axolotl (YAML config -> axolotl.train.train), LoRA/DoRA/QLoRA or full fine-tuning; DPO, ORPO and "
                "KTO through its rl: configs",
    env="axolotl",
    devices=frozenset({"cuda"}),
    requires=("axolotl",),
    version_of="axolotl",
    notes="Native config: axolotl.yml (`python -m axolotl.cli.train axolotl.yml`; dpo/orpo/kto: its rl: keys, "
          "the rows in axolotl_<kind>_dataset.jsonl beside it). Its Triton LoRA kernels stay at Axolotl's defaults "
          "(on for LoRA/QLoRA sft), read back from the live model. CUDA only.",
    refuse=rl_refusal,
    overrides=AxolotlOverrides,
    objectives=frozenset({"sft", "dpo", "orpo", "kto"}),
    objectives_note="grpo is not wired in this adapter: Axolotl documents its rl: grpo with vLLM generation (a vLLM "
                    "server beside training), which the axolotl environment does not carry",
    strategies=TRAINER_STRATEGIES,  # DDP by the launch; FSDP and DeepSpeed from its YAML
    launcher="accelerate",  # `axolotl train` starts its ranks with accelerate launch
)
