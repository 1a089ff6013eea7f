"""The tunebench hand loop: the trainer library (``kernels.trainer``) called directly, its step timed by hand.

:func:`trainer_config` writes down the settings the tunebench adapter builds for a scenario row without overrides
(``adapters_for_tools/tunebench/adapter.py``, ``trainer_config``; the tests hold the two equal): the method with the
knobs' defaults, the loop, the compute dtype and the device. The loop then uses the library's own parts, as a
script would: ``load_model``, ``make_optimizer`` / ``make_scheduler``, the Trainer's row order
(``batches.step_rows``) and padding (``batches.collate``), and ``optimizer_step`` (forwards, backwards, clipping,
optimizer). What it leaves out is the adapter and the harness around it: worker, ``StepMeter``, the meter's token
counting, progress file and read-back callbacks.
"""

from __future__ import annotations

import dataclasses

import torch

from harness.measuring.effective import read_back_optimizer
from harness.measuring.handloop.common import (
    TIMING,
    MachineWatch,
    StepClock,
    StepLog,
    machine,
    sweep_rows,
)
from kernels.trainer.batches import collate, step_rows
from kernels.trainer.config import MethodOptions, TrainerConfig, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.train import make_optimizer, make_scheduler, optimizer_step

LIBRARIES = ("torch", "triton", "transformers")


def trainer_config(sc, pad_id: int) -> TrainerConfig:  # noqa: ANN001
    """The trainer's settings for scenario ``sc`` with every knob at its default (the adapter's mapping)."""
    m, t = sc.method, sc.train
    method = MethodOptions(kind=m.kind, lora_r=m.lora_r, lora_alpha=float(m.lora_alpha),
                           lora_dropout=float(m.lora_dropout), target_modules=tuple(m.resolved_targets()),
                           double_quant=bool(m.quant.double_quant) if m.quant else True, lora_dtype=torch.float32,
                           gradient_checkpointing=t.gradient_checkpointing)
    loop = TrainSettings(micro_batch=t.micro_batch, grad_accum=t.grad_accum, steps=t.steps, lr=t.lr,
                         lr_scheduler=t.lr_scheduler, optimizer=t.optimizer, weight_decay=t.weight_decay,
                         max_grad_norm=t.max_grad_norm, pad_id=pad_id)
    dtype = getattr(torch, m.quant.compute_dtype if m.kind == "qlora" else sc.model.dtype)
    return TrainerConfig(method=method, train=loop, dtype=dtype,
                         device=torch.device("cuda" if sc.hardware.device == "cuda" else "cpu"))


def run(sc, checkpoint: str, device: str, steps: int) -> dict:  # noqa: ANN001
    """Train the scenario with the trainer library in a hand-timed loop.

    Args:
        sc: the scenario.
        checkpoint: the directory every framework loads.
        device: ``"cuda"`` or ``"cpu"``.
        steps: optimizer steps (the scenario's unless asked otherwise).

    Returns:
        The loop's figures and ``settings`` (the model's ``effective_settings`` and the optimizer read back, as
        the adapter records them, plus the trainer settings and what the loop fed).
    """
    from transformers import AutoTokenizer  # heavy (transformers): the tokenizer every framework uses

    torch.manual_seed(sc.train.seed)
    watch = MachineWatch(device)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    cfg = trainer_config(sc, tok.pad_token_id)
    s = dataclasses.replace(cfg.train, steps=steps) if steps != cfg.train.steps else cfg.train
    model = load_model(checkpoint, cfg.method, dtype=cfg.dtype, device=cfg.device)
    rows, data_settings = sweep_rows(sc, tok)
    opt = make_optimizer(model, s)
    sched = make_scheduler(opt, s)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    params = [p for p in model.parameters() if id(p) in in_opt]  # clipped in the model's order, as train() does
    model.train()
    settings = model.effective_settings() | read_back_optimizer(opt) | {
        "trainer": cfg.to_dict(), "loss_normalisation": "token-loss sum / loss tokens of the step",
        "timing": TIMING}
    log, clock = StepLog(), StepClock(device)
    for step in range(s.steps):
        host_batches = [collate([rows[i] for i in idx], s.pad_id) for idx in step_rows(len(rows), s, step)]
        n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in host_batches)  # on the host: no sync
        batches = [{k: v.to(device) for k, v in b.items()} for b in host_batches]
        clock.begin()
        total = optimizer_step(model, batches, max(n_loss, 1), params, s, opt)
        opt.zero_grad(set_to_none=True)
        sched.step()
        step_s = clock.end()
        log.add(step_s, host_batches, float(total))
    return log.summary(sc.train.warmup_steps) | watch.finish() | {
        "settings": settings | log.geometry(sc.data.packing) | data_settings | machine(device, LIBRARIES)
        | {"checkpoint": str(checkpoint)}}
