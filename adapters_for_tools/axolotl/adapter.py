"""axolotl adapter: the scenario as an Axolotl YAML, trained in-process through Axolotl's own entry points.

What ``python -m axolotl.cli.train axolotl.yml`` does, minus the CLI: ``axolotl.cli.config.load_cfg`` (validation,
defaults, plugin registration) -> ``axolotl.common.datasets.load_datasets`` -> ``axolotl.train.train``. Running
it in the worker process lets the common hook measure it: the config gets one extra plugin
(:mod:`adapters_for_tools.axolotl.plugin`, after the row's own plugins) that adds our ``TrainerCallback`` once
Axolotl has built its trainer. Speed switches (its Liger plugin, its fused LoRA kernels) are read back from the
live model at the first step (:mod:`adapters_for_tools.switches`).

Name clash: Axolotl imports the PyPI package ``kernels``, and our repository has a top-level ``kernels/``.
The worker's ``PYTHONPATH`` is overlay first, repository root after (``harness.running.runner.worker_environment``), and
its cwd is the run's work directory, so ``import kernels`` finds the overlay's; nothing on this path imports our
``kernels`` package (tests/adapters checks both).
"""

from __future__ import annotations

import json
import time

import yaml

from adapters_for_tools import distributed, switches
from adapters_for_tools.axolotl import config as ax_config
from adapters_for_tools.contract import rerun_command
from harness.inputs.models import load_config_dict


def run(ctx) -> None:
    sc = ctx.scenario
    fmt = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())["format"]
    for setting, why in ax_config.cannot_honour(sc, fmt):
        ctx.cannot_honour(setting, why)
    layer_class = distributed.decoder_layer_class(load_config_dict(ctx.checkpoint))
    cfg = ax_config.native_config(sc, ctx.work_dir, ctx.checkpoint, ctx.dataset_path, fmt, liger=ctx.options.liger,
                                  layer_class=layer_class)
    cfg.update(ctx.options.axolotl)
    path = ctx.save_native_config("axolotl.yml", yaml.safe_dump(cfg, sort_keys=False))
    ctx.extra["rerun"] = rerun_command(f"axolotl.cli.train {path}")
    if distributed.strategy(sc) is not None:  # Axolotl's own multi-GPU command: `axolotl train` launches this way
        ctx.extra["rerun"] = rerun_command(f"accelerate.commands.launch --num_processes {sc.hardware.gpus} "
                                           f"-m axolotl.cli.train {path}")
    if sc.data.packing:
        ctx.extra["packing"] = "Axolotl multipack sampler (its own grouping of samples into rows)"

    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train
    from axolotl.utils.dict import DictDefault

    from adapters_for_tools.axolotl import plugin  # imports axolotl: only inside the worker, after the toolkit

    plugin.CTX = ctx
    plugin.READ_BACK = _read_back
    t0 = time.time()
    parsed = load_cfg(DictDefault(dict(cfg, plugins=[*(cfg.get("plugins") or []), plugin.PLUGIN_NAME])))
    (ctx.work_dir / "axolotl_resolved.json").write_text(json.dumps(dict(parsed), indent=1, default=str))
    # what Axolotl resolved (its validation turns the LoRA kernels on when unset): the live model must show it
    switches.expect(ctx, **ax_config.switches(dict(parsed)))
    dataset_meta = load_datasets(cfg=parsed, cli_args=TrainerCliArgs())
    ctx.load_s = time.time() - t0  # config + data preparation; the model loads inside train()
    import kernels as _kernels_pkg  # the overlay's PyPI `kernels`, never the repository's (see module doc)

    ctx.extra["kernels_module"] = getattr(_kernels_pkg, "__file__", None)
    train(cfg=parsed, dataset_meta=dataset_meta)
    switches.settle(ctx)
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"


def _read_back(model) -> dict:
    """Liger-Kernel, the checkpoint function and Axolotl's fused LoRA kernels, from the live model."""
    return switches.read_trainer_model(model) | switches.read_axolotl_lora_kernels(model)
