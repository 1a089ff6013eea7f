"""tunebench: our own trainer (``kernels/trainer``) on the Triton ops of ``kernels/ops``.

Its overrides are the trainer's knobs (:class:`TunebenchOverrides`; kernels/trainer/README.md, "Knobs", says
what each costs and saves); the run records them in its ``extra["trainer"]``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from adapters_for_tools.contract import AdapterInfo, Overrides, family_of

REFERENCE_OPS = Literal["rms_norm", "rope", "swiglu", "geglu", "fused_linear_cross_entropy", "fused_linear_logprobs"]
# what `plan` chooses (kernels/trainer/plan.py, Plan)
PLANNED = frozenset({"recompute_layers", "remake_mlp_layers", "offload_checkpoints", "offload_weights",
                     "offload_embeddings", "offload_lm_head", "cuda_graph", "mlp_chunk_tokens"})


class TunebenchOverrides(Overrides):
    """The trainer's knobs (``frameworks: [{name: tunebench, overrides: {recompute_layers: 1}}]``)."""

    # selective recomputation: N evenly spread layers recompute, the others keep activations (-1: all recompute)
    recompute_layers: int = Field(-1, ge=-1)
    offload_checkpoints: bool = False  # checkpointed layer inputs in pinned host memory
    # frozen bf16 base weights of N decoder layers streamed from pinned host memory (-1: all)
    offload_weights: int = Field(0, ge=-1)
    offload_embeddings: bool = False  # the frozen, untied input embedding table on the host
    offload_lm_head: bool = False  # the frozen, untied LM head on the host
    fused_ce_chunk: int | None = Field(None, ge=1)  # tokens per chunk of the fused LM head + loss (None: op default)
    lora_dtype: Literal["float32", "bfloat16"] = "float32"  # LoRA A/B (and DoRA magnitude) storage dtype
    # ops run as their PyTorch references: for bisecting a loss-parity departure op by op
    reference_ops: list[REFERENCE_OPS] = Field(default_factory=list)
    group_projections: bool = True  # false: one LoRA call per projection instead of one per q/k/v and gate/up group
    remake_activations: bool = True  # false: keep norm outputs and the gated activation instead of remaking them
    # of the layers that keep their activations, N (-1: all) remake their MLP's gate and up in backward too
    remake_mlp_layers: int = Field(0, ge=-1)
    # QLoRA: a recomputing layer's backward uses the bf16 weights its recompute dequantised (false: dequantise again)
    reuse_dequant: bool = True
    mlp_chunk_tokens: int | None = Field(None, ge=1)  # the MLP over chunks of this many tokens (long context)
    cuda_graph: bool = False  # the whole optimizer step captured as one CUDA graph and replayed
    varlen_attention: bool = True  # false: packed rows through a block mask instead of flash varlen
    # unpacked rows' causal attention: torch's choice (flash) or cuDNN's fused attention first
    attention_backend: Literal["auto", "cudnn"] = "auto"
    # false: soft-capped and sliding-window attention eager / through a masked SDPA instead of compiled FlexAttention
    flex_attention: bool = True
    expandable_segments: bool = True  # false: leave the CUDA allocator in its default mode
    # dpo/orpo: a micro-batch's chosen and rejected sequences as one packed row, one row with each prompt computed
    # once for both of its completions, or TRL's right-padded rows (kernels/trainer/preference.py)
    pair_layout: Literal["packed", "shared_prompt", "padded"] = "packed"
    # plan to a memory budget: the trainer sets the PLANNED knobs itself, fastest predicted within the budget.
    # auto: hardware.memory_budget_gib when the scenario has one, else the GPU's free memory; a number: GiB
    plan: Literal["auto"] | Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _plan_sets_the_knobs(self) -> TunebenchOverrides:
        both = sorted(PLANNED & self.model_fields_set) if self.plan is not None else []
        if both:
            raise ValueError(f"plan chooses {', '.join(both)} itself: leave {'it' if len(both) == 1 else 'them'} out")
        return self

    @field_validator("recompute_layers")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 would switch gradient checkpointing off; set train.gradient_checkpointing: false "
                             "in the scenario for that")
        return v


MOE_FAMILIES = frozenset({"mixtral", "qwen3_moe"})


def row_problems(sc, o: TunebenchOverrides) -> list[tuple[tuple[str, ...], str]]:  # noqa: ANN001
    """Knobs the scenario's own settings rule out, said at validation instead of as a failed run: what each knob
    needs of the device, the method, the objective, the data and the GPU setup (kernels/trainer/README.md, "Knobs";
    the trainer refuses the same when it loads, for callers that skip validation)."""
    kind, strategy, objective = sc.method.kind, sc.hardware.strategy, sc.objective.kind
    dropout = kind in ("lora", "qlora", "dora") and sc.method.lora_dropout > 0
    one_process = (f"one process (not hardware.strategy {strategy})", bool(strategy))
    inside = [k for k in ("offload_weights", "offload_lm_head", "offload_checkpoints") if getattr(o, k)]
    needs = {  # knob: (what it needs, whether this scenario lacks it)
        "cuda_graph": [("a CUDA device (hardware.device: cuda)", sc.hardware.device != "cuda"),
                       ("method.lora_dropout 0 (the replayed graph would reuse one dropout mask)", dropout),
                       ("data.packing off (packed rows build a mask per batch)", sc.data.packing),
                       (f"no host offload inside the step (not {', '.join(inside)})", bool(inside)),
                       (f"the sft objective (the graphed step is the SFT step, not {objective})", objective != "sft"),
                       one_process],
        "offload_weights": [("a dense frozen base (method lora or dora: streamed layers are bf16)",
                             kind not in ("lora", "dora")),
                            ("train.gradient_checkpointing (streamed layers are fetched again for backward)",
                             not sc.train.gradient_checkpointing),
                            (f"no {objective} objective (its reference pass runs without the checkpointed passes "
                             "that stream)", objective in ("dpo", "kto")),
                            one_process],
        "offload_embeddings": [("frozen weights (method lora, dora or qlora)", kind == "full"), one_process],
        "offload_lm_head": [("frozen weights (method lora, dora or qlora)", kind == "full"), one_process],
        "offload_checkpoints": [one_process],
        "mlp_chunk_tokens": [one_process],
        "remake_mlp_layers": [("remake_activations", not o.remake_activations),
                              ("method.lora_dropout 0 (the projection made again would draw new dropout masks)",
                               dropout),
                              ("a dense MLP (not a mixture of experts)", family_of(sc) in MOE_FAMILIES),
                              ("the MLP over all tokens at once (no mlp_chunk_tokens)", bool(o.mlp_chunk_tokens))],
        "attention_backend": [("a CUDA device (hardware.device: cuda): cuDNN's attention is a CUDA kernel",
                               o.attention_backend != "auto" and sc.hardware.device != "cuda")],
        "plan": [(f"{one_process[0]}: what it plans (host offload, CUDA graphs) runs in one", bool(strategy)),
                 ("for auto, a CUDA device (hardware.device: cuda): auto plans to hardware.memory_budget_gib or "
                  "the GPU's free memory; on a cpu give a budget in GiB",
                  o.plan == "auto" and sc.hardware.device != "cuda")],
    }
    out = []
    for knob, reqs in needs.items():
        why = [w for w, lacking in reqs if lacking]
        if getattr(o, knob) and why:  # set: a plan, a count other than 0, a flag on
            out.append(((knob,), f"needs {' and '.join(why)}"))
    if o.pair_layout != "packed" and objective not in ("dpo", "orpo"):
        out.append((("pair_layout",), f"needs a dpo or orpo objective (it arranges pairs; {objective} has none)"))
    return out


def reference_refusal(sc) -> str | None:  # noqa: ANN001
    """DPO's and KTO's reference here is the policy with its adapters switched off, in every step or once before
    training: a reference copy, or full fine-tuning (which has no adapters to switch off), is refused."""
    ob = sc.objective
    if ob.kind in ("dpo", "kto") and (ob.reference_for(sc.method.is_peft) == "copy" or not sc.method.is_peft):
        return (f"{ob.kind} reference {ob.reference_for(sc.method.is_peft)!r} with method {sc.method.kind}: "
                "tunebench's reference is the policy with its adapters switched off (method lora, dora or qlora; "
                "objective.reference auto, adapter_disabled or precomputed)")
    return None


INFO = AdapterInfo(
    name="tunebench",
    description="tunebench's Triton-fused trainer (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy, LoRA, NF4)",
    env="base",
    # the model types kernels/trainer/config.py reads (MODEL_TYPES); the other families' rows are stored as
    # unsupported with that reason
    families=frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral",
                        "qwen3_moe"}),
    requires=("torch", "triton", "safetensors", "transformers"),
    version_of="tunebench",
    notes="On CPU the ops run their PyTorch references (TRITON_INTERPRET=1 runs the Triton interpreter instead).",
    overrides=TunebenchOverrides,
    check_row=row_problems,
    # kernels/trainer/distributed.py: DDP of the adapters; FSDP2 of every weight, a 4-bit base included
    strategies={"ddp": frozenset({"lora", "dora", "qlora"}), "fsdp": frozenset({"full", "lora", "qlora"})},
    # kernels/trainer/preference.py and kto.py: TRL's DPO, ORPO and KTO losses
    objectives=frozenset({"sft", "dpo", "orpo", "kto"}),
    objectives_note="grpo is not built in tunebench's trainer (it has no sampling loop)",
    refuse=reference_refusal,
    budget_overrides=frozenset({"plan"}),  # plan: auto plans to hardware.memory_budget_gib (adapter.predicts_fit)
)
