"""The scenario as LLaMA-Factory arguments (pure; no toolkit import).

Text rows train in the ``pt`` stage: LLaMA-Factory appends the EOS text and tokenises without special tokens,
adding ``<bos>`` only when the tokenizer has ``add_bos_token``; the adapter prepends the BOS text to each row
when it does not, so ids are ``<bos> + text + <eos>`` like the harness's. The dataset is registered through a
``dataset_info.json`` in a ``dataset_dir`` under the work dir. ``disable_shuffling`` keeps the file order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import distributed
from adapters_for_tools.contract import trainer_args

DATASET_NAME = "tunebench"


def dataset_info(file_name: str) -> dict[str, Any]:
    """``dataset_info.json`` registering the run's text JSONL for the pt stage."""
    return {DATASET_NAME: {"file_name": file_name, "formatting": "alpaca", "columns": {"prompt": "text"}}}


def native_config(sc, work_dir: Path, checkpoint: str, dataset_dir: Path, liger: bool = False,
                  unsloth_gc: bool = False) -> dict[str, Any]:
    """LLaMA-Factory training arguments (the YAML ``llamafactory-cli train`` reads) for scenario ``sc``.

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory.
        checkpoint: model directory every framework loads.
        dataset_dir: directory holding ``dataset_info.json`` and the data file.
        liger: the row's ``liger`` override: ``enable_liger_kernel``.
        unsloth_gc: the row's ``unsloth_gc`` override: ``use_unsloth_gc`` (offloading checkpoints).

    Returns:
        The arguments as a plain dict.
    """
    work_dir = Path(work_dir)
    m, t = sc.method, sc.train
    cfg: dict[str, Any] = {
        "model_name_or_path": str(checkpoint),
        "trust_remote_code": False,
        "stage": "pt",
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
    return cfg


def switches(args: dict[str, Any]) -> dict[str, bool]:
    """The speed switches final arguments ask for, under the read-back keys of :mod:`adapters_for_tools.switches`:
    Liger-Kernel, and whether the checkpointed layers offload (``use_unsloth_gc`` with checkpointing on)."""
    gc = not args.get("disable_gradient_checkpointing", False)
    return {"liger_kernel": bool(args.get("enable_liger_kernel")),
            "gradient_checkpointing_offload": gc and bool(args.get("use_unsloth_gc"))}


def cannot_honour(sc, fmt: str) -> list[tuple[str, str]]:
    """Scenario settings LLaMA-Factory cannot reproduce exactly: (setting, why)."""
    out = []
    if fmt != "text":
        out.append(("data.format", f"{fmt} rows would render through a LLaMA-Factory template, not the harness's "
                    "prompt format; this adapter trains text rows only (pt stage)"))
    if sc.data.packing:
        out.append(("data.packing", "LLaMA-Factory's pt packing concatenates all samples and cuts cutoff_len blocks "
                    "(samples straddle rows, no per-sample position_ids); the harness keeps samples whole"))
    if sc.method.kind == "qlora" and sc.method.quant.compute_dtype != sc.model.dtype:
        out.append(("method.quant.compute_dtype", "LLaMA-Factory computes 4-bit layers in the model's dtype"))
    return out
