"""The hf hand loop: transformers + PEFT loaded as the hf adapter loads them, trained by a plain loop that does what
the HF Trainer's step does (:mod:`harness.measuring.handloop.trainer_loop` lists each setting).

Loading follows ``adapters_for_tools/hf/adapter.py`` (``build_model``): ``from_pretrained`` with the scenario's
dtype and attention implementation (QLoRA: ``BitsAndBytesConfig`` with the scenario's quant type, double
quantisation and compute dtype, on GPU 0), ``.to("cuda")`` otherwise, PEFT ``LoraConfig`` (rank, alpha, dropout,
targets, DoRA, bias none) through ``get_peft_model``; full fine-tuning makes every weight trainable.
"""

from __future__ import annotations

import importlib

import torch

from harness.measuring.handloop.common import (
    MachineWatch,
    machine,
    read_back_transformers,
    sweep_rows,
    trainer_read_back,
)
from harness.measuring.handloop.knobs import HfKnobs
from harness.measuring.handloop.trainer_loop import collated_steps, enable_checkpointing, train

LIBRARIES = ("torch", "transformers", "peft", "accelerate")
TRAINER_LOOP_MODULE = "adapters_for_tools.hf.handloop"  # the trainer=true knob's loop


def load(sc, checkpoint: str, device: str, knobs: HfKnobs):  # noqa: ANN001, ANN201
    """The model and tokenizer as the hf adapter builds them (``knobs.attn_implementation`` may override)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (transformers)

    kwargs = {"dtype": getattr(torch, sc.model.dtype),
              "attn_implementation": knobs.attn_implementation or sc.model.attn_implementation}
    if sc.method.kind == "qlora":
        from transformers import BitsAndBytesConfig

        q = sc.method.quant
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if device == "cuda" and sc.method.kind != "qlora":
        model.to("cuda")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    if sc.method.is_peft:
        from peft import LoraConfig, get_peft_model  # heavy (peft)

        cfg = LoraConfig(r=sc.method.lora_r, lora_alpha=sc.method.lora_alpha, lora_dropout=sc.method.lora_dropout,
                         target_modules=sc.method.resolved_targets(), use_dora=sc.method.kind == "dora",
                         bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, tok


def run(sc, checkpoint: str, device: str, steps: int, knobs: HfKnobs | None = None) -> dict:  # noqa: ANN001
    """Train the scenario with transformers + PEFT in a plain loop and measure it.

    Args:
        sc: the scenario.
        checkpoint: the directory every framework loads.
        device: ``"cuda"`` or ``"cpu"``.
        steps: optimizer steps (the scenario's unless asked otherwise).
        knobs: the Trainer step's settings (default: the hf adapter's).

    Returns:
        The loop's figures (``tokens_per_s``, ``step_s_median``, peaks, losses) and ``settings`` (read back from
        the live model and optimizer, in the adapters' ``effective`` keys, plus what the loop fed).
    """
    knobs = knobs or HfKnobs()
    torch.manual_seed(sc.train.seed)
    watch = MachineWatch(device)
    model, tok = load(sc, checkpoint, device, knobs)
    rows, data_settings = sweep_rows(sc, tok)

    def read_back(m, opt) -> dict:  # noqa: ANN001
        return read_back_transformers(m, opt, trainer_read_back)

    if knobs.trainer:  # the Trainer enables checkpointing itself, from the adapter's TrainingArguments
        # beside its adapter (the adapter's own TrainingArguments); loaded by name, as the worker loads adapters
        mod = importlib.import_module(TRAINER_LOOP_MODULE)
        log, settings = mod.train_with_trainer(model, tok, sc, device, rows, steps, knobs, read_back)
    else:
        if sc.train.gradient_checkpointing:
            enable_checkpointing(model, knobs)
        log, settings = train(model, sc, device, collated_steps(rows, tok, sc, device, steps), knobs, read_back)
    return log.summary(sc.train.warmup_steps) | watch.finish() | {
        "settings": settings | log.geometry(sc.data.packing) | data_settings | machine(device, LIBRARIES)
        | {"checkpoint": str(checkpoint), "hand_loop_knobs": knobs.to_dict()}}
