"""A careful hand-written training loop, to check the harness's own numbers: ``python -m harness.measuring.selfcheck``.

It shares nothing with the measurement code (no StepMeter, no Trainer, no harness data loader): it loads
the same checkpoint with transformers + PEFT at the scenario's settings, trains with a plain loop under
bf16 autocast (what the HF Trainer does with ``bf16=True``), times steps with CUDA events, counts tokens
from the tensors it feeds, and reads torch's peak memory. If its tokens/s or peak memory disagree with
the hf adapter's stored result at the same settings, either the measurement or the settings are wrong.

    python -m harness.measuring.selfcheck scenarios/llama8b_lora.yaml --out selfcheck.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness.inputs import data, models
from harness.spec.scenario import load_scenario


def run(scenario_path: str, steps: int | None = None, variants: tuple[str, ...] = ("plain",)) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    sc = load_scenario(scenario_path)
    ckpt = str(models.resolve_checkpoint(sc.model, device=sc.hardware.device))
    dev = "cuda" if sc.hardware.device == "cuda" else "cpu"
    dtype = getattr(torch, sc.model.dtype)
    kw = {"dtype": dtype, "attn_implementation": sc.model.attn_implementation}
    if sc.method.kind == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=sc.method.quant.double_quant,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
    if dev == "cuda" and sc.method.kind != "qlora":
        model.to(dev)
    tok = AutoTokenizer.from_pretrained(ckpt)
    if sc.method.is_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=sc.method.lora_r, lora_alpha=sc.method.lora_alpha,
                                                 lora_dropout=sc.method.lora_dropout, use_dora=sc.method.kind == "dora",
                                                 target_modules=sc.method.resolved_targets(), task_type="CAUSAL_LM"))
    if sc.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where checkpointing would silently be skipped
    params = [p for p in model.parameters() if p.requires_grad]
    # the same text the sweep feeds, tokenised here directly
    rows = [data.tokenize_example(tok, r, "text", sc.data.seq_len) for r in data.synthetic_examples(sc)]
    results = {}
    for variant in variants:
        results[variant] = _train(model, params, rows, sc, dev, steps or sc.train.steps, variant)
    return {"scenario": sc.name, "trainable_params": sum(p.numel() for p in params), "variants": results}


def _train(model, params, rows, sc, dev: str, n_steps: int, variant: str) -> dict:
    """One timed training run. Variant words: ``mask`` (pass an all-ones attention_mask, as collators do),
    ``nofused`` (AdamW without the fused kernel, as the HF Trainer's adamw_torch)."""
    import torch

    opt = torch.optim.AdamW(params, lr=sc.train.lr, weight_decay=sc.train.weight_decay,
                            fused=dev == "cuda" and "nofused" not in variant)
    mb, ga = sc.train.micro_batch, sc.train.grad_accum
    times, tokens = [], []
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    i = 0
    for _ in range(n_steps):
        batches = []
        for _ in range(ga):
            chunk = [rows[(i + k) % len(rows)] for k in range(mb)]
            i += mb
            batches.append(torch.tensor([r["input_ids"] for r in chunk], device=dev))  # fixed lengths: no padding
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for ids in batches:
            mask = torch.ones_like(ids) if "mask" in variant else None
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=sc.model.dtype == "bfloat16"):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss / ga
            loss.backward()
        if sc.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, sc.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            times.append(time.perf_counter() - t0)
        tokens.append(sum(int(b.numel()) for b in batches))
    measured = slice(sc.train.warmup_steps, None)
    secs = sum(times[measured])
    out = {"steps": n_steps, "warmup_steps": sc.train.warmup_steps,
           "tokens_per_s": sum(tokens[measured]) / secs, "step_s_median": statistics.median(times[measured]),
           "final_loss": float(loss.detach()) * ga}
    if dev == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 1024**3
        out["gpu_name"] = torch.cuda.get_device_name(0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.measuring.selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario")
    p.add_argument("--steps", type=int)
    p.add_argument("--variants", default="plain", help="comma-separated: plain, mask, nofused, mask+nofused")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(a.scenario, a.steps, tuple(a.variants.split(",")))
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
