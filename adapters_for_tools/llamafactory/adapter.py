"""llamafactory adapter: the scenario as LLaMA-Factory arguments, run in-process by ``run_exp``.

``llamafactory.train.tuner.run_exp(args, callbacks)`` is what ``llamafactory-cli train cfg.yaml`` calls; it takes
our callbacks. The model is built inside, so the counting hook is attached in ``on_train_begin`` (the model
arrives in the callback's kwargs before the first forward), and the common ``TrainerCallback`` drives the
meter at each optimizer step.
"""

from __future__ import annotations

import json
import time

import yaml

from adapters_for_tools import switches
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.llamafactory import config as lf_config
from harness.inputs.data import read_jsonl, write_jsonl


def attach_on_train_begin(meter):
    """A ``TrainerCallback`` that attaches ``meter``'s counting hook to the model the trainer was built with.

    For tools that build the model inside their own entry point (LLaMA-Factory): ``on_train_begin`` runs
    before the first forward, with the final (PEFT-wrapped, quantised) model in its kwargs.
    """
    from transformers import TrainerCallback

    class AttachCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            model = kw.get("model")
            if model is not None and getattr(meter, "_hook", None) is None:
                meter.attach(model)

    return AttachCallback()


def run(ctx) -> None:
    from transformers import AutoTokenizer

    sc = ctx.scenario
    fmt = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())["format"]
    for setting, why in lf_config.cannot_honour(sc, fmt):
        ctx.cannot_honour(setting, why)
    if fmt != "text":
        raise ValueError(f"llamafactory adapter trains text rows only; the dataset is {fmt}")
    tok = AutoTokenizer.from_pretrained(ctx.checkpoint)
    ds_dir = ctx.work_dir / "lf_data"
    ds_dir.mkdir(exist_ok=True)
    # LLaMA-Factory's pt stage adds <bos> only for tokenizers with add_bos_token; ours adds it in a post-processor
    prefix = "" if getattr(tok, "add_bos_token", False) else tok.bos_token
    write_jsonl([{"text": prefix + r["text"]} for r in read_jsonl(ctx.dataset_path)], ds_dir / "data.jsonl")
    (ds_dir / "dataset_info.json").write_text(json.dumps(lf_config.dataset_info("data.jsonl"), indent=1))
    ov = ctx.options
    args = lf_config.native_config(sc, ctx.work_dir, ctx.checkpoint, ds_dir, liger=ov.liger, unsloth_gc=ov.unsloth_gc)
    if sc.hardware.device == "cpu":
        args["use_cpu"] = True
    args.update(ov.llamafactory)
    switches.expect(ctx, **lf_config.switches(args))
    if args.get("enable_liger_kernel"):
        switches.require_liger("llamafactory")
    path = ctx.save_native_config("llamafactory.yaml", yaml.safe_dump(args, sort_keys=False))
    ctx.extra["rerun"] = rerun_command(f"llamafactory.cli train {path}")
    if sc.hardware.strategy is not None:  # LLaMA-Factory's own multi-GPU command: torchrun of its launcher.py
        ctx.extra["rerun"] = (f"FORCE_TORCHRUN=1 NPROC_PER_NODE={sc.hardware.gpus} "
                              + rerun_command(f"llamafactory.cli train {path}"))

    from llamafactory.train.tuner import run_exp

    t0 = time.time()
    # the switch read-back first: it reads before the measurement callback starts the step clock
    run_exp(args=dict(args), callbacks=[switches.read_back_callback(ctx, switches.read_trainer_model),
                                        attach_on_train_begin(ctx.meter), *ctx.trainer_callbacks()])
    switches.settle(ctx)
    ctx.extra["run_exp_s"] = time.time() - t0
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"
