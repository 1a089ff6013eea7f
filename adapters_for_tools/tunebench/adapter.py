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

Objectives (``objective.kind``): sft as above; dpo and orpo read the sweep's prompt/chosen/rejected rows, kto its
prompt/completion/label rows, tokenised as TRL tokenises them for that objective
(:mod:`adapters_for_tools.tunebench.pairs`), and train through :func:`kernels.trainer.preference.train_preference`
(TRL 1.16's losses; DPO's and KTO's reference is the model with its adapters switched off). The ``pair_layout`` knob
says how a DPO or ORPO micro-batch's sequences enter the model; the run stores the training batches' reward
statistics (``extra["train_rewards"]``) and, for DPO and KTO, the forwards without gradient
(``extra["reference_pass"]``) under the trl adapter's keys. Preference runs are one process, with the knobs given.

Several GPUs (``hardware.strategy``): every rank loads the model whole, then :class:`kernels.trainer.distributed.
DataParallel` makes it one rank of the run (``ddp``: the adapters' gradients all-reduced; ``fsdp``: FSDP2 shards
of every weight, a 4-bit base included), gives each rank its micro-batches of the global batch, and the save
gathers the shards to rank 0, which alone writes.

Effective settings are read back from the live model and optimizer at the first step
(``DecoderModel.effective_settings`` + ``harness.measuring.effective.read_back_optimizer``). Trainer knobs come from
``overrides`` (see the package docstring) and are recorded in ``extra["trainer"]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import torch

from adapters_for_tools.objective_meter import REWARD_LOGS
from adapters_for_tools.tunebench import TunebenchOverrides
from adapters_for_tools.tunebench.pairs import dpo_pairs, kto_rows, orpo_pairs
from harness.inputs.data import load_tokenised, read_jsonl
from harness.inputs.models import get_preset
from harness.measuring.effective import read_back_optimizer
from kernels.ops._utils import interpret_mode
from kernels.trainer.attention import VARLEN, dense_attention_impl
from kernels.trainer.config import DecoderConfig, MethodOptions, ObjectiveOptions, TrainerConfig, TrainSettings
from kernels.trainer.distributed import DataParallel
from kernels.trainer.loading import load_model
from kernels.trainer.planner import Planner
from kernels.trainer.preference import Precomputed, effective_objective, precompute_reference, train_preference
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
        remake_activations=o.remake_activations,
        remake_mlp_layers=o.remake_mlp_layers,
        reuse_dequant=o.reuse_dequant,
        mlp_chunk_tokens=o.mlp_chunk_tokens,
        cuda_graph=o.cuda_graph,
        varlen_attention=o.varlen_attention,
        attention_backend=o.attention_backend,
        flex_attention=o.flex_attention,
        expandable_segments=o.expandable_segments,
        plan=o.plan,  # trainer_config resolves it against the scenario's memory budget
    )


def plan_budget(plan: float | str | None, scenario_gib: float | None) -> float | str | None:
    """The budget the trainer plans to: ``auto`` is the scenario's memory budget when it has one (else the GPU's
    free memory, the trainer's ``auto``); a number is capped at the scenario's budget."""
    if plan is None or scenario_gib is None:
        return plan
    return scenario_gib if plan == "auto" else min(float(plan), scenario_gib)


def train_settings(sc, pad_id: int):  # noqa: ANN001, ANN201
    """The scenario's ``train`` section as the trainer's :class:`TrainSettings`."""
    t = sc.train
    return TrainSettings(micro_batch=t.micro_batch, grad_accum=t.grad_accum, steps=t.steps, lr=t.lr,
                         lr_scheduler=t.lr_scheduler, optimizer=t.optimizer, weight_decay=t.weight_decay,
                         max_grad_norm=t.max_grad_norm, pad_id=pad_id)


def objective_options(sc, overrides: dict):  # noqa: ANN001, ANN201
    """The scenario's ``objective`` (sft, dpo, orpo, kto) and the ``pair_layout`` knob as :class:`ObjectiveOptions`
    (KTO's sequences cut at ``data.seq_len``, TRL's ``max_length``)."""
    ob = sc.objective
    if ob.is_sft:
        return ObjectiveOptions()
    kto = {"desirable_weight": ob.desirable_weight, "undesirable_weight": ob.undesirable_weight,
           "max_length": sc.data.seq_len} if ob.kind == "kto" else {}
    ref = {"reference": ob.reference_for(sc.method.is_peft)} if ob.kind in ("dpo", "kto") else {}
    return ObjectiveOptions(kind=ob.kind, beta=ob.beta, loss_type=ob.loss_type,
                            pair_layout=TunebenchOverrides.model_validate(overrides).pair_layout, **kto, **ref)


def preference_pairs(sc, dataset_path, tok):  # noqa: ANN001, ANN201
    """The sweep's rows as token ids, tokenised (and for DPO and ORPO cut at ``data.seq_len``) as TRL does for the
    objective (:mod:`adapters_for_tools.tunebench.pairs`): prompt/chosen/rejected pairs, KTO's labelled rows."""
    rows = read_jsonl(dataset_path)
    pairs = {"dpo": dpo_pairs, "orpo": orpo_pairs, "kto": kto_rows}[sc.objective.kind](rows, tok, sc.data.seq_len)
    if not pairs:
        raise ValueError(f"{dataset_path}: no row leaves a completion token within seq_len {sc.data.seq_len}")
    return pairs


def trainer_config(sc, overrides: dict, pad_id: int):  # noqa: ANN001, ANN201
    """The whole :class:`TrainerConfig` of a scenario: method and knobs, loop, objective, precision and device."""
    device = torch.device("cuda" if sc.hardware.device == "cuda" else "cpu")
    dtype = getattr(torch, sc.method.quant.compute_dtype if sc.method.kind == "qlora" else sc.model.dtype)
    method = method_options(sc, overrides)
    method.plan = plan_budget(method.plan, sc.hardware.memory_budget_gib)
    return TrainerConfig(method=method, train=train_settings(sc, pad_id), dtype=dtype, device=device,
                         objective=objective_options(sc, overrides))


def predicts_fit(sc, overrides: dict) -> bool | None:  # noqa: ANN001
    """Whether the trainer's planner predicts a plan of this row within the scenario's memory budget at its size
    (:meth:`Planner.predicts_fit`: the cost model, before anything loads), or None where it cannot say: a row that
    does not plan, no budget, or a model given by checkpoint rather than by preset (its shape is not read here)."""
    cfg = trainer_config(sc, overrides, pad_id=0)
    if not isinstance(cfg.method.plan, int | float) or sc.model.preset is None:
        return None
    decoder = DecoderConfig.from_dict(get_preset(sc.model.preset).config)
    return Planner.predicts_fit(cfg, decoder, sc.data.seq_len, sc.data.packing)


def ops_in_use(device: str, reference_ops: tuple[str, ...] = (), dtype: str = "bfloat16",
               varlen: bool = True, activation: str = "silu") -> dict[str, str]:
    """Which implementation each op runs with here (Triton kernel or PyTorch reference; ``reference_ops``:
    the knob of that name), and which attention packed rows get. ``activation``: the model's gated MLP
    (``silu``: SwiGLU, ``gelu_tanh``: GeGLU)."""

    kern = "triton" if device == "cuda" else ("triton-interpreter" if interpret_mode() else "torch-reference")
    ops = ("rms_norm", "rope", "geglu" if activation == "gelu_tanh" else "swiglu", "fused_linear_cross_entropy",
           "fused_linear_logprobs", "lora_linear", "nf4_dequantize")
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
    if options.plan is not None and sc.hardware.strategy:
        raise ValueError(f"plan: not with hardware.strategy {sc.hardware.strategy} (what it plans, host offload and "
                         "CUDA graphs, runs in one process)")
    # the plan is made before loading, so what it puts in host memory never touches the device
    planner = (Planner.start(cfg, DecoderConfig.from_checkpoint(ctx.checkpoint), sc.data.seq_len, sc.data.packing)
               if options.plan is not None else None)
    model = load_model(ctx.checkpoint, options, dtype=dtype, device=device)
    # one rank of several (hardware.strategy): DDP of the adapters or FSDP2 shards, loaded whole first
    dp = DataParallel(sc.hardware.strategy) if sc.hardware.strategy else None
    if dp is not None:
        model = dp.prepare(model)
    ctx.load_s = time.time() - t0
    objective = cfg.objective
    if objective.is_preference and dp is not None:
        raise ValueError(f"{objective.kind}: tunebench trains preference objectives in one process (not with "
                         "hardware.strategy)")
    rows = (preference_pairs(sc, ctx.dataset_path, tok) if objective.is_preference
            else load_tokenised(sc, ctx.dataset_path, tok).rows)
    ops = ops_in_use(device.type, options.reference_ops, str(dtype).removeprefix("torch."), options.varlen_attention,
                     model.cfg.activation)
    mc = model.cfg  # unpacked rows' attention, unless the family's (a soft cap, a window) replaces it below
    ops["attention"] = dense_attention_impl(options.attention_backend, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                            dtype, device)
    ops |= model.family_ops()  # the family's parts that run as PyTorch ops
    trainer_cfg = cfg.to_dict() | {"ops": ops}  # after loading: options.allocator says what the load did
    ctx.save_native_config("tunebench_trainer.json", json.dumps(trainer_cfg, indent=1, default=str))
    ctx.extra["trainer"] = {"overrides": dict(ctx.overrides), "ops": trainer_cfg["ops"], **_layout(model, options),
                            "allocator": options.allocator}
    if planner is not None:
        planner.attach(model)
        ctx.extra["trainer"]["plan"] = planner.record  # updated in place by a re-plan

    def on_first_step(opt) -> None:  # noqa: ANN001
        ctx.set_effective(**model.effective_settings(), **read_back_optimizer(opt), **(dp.effective() if dp else {}),
                          **(effective_objective(objective) if objective.is_preference else {}))

    def save(d) -> str | None:  # noqa: ANN001
        # several ranks: every one takes part in gathering the shards, rank 0 writes
        with dp.whole_parameters(model) if dp else contextlib.nullcontext():
            return save_trained(model, d, ctx.checkpoint) if dp is None or dp.rank == 0 else None

    def save_due(step: int) -> None:  # intermediate outputs for time-to-target (eval.every_steps)
        ctx.save_intermediate(model, step, save=save)

    def step_done(step: int) -> None:  # outside the timed step
        timed = getattr(ctx.meter, "steps", None)  # the meter's own step time leaves intermediate saves out
        if planner is not None and planner.after_step(step, timed[-1]["step_s"] if timed else None):
            ctx.extra["trainer"].update(_layout(model, options))  # the layers the new plan streams and recomputes
        save_due(step)

    def on_oom(step: int) -> bool:  # a step before the probe ran out of memory: a leaner plan, and the step again
        if planner is None or not planner.after_oom(step):
            return False
        moved = planner.record["replanned_after_oom"]
        print(f"tunebench: step {step + 1} ran out of memory under plan {moved['from_plan']}; again under "
              f"{moved['plan']}", file=sys.stderr, flush=True)
        ctx.extra["trainer"].update(_layout(model, options))
        return True

    if objective.is_preference:
        # TRL's precompute_ref_log_probs: the reference of every micro-batch before the first step
        pre = (precompute_reference(model, rows, cfg.train, objective, device)
               if objective.precomputes_reference else None)
        # per step, under TRL's names: rewards/chosen, rewards/accuracies, rewards/margins, logps/*, ...
        history = train_preference(model, rows, cfg.train, objective, meter=ctx.meter, device=device,
                                   on_first_step=on_first_step, on_step_end=step_done, precomputed=pre,
                                   on_oom=on_oom)
        # pairs per micro-batch, the scenario's unit (the meter sees two sequences per pair)
        ctx.set_effective(micro_batch=max(h["pairs"] for h in history))
        ctx.extra.update(preference_extra(history, ctx.meter.steps, objective, pre))
    else:
        train(model, rows, cfg.train, meter=ctx.meter, device=device, on_first_step=on_first_step,
              on_step_end=step_done, dist=dp, on_oom=on_oom)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    ctx.extra["saved"] = save(ctx.output_dir)
    if dp is None or dp.rank == 0:
        tok.save_pretrained(ctx.output_dir)


def preference_extra(history: list[dict], steps: list[dict], objective: ObjectiveOptions,
                     pre: Precomputed | None = None) -> dict:
    """What a preference run stores beside the common metrics, under the trl adapter's keys: the training batches'
    reward statistics per step (``train_rewards``: those the step has; KTO logs no accuracy, and a step without
    good or bad rows has no reward for them) and, for DPO and KTO, the forwards without gradient (the reference
    pass, KTO's KL estimate: not in tokens/s), counted as the meter counts the sequences; a reference precomputed
    before the first step (``pre``) as ``tokens_before_training`` and ``precompute_s``, as the trl adapter stores
    TRL's."""
    out: dict = {"train_rewards": [{"step": i, **{k: h[v] for k, v in REWARD_LOGS.items()
                                                  if v in h and math.isfinite(h[v])}}
                                   for i, h in enumerate(history, 1)]}
    if objective.kind in ("dpo", "kto") and steps:
        ref = out["reference_pass"] = {
            "what": "forwards without gradient (reference log-probs, adapters disabled; KTO's KL estimate): not in "
                    "tokens/s",
            "tokens_per_step_mean": sum(h["reference_tokens"] for h in history) / len(history),
            "tokens_before_training": 0, "forwards": sum(h["reference_forwards"] for h in history)}
        if pre:
            ref |= {"tokens_before_training": pre.tokens, "forwards": ref["forwards"] + pre.forwards,
                    "precompute_s": pre.seconds}  # before the first step
    return out


def _layout(model, options: MethodOptions) -> dict:  # noqa: ANN001
    """Which layers stream and recompute, and the weight bytes in host memory, read from the live model."""
    return {"streamed_layers": model.streamer.layer_ids if model.streamer else [],
            "recomputed_layers": (sorted(model.checkpointed_layers) if model.checkpointed_layers is not None
                                  else "all" if options.gradient_checkpointing else []),
            "host_weight_gib": _host_bytes(model) / 2**30,
            "remade_activations": all(layer.remake_activations for layer in model.model.layers),
            "remade_mlp_layers": [i for i, layer in enumerate(model.model.layers) if layer.remake_mlp],
            "reused_dequant": options.kind == "qlora" and all(layer.reuse_dequant for layer in model.model.layers)}


def _host_bytes(model) -> int:  # noqa: ANN001
    """Bytes of weights kept in host memory by the offload knobs (0 when the model is on the CPU anyway)."""
    dev = model.device_of_compute
    if dev.type == "cpu":
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
