"""The scenario as LLaMA-Factory arguments (pure; no toolkit import).

The stage follows the rows (:mod:`adapters_for_tools.llamafactory.dataset`): text rows train in ``pt``, Alpaca /
messages rows in ``sft``, a preference objective in LLaMA-Factory's own stage for it: ``dpo`` (``pref_loss:
sigmoid``; ORPO is ``pref_loss: orpo``, which needs no reference), ``kto``. Every stage reads the run's JSONL
through a ``dataset_info.json`` in a ``dataset_dir`` under the work dir, renders it with the ``empty`` template
(no chat template: the ids are the harness's, see the dataset module) and keeps the file order
(``disable_shuffling``).

The objective's settings map one to one: ``beta`` is ``pref_beta`` (ORPO's lambda too), KTO's weights
``kto_chosen_weight`` / ``kto_rejected_weight``. KTO's KL estimate pairs each prompt with the previous row's
completion within one preprocessing batch (the first row with the last); ``preprocessing_batch_size =
micro_batch`` makes those batches the micro-batches, so the pairs are TRL's (mismatched completions of the same
micro-batch). Reference: with LoRA / QLoRA / DoRA LLaMA-Factory disables the adapters (``adapter_disabled``);
``copy`` beside a PEFT policy is ``ref_model: <checkpoint>`` (4-bit for QLoRA, as the policy's base); full
fine-tuning loads the copy itself.

What LLaMA-Factory cannot run is refused at validation (``adapters_for_tools.llamafactory.objective_refusal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import distributed
from adapters_for_tools.contract import trainer_args
from adapters_for_tools.llamafactory.dataset import DATASET_NAME, STAGES, form_of


def native_config(sc, work_dir: Path, checkpoint: str, dataset_dir: Path, liger: bool = False,
                  unsloth_gc: bool = False, fmt: str = "text") -> dict[str, Any]:
    """LLaMA-Factory training arguments (the YAML ``llamafactory-cli train`` reads) for scenario ``sc``.

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory.
        checkpoint: model directory every framework loads.
        dataset_dir: directory holding ``dataset_info.json`` and the data file.
        liger: the row's ``liger`` override: ``enable_liger_kernel``.
        unsloth_gc: the row's ``unsloth_gc`` override: ``use_unsloth_gc`` (offloading checkpoints).
        fmt: the sweep's row format (``text``, ``alpaca``, ``messages``, ``sharegpt``); with the objective it
            decides the stage.

    Returns:
        The arguments as a plain dict.
    """
    work_dir = Path(work_dir)
    m, t = sc.method, sc.train
    stage = STAGES[form_of(sc.objective.kind, fmt)]
    cfg: dict[str, Any] = {
        "model_name_or_path": str(checkpoint),
        "trust_remote_code": False,
        "stage": stage,
        "do_train": True,
        "finetuning_type": "lora" if m.is_peft else "full",
        "dataset": DATASET_NAME,
        "dataset_dir": str(dataset_dir),
        "template": "empty",
        "cutoff_len": sc.data.seq_len,
        "packing": sc.data.packing,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(work_dir / "output"),  # = ctx.output_dir: LLaMA-Factory saves the trained output there
        "overwrite_output_dir": True,
        **trainer_args(sc),
        "bf16": sc.model.dtype == "bfloat16",
        "fp16": sc.model.dtype == "float16",
        "disable_gradient_checkpointing": not t.gradient_checkpointing,
        "use_reentrant_gc": False,
        "flash_attn": {"sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}[sc.model.attn_implementation],
        "use_unsloth": False,
        "use_unsloth_gc": unsloth_gc,
        "enable_liger_kernel": liger,
        "upcast_layernorm": False,
        "disable_shuffling": True,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        # DDP / FSDP / ZeRO-3 as TrainingArguments, which LLaMA-Factory passes on (adapters_for_tools/distributed.py);
        # with a sharded 4-bit base it stores the 4-bit weights in the compute dtype and sets no device map itself
        **distributed.trainer_args(sc, work_dir),
    }
    if m.is_peft:
        cfg.update({"lora_rank": m.lora_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                    "lora_target": ",".join(m.resolved_targets()), "use_dora": m.kind == "dora"})
    if m.kind == "qlora":
        cfg.update({"quantization_bit": 4, "quantization_method": "bnb", "quantization_type": m.quant.quant_type,
                    "double_quantization": m.quant.double_quant})
    if stage == "sft":
        # prompt_loss moves the prompt into the response instead (adapters_for_tools/llamafactory/dataset.py says why)
        cfg["train_on_prompt"] = False
    return cfg | objective_args(sc, checkpoint)


def objective_args(sc, checkpoint: str) -> dict[str, Any]:  # noqa: ANN001
    """LLaMA-Factory's arguments for the scenario's preference objective (empty for sft): the module docstring."""
    ob = sc.objective
    if ob.is_sft:
        return {}
    out: dict[str, Any] = {"pref_beta": ob.beta, "pref_ftx": 0.0}
    if ob.kind in ("dpo", "orpo"):
        out["pref_loss"] = "orpo" if ob.kind == "orpo" else ob.loss_type
    if ob.kind == "kto":
        out.update({"kto_chosen_weight": ob.desirable_weight, "kto_rejected_weight": ob.undesirable_weight,
                    "preprocessing_batch_size": sc.train.micro_batch})
    if ob.kind in ("dpo", "kto") and sc.method.is_peft and ob.reference == "copy":
        out["ref_model"] = str(checkpoint)
        if sc.method.kind == "qlora":
            out["ref_model_quantization_bit"] = 4
    return out


def differences(sc, fmt: str) -> list[str]:  # noqa: ANN001
    """Where LLaMA-Factory's own definitions make its loss values differ from the baseline tool's with the same
    settings and tokens: stored with the run, not a reason to mark it invalid."""
    if sc.objective.kind == "orpo":
        return ["orpo: LLaMA-Factory's NLL term averages over each chosen completion's tokens (the ORPO paper's), "
                "TRL's over the prompt and completion tokens of the micro-batch's chosen rows: the loss curves "
                "differ by the prompt's NLL"]
    if sc.objective.is_sft and fmt == "text":
        return ["text: LLaMA-Factory's pt stage labels the <bos>, and the Trainer (transformers 5.6) counts it among "
                "the loss tokens it divides by, though no position predicts it: loss and gradients are the "
                "harness's times n / (n + rows), n the step's loss tokens"]
    return []


def switches(args: dict[str, Any]) -> dict[str, bool]:
    """The speed switches final arguments ask for, under the read-back keys of :mod:`adapters_for_tools.switches`:
    Liger-Kernel, and whether the checkpointed layers offload (``use_unsloth_gc`` with checkpointing on)."""
    gc = not args.get("disable_gradient_checkpointing", False)
    return {"liger_kernel": bool(args.get("enable_liger_kernel")),
            "gradient_checkpointing_offload": gc and bool(args.get("use_unsloth_gc"))}


def cannot_honour(sc, fmt: str) -> list[tuple[str, str]]:
    """Scenario settings LLaMA-Factory cannot reproduce exactly: (setting, why)."""
    out = []
    if sc.data.packing and fmt == "text":
        out.append(("data.packing", "LLaMA-Factory's pt packing concatenates all samples and cuts cutoff_len blocks "
                    "(samples straddle rows, no per-sample position_ids); the harness keeps samples whole"))
    elif sc.data.packing:
        out.append(("data.packing", "LLaMA-Factory's sft packing groups samples by a knapsack over their lengths "
                    "(not in file order) and lets them attend across samples; the harness keeps the order and "
                    "restarts position_ids per sample"))
    if sc.method.kind == "qlora" and sc.method.quant.compute_dtype != sc.model.dtype:
        out.append(("method.quant.compute_dtype", "LLaMA-Factory computes 4-bit layers in the model's dtype"))
    return out
