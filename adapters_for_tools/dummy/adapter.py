"""The template adapter: a plain training loop driving the common hook (``__init__`` declares its overrides)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from adapters_for_tools.dummy import DummyOverrides
from harness.inputs.data import collate, load_tokenised
from harness.measuring.effective import read_back_model, read_back_optimizer


def load_model(ctx):  # noqa: ANN001, ANN201
    """The checkpoint with the scenario's method applied: PEFT LoRA/DoRA, or every weight trainable (full)."""
    import torch  # heavy: the worker's environment only
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sc = ctx.scenario
    model = AutoModelForCausalLM.from_pretrained(ctx.checkpoint, dtype=getattr(torch, sc.model.dtype),
                                                 attn_implementation=sc.model.attn_implementation)
    if sc.hardware.device == "cuda":
        model.to("cuda")
    tok = AutoTokenizer.from_pretrained(ctx.checkpoint)
    if sc.method.is_peft:
        from peft import LoraConfig, get_peft_model

        m = sc.method
        cfg = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                         target_modules=m.resolved_targets(), use_dora=m.kind == "dora", bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, tok


def _simulate_memory(ctx, torch) -> None:  # noqa: ANN001
    """Raise out of memory when the simulated need is above the budget (known from the shapes, so before loading)."""
    sc, ov = ctx.scenario, ctx.options
    if ov.sim_gib_per_token is None:
        return
    need = _simulated_need(sc, ov, ov.sim_gib_per_token)
    ctx.extra["simulated_peak_gib"] = need
    budget = sc.hardware.memory_budget_gib
    if budget is not None and need > budget:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by dummy): needs {need:g} GiB, "
                                     f"budget {budget:g} GiB")


def run(ctx) -> None:  # noqa: ANN001
    import torch  # heavy: the worker's environment only

    sc, ov = ctx.scenario, ctx.options
    if ov.crash:
        os._exit(3)
    if ov.raise_:
        raise RuntimeError(ov.raise_)
    if ov.oom:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (planted by dummy)")
    _simulate_memory(ctx, torch)
    # the trainer's imports (seconds) after the simulated faults: a frontier's probes that run out of memory end sooner
    from transformers import get_scheduler

    from harness.measuring.handloop.trainer_loop import make_optimizer  # imports torch: the worker only
    t0 = time.time()
    model, tok = load_model(ctx)
    ctx.load_s = time.time() - t0
    if sc.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the scenario's optimizer and schedule, built as the HF Trainer builds them
    opt = make_optimizer(model, sc.train.optimizer, sc.train.lr, sc.train.weight_decay)
    sched = get_scheduler(sc.train.lr_scheduler, opt, num_warmup_steps=0, num_training_steps=sc.train.steps)
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
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ov.sleep_s:
            time.sleep(ov.sleep_s)
        ctx.meter.step_end(total * ov.loss_scale)
        ctx.save_intermediate(model, step + 1)  # after step_end: saving is not step time
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ctx.output_dir)
    if ov.leave_child_s:  # a tool's helper process that outlives the run (its pid in extra, for the test)
        helper = [sys.executable, "-c", f"import time; time.sleep({ov.leave_child_s})"]
        ctx.extra["left_child_pid"] = subprocess.Popen(helper).pid


def predicts_fit(sc, overrides: dict) -> bool | None:  # noqa: ANN001
    """A planning row's own prediction of its simulated need against the scenario's budget (None: not a planning
    row, or no simulated memory)."""
    ov = DummyOverrides.model_validate(overrides)
    if not ov.sim_plan or ov.sim_gib_per_token is None or sc.hardware.memory_budget_gib is None:
        return None
    return _simulated_need(sc, ov, ov.sim_predicted_gib_per_token or ov.sim_gib_per_token) \
        <= sc.hardware.memory_budget_gib


def _simulated_need(sc, ov: DummyOverrides, gib_per_token: float) -> float:  # noqa: ANN001
    return ov.sim_base_gib + gib_per_token * sc.train.micro_batch * sc.data.seq_len
