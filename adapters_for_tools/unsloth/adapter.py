"""unsloth adapter: FastLanguageModel + TRL SFTTrainer, as Unsloth's notebooks do, measured by the common hook (the
other objectives: :mod:`adapters_for_tools.unsloth.objectives`).

``import unsloth`` must run before transformers, TRL and PEFT are imported (it patches them), so it is the first
import of this module. The worker imports only light harness modules before it loads this module
(harness.measuring.meter,
harness.measuring.effective, harness.inputs.data import torch/transformers inside functions; tests/adapters checks that
transformers is not yet imported when the adapter module is loaded). Environment: ``UNSLOTH_DISABLE_STATISTICS=1``,
``UNSLOTH_DISABLE_CPU_FALLBACK=1`` (without a GPU Unsloth would silently train on the CPU), ``HF_HUB_OFFLINE=1``
(set by environments.yaml / the runner).
"""

# ruff: noqa: E402, I001
import unsloth  # noqa: F401  (first, on purpose: it patches transformers/TRL/PEFT on import)

import json
import time

from adapters_for_tools import switches
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.unsloth import config as us_config
from adapters_for_tools.unsloth import objectives, trainers
from harness.inputs.data import read_jsonl, write_jsonl


def run(ctx) -> None:
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    sc = ctx.scenario
    if not sc.objective.is_sft:  # dpo, orpo, grpo: the TRL trainers Unsloth patches (objectives.py)
        objectives.run(ctx)
        return
    if sc.hardware.device != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("unavailable: needs CUDA (Unsloth's kernels are GPU-only)")
    if ctx.options.objective_config:
        raise ValueError("the unsloth override objective_config applies to objectives dpo, orpo and grpo; give an "
                         "sft row's entries in sft")
    fmt = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())["format"]
    from transformers import AutoTokenizer

    # the rows Unsloth trains on (us_config.trainer_rows), written once where they differ from the sweep's file
    given = read_jsonl(ctx.dataset_path)
    rows, notes = us_config.trainer_rows(given, fmt, AutoTokenizer.from_pretrained(ctx.checkpoint), sc)
    ctx.extra.update(notes)
    data_file = ctx.dataset_path
    if rows is not given:
        data_file = ctx.work_dir / "unsloth_dataset.jsonl"
        write_jsonl(rows, data_file)
    for setting, why in us_config.cannot_honour(sc):
        ctx.cannot_honour(setting, why)
    cfg = us_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file,
                                  use_gradient_checkpointing=ctx.options.use_gradient_checkpointing, fmt=fmt)
    cfg["sft"].update(ctx.options.sft)
    cfg["environment"] = us_config.row_environment(ctx.options.block_compile)
    us_config.expect_switches(ctx, cfg)
    path = ctx.save_native_config("unsloth.json", json.dumps(cfg, indent=1))
    ctx.extra["rerun"] = rerun_command(f"adapters_for_tools.unsloth.rerun {path}")

    t0 = time.time()
    model, tok = trainers.load_model(cfg)
    ctx.load_s = time.time() - t0
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    args = SFTConfig(**cfg["sft"])
    ctx.save_native_config("sft_config.json", json.dumps(args.to_dict(), indent=1, default=str))
    ctx.native_config = str(path)

    trainer = SFTTrainer(model=model, processing_class=tok, args=args, train_dataset=dataset,
                         # the switch read-back first: it reads before the measurement callback starts the clock
                         callbacks=[switches.read_back_callback(ctx, trainers.read_switches),
                                    *ctx.trainer_callbacks()])
    ctx.meter.attach(trainer.model)
    ctx.train_reading_packed_rows(trainer)
    switches.settle(ctx)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    tok.save_pretrained(str(ctx.output_dir))
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"
