"""unsloth adapter, preference and RL objectives: DPO, ORPO, KTO and GRPO through the TRL trainers Unsloth patches.

Flow, as for SFT (``adapter.py``): :func:`adapters_for_tools.unsloth.rl_config.native_config` -> ``unsloth_<kind>.json``
(saved; rerun with Unsloth and TRL alone: ``python -m adapters_for_tools.unsloth.rerun unsloth_<kind>.json``) ->
``FastLanguageModel.from_pretrained`` (+ ``get_peft_model``) -> the objective's trainer as Unsloth's guides build it
(:mod:`adapters_for_tools.unsloth.trainers`), with our callbacks. ``<kind>_config.json`` is the config as the trainer
resolved it (Unsloth's patched config fills in what the scenario does not set). The trainer class is recorded in
``extra["trainer_class"]``: a TRL class that Unsloth did not patch would measure TRL, not Unsloth, and marks the run
invalid.

What is counted, and how settings are read back: :mod:`adapters_for_tools.objective_meter`, as for TRL (effective
``beta``, ``loss_type``, ``reference``: a copy, the policy with its adapters disabled, precomputed, or none). One
difference: Unsloth's GRPO packs a micro-batch's completions into one row (and stores each group's prompt once), so
its training micro-batches are counted from the inputs of ``compute_loss`` (``ObjectiveMeter.count_loss_inputs``):
the same figures TRL's padded forward gives; its forwards without gradient are counted as they run (the tokens they
read). GRPO samples with transformers' ``generate`` in Unsloth's inference mode (``fast_inference`` needs vLLM,
which the environment does not carry).
"""

from __future__ import annotations

import json
import time
from typing import Any

from adapters_for_tools import switches
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.objective_meter import ObjectiveMeter, read_back
from adapters_for_tools.unsloth import config as us_config
from adapters_for_tools.unsloth import rl_config, trainers
from harness.inputs.data import read_jsonl, write_jsonl
from harness.inputs.preference import objective_rows


def prepare(ctx) -> dict[str, Any]:  # noqa: ANN001
    """Everything before the model loads (no toolkit needed): the trainer's rows, the settings Unsloth cannot honour,
    ``unsloth_<kind>.json`` with the row's overrides (saved with the run, its rerun command in ``extra``).

    Raises:
        ValueError: the row's ``sft`` override on another objective (its entries go in ``objective_config``).
    """
    sc = ctx.scenario
    kind = sc.objective.kind
    if ctx.options.sft:
        raise ValueError("the unsloth override sft applies to objective sft; give this row's entries of the "
                         f"{kind} config in objective_config")
    data_file = ctx.work_dir / f"unsloth_{kind}_dataset.jsonl"  # the trainer's input, saved with the run
    write_jsonl(objective_rows(read_jsonl(ctx.dataset_path), kind), data_file)
    for setting, why in rl_config.cannot_honour(sc):
        ctx.cannot_honour(setting, why)
    cfg = rl_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file,
                                  use_gradient_checkpointing=ctx.options.use_gradient_checkpointing)
    cfg[kind].update(ctx.options.objective_config)
    cfg["environment"] = us_config.row_environment(ctx.options.block_compile)
    us_config.expect_switches(ctx, cfg)
    path = ctx.save_native_config(f"unsloth_{kind}.json", json.dumps(cfg, indent=1))
    ctx.extra["rerun"] = rerun_command(f"adapters_for_tools.unsloth.rerun {path}")
    return cfg


def run(ctx) -> None:  # noqa: ANN001
    """Train ``ctx.scenario``'s objective (dpo, orpo, kto or grpo) with Unsloth; see the module docstring."""
    import torch  # heavy: the worker's environment only
    from datasets import load_dataset  # the unsloth environment's

    sc = ctx.scenario
    kind = sc.objective.kind
    if sc.hardware.device != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("unavailable: needs CUDA (Unsloth's kernels are GPU-only)")
    cfg = prepare(ctx)
    native = ctx.native_config
    om = ObjectiveMeter(ctx.meter, sc.hardware.device)
    # the switch read-back first (it reads before the measuring callback starts the clock); the objective's callback
    # after the measuring one, so the step's clock stops first
    callbacks = [switches.read_back_callback(ctx, trainers.read_switches), *ctx.trainer_callbacks(), om.callback()]
    t0 = time.time()
    model, tok = trainers.load_model(cfg)
    dataset = load_dataset("json", data_files=cfg["data_file"], split="train")
    trainer_cls, _ = trainers.trainer_classes(kind)
    # DPO's precomputed reference runs inside the constructor: counted where the class defines it (Unsloth's compiled
    # trainer subclasses TRL's code under another name)
    owner = next((c for c in trainer_cls.__mro__ if "_precompute_ref_logps" in vars(c)), trainer_cls)
    with om.precompute_counted(owner):
        trainer = trainers.objective_trainer(cfg, model, tok, dataset, callbacks)
    ctx.load_s = time.time() - t0  # model load(s) + TRL's tokenisation (+ a precomputed reference), before step 1
    ctx.extra["trainer_class"] = f"{type(trainer).__module__}.{type(trainer).__name__}"
    if not type(trainer).__name__.startswith("Unsloth"):
        ctx.cannot_honour("framework", f"Unsloth did not patch TRL's {type(trainer).__name__}: the run trained with "
                                       "TRL's own trainer, not Unsloth's")
    ctx.save_native_config(f"{kind}_config.json", json.dumps(trainer.args.to_dict(), indent=1, default=str))
    ctx.native_config = native  # unsloth_<kind>.json reruns; <kind>_config.json is the config as resolved
    om.attach(trainer, kind)
    if kind == "grpo":
        om.count_loss_inputs(trainer)
    ctx.set_effective(**read_back(trainer, kind))
    trainer.train()
    switches.settle(ctx)
    ctx.set_effective(**om.batch_effective(kind))
    ctx.extra.update(om.extra(kind))
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    tok.save_pretrained(str(ctx.output_dir))
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"
