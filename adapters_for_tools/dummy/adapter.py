"""The template adapter: a plain training loop driving the common hook (see ``__init__`` for overrides)."""

from __future__ import annotations

import os
import time

from harness.inputs.data import collate, load_tokenised
from harness.measuring.effective import read_back_model, read_back_optimizer


def run(ctx) -> None:
    import torch

    from adapters_for_tools.hf.adapter import build_model

    sc, ov = ctx.scenario, ctx.overrides
    if ov.get("crash"):
        os._exit(3)
    if ov.get("raise"):
        raise RuntimeError(ov["raise"])
    if ov.get("oom"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (planted by dummy)")
    t0 = time.time()
    model, tok = build_model(ctx)
    ctx.load_s = time.time() - t0
    if sc.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.train.lr, weight_decay=sc.train.weight_decay)
    rows = load_tokenised(sc, ctx.dataset_path, tok).rows
    mb, ga = sc.train.micro_batch, sc.train.grad_accum
    dev = "cuda" if sc.hardware.device == "cuda" else "cpu"
    i = 0
    for step in range(sc.train.steps):
        batches = []
        for _ in range(ga):
            chunk = [rows[(i + k) % len(rows)] for k in range(mb)]
            i += mb
            batches.append({k: v.to(dev) for k, v in collate(chunk, tok.pad_token_id).items()})
        n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        ctx.meter.step_begin()
        if step == 0:
            ctx.set_effective(**read_back_model(model), **read_back_optimizer(opt))
        total = 0.0
        for b in batches:
            ctx.meter.count_batch(b)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits = out.logits[:, :-1].float()
            tgt = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / n_loss
            loss.backward()
            total += float(loss)
        if sc.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, sc.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ov.get("sleep_s"):
            time.sleep(float(ov["sleep_s"]))
        ctx.meter.step_end(total * float(ov.get("loss_scale", 1.0)))
        ctx.save_intermediate(model, step + 1)  # after step_end: saving is not step time
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ctx.output_dir)
