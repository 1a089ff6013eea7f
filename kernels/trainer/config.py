"""The trainer's settings: the architecture read from a checkpoint, the method, the loop, and the three together.

- :class:`DecoderConfig`: architecture values of a transformers ``config.json`` (llama, mistral, qwen2, qwen3, phi3,
  gemma2, gemma3_text, mixtral, qwen3_moe), with what sets each family apart from Llama as plain fields.
- :class:`MethodOptions`: what to train (full / LoRA / DoRA / QLoRA, LoRA settings) and the trainer's knobs
  (recomputation, host offload, CUDA graph, attention path, allocator).
- :class:`TrainSettings`: the loop (micro-batch, grad accumulation, steps, optimizer, learning rate, schedule).
- :class:`ObjectiveOptions`: what the loss is: next-token cross-entropy (``sft``) or a preference objective
  (``dpo``, ``orpo``: :mod:`kernels.trainer.preference`).
- :class:`TrainerConfig`: method + loop + objective + precision + device, with the JSON record of a run's settings.

Plain dataclasses with the trainer's own defaults: whoever drives the trainer (the tunebench adapter, a script)
translates its own configuration into these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe")
# families whose sliding_window (when set) applies to every layer; the others name theirs in layer_types
_WINDOW_EVERY_LAYER = ("mistral", "phi3", "mixtral")


def _rope(mt: str, rp: dict[str, Any], d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` of one set of RoPE parameters (``rope_type`` other than default: the scaling dict), with
    ``d``'s top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` where ``rp`` lacks them."""
    rp = dict(rp)
    theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
    partial = float(rp.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise NotImplementedError(f"{mt}: partial_rotary_factor {partial} (tunebench rotates whole heads)")
    return theta, rp if rp and rp.get("rope_type", "default") != "default" else d.get("rope_scaling")


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture values read from a transformers ``config.json`` (:data:`MODEL_TYPES`).

    The fields after ``raw`` are what a family changes in the Llama layer; their defaults are Llama's.

    Attributes:
        qk_norm: qwen3, gemma3: an RMSNorm over each head of the queries and of the keys (``q_norm``, ``k_norm``,
            one ``head_dim`` weight each; gemma3's scale by ``1 + weight``), before RoPE.
        local_rope_theta / local_rope_scaling: gemma3: the RoPE of the sliding-window layers (None: they rotate as
            the others).
        fused_qkv / fused_gate_up: phi3: one ``qkv_proj`` and one ``gate_up_proj`` linear (kept fused, as PEFT
            targets them).
        activation: the gated MLP's activation: ``silu`` (SwiGLU) or ``gelu_tanh`` (gemma2's GeGLU).
        norm_plus_one: gemma2, gemma3: RMSNorm scales by ``1 + weight``.
        sandwich_norms: gemma2, gemma3: the attention and MLP outputs are normed before the residual add
            (``post_attention_layernorm``, ``post_feedforward_layernorm``); the MLP input by
            ``pre_feedforward_layernorm``.
        embed_scale: gemma2, gemma3: embeddings multiplied by ``sqrt(hidden)`` (in the weights' dtype, as transformers).
        attn_scale: gemma2, gemma3: ``query_pre_attn_scalar ** -0.5`` (None: ``head_dim ** -0.5``).
        attn_softcap / final_softcap: gemma2: ``cap * tanh(x / cap)`` of the attention scores / of the logits.
        sliding_window / sliding_layers: a causal window of this many keys (the query's own included) in these
            layers.
        num_experts / experts_per_token: mixtral, qwen3_moe: a sparse MoE block of this many SwiGLU experts (each
            of ``intermediate_size``: qwen3_moe's ``moe_intermediate_size``), top-k routed.
        norm_topk_prob: the top-k router probabilities renormalised to sum to 1 (mixtral always; qwen3_moe as its
            config says).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    qk_norm: bool = False
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    activation: str = "silu"
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        mt = d["model_type"]
        if mt not in MODEL_TYPES:
            raise NotImplementedError(f"model_type {mt!r}: tunebench trains {', '.join(MODEL_TYPES)}")
        # transformers 5 writes rope_parameters {rope_type, rope_theta, ...} (gemma3: one such per layer type);
        # older files rope_theta + rope_scaling (gemma3: + rope_local_base_freq for its sliding layers)
        rp = d.get("rope_parameters") or {}
        local = None
        if "full_attention" in rp:
            rp, local = rp["full_attention"], rp.get("sliding_attention")
        elif d.get("rope_local_base_freq") is not None:
            local = {"rope_theta": d["rope_local_base_freq"]}
        theta, scaling = _rope(mt, rp, d)
        local_theta, local_scaling = _rope(mt, local, {}) if local else (None, None)
        heads = int(d["num_attention_heads"])
        attn_bias = bool(d.get("attention_bias", False))
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
        for key in ("resid_pdrop", "embd_pdrop", "attention_dropout", "router_jitter_noise"):
            if float(d.get(key) or 0.0):
                raise NotImplementedError(f"{mt}: {key} {d[key]} (tunebench trains without model dropout)")
        moe = mt in ("mixtral", "qwen3_moe")
        if moe and d.get("output_router_logits"):
            raise NotImplementedError(f"{mt}: output_router_logits (the router's auxiliary loss) is not built")
        if mt == "qwen3_moe" and (d.get("mlp_only_layers") or int(d.get("decoder_sparse_step") or 1) != 1):
            raise NotImplementedError("qwen3_moe: dense layers among the sparse ones (mlp_only_layers, "
                                      "decoder_sparse_step) are not built: every layer is a MoE block here")
        gemma = mt in ("gemma2", "gemma3_text")
        if gemma and d.get("use_bidirectional_attention"):
            raise NotImplementedError(f"{mt}: use_bidirectional_attention (tunebench trains causal LMs)")
        act = d.get("hidden_activation" if gemma else "hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
        if activation is None:
            raise NotImplementedError(f"{mt}: activation {act!r} (tunebench has silu and gelu_pytorch_tanh)")
        window = d.get("sliding_window")
        if window and d.get("layer_types"):
            sliding = tuple(i for i, t in enumerate(d["layer_types"]) if t == "sliding_attention")
        elif window and mt == "gemma3_text":  # without layer_types: every sliding_window_pattern-th layer is global
            pattern = int(d.get("sliding_window_pattern") or 6)
            sliding = tuple(i for i in range(int(d["num_hidden_layers"])) if (i + 1) % pattern)
        elif window and (mt in _WINDOW_EVERY_LAYER or gemma):
            # gemma2 without layer_types: transformers' default, sliding in every other layer from the first
            sliding = tuple(range(0, int(d["num_hidden_layers"]), 2 if gemma else 1))
        else:
            sliding = ()

        def cap(key: str) -> float | None:
            return float(d[key]) if gemma and d.get(key) else None

        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["moe_intermediate_size"] if mt == "qwen3_moe" else d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            qkv_bias=True if mt == "qwen2" else attn_bias,  # qwen2 always has q/k/v bias, no o bias
            o_bias=attn_bias if mt in ("llama", "gemma2", "gemma3_text", "qwen3", "qwen3_moe") else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            raw=dict(d),
            qk_norm=mt in ("qwen3", "gemma3_text", "qwen3_moe"),
            fused_qkv=mt == "phi3",
            fused_gate_up=mt == "phi3",
            activation=activation,
            norm_plus_one=gemma,
            sandwich_norms=gemma,
            embed_scale=float(d["hidden_size"]) ** 0.5 if gemma else None,
            attn_scale=float(d.get("query_pre_attn_scalar") or head_dim) ** -0.5 if gemma else None,
            attn_softcap=cap("attn_logit_softcapping"),
            final_softcap=cap("final_logit_softcapping"),
            sliding_window=int(window) if sliding else None,
            sliding_layers=sliding,
            # transformers 5 writes num_local_experts for both; older qwen3_moe files num_experts
            num_experts=int(d.get("num_local_experts") or d.get("num_experts") or 0) if moe else 0,
            experts_per_token=int(d.get("num_experts_per_tok") or 0) if moe else 0,
            norm_topk_prob=mt != "qwen3_moe" or bool(d.get("norm_topk_prob", False)),
        )

    @property
    def moe(self) -> bool:
        """The MLP is a sparse mixture of experts (Mixtral, Qwen3-MoE)."""
        return self.num_experts > 0

    def layer_linear_names(self) -> tuple[str, ...]:
        """Leaf names of one decoder layer's linear modules, in transformers' module order (PEFT's init order)."""
        attn = ("o_proj", "qkv_proj") if self.fused_qkv else ATTN_MODULES  # Phi3Attention makes o_proj first
        if self.moe:
            return attn  # the experts are 3-D tensors, not linear modules (transformers 5)
        return attn + (("gate_up_proj", "down_proj") if self.fused_gate_up else MLP_MODULES)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> DecoderConfig:
        return cls.from_dict(json.loads((Path(checkpoint) / "config.json").read_text()))


ATTENTION_BACKENDS = ("auto", "cudnn")  # MethodOptions.attention_backend


@dataclass
class MethodOptions:
    """What to train and how (the scenario's method plus trainer knobs).

    Attributes:
        kind: ``full`` | ``lora`` | ``dora`` | ``qlora``.
        lora_r / lora_alpha / lora_dropout / target_modules: PEFT's meaning (scale = alpha / r).
        double_quant: QLoRA: quantise the NF4 absmaxes too.
        lora_dtype: dtype of LoRA A/B (and DoRA magnitude). float32, like PEFT's default
            (``autocast_adapter_dtype=True``); the matmuls run in the activation dtype, as under the HF
            Trainer's bf16 autocast.
        gradient_checkpointing: recompute decoder layers in backward.
        recompute_layers: with gradient checkpointing, how many decoder layers recompute (spread evenly;
            -1 = all). The others keep their activations (~570 MB per layer at the 8B shapes, micro-batch 2 x
            2048), trading memory for the recompute forward (1/4 of the layer's GEMM time). Layers whose
            weights stream from the host always recompute.
        offload_checkpoints: keep checkpointed layer inputs in pinned host memory.
        offload_weights: decoder layers (count, spread evenly; -1 = all) whose frozen base weights stream
            from pinned host memory. Needs gradient checkpointing and a dense frozen base (LoRA/DoRA).
        offload_embeddings: input embedding table on the host (frozen, untied only).
        offload_lm_head: frozen LM head on the host, copied to the GPU for the loss (untied only).
        fused_ce_chunk: tokens per chunk of the fused LM-head + loss (None: the op's default, 1024).
        reference_ops: ops (``rms_norm``, ``rope``, ``swiglu``, ``geglu``, ``fused_linear_cross_entropy``,
            ``fused_linear_logprobs``) to run as their PyTorch references instead
            (:class:`kernels.trainer.opset.OpSet`), for isolating a numerical difference on the GPU.
        group_projections: run q/k/v and gate/up, where all of a group carry LoRA of one rank and scale without
            dropout, as one :func:`~kernels.ops.lora_linear.lora_linear_group` call each (one A GEMM, one
            autograd node, dx accumulated in one buffer) instead of one ``lora_linear`` per projection.
        remake_activations: a decoder layer's norm outputs and gated MLP activation are not kept for backward but
            remade there from the tensors their ops keep anyway (:mod:`kernels.trainer.remake`): ~32 % less
            memory per layer that keeps its activations, for a few row-wise passes in backward.
        mlp_chunk_tokens: the dense MLP of every layer over chunks of this many tokens, keeping only its input for
            backward (:class:`kernels.trainer.remake.TiledMLP`): long context in less memory, for one more MLP
            forward per layer. One process only. None: the MLP over all tokens at once.
        remake_mlp_layers: of the layers that keep their activations, this many (the first ones; -1: all) also
            remake their dense MLP's gate and up outputs in backward (one gate/up projection again, from the remade
            norm output) instead of keeping them (:class:`kernels.trainer.remake.Shared`): 2 x intermediate widths
            per token less (0.24 GB per layer at the 8B shapes, 4,096 tokens) for about half the layer's forward,
            where recomputing the layer costs all of it. Needs ``remake_activations`` and no LoRA dropout (the
            projection runs again); not Mixtral's experts, not with ``mlp_chunk_tokens``. 0: keep them.
        reuse_dequant: QLoRA: a recomputing layer's NF4 projections keep the bf16 weights they dequantise in the
            recompute forward for the backward that follows, instead of dequantising each again there
            (:func:`kernels.ops.lora_linear.reuse_dequantised`): one dequantisation per weight and micro-batch saved
            in every recomputing layer, for that layer's bf16 weights held from its recompute into its backward
            (436 MB at the 8B shapes). Layers that keep their activations keep no dense weight. False: every
            backward dequantises again.
        cuda_graph: capture the whole optimizer step as one CUDA graph and replay it
            (:class:`kernels.trainer.train.StepGraph`): no per-kernel host launches. CUDA only; not with host
            offload (its copies and events are host-driven), LoRA dropout (RNG state replayed from the host) or
            packed rows.
        varlen_attention: packed rows on CUDA in bf16/fp16 through variable-length flash attention where this
            torch has it (else, or False: SDPA with a block-diagonal causal mask).
        attention_backend: which kernel the causal attention of unpacked rows (SDPA, no mask) asks torch for
            first: ``"auto"``, torch's own order (flash attention on CUDA in bf16/fp16); ``"cudnn"``, cuDNN's fused
            attention first (:data:`ATTENTION_BACKENDS`), falling back to torch's order
            where cuDNN does not take the inputs; what was used is recorded (``ops["attention"]``).
        flex_attention: layers with soft-capped scores (Gemma-2) or a sliding window shorter than the rows on CUDA
            in bf16/fp16 through compiled FlexAttention (:mod:`kernels.trainer.flex`: no ``[B, H, S, S]`` scores)
            where this torch has it (else, or False: eager soft-capped attention, SDPA with a window mask).
        expandable_segments: the CUDA caching allocator in expandable-segments mode
            (:func:`kernels.trainer.loading.configure_allocator`).
        plan: a memory budget in GiB, or ``"auto"`` (the device's free memory): the trainer then sets
            ``recompute_layers``, ``remake_mlp_layers``, the ``offload_*`` knobs, ``cuda_graph`` and (for rows
            longer than a chunk) ``mlp_chunk_tokens`` itself, to the plan predicted fastest within the budget
            (:class:`kernels.trainer.planner.Planner`). None: the knobs as given.
    """

    kind: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LINEAR_MODULES
    double_quant: bool = True
    lora_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = True
    recompute_layers: int = -1
    offload_checkpoints: bool = False
    offload_weights: int = 0
    offload_embeddings: bool = False
    offload_lm_head: bool = False
    fused_ce_chunk: int | None = None
    reference_ops: tuple[str, ...] = ()
    group_projections: bool = True
    remake_activations: bool = True
    mlp_chunk_tokens: int | None = None
    remake_mlp_layers: int = 0
    reuse_dequant: bool = True
    cuda_graph: bool = False
    varlen_attention: bool = True
    attention_backend: str = "auto"
    flex_attention: bool = True
    expandable_segments: bool = True
    plan: float | str | None = None
    allocator: str = ""  # what load_model did to the CUDA allocator (configure_allocator); recorded with the run

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r}: one of {', '.join(ATTENTION_BACKENDS)}")

    @property
    def is_peft(self) -> bool:
        return self.kind in ("lora", "dora", "qlora")


@dataclass
class TrainSettings:
    """The training loop's settings.

    Attributes:
        micro_batch: rows per forward.
        grad_accum: micro-batches per optimizer step.
        steps: optimizer steps.
        lr: peak learning rate.
        lr_scheduler: ``constant`` | ``linear`` | ``cosine`` (no LR warmup), as transformers' schedulers.
        optimizer: ``adamw_torch`` | ``adamw_torch_fused`` | ``sgd``: torch's AdamW in its default
            implementation (foreach on CUDA, per tensor on the CPU) or fused, as the transformers Trainer maps
            those names (:func:`kernels.trainer.train.make_optimizer`).
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD), on all trainable parameters but biases and
            norm weights, as the transformers Trainer groups them.
        max_grad_norm: gradient clipping norm (None or 0: no clipping).
        pad_id: padding token id for collation.
    """

    micro_batch: int
    grad_accum: int
    steps: int
    lr: float = 2e-4
    lr_scheduler: str = "constant"
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    pad_id: int = 0


OBJECTIVES = ("sft", "dpo", "orpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down")
LOSS_TYPES = {"dpo": DPO_LOSS_TYPES, "kto": ("kto", "apo_zero_unpaired")}  # the kinds with a choice of loss
PAIR_LAYOUTS = ("packed", "shared_prompt", "padded")
REFERENCES = ("adapter_disabled", "precomputed")  # DPO's and KTO's: in the step, or once before training


@dataclass
class ObjectiveOptions:
    """The training objective (TRL 1.16's definitions for the preference ones: :mod:`kernels.trainer.preference`).

    Attributes:
        kind: ``sft`` (next-token cross-entropy on the rows' labels), ``dpo`` (pairs of chosen / rejected
            completions against the frozen base as reference: LoRA / DoRA / QLoRA only) or ``orpo`` (odds-ratio
            term + NLL of the chosen sequences, no reference) or ``kto`` (single completions labelled good or bad
            against the frozen base as reference, with a KL estimate: :mod:`kernels.trainer.kto`).
        beta: DPO's and KTO's temperature of the log-ratio (IPO's regularisation tau); ORPO's weight of the
            odds-ratio term (TRL's default 0.1 for all three).
        loss_type: DPO's loss of the margin: ``sigmoid`` (the DPO paper), ``hinge`` (SLiC), ``ipo``, ``robust``
            (label-smoothed), ``apo_zero`` or ``apo_down`` (APO); KTO's ``kto`` (the paper's, with its KL
            estimate) or ``apo_zero_unpaired``. None: the kind's first.
        label_smoothing: ``robust`` DPO's assumed share of flipped labels (TRL's default 0: then it is ``sigmoid``).
        pair_layout: how a preference micro-batch enters the model, the same function each way
            (:func:`kernels.trainer.preference.collate_pairs`): ``packed`` (one row, every ``prompt + chosen`` and
            ``prompt + rejected`` sequence back to back, position ids restarting per sequence: no padding),
            ``shared_prompt`` (one row of ``[prompt, chosen, rejected]`` per pair: each prompt computed once for
            both completions) or ``padded`` (``2 x pairs`` right-padded rows, TRL's layout); KTO packs.
        desirable_weight: KTO's weight of a good completion's loss (TRL's default 1).
        undesirable_weight: KTO's weight of a bad completion's loss.
        max_length: KTO: each ``prompt + completion`` sequence (and each KL sequence) cut to this many tokens
            from the start, as TRL's collator cuts them (None: not cut).
        reference: DPO's and KTO's reference log-probs, both from the model with its adapters switched off:
            ``adapter_disabled`` (a forward without gradient in every step) or ``precomputed`` (once per
            micro-batch before training, TRL's ``precompute_ref_log_probs``; KTO's policy KL forward still runs
            in every step).
    """

    kind: str = "sft"
    beta: float = 0.1
    loss_type: str | None = None
    label_smoothing: float = 0.0
    pair_layout: str = "packed"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_length: int | None = None
    reference: str = "adapter_disabled"

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective {self.kind!r}: tunebench trains {', '.join(OBJECTIVES)}")
        choices = LOSS_TYPES.get(self.kind, DPO_LOSS_TYPES)
        if self.loss_type is None:
            self.loss_type = choices[0]
        if self.loss_type not in choices:
            raise ValueError(f"loss_type {self.loss_type!r}: {self.kind} here has {', '.join(choices)}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"kto's weights must be > 0, got {self.desirable_weight}, {self.undesirable_weight}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference {self.reference!r}: one of {', '.join(REFERENCES)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt token and a completion token), got "
                             f"{self.max_length}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.pair_layout not in PAIR_LAYOUTS:
            raise ValueError(f"pair_layout {self.pair_layout!r}: one of {', '.join(PAIR_LAYOUTS)}")

    @property
    def is_preference(self) -> bool:
        return self.kind in ("dpo", "orpo", "kto")

    @property
    def has_reference(self) -> bool:
        """DPO and KTO score against a reference (the model with its adapters off, in passes without gradient)."""
        return self.kind in ("dpo", "kto")

    @property
    def precomputes_reference(self) -> bool:
        """DPO's or KTO's reference computed once before training (ORPO has none)."""
        return self.has_reference and self.reference == "precomputed"

    @property
    def trained_sequences_per_row(self) -> int:
        """Sequences with gradient per row of ``micro_batch`` (a pair's chosen and rejected: 2)."""
        return 2 if self.kind in ("dpo", "orpo") else 1

    @property
    def nograd_forwards(self) -> tuple[float, ...]:
        """A step's forwards without gradient per micro-batch, each in multiples of the tokens it trains on: DPO's
        reference over the pairs; KTO's KL sequences under the policy, then the rows and KL sequences under the
        reference (each KL sequence as long as a row, on average); none where the reference was precomputed."""
        reference = () if self.precomputes_reference else {"dpo": (1.0,), "kto": (2.0,)}.get(self.kind, ())
        return ((1.0,) if self.kind == "kto" else ()) + reference


@dataclass
class TrainerConfig:
    """One training run's settings: method and knobs, loop, objective, precision and device.

    Attributes:
        method: what to train and the trainer's knobs.
        train: the loop.
        dtype: storage dtype of the frozen base (QLoRA: the compute dtype of the 4-bit weights).
        device: where the model computes.
        objective: the loss (default: next-token cross-entropy).
    """

    method: MethodOptions
    train: TrainSettings
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values (dtypes as strings), for the run's record."""
        method = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(self.method).items()}
        return {"method": method, "train": dict(vars(self.train)), "device": str(self.device),
                "dtype": str(self.dtype), "objective": dict(vars(self.objective))}
