"""llamafactory adapter: the scenario as LLaMA-Factory arguments, run in-process by ``run_exp``.

``llamafactory.train.tuner.run_exp(args, callbacks)`` is what ``llamafactory-cli train cfg.yaml`` calls; it takes
our callbacks. The model is built inside, so the counting hook is attached in ``on_train_begin`` (the model
arrives in the callback's kwargs before the first forward), and the common ``TrainerCallback`` drives the
meter at each optimizer step. The preference stages (dpo, kto) are counted and read back from the trainer itself:
:mod:`adapters_for_tools.llamafactory.objectives`.

The run's rows are written as LLaMA-Factory reads them, beside the native config: ``lf_data/data.jsonl`` and
``lf_data/dataset_info.json`` (:mod:`adapters_for_tools.llamafactory.dataset`).
"""

from __future__ import annotations

import json
import time

import yaml

from adapters_for_tools import switches
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.llamafactory import config as lf_config
from adapters_for_tools.llamafactory import dataset as lf_data
from adapters_for_tools.llamafactory import objectives
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


def write_dataset(ctx, tok, fmt: str) -> None:  # noqa: ANN001
    """Write the run's rows and their ``dataset_info.json`` into ``<work_dir>/lf_data``; report where LLaMA-Factory's
    labels or truncation differ from the harness's."""
    sc = ctx.scenario
    given = read_jsonl(ctx.dataset_path)
    form = lf_data.form_of_rows(sc.objective.kind, fmt, given, sc.data.prompt_loss)
    # the pt stage adds <bos> itself only for tokenizers with add_bos_token (ours adds it in a post-processor); the
    # template stages never do
    bos = "" if form == "text" and getattr(tok, "add_bos_token", False) else (tok.bos_token or "")
    rows, notes = lf_data.lf_rows(given, fmt, form, bos, tok.eos_token, sc.data.prompt_loss)
    ds_dir = ctx.work_dir / "lf_data"
    ds_dir.mkdir(exist_ok=True)
    write_jsonl(rows, ds_dir / lf_data.FILE_NAME)
    (ds_dir / "dataset_info.json").write_text(json.dumps(lf_data.dataset_info(lf_data.FILE_NAME, form), indent=1))
    if notes := notes + lf_config.differences(sc, fmt):
        ctx.extra["differences"] = notes
    n = lf_data.overlong(rows, form, lambda s: tok(s, add_special_tokens=False)["input_ids"], sc.data.seq_len)
    if n:
        ctx.cannot_honour("data.seq_len", f"{n} rows longer than {sc.data.seq_len} tokens: LLaMA-Factory's "
                          "infer_seqlen cuts their prompt too (or prompt and response in proportion), the harness "
                          "and TRL cut the sequence's end")


def run(ctx) -> None:
    from transformers import AutoTokenizer

    sc = ctx.scenario
    fmt = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())["format"]
    for setting, why in lf_config.cannot_honour(sc, fmt):
        ctx.cannot_honour(setting, why)
    write_dataset(ctx, AutoTokenizer.from_pretrained(ctx.checkpoint), fmt)
    ov = ctx.options
    args = lf_config.native_config(sc, ctx.work_dir, ctx.checkpoint, ctx.work_dir / "lf_data", liger=ov.liger,
                                   unsloth_gc=ov.unsloth_gc, fmt=fmt)
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

    # the switch read-back first: it reads before the measurement callback starts the step clock
    read_switches = switches.read_back_callback(ctx, switches.read_trainer_model)
    t0 = time.time()
    if sc.objective.is_sft:
        run_exp(args=dict(args), callbacks=[read_switches, attach_on_train_begin(ctx.meter), *ctx.trainer_callbacks()])
    else:
        kind = sc.objective.kind
        with objectives.built(objectives.trainer_class(kind)) as made:
            om, counting = objectives.objective_callbacks(ctx, kind, made, t0)
            run_exp(args=dict(args), callbacks=[read_switches, *ctx.trainer_callbacks(), *counting])
        ctx.set_effective(**om.batch_effective(kind))
        ctx.extra.update(om.extra(kind))
    switches.settle(ctx)
    ctx.extra["run_exp_s"] = time.time() - t0
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"
