"""axolotl adapter: the scenario as an Axolotl YAML, trained in-process through Axolotl's own entry points.

What ``python -m axolotl.cli.train axolotl.yml`` does, minus the CLI: ``axolotl.cli.config.load_cfg`` (validation,
defaults, plugin registration) -> ``axolotl.common.datasets.load_datasets`` (``load_preference_datasets`` for
``rl:``) -> ``axolotl.train.train``. Running it in the worker process lets the common hook measure it: the config
gets one extra plugin (:mod:`adapters_for_tools.axolotl.plugin`, after the row's own plugins) that adds our
``TrainerCallback`` once Axolotl has built its trainer. Speed switches (its Liger plugin, its fused LoRA kernels)
are read back from the live model at the first step (:mod:`adapters_for_tools.switches`).

Objectives: sft through Axolotl's SFT path (:mod:`adapters_for_tools.axolotl.config`); dpo, orpo and kto through
its ``rl:`` path (:mod:`adapters_for_tools.axolotl.rl_config`), on the rows written beside the YAML
(``axolotl_<kind>_dataset.jsonl``), measured with :mod:`adapters_for_tools.objective_meter` as the trl adapter
measures TRL's own trainers.

Name clash: Axolotl imports the PyPI package ``kernels``, and our repository has a top-level ``kernels/``.
The worker's ``PYTHONPATH`` is overlay first, repository root after (``harness.running.envs.worker_environment``), and
its cwd is the run's work directory, so ``import kernels`` finds the overlay's; nothing on this path imports our
``kernels`` package (tests/adapters checks both).
"""

from __future__ import annotations

import contextlib
import json
import time

import yaml

from adapters_for_tools import distributed, switches
from adapters_for_tools.axolotl import config as ax_config
from adapters_for_tools.axolotl import rl_config
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.objective_meter import ObjectiveMeter
from harness.inputs.data import CONVERSATIONS, read_jsonl, write_jsonl
from harness.inputs.models import load_config_dict
from harness.inputs.preference import objective_rows


def prepare(ctx) -> dict:
    """The run's Axolotl config, saved as ``axolotl.yml`` (with, for dpo/orpo/kto, the rows it reads beside it), and
    the command that reruns it; returns the config. No toolkit import: everything before training starts."""
    sc = ctx.scenario
    kind = sc.objective.kind
    if kind != "sft" and ctx.options.liger:
        raise ValueError("the axolotl override liger applies to objective sft (Axolotl's preference trainers are "
                         "TRL's, which compute log-probs with their own LM head); run this row without it")
    layer_class = distributed.decoder_layer_class(load_config_dict(ctx.checkpoint))
    if kind == "sft":
        fmt = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())["format"]
        data_file = ctx.dataset_path
        if fmt in CONVERSATIONS:  # conversations go pre-tokenised (config.tokenised_rows), kept with the run
            from transformers import AutoTokenizer  # heavy: the worker's environment only

            data_file = ctx.work_dir / "axolotl_sft_dataset.jsonl"
            write_jsonl(ax_config.tokenised_rows(read_jsonl(ctx.dataset_path), fmt,
                                                 AutoTokenizer.from_pretrained(ctx.checkpoint), sc.data.seq_len,
                                                 sc.data.prompt_loss), data_file)
            ctx.extra["data"] = ("conversations given to Axolotl pre-tokenised by the harness (input_ids, "
                                 "attention_mask, labels: Axolotl's custom pre-tokenised dataset)")
        cfg = ax_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file, fmt,
                                      liger=ctx.options.liger, layer_class=layer_class)
    else:
        data_file = ctx.work_dir / f"axolotl_{kind}_dataset.jsonl"  # Axolotl's input, saved with the run
        write_jsonl(objective_rows(read_jsonl(ctx.dataset_path), kind), data_file)
        cfg = rl_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file, layer_class=layer_class)
        if notes := rl_config.differences(sc):
            ctx.extra["differences"] = notes
    cfg.update(ctx.options.axolotl)
    path = ctx.save_native_config("axolotl.yml", yaml.safe_dump(cfg, sort_keys=False))
    ctx.extra["rerun"] = rerun_command(f"axolotl.cli.train {path}")
    if distributed.strategy(sc) is not None:  # Axolotl's own multi-GPU command: `axolotl train` launches this way
        ctx.extra["rerun"] = rerun_command(f"accelerate.commands.launch --num_processes {sc.hardware.gpus} "
                                           f"-m axolotl.cli.train {path}")
    if sc.data.packing:
        ctx.extra["packing"] = "Axolotl multipack sampler (its own grouping of samples into rows)"
    return cfg


def run(ctx) -> None:
    """Train ``ctx.scenario`` through Axolotl's own entry points (the module docstring says how)."""
    sc = ctx.scenario
    kind = sc.objective.kind
    cfg = prepare(ctx)

    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets, load_preference_datasets
    from axolotl.train import train
    from axolotl.utils.dict import DictDefault

    from adapters_for_tools.axolotl import plugin  # imports axolotl: only inside the worker, after the toolkit

    om = None if kind == "sft" else ObjectiveMeter(ctx.meter, sc.hardware.device)
    plugin.CTX, plugin.READ_BACK, plugin.OBJECTIVE, plugin.TRAINER = ctx, _read_back, om, None
    t0 = time.time()
    parsed = load_cfg(DictDefault(dict(cfg, plugins=[*(cfg.get("plugins") or []), plugin.PLUGIN_NAME])))
    (ctx.work_dir / "axolotl_resolved.json").write_text(json.dumps(dict(parsed), indent=1, default=str))
    # what Axolotl resolved (its validation turns the LoRA kernels on when unset): the live model must show it
    switches.expect(ctx, **ax_config.switches(dict(parsed)))
    load = load_preference_datasets if parsed.rl else load_datasets  # as axolotl.cli.train chooses
    dataset_meta = load(cfg=parsed, cli_args=TrainerCliArgs())
    ctx.load_s = time.time() - t0  # config + data preparation; the model loads inside train()
    import kernels as _kernels_pkg  # the overlay's PyPI `kernels`, never the repository's (see module doc)

    ctx.extra["kernels_module"] = getattr(_kernels_pkg, "__file__", None)
    with _precompute_counted(om, kind):
        train(cfg=parsed, dataset_meta=dataset_meta)
    if plugin.TRAINER is not None:  # what lives on the trainer, not the model: its step's offloading context
        ctx.set_effective(**switches.read_activation_offloading(plugin.TRAINER))
    switches.narrow_axolotl_kernels(ctx)
    switches.settle(ctx)
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"
    if om is not None:
        ctx.set_effective(**om.batch_effective(kind))
        ctx.extra.update(om.extra(kind))


def _precompute_counted(om: ObjectiveMeter | None, kind: str):
    """DPO's precomputed reference pass runs inside the trainer's constructor, which Axolotl calls inside
    ``train()``: counted and timed there by ``om`` (a no-op for the other objectives)."""
    if om is None or kind != "dpo":
        return contextlib.nullcontext()
    import trl  # heavy: the worker's environment only

    return om.precompute_counted(trl.DPOTrainer)


def _read_back(model) -> dict:
    """Liger-Kernel, the checkpoint function and Axolotl's fused LoRA kernels, from the live model."""
    return switches.read_trainer_model(model) | switches.read_axolotl_lora_kernels(model)
