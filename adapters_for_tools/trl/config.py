"""The scenario as TRL's own configuration: a YAML for TRL's SFT script (pure; no toolkit import).

The YAML holds the four argument groups of ``trl/scripts/sft.py`` (``ScriptArguments``, ``SFTConfig``,
``ModelConfig``, ``DatasetMixtureConfig``) in one flat mapping, so ``python -m trl.scripts.sft --config
trl_sft.yaml`` reruns it with TRL alone; the adapter parses the same YAML with TRL's parser, so the file is
exactly what ran.

Token ids: TRL tokenises a text row with the tokenizer's defaults (our generated tokenizer puts ``<bos>`` in
front) and appends the EOS *text* before tokenising, which gives ``<bos> + text + <eos>`` truncated to
``max_length`` — the same ids as ``harness.inputs.data.tokenize_example`` (checked by the tests). Alpaca rows become
prompt/completion rows (``completion_only_loss`` = not ``prompt_loss``); messages rows with one final
assistant turn likewise (see :func:`convert_rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import distributed
from adapters_for_tools.contract import trainer_args
from adapters_for_tools.prompt_completion import sft_trainer_rows


def native_config(sc, work_dir: Path, checkpoint: str, data_file: Path, fmt: str,
                  liger: bool = False) -> dict[str, Any]:
    """TRL SFT script arguments for scenario ``sc``.

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (trainer output goes under it).
        checkpoint: model directory every framework loads.
        data_file: the JSONL TRL reads (the sweep's file for text rows, a converted one otherwise).
        fmt: dataset format of the sweep's file (``text``, ``alpaca``, ``messages``, ``sharegpt``).
        liger: the row's ``liger`` override: ``use_liger_kernel``.

    Returns:
        A flat mapping of TRL CLI arguments (JSON/YAML-serialisable).
    """
    cfg: dict[str, Any] = {
        **script_args(sc, work_dir, checkpoint, data_file),
        "train_sampling_strategy": "sequential",  # same order as every other framework (no shuffling)
        "shuffle_dataset": False,
        # SFT specifics
        "max_length": sc.data.seq_len,
        "truncation_mode": "keep_start",
        "packing": sc.data.packing,
        "dataset_num_proc": 1,
        "dataset_text_field": "text",
        "pad_to_multiple_of": None,
        "use_liger_kernel": liger,
        "activation_offloading": False,
    }
    if sc.data.packing:
        # best-fit-decreasing keeps samples whole and restarts position_ids per sample (padding-free rows)
        cfg["packing_strategy"] = "bfd"
    if fmt != "text":
        cfg["completion_only_loss"] = not sc.data.prompt_loss
    return cfg | method_args(sc)


def script_args(sc, work_dir: Path, checkpoint: str, data_file: Path) -> dict[str, Any]:  # noqa: ANN001
    """The arguments every TRL script gets alike (SFT here, DPO / ORPO / KTO / GRPO in ``rl_config``): the model,
    the local JSONL as one "train" split, the scenario's optimisation settings, precision, checkpointing, seed,
    logging every step, no saving or reporting."""
    mixed = sc.model.dtype in ("bfloat16", "float16")
    return {
        # ModelConfig
        "model_name_or_path": str(checkpoint),
        "dtype": sc.model.dtype,
        "attn_implementation": sc.model.attn_implementation,
        "use_peft": sc.method.is_peft,
        # DatasetMixtureConfig: the local JSONL, read as one "train" split, in file order
        "datasets": [{"path": "json", "data_files": str(data_file), "split": "train"}],
        "dataset_train_split": "train",
        # the trainer's config (TrainingArguments)
        "output_dir": str(Path(work_dir) / "trainer"),
        **trainer_args(sc),
        "gradient_checkpointing": sc.train.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if sc.train.gradient_checkpointing else None,
        "bf16": mixed and sc.model.dtype == "bfloat16",
        "fp16": sc.model.dtype == "float16",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": sc.train.seed,
        "data_seed": sc.train.seed,
        "dataloader_num_workers": 0,
        "use_cpu": sc.hardware.device == "cpu",
        "disable_tqdm": True,
        **distributed.trainer_args(sc, work_dir),  # DDP / FSDP / ZeRO-3 (adapters_for_tools/distributed.py)
    }


def method_args(sc) -> dict[str, Any]:  # noqa: ANN001
    """ModelConfig's PEFT and 4-bit arguments for the scenario's method (empty for full fine-tuning)."""
    m, out = sc.method, {}
    if m.is_peft:
        out.update({"lora_r": m.lora_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                    "lora_target_modules": m.resolved_targets(), "use_dora": m.kind == "dora",
                    "lora_task_type": "CAUSAL_LM"})
    if m.kind == "qlora":
        out.update({"load_in_4bit": True, "bnb_4bit_quant_type": m.quant.quant_type,
                    "use_bnb_nested_quant": m.quant.double_quant})
        if distributed.sharded_4bit(sc):  # TRL computes 4-bit layers in the model dtype: stored in it to shard
            out["bnb_4bit_quant_storage"] = sc.model.dtype
    return out


def switches(cfg: dict[str, Any]) -> dict[str, bool]:
    """The speed switches an SFT configuration asks for, under the read-back keys of
    :mod:`adapters_for_tools.switches`: Liger-Kernel, and activation offloading where it is on (the trainer's step
    inside TRL's ``OffloadActivations``)."""
    out = {"liger_kernel": bool(cfg.get("use_liger_kernel"))}
    if cfg.get("activation_offloading"):
        out["activation_offloading"] = True
    return out


def cannot_honour(sc) -> list[tuple[str, str]]:
    """Scenario settings this TRL configuration cannot reproduce exactly: (setting, why)."""
    out = []
    if sc.method.kind == "qlora" and sc.method.quant.compute_dtype != sc.model.dtype:
        out.append(("method.quant.compute_dtype", f"TRL's script computes 4-bit layers in the model dtype "
                    f"({sc.model.dtype}), not {sc.method.quant.compute_dtype}"))
    return out


def convert_rows(rows: list[dict[str, Any]], fmt: str, tokenizer: Any = None, seq_len: int | None = None,
                 prompt_loss: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Sweep rows -> rows TRL reads, rendered as ``harness.inputs.data.prompt_response`` renders them.

    Returns:
        (rows, notes): ``text`` rows unchanged; the others as
        :func:`adapters_for_tools.prompt_completion.sft_trainer_rows` gives them (prompt/completion, or
        pre-tokenised conversations with several assistant turns).
    """
    if fmt == "text":
        return [{"text": r["text"]} for r in rows], []
    return sft_trainer_rows(rows, fmt, "TRL", tokenizer, seq_len, prompt_loss)
