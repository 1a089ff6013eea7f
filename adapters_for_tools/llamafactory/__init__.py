"""llamafactory: LLaMA-Factory 0.9.5's ``run_exp`` (YAML-style args), in-process, in its own environment: its pt
stage for text rows, sft for instruction rows, and its own dpo (DPO, ORPO) and kto stages for the objectives.

What LLaMA-Factory 0.9.5 (with the TRL 0.24 it pins) cannot run is refused at validation (:func:`objective_refusal`):
GRPO (no such stage), DPO losses other than sigmoid (its ``CustomDPOTrainer`` calls TRL 0.24's ``dpo_loss``
without ``loss_type``, so ``pref_loss: hinge`` or ``ipo`` would train the sigmoid loss; it has no robust or APO
loss), KTO's ``apo_zero_unpaired`` (its ``CustomKTOTrainer`` sets ``loss_type = "kto"``), a precomputed reference
(its trainers fix ``precompute_ref_log_probs`` to False).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides
from adapters_for_tools.distributed import TRAINER_STRATEGIES

DPO_LOSSES = ("sigmoid",)  # the DPO losses that run as named (module docstring)


class LlamaFactoryOverrides(Overrides):
    # Liger-Kernel (enable_liger_kernel: its RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, patched in before
    # the model loads); needs liger-kernel (the `base` overlay every environment sees carries it)
    liger: bool = False
    # LLaMA-Factory's offloading checkpoints (use_unsloth_gc: each checkpointed layer's input kept in host memory;
    # Unsloth itself not needed): leaner, slower
    unsloth_gc: bool = False
    # entries of llamafactory.yaml, over the scenario's; LLaMA-Factory's argument parser checks them
    llamafactory: dict[str, Any] = Field(default_factory=dict)


def objective_refusal(sc) -> str | None:  # noqa: ANN001
    """Why LLaMA-Factory cannot run the scenario's objective settings (the module docstring), or None."""
    ob = sc.objective
    if ob.kind == "dpo" and ob.loss_type not in DPO_LOSSES:
        return (f"DPO loss_type {ob.loss_type!r}: LLaMA-Factory 0.9.5 computes the sigmoid loss whatever its pref_loss "
                "says (its DPO trainer calls TRL 0.24's dpo_loss without the loss type); it runs sigmoid only")
    if ob.kind == "kto" and ob.loss_type != "kto":
        return f"KTO loss_type {ob.loss_type!r}: LLaMA-Factory's KTO trainer sets loss_type 'kto'"
    if ob.kind in ("dpo", "kto") and ob.reference_for(sc.method.is_peft) == "precomputed":
        return ("reference 'precomputed': LLaMA-Factory's DPO and KTO trainers run the reference at every step "
                "(precompute_ref_log_probs fixed to False)")
    return None


INFO = AdapterInfo(
    name="llamafactory",
    description="LLaMA-Factory (run_exp: pt stage for text, sft for instruction rows; dpo, orpo and kto through its "
                "own stages), LoRA/DoRA/QLoRA or full fine-tuning",
    env="llamafactory",
    devices=frozenset({"cuda"}),
    requires=("llamafactory",),
    version_of="llamafactory",
    notes="Native config: llamafactory.yaml (`python -m llamafactory.cli train llamafactory.yaml`) with its "
          "dataset_info.json and data file in lf_data/; the `empty` template, so the token ids are the harness's. "
          "DPO sigmoid only. CUDA only.",
    objectives=frozenset({"sft", "dpo", "orpo", "kto"}),
    objectives_note="LLaMA-Factory has no GRPO stage (its stages: pt, sft, rm, ppo, dpo, kto)",
    refuse=objective_refusal,
    overrides=LlamaFactoryOverrides,
    strategies=TRAINER_STRATEGIES,  # DDP by the launch (its FORCE_TORCHRUN); FSDP and DeepSpeed as its arguments
)
