"""The HF Trainer's optimizer step as a plain loop, each of its settings a named knob (:class:`HfKnobs`).

What ``transformers.Trainer.train`` (5.17) does to a PEFT model at the hf adapter's ``TrainingArguments``
(``adapters_for_tools/hf/config.py``), and what this loop does in its place:

- gradient checkpointing: ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
  False})`` inside ``train()``; for a model whose main input is ``input_ids`` transformers then also calls
  ``enable_input_require_grads`` (a forward hook that makes the embedding output require grad);
- ``model.train()`` before each step (``from_pretrained`` returns eval mode, where checkpointing is skipped);
- data: the harness's ``collate`` (``input_ids``, ``attention_mask`` of ones on real tokens, ``labels``, and
  ``position_ids`` for packed rows) from a sequential ``DataLoader``, ``grad_accum`` batches fetched and copied
  to the device before the step begins, each fed whole (``model(**batch)``);
- loss: ``model(**batch, num_items_in_batch=n)`` with ``n`` the loss tokens of the whole step, so each micro-batch
  loss is its token-loss sum over ``n``; forward under autocast in the training dtype (``bf16=True``: accelerate
  wraps the forward in ``torch.autocast``, and its ``convert_outputs_to_fp32`` casts the forward's bf16/fp16
  outputs, the logits among them, to float32); backward outside it, once every output but the loss is dropped;
- the Trainer's bookkeeping around each micro-batch: ``model.train()`` in ``training_step``, the NaN/Inf check of
  the micro-batch's loss (``logging_nan_inf_filter``, on by default: a device synchronisation once its backward is
  queued) and ``floating_point_ops`` (stock: ``6 * tokens * model.num_parameters(exclude_embeddings=True)``, a walk
  over every module and parameter; Unsloth's trainer caches the count and turns the check off, and its loop takes
  both from its trainer). After the check the GPU is idle, so this host work adds to the step's time;
- clipping ``model.parameters()`` (walked afresh each step) to ``max_grad_norm``; the optimizer the scenario names
  (``adamw_torch_fused``: ``torch.optim.AdamW(fused=True)``; ``adamw_torch``: torch's default implementation for
  the device) over the Trainer's two parameter groups; the scheduler from ``transformers.get_scheduler`` with no
  warmup; then ``zero_grad`` (set to None).

Each knob's default is what the Trainer does; setting one (``--set attention_mask=false``) runs the loop with that
one setting changed, which is how a difference from the harness is bisected setting by setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from harness.inputs import data
from harness.measuring.handloop.common import TIMING, StepClock, StepLog, trainer_steps
from harness.measuring.handloop.knobs import HfKnobs

# transformers' Trainer.get_decay_parameter_names: no weight decay for these names (nor inside nn.LayerNorm)
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def enable_checkpointing(model, knobs: HfKnobs) -> None:  # noqa: ANN001
    """Gradient checkpointing as ``Trainer.train`` enables it (the knobs say which way)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": knobs.use_reentrant})
    if not knobs.input_require_grads:
        model.disable_input_require_grads()


def make_optimizer(model, optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:  # noqa: ANN001
    """The optimizer the Trainer builds for ``TrainingArguments.optim`` (the scenario's name mapped by
    ``adapters_for_tools.contract.HF_OPTIM``), over its two parameter groups."""
    from transformers.trainer_pt_utils import get_parameter_names  # heavy; and Unsloth must patch it first

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # optional (QLoRA environments carry it)

        return bnb.optim.AdamW(groups, lr=lr, optim_bits=8, is_paged=False)
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        # adamw_torch passes no implementation flag: torch picks foreach on CUDA, the per-tensor loop on a CPU
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if optimizer == "adamw_torch_fused" else {}))
    raise ValueError(f"optimizer {optimizer!r}: the hand loop has adamw_torch, adamw_torch_fused, adamw_8bit, sgd")


def stock_flos(model) -> Callable[[dict], float] | None:  # noqa: ANN001
    """``Trainer.floating_point_ops`` as transformers 5.17 runs it for ``model`` (None: the model has no
    ``num_parameters``, and the Trainer counts 0)."""
    if not hasattr(model, "num_parameters"):
        return None
    name = getattr(model, "main_input_name", "input_ids")

    def flos(inputs: dict) -> float:
        if name not in inputs:
            return 0.0
        return float(6 * inputs[name].numel() * model.num_parameters(exclude_embeddings=True))

    return flos


def _outputs_to_fp32(out) -> dict[str, Any]:  # noqa: ANN001
    """accelerate's ``convert_to_fp32`` of a forward's outputs: every bf16/fp16 tensor cast to float32."""
    half = (torch.bfloat16, torch.float16)
    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in half else v for k, v in out.items()}


def collated_steps(rows: list[dict], tokenizer, sc, device: str, steps: int) -> Iterator[list[dict]]:  # noqa: ANN001
    """The micro-batches of each step from the sweep's tokenised rows
    (:func:`~harness.measuring.handloop.common.sweep_rows`) through the harness's collate, as the HF Trainer reads
    them (:func:`~harness.measuring.handloop.common.trainer_steps`)."""

    def collate(feats: list[dict]) -> dict:
        return data.collate(feats, tokenizer.pad_token_id)

    return trainer_steps(rows, sc.train.micro_batch, sc.train.grad_accum, steps, collate, device == "cuda")


def train(model, sc, device: str, feed: Iterable[list[dict]], knobs: HfKnobs,  # noqa: ANN001
          read_back: Callable[[Any, Any], dict[str, Any]],
          flos: Callable[[dict], float] | None = None) -> tuple[StepLog, dict[str, Any]]:
    """Train ``model`` (checkpointing already enabled) on ``feed``, one HF Trainer step per item.

    Args:
        model: the live transformers/PEFT model on its device.
        sc: the scenario.
        device: ``"cuda"`` or ``"cpu"``.
        feed: each optimizer step's micro-batches (:func:`collated_steps`, or a tool's own data loader through
            :func:`~harness.measuring.handloop.common.loader_steps`), on the host or already on the device.
        knobs: the step's settings.
        read_back: ``read_back(model, optimizer)``: the settings the loop runs with, read after it is set up.
        flos: the trainer's ``floating_point_ops(inputs)``, called per micro-batch when ``knobs.count_flos``
            (default: :func:`stock_flos` of ``model``).

    Returns:
        ``(log, settings)``: each step's time, tokens and loss; the settings read back plus what the loop feeds.
    """
    from transformers import get_scheduler  # heavy; and Unsloth must patch transformers before it is imported

    t = sc.train
    opt = make_optimizer(model, knobs.optimizer or t.optimizer, t.lr, t.weight_decay)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=0, num_training_steps=t.steps)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(sc.model.dtype)
    use_amp = knobs.autocast and amp_dtype is not None
    scaler = torch.amp.GradScaler(device) if use_amp and amp_dtype == torch.float16 else None
    params = list(model.parameters())  # the Trainer clips model.parameters(); frozen ones have no grad
    flos = (flos or stock_flos(model)) if knobs.count_flos else None
    model.train()
    settings = read_back(model, opt) | {
        "attention_mask_fed": knobs.attention_mask,
        "loss_normalisation": ("token-loss sum / loss tokens of the step (num_items_in_batch)"
                               if knobs.num_items_in_batch else "micro-batch mean / grad_accum"),
        "autocast": str(amp_dtype).removeprefix("torch.") if use_amp else None,
        "logging_nan_inf_filter": knobs.nan_inf_filter, "timing": TIMING}
    log, clock = StepLog(), StepClock(device)
    for host_batches in feed:
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in host_batches]
        # the Trainer counts the step's loss tokens on the device tensors before the step begins (no sync)
        n_items = sum((b["labels"][..., 1:] != data.IGNORE_INDEX).sum() for b in batches)
        clock.begin()
        total = torch.zeros((), device=device)
        for b in batches:
            # the whole collated batch, as the Trainer's model(**inputs): position_ids too when rows are packed
            if knobs.train_each_step:
                model.train()
            inputs = {k: v for k, v in b.items() if knobs.attention_mask or k != "attention_mask"}
            kwargs = {"num_items_in_batch": n_items} if knobs.num_items_in_batch else {}
            amp = torch.autocast(device, dtype=amp_dtype) if use_amp else contextlib.nullcontext()
            with amp:
                out = model(**inputs, **kwargs)
            if use_amp and knobs.outputs_to_fp32:
                out = _outputs_to_fp32(out)
            loss = out["loss"]
            del out  # compute_loss hands back the loss alone: the logits are freed before backward
            if not knobs.num_items_in_batch:
                loss = loss / len(batches)
            (scaler.scale(loss) if scaler else loss).backward()
            loss = loss.detach()
            if knobs.nan_inf_filter and bool(torch.isnan(loss) or torch.isinf(loss)):
                total += total / (1 + len(log.step_s))  # the Trainer's stand-in for a NaN/Inf micro-batch
            else:
                total += loss
            if flos is not None:
                flos(inputs)  # the Trainer's per-micro-batch count: its host work is what the step pays
        if scaler:
            scaler.unscale_(opt)
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters() if knobs.clip_walks_parameters else params,
                                           t.max_grad_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
        step_s = clock.end()
        log.add(step_s, host_batches, float(total))
    return log, settings
