"""Build a :class:`~kernels.trainer.model.DecoderModel` from a transformers checkpoint and apply the method.

Every tensor is read once, straight to where it will live (the compute device, or pinned host memory for what
the offload knobs keep on the host); QLoRA projections are quantised to NF4 as they arrive, and bitsandbytes 4-bit
checkpoints are wrapped without re-quantising. :func:`apply_method` then adds LoRA/DoRA adapters (PEFT's init),
sets what trains, and applies the offload and recomputation knobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kernels.ops.nf4 import NF4Tensor, quantize_nf4
from kernels.trainer.attention import Attention
from kernels.trainer.config import MLP_MODULES, DecoderConfig, MethodOptions
from kernels.trainer.model import MLP, DecoderLayer, DecoderModel
from kernels.trainer.moe import Experts, ExpertStacker
from kernels.trainer.norm import RMSNorm
from kernels.trainer.offload import WeightStreamer, checkpointed_layer_ids, streamed_layer_ids
from kernels.trainer.opset import FUSED_OPS, OpSet
from kernels.trainer.remake import mark_remade_mlp

_MLP_LEAVES = (*MLP_MODULES, "gate_up_proj")


def configure_allocator(options: MethodOptions) -> str:
    """Switch this process's CUDA caching allocator to expandable segments (``options.expandable_segments``),
    before the first weight is allocated: the allocator then grows one mapped range instead of caching
    fixed-size segments, so NVML's per-process memory stays near torch's allocated peak (without it, 0.8 GiB
    reserved above allocated in the 8B LoRA rows on an H100). Left alone where the user set
    ``PYTORCH_CUDA_ALLOC_CONF``/``PYTORCH_ALLOC_CONF``. Graphed runs take them too (QLoRA 8B, H200, torch 2.11:
    0.50 GiB less reserved and NVML than without, the same step time and losses: results/alloc_ab_h200-20261206);
    a torch that keeps its graph pools out of them runs the same, with less of that saving. Returns what was done."""
    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if user:
        return f"user: {user}"
    if not options.expandable_segments:
        return "default"
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # a torch without the setter, or a refused setting
        return f"default ({type(e).__name__}: {e})"[:200]
    return "expandable_segments:True"


def _safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / n for n in names]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no *.safetensors files")
    return files


def load_model(checkpoint: str | Path, options: MethodOptions, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cuda", seed: int | None = None) -> DecoderModel:
    """Build the model from a transformers checkpoint and apply the method.

    The model is built on the meta device and every tensor is read once, straight to where it will live
    (safetensors ``safe_open``): the compute device, or pinned host memory for what the offload knobs keep on
    the host; QLoRA projections are quantised as they arrive. So loading never needs more device memory than
    training: a 4-bit 8B model never holds its bf16 weights at once, and streamed layers never touch the GPU.

    A checkpoint saved by transformers with bitsandbytes 4-bit nf4 weights (``quantization_config`` in
    ``config.json``, e.g. the ``*-bnb-4bit`` uploads) is read as it is: its packed weights and quant states become
    :class:`NF4Tensor` s without re-quantising (QLoRA only; bitsandbytes itself is not needed).

    Args:
        checkpoint: directory with ``config.json`` and safetensors (what ``AutoModelForCausalLM`` loads).
        options: method and trainer knobs.
        dtype: base weight dtype (QLoRA: the compute dtype of the 4-bit weights).
        device: target device.
        seed: seeds the LoRA init (``torch.manual_seed``) when given.

    Returns:
        The model in train mode, with ``requires_grad`` set for the method.
    """
    checkpoint = Path(checkpoint)
    cfg = DecoderConfig.from_checkpoint(checkpoint)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        options.allocator = configure_allocator(options)
    quantize = options.kind == "qlora"
    prequantized = _bnb_4bit(cfg.raw, checkpoint)
    if prequantized and not quantize:
        raise ValueError(f"{checkpoint}: a bitsandbytes 4-bit checkpoint trains with method qlora only "
                         f"(got {options.kind!r})")
    model = DecoderModel(cfg, dtype, torch.device("meta"))
    targets = dict(model.named_parameters())
    linears = dict(model.linears())
    on_host = _host_tensors(cfg, options) if device.type == "cuda" else set()
    files = _safetensors_files(checkpoint)
    bnb_parts = _bnb_quant_states(files, device) if prequantized else {}
    stacker = ExpertStacker(model) if cfg.moe else None
    seen = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st_host, \
                safe_open(str(f), framework="pt", device=str(device)) as st_dev:
            for key in st_dev.keys():
                if key == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: some files carry the duplicate
                if _bnb_part(key):
                    continue  # a 4-bit weight's quant state: read with its weight below
                stacked = stacker.take(key, lambda k=key, st=st_dev: st.get_tensor(k)) if stacker else None
                if stacked is not None:  # one expert's slice of a stacked MoE tensor (original layout)
                    seen.add(stacked)
                    continue
                if key not in targets:
                    raise KeyError(f"{f.name}: unexpected tensor {key!r} for {cfg.model_type}")
                mod_name, _, leaf = key.rpartition(".")
                if key in bnb_parts:
                    linears[mod_name].qweight = NF4Tensor.from_bnb_serialized(st_dev.get_tensor(key), bnb_parts[key],
                                                                              dtype)
                    linears[mod_name].weight = None
                elif quantize and leaf == "weight" and mod_name in linears:
                    w = st_dev.get_tensor(key).to(dtype)
                    linears[mod_name].qweight = quantize_nf4(w, double_quant=options.double_quant)
                    linears[mod_name].weight = None
                    del w
                elif key in on_host:
                    _assign(model, key, st_host.get_tensor(key).to(dtype).pin_memory())
                else:
                    _assign(model, key, st_dev.get_tensor(key).to(dtype))
                seen.add(key)
    missing = (set(targets) - seen) | set(stacker.incomplete() if stacker else ())
    if missing:
        raise KeyError(f"{checkpoint}: tensors missing from the checkpoint: {sorted(missing)[:8]}")
    model.compute_device = device
    apply_method(model, options, seed)
    return model


def _bnb_4bit(config: dict[str, Any], checkpoint: Path) -> bool:
    """Whether a checkpoint's ``config.json`` (``config``) says it holds bitsandbytes 4-bit weights."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return False
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise NotImplementedError(f"{checkpoint}: bitsandbytes 8-bit checkpoints are not supported (4-bit nf4 only)")
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _bnb_part(key: str) -> str | None:
    """The suffix if ``key`` is one of the quant-state tensors saved beside a bitsandbytes 4-bit weight."""
    return next((sfx for sfx in NF4Tensor.BNB_SUFFIXES if key.endswith(".weight." + sfx)), None)


def _bnb_quant_states(files: list[Path], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """``{weight key: {suffix: tensor}}`` of every 4-bit weight's quant state, from any shard (they are small)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            for key in st.keys():
                sfx = _bnb_part(key)
                if sfx:
                    out.setdefault(key[: -len(sfx) - 1], {})[sfx] = st.get_tensor(key)
    return out


def _host_tensors(cfg: DecoderConfig, o: MethodOptions) -> set[str]:
    """Names of the tensors the offload knobs keep in host memory."""
    out = set()
    if not o.is_peft:
        return out
    if o.offload_weights and o.kind != "qlora":
        for i in streamed_layer_ids(cfg.num_layers, o.offload_weights):
            for m in cfg.layer_linear_names():
                out.add(f"model.layers.{i}.{'mlp' if m in _MLP_LEAVES else 'self_attn'}.{m}.weight")
    if not cfg.tie_word_embeddings:
        if o.offload_embeddings:
            out.add("model.embed_tokens.weight")
        if o.offload_lm_head:
            out.add("lm_head.weight")
    return out


def _assign(model: DecoderModel, key: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, leaf, nn.Parameter(t, requires_grad=False))


def apply_method(model: DecoderModel, options: MethodOptions, seed: int | None = None) -> None:
    """Set trainable parameters for the method; add LoRA/DoRA adapters (PEFT init) to the target linears."""
    model.options = options
    ops = OpSet.with_references(options.reference_ops) if options.reference_ops else FUSED_OPS
    cfg = model.cfg
    head_ops = ops.with_softcap(cfg.final_softcap) if cfg.final_softcap is not None else ops
    for m in model.modules():
        if isinstance(m, DecoderModel):
            m.ops = head_ops
        elif isinstance(m, (RMSNorm, Attention, MLP, Experts)):
            m.ops = ops
        if isinstance(m, (Attention, MLP)):
            m.group_projections = options.group_projections
        if isinstance(m, Attention):
            m.attention_backend = options.attention_backend
        if isinstance(m, DecoderLayer):
            m.remake_activations = options.remake_activations
            m.mlp_chunk_tokens = options.mlp_chunk_tokens
            m.reuse_dequant = options.reuse_dequant
    model.gradient_checkpointing = options.gradient_checkpointing
    model.offload_checkpoints = options.offload_checkpoints
    model.checkpointed_layers = None
    if options.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif options.is_peft:
        if seed is not None:
            torch.manual_seed(seed)
        experts = sorted(set(options.target_modules) & {*_MLP_LEAVES, "w1", "w2", "w3"}) if cfg.moe else []
        if experts:
            raise ValueError(f"target_modules {experts}: LoRA on {cfg.model_type}'s experts is not built (they are "
                             "3-D tensors, not linear modules; all-linear means the attention projections)")
        for name, mod in model.linears():
            if name.rsplit(".", 1)[-1] in options.target_modules:
                mod.add_lora_(options.lora_r, options.lora_alpha, options.lora_dropout, options.kind == "dora",
                              options.lora_dtype, model.device_of_compute)
    else:
        raise ValueError(f"unknown method kind {options.kind!r}")
    _apply_offload(model, options)
    model.train()


def _apply_offload(model: DecoderModel, o: MethodOptions) -> None:
    frozen_ok = o.is_peft
    if (o.offload_weights or o.offload_embeddings or o.offload_lm_head) and not frozen_ok:
        raise ValueError("offload_weights / offload_embeddings / offload_lm_head apply to frozen weights "
                         "(lora, dora, qlora), not to full fine-tuning")
    tied = model.lm_head is None
    cuda = model.device_of_compute.type == "cuda"
    for flag, holder in ((o.offload_embeddings, model.model.embed_tokens), (o.offload_lm_head, model.lm_head)):
        if flag and not tied and holder.weight.device.type != "cpu":  # load_model already put it there
            host = holder.weight.data.to("cpu")
            holder.weight = nn.Parameter(host.pin_memory() if cuda else host, requires_grad=False)
    if o.offload_weights:
        if not o.gradient_checkpointing:
            raise ValueError("offload_weights needs gradient checkpointing (layers are re-fetched for backward)")
        if o.kind == "qlora":
            raise ValueError("offload_weights streams bf16 weights; QLoRA's 4-bit layers are small enough to stay")
        ids = streamed_layer_ids(model.cfg.num_layers, o.offload_weights)
        model.streamer = WeightStreamer(model, ids, model.device_of_compute)
    model.checkpointed_layers = checkpointed_layer_ids(model.cfg.num_layers, o)
    mark_remade_mlp(model, o)
    if o.cuda_graph:
        why = [w for w, bad in (("a CUDA device", model.device_of_compute.type != "cuda"),
                                # an offloaded input embedding is gathered before each replay (StepGraph)
                                ("no host offload inside the step (offload_weights, offload_lm_head, "
                                 "offload_checkpoints)", o.offload_weights or o.offload_lm_head
                                 or o.offload_checkpoints),
                                ("lora_dropout 0", o.lora_dropout > 0),
                                # the loop over experts syncs with the host per expert: not capturable
                                ("grouped expert GEMMs (torch._grouped_mm: bf16 on a Hopper GPU)",
                                 model.family_ops().get("moe_experts", "torch-grouped-mm") != "torch-grouped-mm"),
                                ) if bad]
        if why:
            raise ValueError(f"cuda_graph needs {' and '.join(why)}")
