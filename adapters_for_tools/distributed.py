"""Multi-GPU settings several adapters share: which strategies the HF-Trainer-based tools run, and each strategy
in their own configuration (pure: no toolkit import).

The ranks are started by :mod:`harness.running.launch` (torchrun, or accelerate launch for Axolotl); inside each,
the tool's Trainer reads the world from the environment. What the configuration adds per strategy:

- ``ddp``: nothing but the launch (the Trainer wraps the model in DDP itself); ``ddp_find_unused_parameters``
  off, as every parameter that trains gets a gradient every step (the search costs a graph walk per step).
- ``fsdp``: FSDP2 (``fsdp_version: 2``), each decoder layer its own unit (transformer-based wrapping over the
  model's own ``_no_split_modules``, its decoder layer class, whatever the family), parameters resharded after
  forward, gathered to rank 0 for the save. Gradient checkpointing stays the model's
  own (``gradient_checkpointing`` in the arguments, what the one-GPU rows run and what the read-back checks), not
  FSDP's ``activation_checkpointing``: the two cannot both be on.
- ``zero3``: DeepSpeed ZeRO stage 3 through a JSON in the run's folder (``deepspeed: <path>``), its batch, clipping
  and precision left to the Trainer (``"auto"``). Needs ``deepspeed`` in the tool's environment.
- QLoRA sharded (``fsdp``, ``zero3``): the 4-bit weights are stored in the compute dtype
  (``bnb_4bit_quant_storage``), so they shard and gather with the bf16 parameters (one dtype per flat buffer),
  and are not pinned to one GPU (no ``device_map``): answer.ai's FSDP + QLoRA recipe, which transformers, PEFT
  and the tools built on them follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters_for_tools.contract import ALL_METHODS

SHARDED_METHODS = frozenset({"full", "lora", "qlora"})  # DoRA's row norms need the whole weight
# hardware.strategy -> methods, for tools that train through the transformers Trainer and accelerate
TRAINER_STRATEGIES = {"ddp": ALL_METHODS, "fsdp": SHARDED_METHODS, "zero3": SHARDED_METHODS}
DEEPSPEED_CONFIG = "deepspeed_zero3.json"


def strategy(sc: Any) -> str | None:
    """The scenario's ``hardware.strategy`` (None: one GPU)."""
    return sc.hardware.strategy


def fsdp_config() -> dict[str, Any]:
    """transformers' ``TrainingArguments.fsdp_config`` for FSDP2 over decoder layers (the model's
    ``_no_split_modules``, which accelerate wraps when no class is named)."""
    return {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "activation_checkpointing": False, "cpu_ram_efficient_loading": False,
            "state_dict_type": "FULL_STATE_DICT", "offload_params": False}


def deepspeed_zero3() -> dict[str, Any]:
    """DeepSpeed's ZeRO-3 config, with what the Trainer knows left ``"auto"`` (it fills them from its arguments)."""
    return {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto"}


def write_deepspeed_config(work_dir: Path) -> Path:
    """The ZeRO-3 JSON in the run's folder (stored with the run, read by the tool)."""
    path = Path(work_dir) / DEEPSPEED_CONFIG
    path.write_text(json.dumps(deepspeed_zero3(), indent=1))
    return path


def trainer_args(sc: Any, work_dir: Path) -> dict[str, Any]:
    """``TrainingArguments`` keywords for the scenario's strategy (hf, TRL and LLaMA-Factory take them as such);
    empty for one GPU. Writes the DeepSpeed JSON into ``work_dir`` for ``zero3``."""
    st = strategy(sc)
    if st is None:
        return {}
    out: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if st == "fsdp":
        out.update({"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp_config()})
    elif st == "zero3":
        out["deepspeed"] = str(write_deepspeed_config(work_dir))
    return out


def decoder_layer_class(config: dict[str, Any]) -> str | None:
    """The decoder layer class of a transformers checkpoint (``LlamaForCausalLM`` -> ``LlamaDecoderLayer``, the
    naming every family here follows), from its ``config.json``; None when it names no causal LM."""
    arch = (config.get("architectures") or [None])[0]
    return arch.replace("ForCausalLM", "DecoderLayer") if arch and arch.endswith("ForCausalLM") else None


def axolotl_config(sc: Any, work_dir: Path, layer_class: str | None = None) -> dict[str, Any]:
    """Axolotl's YAML keys for the scenario's strategy (its own names: ``fsdp_version`` / ``fsdp_config``,
    ``deepspeed``); empty for one GPU and for DDP (the launch alone). ``layer_class``: FSDP's wrapping unit
    (:func:`decoder_layer_class`), named as Axolotl's FSDP examples name it."""
    st = strategy(sc)
    if st == "fsdp":
        named = {"transformer_layer_cls_to_wrap": layer_class} if layer_class else {}
        return {"fsdp_version": 2, "fsdp_config": {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", **named, "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "offload_params": False, "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False}}
    if st == "zero3":
        return {"deepspeed": str(write_deepspeed_config(work_dir))}
    return {}


def sharded_4bit(sc: Any) -> bool:
    """QLoRA whose 4-bit base is sharded (``fsdp``, ``zero3``): quant storage in the compute dtype, no device map."""
    return sc.method.kind == "qlora" and strategy(sc) in ("fsdp", "zero3")
