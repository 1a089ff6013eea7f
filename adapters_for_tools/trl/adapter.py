"""trl adapter: the scenario as TRL's SFT script configuration, run in-process with the common hook (the other
objectives: :mod:`adapters_for_tools.trl.objectives`).

Flow: :func:`adapters_for_tools.trl.config.native_config` -> ``trl_sft.yaml`` (saved; rerun with TRL alone:
``python -m trl.scripts.sft --config trl_sft.yaml``) -> parsed back with TRL's own ``TrlParser`` into
``ScriptArguments``/``SFTConfig``/``ModelConfig``/``DatasetMixtureConfig`` -> the same steps as TRL's
``trl/scripts/sft.py`` (``get_dataset``, ``get_peft_config``, ``get_quantization_config``, ``SFTTrainer``),
with our ``TrainerCallback`` added and the counting hook attached to the model the trainer built.

Differences from the hf adapter, on purpose (TRL's own behaviour is what is measured): TRL tokenises the
text itself (same ids, see config.py; conversations with several assistant turns, which its prompt/completion
form cannot hold, come pre-tokenised by the harness), builds the PEFT model itself, and with ``packing`` packs
best-fit-decreasing (samples grouped differently from the harness's first-fit order; recorded in extra).
"""

from __future__ import annotations

import json
import time

import yaml

from adapters_for_tools import distributed, switches
from adapters_for_tools.contract import rerun_command
from adapters_for_tools.trl import config as trl_config
from adapters_for_tools.trl import objectives
from harness.inputs.data import read_jsonl, write_jsonl


def run(ctx) -> None:
    from trl import (
        DatasetMixtureConfig,
        ModelConfig,
        ScriptArguments,
        SFTConfig,
        SFTTrainer,
        TrlParser,
        get_dataset,
        get_peft_config,
        get_quantization_config,
    )

    sc = ctx.scenario
    if not sc.objective.is_sft:  # dpo, orpo, kto, grpo: TRL's other trainers (objectives.py)
        objectives.run(ctx)
        return
    if ctx.options.objective_config:
        raise ValueError("the trl override objective_config applies to objectives dpo, orpo, kto and grpo; give an "
                         "sft row's entries in sft")
    meta = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())
    fmt = meta["format"]
    data_file = ctx.dataset_path
    if fmt != "text":
        from transformers import AutoTokenizer

        rows, notes = trl_config.convert_rows(read_jsonl(ctx.dataset_path), fmt,
                                              AutoTokenizer.from_pretrained(ctx.checkpoint), sc.data.seq_len,
                                              sc.data.prompt_loss)
        data_file = ctx.work_dir / "trl_dataset.jsonl"
        write_jsonl(rows, data_file)
        if notes:
            ctx.extra["differences"] = notes
    for setting, why in trl_config.cannot_honour(sc):
        ctx.cannot_honour(setting, why)
    cfg = trl_config.native_config(sc, ctx.work_dir, ctx.checkpoint, data_file, fmt, liger=ctx.options.liger)
    cfg.update(ctx.options.sft)
    switches.expect(ctx, **trl_config.switches(cfg))
    if cfg["use_liger_kernel"]:
        switches.require_liger("trl")
    cfg_path = ctx.save_native_config("trl_sft.yaml", yaml.safe_dump(cfg, sort_keys=False))
    ctx.extra["rerun"] = rerun_command(f"trl.scripts.sft --config {cfg_path}")
    if sc.data.packing:
        ctx.extra["packing"] = "TRL best-fit-decreasing packing (samples whole, position_ids per sample)"

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, args, model_args, dataset_args = parser.parse_dict(cfg, allow_extra_keys=False)
    ctx.save_native_config("sft_config.json", json.dumps(args.to_dict(), indent=1, default=str))
    ctx.native_config = str(cfg_path)  # the YAML is what reruns; sft_config.json is the resolved SFTConfig

    # as trl/scripts/sft.py does
    args.model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}
    quant = get_quantization_config(model_args)
    if quant is not None and not distributed.sharded_4bit(sc):  # FSDP / ZeRO-3 place the 4-bit shards themselves
        import torch  # heavy: the worker's environment only

        args.model_init_kwargs["device_map"] = {"": torch.cuda.current_device()}  # this rank's GPU (LOCAL_RANK)
    dataset = get_dataset(dataset_args)
    t0 = time.time()
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=args,
                         train_dataset=dataset[script_args.dataset_train_split],
                         quantization_config=quant, peft_config=get_peft_config(model_args),
                         # the switch read-back first: it reads before the measurement callback starts the clock
                         callbacks=[switches.read_back_callback(ctx, switches.read_trainer_model),
                                    *ctx.trainer_callbacks()])
    ctx.load_s = time.time() - t0  # model load + TRL's tokenisation (both before the first step)
    ctx.meter.attach(trainer.model)
    ctx.train_reading_packed_rows(trainer)
    ctx.set_effective(**switches.read_activation_offloading(trainer))
    switches.settle(ctx)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    if args.should_save:  # rank 0 (the only process of a one-GPU run)
        trainer.processing_class.save_pretrained(str(ctx.output_dir))
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"

