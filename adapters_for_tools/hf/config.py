"""The scenario as the hf adapter's ``TrainingArguments`` keywords (pure; no toolkit import).

Settings map one to one: micro-batch, accumulation, steps, LR, optimizer (:func:`~adapters_for_tools.contract.
trainer_args`), gradient checkpointing (non-reentrant) and precision; data in file order (sequential sampler).
The row's overrides come last: ``liger: true`` is transformers' ``use_liger_kernel`` (Liger-Kernel's RMSNorm,
SwiGLU, RoPE and fused linear cross-entropy, applied by ``Trainer.train``), and ``training_args`` any other
``TrainingArguments`` keyword, which wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import distributed
from adapters_for_tools.contract import trainer_args


def training_args(sc, work_dir: Path, options) -> dict[str, Any]:  # noqa: ANN001
    """``TrainingArguments`` keywords for scenario ``sc`` and the row's typed overrides ``options``.

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (the Trainer's output_dir goes under it).
        options: the row's ``HfOverrides``.

    Returns:
        Keywords for ``transformers.TrainingArguments`` (JSON-serialisable).
    """
    gc = sc.train.gradient_checkpointing
    args: dict[str, Any] = {
        "output_dir": str(Path(work_dir) / "trainer"),
        **trainer_args(sc),
        "gradient_checkpointing": gc,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if gc else None,
        "bf16": sc.model.dtype == "bfloat16",
        "fp16": sc.model.dtype == "float16",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": sc.train.seed,
        "data_seed": sc.train.seed,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",
        "remove_unused_columns": False,
        "use_cpu": sc.hardware.device == "cpu",
        "disable_tqdm": True,
        "use_liger_kernel": options.liger,
        **distributed.trainer_args(sc, work_dir),  # DDP / FSDP / ZeRO-3 (adapters_for_tools/distributed.py)
    }
    args.update(options.training_args)
    return args


def switches(args: dict[str, Any]) -> dict[str, bool]:
    """The speed switches final ``TrainingArguments`` ask for, under the read-back keys of
    :mod:`adapters_for_tools.switches`: Liger-Kernel, and the checkpointed layers' saved inputs in host memory where
    ``gradient_checkpointing_kwargs`` asks for it (transformers' ``offload``)."""
    out = {"liger_kernel": bool(args.get("use_liger_kernel"))}
    if args.get("gradient_checkpointing") and (args.get("gradient_checkpointing_kwargs") or {}).get("offload"):
        out["gradient_checkpointing_offload"] = True
    return out
