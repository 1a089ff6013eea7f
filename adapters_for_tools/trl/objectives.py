"""trl adapter, preference and RL objectives: DPO, ORPO, KTO and GRPO through TRL's own trainers.

Flow, as for SFT (``adapter.py``): :func:`adapters_for_tools.trl.rl_config.native_config` -> ``trl_<kind>.yaml``
(saved; rerun with TRL alone: ``python -m trl.scripts.<kind> --config trl_<kind>.yaml``, ORPO through
``adapters_for_tools.trl.rerun_orpo``) -> parsed back with TRL's ``TrlParser`` -> the script's steps
(``get_dataset``, ``get_peft_config``, ``get_quantization_config``, ``DPOTrainer`` / ``KTOTrainer`` /
``GRPOTrainer``; ``ORPOTrainer`` from ``trl.experimental``) with our callbacks.

What is counted, and how settings are read back: :mod:`adapters_for_tools.objective_meter`.
"""

from __future__ import annotations

import importlib
import json
import time

import yaml

from adapters_for_tools import distributed
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.objective_meter import ObjectiveMeter, loads_reference_copy, read_back
from adapters_for_tools.trl import rl_config
from harness.inputs.data import read_jsonl, write_jsonl
from harness.inputs.preference import objective_rows


def run(ctx) -> None:
    """Train ``ctx.scenario``'s objective (not sft) with TRL; see the module docstring."""
    import torch
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_dataset, get_peft_config, get_quantization_config

    sc = ctx.scenario
    kind = sc.objective.kind
    if ctx.options.liger or ctx.options.sft:
        raise ValueError("the trl overrides liger and sft apply to objective sft (TRL's preference and RL trainers "
                         "compute log-probs with their own fused LM head); give this row's entries in objective_config")
    rows = objective_rows(read_jsonl(ctx.dataset_path), kind)
    data_file = ctx.work_dir / f"trl_{kind}_dataset.jsonl"  # TRL's input, saved with the run
    write_jsonl(rows, data_file)
    for setting, why in rl_config.cannot_honour(sc):
        ctx.cannot_honour(setting, why)
    cfg = rl_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file)
    cfg.update(ctx.options.objective_config)
    cfg_path = ctx.save_native_config(f"trl_{kind}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    ctx.extra["rerun"] = rerun_command(f"{rl_config.SCRIPTS[kind]} --config {cfg_path}")

    script_cls, config_cls = _argument_classes(kind)
    parser = TrlParser((script_cls, config_cls, ModelConfig, DatasetMixtureConfig))
    script_args, args, model_args, dataset_args = parser.parse_dict(cfg, allow_extra_keys=False)
    ctx.save_native_config(f"{kind}_config.json", json.dumps(args.to_dict(), indent=1, default=str))
    ctx.native_config = str(cfg_path)  # the YAML is what reruns; <kind>_config.json the resolved config

    # as trl/scripts/<kind>.py does
    args.model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}
    quant = get_quantization_config(model_args)
    if quant is not None and not distributed.sharded_4bit(sc):  # FSDP / ZeRO-3 place the 4-bit shards themselves
        args.model_init_kwargs["device_map"] = {"": torch.cuda.current_device()}
    dataset = get_dataset(dataset_args)[script_args.dataset_train_split]
    om = ObjectiveMeter(ctx.meter, sc.hardware.device)
    callbacks = [*ctx.trainer_callbacks(), om.callback()]  # after the measuring one: its clock stops first
    t0 = time.time()
    if kind == "orpo":
        from adapters_for_tools.trl.rerun_orpo import orpo_trainer  # imports TRL: the worker's environment only

        trainer = orpo_trainer(args, model_args, dataset, callbacks)
    else:
        trainer = _trainer(kind, sc, args, model_args, script_args, dataset, quant, get_peft_config(model_args),
                           callbacks, om)
    ctx.load_s = time.time() - t0  # model load(s) + TRL's tokenisation, before the first step
    om.attach(trainer, kind)
    ctx.set_effective(**read_back(trainer, kind))
    trainer.train()
    ctx.set_effective(**om.batch_effective(kind))
    ctx.extra.update(om.extra(kind))
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    if args.should_save:  # rank 0 (the only process of a one-GPU run)
        trainer.processing_class.save_pretrained(str(ctx.output_dir))
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"


def _argument_classes(kind: str) -> tuple[type, type]:
    """(script arguments, trainer config) of TRL's script for ``kind``."""
    import trl
    from trl import ScriptArguments

    if kind == "grpo":
        from trl.scripts.grpo import GRPOScriptArguments  # its reward_funcs: the script's own argument

        return GRPOScriptArguments, trl.GRPOConfig
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ScriptArguments, ORPOConfig
    return ScriptArguments, getattr(trl, rl_config.CONFIG_CLASSES[kind])


def _trainer(kind, sc, args, model_args, script_args, dataset, quant, peft_config, callbacks, om):  # noqa: ANN001, ANN202
    """DPOTrainer / KTOTrainer / GRPOTrainer as TRL's scripts build them (plus a reference copy where asked); a
    precomputed reference pass (it runs inside the constructor) counted by ``om``."""
    import trl

    common = {"model": model_args.model_name_or_path, "args": args, "train_dataset": dataset,
              "quantization_config": quant, "peft_config": peft_config, "callbacks": callbacks}
    if kind == "grpo":
        funcs = []
        for path in script_args.reward_funcs or []:
            module, name = path.rsplit(".", 1)
            funcs.append(getattr(importlib.import_module(module), name))
        return trl.GRPOTrainer(reward_funcs=funcs, **common)
    ref = None
    if loads_reference_copy(sc):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                   **args.model_init_kwargs,
                                                   **({"quantization_config": quant} if quant is not None else {}))
    cls = trl.DPOTrainer if kind == "dpo" else trl.KTOTrainer
    with om.precompute_counted(cls):
        return cls(ref_model=ref, **common)
