"""The calls a saved Unsloth configuration makes: load the model, build an objective's trainer. Shared by the adapter
and ``rerun.py``, so a rerun trains exactly what the run trained.

Heavy: every function imports torch, TRL or Unsloth, and must run after ``import unsloth`` (the adapter's and the
rerun script's first import), which replaces TRL's trainers with its patched ones.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from adapters_for_tools import switches


def load_model(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """``FastLanguageModel.from_pretrained`` (and ``get_peft_model`` for LoRA / QLoRA) with the saved keywords, after
    the saved environment variables: ``(model, tokenizer)``."""
    from unsloth import FastLanguageModel

    os.environ.update(cfg.get("environment", {}))  # read by Unsloth as it patches the model it loads
    model, tok = FastLanguageModel.from_pretrained(**_from_pretrained(cfg))
    if cfg["get_peft_model"]:
        model = FastLanguageModel.get_peft_model(model, **cfg["get_peft_model"])
    return model, tok


def _from_pretrained(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    fp = dict(cfg["from_pretrained"])
    fp["dtype"] = getattr(torch, fp["dtype"])
    return fp


def trainer_classes(kind: str) -> tuple[type, type]:
    """(trainer, config) classes of objective ``kind`` as ``import unsloth`` left them in TRL: its patched
    ``UnslothDPOTrainer`` / ``UnslothORPOTrainer`` / ``UnslothKTOTrainer`` / ``UnslothGRPOTrainer`` and their
    configs, or TRL's own where Unsloth could not patch one (it says so in a warning; the adapter records the class
    it got)."""
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # TRL 1.x keeps ORPO in trl.experimental

        return ORPOTrainer, ORPOConfig
    import trl

    name = {"dpo": "DPO", "kto": "KTO", "grpo": "GRPO"}[kind]
    return getattr(trl, f"{name}Trainer"), getattr(trl, f"{name}Config")


def objective_trainer(cfg: dict[str, Any], model, tok, dataset, callbacks: list[Any] | None = None):  # noqa: ANN001, ANN201
    """The trainer of ``cfg["objective"]`` as Unsloth's guides build it: the model instance, the tokenizer as
    ``processing_class``, ``ref_model=None`` for DPO and KTO unless the configuration asks for a copy, the reward
    functions for GRPO."""
    kind = cfg["objective"]
    trainer_cls, config_cls = trainer_classes(kind)
    common = {"model": model, "args": config_cls(**cfg[kind]), "train_dataset": dataset, "processing_class": tok,
              "callbacks": callbacks}
    if kind == "grpo":
        funcs = []
        for path in cfg["reward_funcs"]:
            module, name = path.rsplit(".", 1)
            funcs.append(getattr(importlib.import_module(module), name))
        return trainer_cls(reward_funcs=funcs, **common)
    if kind in ("dpo", "kto"):
        return trainer_cls(ref_model=reference_copy(cfg) if cfg["reference_copy"] else None, **common)
    return trainer_cls(**common)


def reference_copy(cfg: dict[str, Any]) -> Any:
    """A frozen copy of the starting model for DPO's or KTO's reference, loaded as the policy was (same dtype, 4-bit
    or not), without adapters."""
    from unsloth import FastLanguageModel

    ref, _ = FastLanguageModel.from_pretrained(**_from_pretrained(cfg))
    ref.requires_grad_(False)
    return ref.eval()


def read_switches(model) -> dict[str, Any]:  # noqa: ANN001
    """Unsloth's checkpoint mode and per-layer compile as installed on the live model, and any Liger-Kernel
    replacement."""
    return (switches.read_unsloth_checkpointing(model) | switches.read_unsloth_block_compile(model)
            | switches.read_liger(model))
