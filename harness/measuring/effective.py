"""Effective settings: what a run actually trained with, read back from the live model and trainer.

Every adapter records these (``ctx.set_effective``); :func:`check` compares them with what the scenario
asked for and the run is marked invalid, with the differences, when they disagree. Example trap this
catches: ``from_pretrained`` returns a model in eval mode, and transformers then silently skips gradient
checkpointing — memory halves... the wrong way round, and the step gets faster.

Keys (all optional; a key an adapter cannot read is left out and not checked):

=========================  =========================================================================
train_mode                 model.training at the first optimizer step
gradient_checkpointing     checkpointing active at the first step (model flag or checkpointed layers)
dtype                      dtype of the frozen base weights (quantised ones: their compute dtype)
quantization               None | "nf4" | "fp4" (4-bit base layers found)
double_quant               bool, for 4-bit
lora_r / lora_alpha / lora_dropout / use_dora   from the live adapter config
target_modules             sorted leaf names of the modules that carry an adapter
trainable_params           parameters with requires_grad
total_params               all parameters (packed 4-bit weights counted as stored)
micro_batch                rows per forward seen by the hook (max)
grad_accum                 micro-batches per optimizer step seen by the hook
seq_len                    widest row seen
optimizer                  normalised optimizer name
lr                         learning rate the optimizer started with
memory_budget_gib          the memory budget the worker applied (harness.measuring.memcap); only with a budget
world_size / strategy      processes of a multi-GPU run and how the tool spread it (ddp, fsdp, zero3), read back on
                           every rank (harness.running.ranks); only with hardware.strategy
objective, beta, ...       a preference / RL objective's settings from the live trainer (``objective`` the kind,
                           ``reference`` resolved: copy | adapter_disabled | ref_adapter_untrained (a frozen copy
                           of the untrained adapter: the base model, as disabled adapters give; checked as
                           adapter_disabled) | ref_adapter | precomputed | none; the keys of
                           ``harness.spec.objective.ObjectiveSpec.expected``); only for an objective other than sft
=========================  =========================================================================
"""

from __future__ import annotations

from typing import Any

OPTIMIZER_NAMES = {
    "adamw": "adamw_torch", "adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused",
    "adamw8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit", "sgd": "sgd",
}


# (key, value read back) -> the scenario's value it is: another way to the same setting
SAME_SETTING: dict[tuple[str, str], str] = {("reference", "ref_adapter_untrained"): "adapter_disabled"}


def same_setting(key: str, got: Any) -> Any:
    """``got`` in the scenario's terms (:data:`SAME_SETTING`); other values unchanged."""
    return SAME_SETTING.get((key, got), got) if isinstance(got, str) else got


def expected(sc) -> dict[str, Any]:
    """What the scenario asks for, in the same keys."""
    exp: dict[str, Any] = {
        "train_mode": True,
        "gradient_checkpointing": sc.train.gradient_checkpointing,
        "dtype": sc.model.dtype,
        "quantization": sc.method.quant.quant_type if sc.method.kind == "qlora" else None,
        "micro_batch": sc.train.micro_batch,
        "grad_accum": sc.train.grad_accum,
        "optimizer": sc.train.optimizer,
        "lr": sc.train.lr,
    }
    if sc.method.kind == "qlora":
        exp["double_quant"] = sc.method.quant.double_quant
    if sc.method.is_peft:
        exp.update({"lora_r": sc.method.lora_r, "lora_alpha": sc.method.lora_alpha,
                    "lora_dropout": sc.method.lora_dropout, "use_dora": sc.method.kind == "dora",
                    "target_modules": sorted(sc.method.resolved_targets())})
    if not sc.data.packing:
        exp["seq_len_max"] = sc.data.seq_len
    if sc.hardware.memory_budget_gib is not None:
        exp["memory_budget_gib"] = sc.hardware.memory_budget_gib
    if sc.hardware.strategy is not None:
        exp["world_size"] = sc.hardware.gpus
        exp["strategy"] = sc.hardware.strategy
    exp.update(sc.objective.expected(sc.method.is_peft))  # preference / RL settings (none for sft)
    return exp


def check(sc, effective: dict[str, Any]) -> list[str]:
    """Differences between effective settings and the scenario, as readable strings (empty = valid)."""
    exp = expected(sc)
    out = []
    for key, want in exp.items():
        if key == "seq_len_max":
            got = effective.get("seq_len")
            if got is not None and got > want:
                out.append(f"seq_len: rows of {got} tokens, scenario allows {want}")
            continue
        if key not in effective:
            continue
        got = same_setting(key, effective[key])
        if key == "optimizer" and got is not None:
            got = OPTIMIZER_NAMES.get(str(got).lower(), got)
            if {got, want} <= {"adamw_torch", "adamw_torch_fused"}:
                continue  # same algorithm; fused only changes the kernel
        if isinstance(want, float) and isinstance(got, (int, float)):
            if abs(got - want) > 1e-9 * max(1.0, abs(want)):
                out.append(f"{key}: ran with {got}, scenario says {want}")
        elif got != want:
            out.append(f"{key}: ran with {got!r}, scenario says {want!r}")
    return out


def cut_shorter(effective: dict[str, Any], widest: int | None) -> list[str]:
    """A run whose widest row is well short of the widest row the steps read (``dataset.meta.json``'s
    ``widest_row_tokens``, cut at the scenario's ``seq_len``): the tool cut its rows at another length (a
    ``max_length`` of its own, a default), so it trained another job. Within 10 % and 2 tokens it passes (tools
    tokenise the same text themselves and may differ by a <bos> or <eos>).

    Returns:
        The reason (empty when it trained rows as wide, or either figure is unknown).
    """
    got = effective.get("seq_len")
    if widest is None or got is None or got >= 0.9 * widest - 2:
        return []
    return [f"seq_len: its widest row had {got} tokens, the rows the steps read reach {widest} within the "
            "scenario's seq_len: it cut them shorter"]


def from_meter(meter, packing: bool = False) -> dict[str, Any]:
    """Batch geometry the measurement hook saw during training.

    Without packing the scenario's micro-batch counts samples and its seq_len bounds each sample, so a tool
    that joins a micro-batch's samples into one padding-free row (Unsloth does by default; position_ids
    keep attention within samples) is read in samples. With packing, micro-batch counts rows of seq_len.
    """
    steps = meter.steps
    if not steps:
        return {}
    rows = max(s.get("rows", 0) for s in steps)
    samples = max(s.get("samples_per_mb", 0) for s in steps)
    out = {"micro_batch": rows if packing else samples,
           "grad_accum": max(s["micro_batches"] for s in steps),
           "seq_len": max(s["max_len"] if packing else s.get("max_sample_len", s["max_len"]) for s in steps),
           "tokens_per_step": sum(s["tokens"] for s in steps) / len(steps)}
    if not packing and rows < samples:
        out["padding_free_rows"] = True
    return out


def read_back_model(model) -> dict[str, Any]:
    """Read method settings from a live transformers/PEFT model (works for any HF-based tool)."""
    import torch

    eff: dict[str, Any] = {"train_mode": bool(model.training)}
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            try:
                base = base.get_base_model()
            except Exception:
                pass
    gc = getattr(base, "is_gradient_checkpointing", None)
    if gc is None:
        gc = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    # transformers skips checkpointing in eval mode: train_mode (checked too) catches that trap
    eff["gradient_checkpointing"] = bool(gc)
    quant, dq, dtypes = None, None, {}
    lora_targets = set()
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        weight_cls = type(getattr(mod, "weight", None)).__name__
        if cls == "Linear4bit" or weight_cls == "Params4bit":
            qs = getattr(mod.weight, "quant_state", None)
            quant = getattr(qs, "quant_type", None) or getattr(mod.weight, "quant_type", None) or "4bit"
            if qs is not None:
                dq = bool(getattr(qs, "nested", False))
        if hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict) and len(mod.lora_A):
            lora_targets.add(name.rsplit(".", 1)[-1])
    for p in model.parameters():
        if not p.requires_grad and p.dtype.is_floating_point:
            dtypes[p.dtype] = dtypes.get(p.dtype, 0) + p.numel()
    if dtypes:
        eff["dtype"] = str(max(dtypes, key=dtypes.get)).removeprefix("torch.")
    eff["quantization"] = quant
    if quant is not None:
        eff["double_quant"] = dq
        cd = _compute_dtype(model)
        if cd:
            eff["dtype"] = cd
    eff["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eff["total_params"] = sum(p.numel() for p in model.parameters())
    peft_cfg = getattr(model, "peft_config", None)
    if peft_cfg:
        cfg = next(iter(peft_cfg.values()))
        eff.update({"lora_r": cfg.r, "lora_alpha": float(cfg.lora_alpha), "lora_dropout": float(cfg.lora_dropout),
                    "use_dora": bool(getattr(cfg, "use_dora", False)), "target_modules": sorted(lora_targets)})
    return eff


def _compute_dtype(model) -> str | None:
    for mod in model.modules():
        cd = getattr(mod, "compute_dtype", None)
        if cd is not None:
            return str(cd).removeprefix("torch.")
    return None


def read_back_optimizer(optimizer) -> dict[str, Any]:
    if optimizer is None:
        return {}
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    name = type(opt).__name__.lower()
    fused = bool(opt.defaults.get("fused")) if hasattr(opt, "defaults") else False
    if name == "adamw":
        name = "adamw_torch_fused" if fused else "adamw_torch"
    elif "8bit" in name:
        name = "adamw_8bit"
    lr = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"]) if opt.param_groups else None
    if hasattr(lr, "item"):  # a device tensor (capturable optimizers for CUDA graphs)
        lr = float(lr)
    return {"optimizer": name, "lr": lr}
