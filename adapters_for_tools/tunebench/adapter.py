"""tunebench adapter: the scenario trained by ``kernels.trainer`` (our model, loop and fused ops).

The trainer is a library with its own settings (:class:`kernels.trainer.config.TrainerConfig`); this adapter
translates the scenario into them. Mapping: ``model.dtype`` is the storage dtype of the frozen base (bf16 on GPU);
``method`` plus the override knobs become :class:`kernels.trainer.config.MethodOptions` (LoRA/DoRA with PEFT's
init and scale, QLoRA as NF4 base weights with ``quant.compute_dtype`` compute, full = every weight trainable);
``train`` becomes :class:`kernels.trainer.config.TrainSettings` and drives :func:`kernels.trainer.train.train`
(the hf baseline's data order, loss normalisation, AdamW parameter groups and implementation, and clipping).
Data is tokenised by ``harness.inputs.data.load_tokenised``, as for hf; the trainer pads its micro-batches itself
(:mod:`kernels.trainer.batches`, the same tensors as the harness's ``collate``).

Devices: on CUDA the ops launch their Triton kernels (bf16); on CPU without ``TRITON_INTERPRET=1`` each op runs
its PyTorch reference (same maths; the fused cross-entropy then materialises the logits), which is how the CPU
scenarios and CI exercise this adapter.

Effective settings are read back from the live model and optimizer at the first step
(``DecoderModel.effective_settings`` + ``harness.measuring.effective.read_back_optimizer``). Trainer knobs come from
``overrides`` (see the package docstring) and are recorded in ``extra["trainer"]``.
"""

from __future__ import annotations

import json
import time

import torch

from adapters_for_tools.tunebench import TunebenchOverrides
from harness.inputs.data import load_tokenised
from harness.measuring.effective import read_back_optimizer
from kernels.ops._utils import interpret_mode
from kernels.trainer.attention import VARLEN
from kernels.trainer.config import MethodOptions, TrainerConfig, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.save import save_trained
from kernels.trainer.train import train


def method_options(sc, overrides: dict):  # noqa: ANN001, ANN201
    """The scenario's method and the override knobs as :class:`MethodOptions`.

    The knobs go through the adapter's typed model (:class:`TunebenchOverrides`, the one ``validate`` checks), so
    an unknown or mistyped knob raises (a pydantic ``ValidationError``, a ``ValueError``) and defaults are its.
    """
    o = TunebenchOverrides.model_validate(overrides)
    m = sc.method
    return MethodOptions(
        kind=m.kind,
        lora_r=m.lora_r,
        lora_alpha=float(m.lora_alpha),
        lora_dropout=float(m.lora_dropout),
        target_modules=tuple(m.resolved_targets()),
        double_quant=bool(m.quant.double_quant) if m.quant else True,
        lora_dtype=getattr(torch, o.lora_dtype),
        gradient_checkpointing=sc.train.gradient_checkpointing,
        recompute_layers=o.recompute_layers,
        offload_checkpoints=o.offload_checkpoints,
        offload_weights=o.offload_weights,
        offload_embeddings=o.offload_embeddings,
        offload_lm_head=o.offload_lm_head,
        fused_ce_chunk=o.fused_ce_chunk,
        reference_ops=tuple(o.reference_ops),
        group_projections=o.group_projections,
        cuda_graph=o.cuda_graph,
        varlen_attention=o.varlen_attention,
        expandable_segments=o.expandable_segments,
    )


def train_settings(sc, pad_id: int):  # noqa: ANN001, ANN201
    """The scenario's ``train`` section as the trainer's :class:`TrainSettings`."""
    t = sc.train
    return TrainSettings(micro_batch=t.micro_batch, grad_accum=t.grad_accum, steps=t.steps, lr=t.lr,
                         lr_scheduler=t.lr_scheduler, optimizer=t.optimizer, weight_decay=t.weight_decay,
                         max_grad_norm=t.max_grad_norm, pad_id=pad_id)


def trainer_config(sc, overrides: dict, pad_id: int):  # noqa: ANN001, ANN201
    """The whole :class:`TrainerConfig` of a scenario: method and knobs, loop, precision and device."""
    device = torch.device("cuda" if sc.hardware.device == "cuda" else "cpu")
    dtype = getattr(torch, sc.method.quant.compute_dtype if sc.method.kind == "qlora" else sc.model.dtype)
    return TrainerConfig(method=method_options(sc, overrides), train=train_settings(sc, pad_id), dtype=dtype,
                         device=device)


def ops_in_use(device: str, reference_ops: tuple[str, ...] = (), dtype: str = "bfloat16",
               varlen: bool = True) -> dict[str, str]:
    """Which implementation each op runs with here (Triton kernel or PyTorch reference; ``reference_ops``:
    the knob of that name), and which attention packed rows get."""

    kern = "triton" if device == "cuda" else ("triton-interpreter" if interpret_mode() else "torch-reference")
    ops = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "lora_linear", "nf4_dequantize")
    # lora_linear is cuBLAS GEMMs with a hand-written backward (no Triton kernel of its own); DoRA is plain torch
    flash = varlen and VARLEN is not None and device == "cuda" and dtype in ("bfloat16", "float16")
    return {op: ("torch-reference" if op in reference_ops else kern) for op in ops} | {
        "dora": "torch", "attention_packed": "varlen-flash" if flash else "sdpa-block-mask"}


def run(ctx) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    sc = ctx.scenario
    if sc.method.kind == "qlora" and sc.method.quant.quant_type != "nf4":
        ctx.cannot_honour("method.quant.quant_type", f"{sc.method.quant.quant_type}: tunebench quantises to nf4 only")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(ctx.checkpoint)
    cfg = trainer_config(sc, ctx.overrides, tok.pad_token_id)
    options, device, dtype = cfg.method, cfg.device, cfg.dtype
    model = load_model(ctx.checkpoint, options, dtype=dtype, device=device)
    ctx.load_s = time.time() - t0
    rows = load_tokenised(sc, ctx.dataset_path, tok).rows
    ops = ops_in_use(device.type, options.reference_ops, str(dtype).removeprefix("torch."), options.varlen_attention)
    trainer_cfg = cfg.to_dict() | {"ops": ops}  # after loading: options.allocator says what the load did
    ctx.save_native_config("tunebench_trainer.json", json.dumps(trainer_cfg, indent=1, default=str))
    ctx.extra["trainer"] = {"overrides": dict(ctx.overrides), "ops": trainer_cfg["ops"],
                            "streamed_layers": model.streamer.layer_ids if model.streamer else [],
                            "recomputed_layers": (sorted(model.checkpointed_layers)
                                                  if model.checkpointed_layers is not None
                                                  else "all" if options.gradient_checkpointing else []),
                            "host_weight_gib": _host_bytes(model) / 2**30, "allocator": options.allocator}

    def on_first_step(opt) -> None:  # noqa: ANN001
        ctx.set_effective(**model.effective_settings(), **read_back_optimizer(opt))

    def save_due(step: int) -> None:  # intermediate outputs for time-to-target (eval.every_steps)
        ctx.save_intermediate(model, step, save=lambda d: save_trained(model, d, ctx.checkpoint))

    train(model, rows, cfg.train, meter=ctx.meter, device=device, on_first_step=on_first_step,
          on_step_end=save_due)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    ctx.extra["saved"] = save_trained(model, ctx.output_dir, ctx.checkpoint)
    tok.save_pretrained(ctx.output_dir)


def _host_bytes(model) -> int:  # noqa: ANN001
    """Bytes of weights kept in host memory by the offload knobs (0 when the model is on the CPU anyway)."""
    dev = model.device_of_compute
    if dev.type == "cpu":
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
