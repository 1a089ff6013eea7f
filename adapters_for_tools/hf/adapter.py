"""hf adapter: the scenario as a transformers ``Trainer`` run with PEFT, measured by the common hook.

Settings map one to one: ``TrainingArguments`` (:func:`adapters_for_tools.hf.config.training_args`) gets
micro-batch, accumulation, steps, LR, optimizer, gradient checkpointing (non-reentrant) and precision; PEFT's
``LoraConfig`` gets rank, alpha, dropout, targets and DoRA; QLoRA loads the base through ``BitsAndBytesConfig``
(nf4, double quantisation, bf16 compute). Data is the sweep's dataset tokenised by ``harness.inputs.data`` and fed
in order (sequential sampler). A ``liger: true`` row (``use_liger_kernel``) is read back from the live model at
the first step (:mod:`adapters_for_tools.switches`): no Liger module there marks the run invalid.

Decision: QLoRA does not call ``peft.prepare_model_for_kbit_training`` — it upcasts every non-quantised
weight (norms, embeddings, LM head) to float32, which costs ~2 GB on an 8B model and which no other
framework in the comparison does; the method (4-bit base, bf16 compute, LoRA adapters) is the same.
"""

from __future__ import annotations

import json
import time

from adapters_for_tools import distributed, switches
from adapters_for_tools.hf.config import switches as hf_switches
from adapters_for_tools.hf.config import training_args
from harness.inputs.data import collate, load_tokenised


def build_model(ctx):
    """Load the checkpoint and apply the method: PEFT LoRA/DoRA, QLoRA on a 4-bit base, or full fine-tuning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sc = ctx.scenario
    dtype = getattr(torch, sc.model.dtype)
    kwargs = {"dtype": dtype, "attn_implementation": sc.model.attn_implementation}
    if sc.method.kind == "qlora":
        from transformers import BitsAndBytesConfig

        q = sc.method.quant
        sharded = {"bnb_4bit_quant_storage": getattr(torch, q.compute_dtype)} if distributed.sharded_4bit(sc) else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype), **sharded)
        if not sharded:  # this rank's GPU (the current device: LOCAL_RANK under several); FSDP/ZeRO-3 place shards
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(ctx.checkpoint, **kwargs)
    if sc.hardware.device == "cuda" and sc.method.kind != "qlora":
        model.to("cuda")
    tok = AutoTokenizer.from_pretrained(ctx.checkpoint)
    if sc.method.is_peft:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=sc.method.lora_r, lora_alpha=sc.method.lora_alpha, lora_dropout=sc.method.lora_dropout,
                         target_modules=sc.method.resolved_targets(), use_dora=sc.method.kind == "dora",
                         bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, tok


def run(ctx) -> None:
    from transformers import Trainer, TrainingArguments

    sc = ctx.scenario
    args_kw = training_args(sc, ctx.work_dir, ctx.options)
    if args_kw.get("use_liger_kernel"):
        switches.require_liger("hf")  # before the model loads: an 8B load is minutes lost
    t0 = time.time()
    model, tok = build_model(ctx)
    ctx.load_s = time.time() - t0
    data = load_tokenised(sc, ctx.dataset_path, tok)
    args = TrainingArguments(**args_kw)
    switches.expect(ctx, **hf_switches(args.to_dict()))
    ctx.save_native_config("training_args.json", json.dumps(args.to_dict(), indent=1, default=str))
    ctx.meter.attach(model)

    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(data.rows),
                      data_collator=lambda feats: collate(feats, tok.pad_token_id),
                      # order matters: the switch read-back runs before the measurement callback starts the step
                      # clock, and the measurement callback stops it before a save
                      callbacks=[switches.read_back_callback(ctx, switches.read_trainer_model),
                                 *ctx.trainer_callbacks()])
    trainer.train()
    switches.settle(ctx)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    if distributed.strategy(sc) is None:
        model.save_pretrained(ctx.output_dir)
    else:  # the Trainer gathers FSDP / ZeRO-3 shards and writes from rank 0 only
        trainer.save_model(str(ctx.output_dir))
    if args.should_save:  # rank 0 (the only process of a one-GPU run)
        tok.save_pretrained(ctx.output_dir)
    ctx.extra["saved"] = "peft adapter" if sc.method.is_peft else "hf checkpoint"


class _ListDataset:
    """Pre-tokenised rows as a map-style dataset (fixed order; the Trainer's sampler is sequential)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]
