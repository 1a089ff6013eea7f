"""A Llama-style decoder for training (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, mixtral), built on the
fused ops in ``kernels.ops``.

It has transformers' module and tensor names (``model.layers.N.self_attn.q_proj``, ``lm_head``), so it loads the
checkpoint files transformers loads (:mod:`kernels.trainer.loading`) and computes the same function as
``AutoModelForCausalLM`` (tests compare logits), with:

- RMSNorm from :func:`kernels.ops.rms_norm.rms_norm`; the residual add before ``post_attention_layernorm`` is fused
  into it. The add at the end of the block stays a plain add so a layer's only input and output is the
  residual stream (one tensor per checkpointed layer, not two).
- RoPE from :mod:`kernels.ops.rope` (``rope_theta``, Llama-3 or linear ``rope_scaling``), positions from
  ``position_ids``.
- SwiGLU from :func:`kernels.ops.swiglu.swiglu`, Gemma's GeGLU from :func:`kernels.ops.swiglu.geglu`.
- The families' own parts: Qwen3's and Gemma-3's per-head RMSNorm of queries and keys, Gemma-3's own RoPE in its
  sliding-window layers; Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` (kept fused); Gemma-2's ``1 + weight`` norms,
  sandwich norms, scaled embeddings, soft-capped attention (below) and logits (the fused head's ``softcap``),
  sliding-window layers; Mixtral's experts (:mod:`kernels.trainer.moe`).
- Attention: :mod:`kernels.trainer.attention` (SDPA; packed rows through flash varlen or a block mask; soft-capped
  and sliding-window layers through compiled FlexAttention on CUDA, :mod:`kernels.trainer.flex`).
- LM head + loss: :func:`kernels.ops.fused_linear_cross_entropy.fused_linear_cross_entropy` (no
  ``[tokens, vocab]`` logits on CUDA); the loss is a *sum*, divided inside the op by ``num_items`` when the
  trainer passes the loss tokens of the whole optimizer step (what the HF Trainer does with
  ``num_items_in_batch``).
- LoRA / DoRA / QLoRA projections: :class:`kernels.trainer.linear.Linear`; full fine-tuning makes every
  weight trainable.
- Gradient checkpointing per decoder layer (all layers, or ``recompute_layers`` of them) and host offload of
  frozen weights, embeddings, LM head and checkpointed inputs: :mod:`kernels.trainer.offload`.

On CPU without ``TRITON_INTERPRET=1`` each op runs its PyTorch reference, so the model trains anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ops.rope import rope_cos_sin
from kernels.trainer.attention import Attention, SharedPrompts, packed_attention_mask
from kernels.trainer.config import DecoderConfig, MethodOptions
from kernels.trainer.flex import block_mask, flex_layer, flex_runs
from kernels.trainer.linear import Linear, project
from kernels.trainer.moe import Experts, SparseMoE, grouped_mm_ok
from kernels.trainer.norm import RMSNorm
from kernels.trainer.offload import LayerCall, LayerCheckpoint, WeightStreamer, copy_stream
from kernels.trainer.opset import FUSED_OPS
from kernels.trainer.remake import RemadeSaves, Shared, tiled_mlp
from kernels.trainer.torch_ops import window_mask


class MLP(nn.Module):
    """The gated MLP: ``down(act(gate(x)) * up(x))`` with SwiGLU or Gemma's GeGLU (both fused ops of
    :mod:`kernels.ops.swiglu`); Phi-3's ``gate_up_proj`` stays one fused linear."""

    ops = FUSED_OPS
    group_projections = True

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.intermediate, self.fused, self.gelu = i, cfg.fused_gate_up, cfg.activation == "gelu_tanh"
        if cfg.fused_gate_up:
            self.gate_up_proj = Linear(h, 2 * i, b, dtype, device)
        else:
            self.gate_proj = Linear(h, i, b, dtype, device)
            self.up_proj = Linear(h, i, b, dtype, device)
        self.down_proj = Linear(i, h, b, dtype, device)

    def forward(self, x: torch.Tensor, saves: RemadeSaves | None = None, remake_gate_up: bool = False) -> torch.Tensor:
        """``saves``: the layer's remade saves; ``remake_gate_up``: gate and up are remade in backward from ``x``
        (itself remade) instead of kept (:class:`~kernels.trainer.remake.Shared`)."""
        gate, up = self._gate_up(x)
        # registered before the op that saves them: the same projection of the same input, bitwise the forward's
        pair = None
        if saves is not None and remake_gate_up:
            pair = Shared(lambda make=saves.recipe(x): self._gate_up(make()), takers=2)
            saves.remake(gate, lambda: pair.take()[0])
            saves.remake(up, lambda: pair.take()[1])
        act = self._act(gate, up)
        if pair is not None:
            saves.remake(act, lambda: self._act(*pair.peek()))
        elif saves is not None:  # down_proj's backward gets it remade from gate and up, which the activation keeps
            saves.remake(act, lambda: self._act(gate, up))
        return self.down_proj(act)

    def _gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            gate_up = self.gate_up_proj(x)
            return gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
        gate, up = project(x, (self.gate_proj, self.up_proj), self.group_projections)
        return gate, up

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.ops.geglu(gate, up) if self.gelu else self.ops.swiglu(gate, up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; Gemma-2's "sandwich" adds a norm after attention and around the MLP; Mixtral's
    MLP is a sparse mixture of experts (:class:`~kernels.trainer.moe.SparseMoE`)."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, eps, one = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one
        self.self_attn = Attention(cfg, dtype, device)
        self.mlp = SparseMoE(cfg, dtype, device) if cfg.moe else MLP(cfg, dtype, device)
        self.input_layernorm = RMSNorm(h, eps, dtype, device, one)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, device, one)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, dtype, device, one)
            self.post_feedforward_layernorm = RMSNorm(h, eps, dtype, device, one)

    remake_activations = True  # norm outputs and the gated activation remade in backward (kernels/trainer/remake.py)
    mlp_chunk_tokens: int | None = None  # the dense MLP over chunks of this many tokens (remake.TiledMLP)
    reuse_dequant = True  # its recompute keeps dequantised NF4 weights for its backward (offload.LayerCall)
    remake_mlp = False  # kept layer: its dense MLP's gate and up remade in backward too (remake_mlp_layers)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with RemadeSaves(self.remake_activations) as saves:
            return self._forward(h, cos, sin, mask, saves)

    def _forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 saves: RemadeSaves) -> torch.Tensor:
        # a norm's output is remade from its input, the residual stream its own backward keeps (after a fused
        # residual add: the stored sum, which is what the fused op normalised)
        x = saves.remake(self.input_layernorm(h), lambda h=h: self.input_layernorm(h))
        a = self.self_attn(x, cos, sin, mask)
        if self.sandwich:
            a = self.post_attention_layernorm(a)
            x, h = self.pre_feedforward_layernorm(a, residual=h)  # fused: h = h + a; x = norm(h)
            saves.remake(x, lambda h=h: self.pre_feedforward_layernorm(h))
            return h + self.post_feedforward_layernorm(self._mlp(x, saves))
        x, h = self.post_attention_layernorm(a, residual=h)  # fused: h = h + a; x = norm(h)
        saves.remake(x, lambda h=h: self.post_attention_layernorm(h))
        return h + self._mlp(x, saves)

    def _mlp(self, x: torch.Tensor, saves: RemadeSaves) -> torch.Tensor:
        if isinstance(self.mlp, SparseMoE):
            return self.mlp(x)
        if self.mlp_chunk_tokens:  # long context: the MLP's activations one chunk at a time
            return tiled_mlp(self.mlp, x, self.mlp_chunk_tokens)
        return self.mlp(x, saves, self.remake_mlp)


class DecoderModel(nn.Module):
    """Causal LM with transformers' module names (``model.layers.N...``, ``lm_head``) for loading and saving.

    Args:
        cfg: architecture.
        dtype: storage dtype of the base weights (bf16 on GPU; fp32 in CPU tests).
        device: where the weights live.
    """

    ops = FUSED_OPS

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        device = torch.device(device)
        self.cfg, self.dtype = cfg, dtype
        self.model = nn.Module()
        # _weight: skip nn.Embedding's random init (it would move the RNG that the LoRA init must share with PEFT)
        self.model.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                                 device=device))
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, cfg.norm_plus_one)
        self.lm_head: nn.Module | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Module()  # a bare module so the tensor is named lm_head.weight, as in transformers
            self.lm_head.weight = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.options = MethodOptions(kind="none")
        self.gradient_checkpointing = False
        self.checkpointed_layers: frozenset[int] | None = None  # None: every layer (when checkpointing)
        self.offload_checkpoints = False
        self.streamer: WeightStreamer | None = None
        self.compute_device: torch.device | None = None if device.type == "meta" else device
        self._lm_head_prefetch: tuple[torch.Tensor, Any] | None = None

    # -- helpers --------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.device_of_compute

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def linears(self):  # noqa: ANN201
        """``(qualified name, Linear)`` for every projection, e.g. ``model.layers.0.self_attn.q_proj``."""
        for name, mod in self.named_modules():
            if isinstance(mod, Linear):
                yield name, mod

    # -- forward --------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      shared: SharedPrompts | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, S, H]``. ``position_ids`` given = packed rows; with ``shared``, packed
        preference pairs whose completions share their prompt (:mod:`kernels.trainer.attention`)."""
        cfg = self.cfg
        h = self._embed(input_ids)
        self._prefetch_lm_head()
        mask = None
        seq = input_ids.shape[1]
        windowed = cfg.sliding_window is not None and seq > cfg.sliding_window
        # soft-capped scores or a window shorter than the rows: FlexAttention block masks where it runs (CUDA,
        # bf16/fp16: kernels/trainer/flex.py), else bool masks (no flash kernel takes either)
        flex_full, flex_local = (flex_layer(h.device, h.dtype, self.options.flex_attention, cfg.attn_softcap, w, seq)
                                 for w in (None, cfg.sliding_window))
        bool_local = windowed and not flex_local  # the sliding layers' bool mask is cut from the packed one
        flash_ok = self.options.varlen_attention and not bool_local and cfg.attn_softcap is None
        # gemma3: its sliding-window layers rotate with their own RoPE, whatever the rows' length
        local_rope = cfg.local_rope_theta is not None
        if position_ids is None:
            cos, sin = self._rope_tables(seq, input_ids.device)
            rope_local = self._rope_tables(seq, input_ids.device, local=True) if local_rope else (cos, sin)
        else:
            # the layers' "mask" argument: int32 cu_seqlens (varlen) or the [B, S, S] bool mask
            if bool_local or not flex_full:  # some layer takes it
                mask = packed_attention_mask(position_ids, h, flash_ok, shared)
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            rope_local = (rope_cos_sin(position_ids, cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling)
                          if local_rope else (cos, sin))
        local = mask
        if windowed and flex_local:  # the sliding-window layers' mask
            local = block_mask(seq, cfg.sliding_window, h.device, position_ids, shared)
        elif windowed:
            pos = position_ids if position_ids is not None else torch.arange(seq, device=input_ids.device)[None]
            local = window_mask(pos, cfg.sliding_window, mask)
        full = block_mask(seq, None, h.device, position_ids, shared) if flex_full else mask
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if ckpt and not h.requires_grad:
            h = h.detach().requires_grad_(True)  # the reentrant-style Function needs a grad-requiring input
        rope_global = (cos, sin)
        rng = self.training and self.options.lora_dropout > 0
        sliding = set(cfg.sliding_layers) if windowed else set()
        rotated_locally = set(cfg.sliding_layers) if local_rope else set()
        for i, layer in enumerate(self.model.layers):
            mask = local if i in sliding else full
            cos, sin = rope_local if i in rotated_locally else rope_global
            extra = (cos, sin) if mask is None else (cos, sin, mask)
            if ckpt and self.checkpointed_layers is not None and i not in self.checkpointed_layers:
                h = layer(h, cos, sin, mask)  # selective recomputation: this layer keeps its activations
            elif ckpt:
                # our own checkpoint, not torch.utils.checkpoint's non-reentrant one, whose forward builds the
                # graph and runs saved-tensor hooks: host time in a step that is host-bound (kernels/NOTES.md)
                call = LayerCall(layer, i, self.offload_checkpoints, self.streamer, rng)
                h = LayerCheckpoint.apply(call, h, *extra)
            elif self.streamer is not None:
                raise RuntimeError("offload_weights streams layers inside checkpointed training steps only; "
                                   "for evaluation, build the model without it")
            else:
                h = layer(h, cos, sin, mask)
        return self.model.norm(h)

    def _rope_tables(self, seq: int, device: torch.device, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions ``0..seq-1`` (``local``: of gemma3's sliding-window layers), kept for the next call
        of the same length (no host-to-device copy of the frequencies per forward: a CUDA graph cannot capture
        one)."""
        key = "_rope_cache_local" if local else "_rope_cache"
        cached = self.__dict__.get(key)
        if cached is None or cached[0] != (seq, device):
            cfg, pos = self.cfg, torch.arange(seq, device=device)[None]
            theta, scaling = (cfg.local_rope_theta, cfg.local_rope_scaling) if local else (cfg.rope_theta,
                                                                                          cfg.rope_scaling)
            cached = ((seq, device), *rope_cos_sin(pos, cfg.head_dim, theta, scaling))
            self.__dict__[key] = cached
        return cached[1], cached[2]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight
        staged = next((h for ids, h in self.__dict__.get("_staged_embeddings", ()) if ids is input_ids), None)
        if staged is not None:
            # a graphed step's static rows, gathered from the host table before the replay (train.StepGraph)
            h = staged
        elif w.device == input_ids.device:
            h = self.model.embed_tokens(input_ids)
        else:
            # offloaded (frozen) table: gather the rows on the host, ship [B, S, H] (33 MB at 8B shapes) to the device
            h = F.embedding(input_ids.cpu(), w).to(input_ids.device, non_blocking=True)
        if self.cfg.embed_scale is not None:  # gemma2: sqrt(hidden), rounded to the weights' dtype as transformers
            # a Python number (the scale rounded to that dtype on the host): a device tensor made here would be a
            # host-to-device copy, which a CUDA-graph capture refuses; the product is the same bf16 rounding
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype).item()
        return h

    def _prefetch_lm_head(self) -> None:
        """Start copying a host-offloaded LM head now, so the copy overlaps the layers' forward."""
        if self.lm_head is None or self.lm_head.weight.device == self.device_of_compute:
            return
        dev = self.device_of_compute
        if dev.type != "cuda":
            self._lm_head_prefetch = (self.lm_head.weight, None)
            return
        stream = copy_stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            w = self.lm_head.weight.to(dev, non_blocking=True)
        self._lm_head_prefetch = (w, stream.record_event())

    @property
    def device_of_compute(self) -> torch.device:
        """Where activations live (the final norm weight never moves to the host)."""
        return self.compute_device or self.model.norm.weight.device

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, reduction: str = "sum",
                num_items: int | torch.Tensor | None = None) -> torch.Tensor:
        """Loss (``labels`` given: next-token cross-entropy, labels shifted here) or logits (tests, eval).

        Args:
            input_ids: ``[B, S]`` token ids (right-padded).
            labels: ``[B, S]`` unshifted labels, -100 where no loss (padding, prompt, first token of a sample).
            position_ids: ``[B, S]`` for packed rows only; None for one sample per row.
            reduction: ``"sum"`` or ``"mean"``.
            num_items: with ``"sum"``: divide by this inside the loss op (the optimizer step's loss tokens, a
                number or a device scalar), so the gradients are scaled before they are rounded.

        Returns:
            Scalar fp32 loss, or ``[B, S, vocab]`` logits when ``labels`` is None.
        """
        h = self.hidden_states(input_ids, position_ids)
        w = self._head_for_loss()
        if labels is None:
            logits = h @ w.t()
            cap = self.cfg.final_softcap
            return logits if cap is None else torch.tanh(logits / cap) * cap
        return self.ops.fused_linear_cross_entropy(h, w, labels, ignore_index=-100, reduction=reduction, shift=True,
                                                   chunk_size=self.options.fused_ce_chunk,
                                                   num_items_in_batch=num_items)

    def _head_for_loss(self) -> torch.Tensor:
        """The LM head weight on the compute device: a host-offloaded head's prefetched copy (waited for here)."""
        w = self.lm_head_weight()
        if self._lm_head_prefetch is not None:
            w, event = self._lm_head_prefetch
            self._lm_head_prefetch = None  # the device copy dies with this forward (the CE op does not keep it)
            if event is not None:
                torch.cuda.current_stream(w.device).wait_event(event)
                w.record_stream(torch.cuda.current_stream(w.device))
        return w

    def token_logprobs(self, input_ids: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                       position_ids: torch.Tensor | None = None, shared: SharedPrompts | None = None) -> torch.Tensor:
        """Log-probabilities of ``targets`` at some positions: the LM head of the preference objectives.

        Only the scored positions go through the head (:func:`kernels.ops.fused_linear_logprobs`, chunked: no
        ``[tokens, vocab]`` logits): for DPO, the completion tokens, not the prompts twice over.

        Args:
            input_ids: ``[B, S]`` token ids (right-padded rows, or packed rows with ``position_ids``).
            rows: ``[N]`` int64 flat positions (``b * S + t``) whose next-token distribution is scored.
            targets: ``[N]`` the token each of those positions should predict (the id at ``t + 1``).
            position_ids: ``[B, S]`` for packed rows only.
            shared: packed pairs sharing their prompt (:class:`kernels.trainer.attention.SharedPrompts`).

        Returns:
            ``[N]`` fp32 log-probabilities, differentiable with respect to the trainable parameters.
        """
        h = self.hidden_states(input_ids, position_ids, shared)
        w = self._head_for_loss()
        scored = h.reshape(-1, h.shape[-1]).index_select(0, rows)
        return self.ops.fused_linear_logprobs(scored, w, targets, chunk_size=self.options.fused_ce_chunk)

    # -- read-back ------------------------------------------------------------------------------------------------
    def family_ops(self) -> dict[str, str]:
        """The parts of this family that run as PyTorch ops rather than fused kernels (empty for Llama's layout),
        under the names a run records beside the fused ops' (kernels/NOTES.md, "Families")."""
        cfg, out = self.cfg, {}
        flex = flex_runs(self.device_of_compute, self.dtype, self.options.flex_attention)
        if cfg.attn_softcap is not None:
            out["attention"] = "flex-attention-softcap" if flex else "torch-eager-softcap"
        elif cfg.sliding_window is not None:
            out["attention_sliding_window"] = (f"{'flex-attention' if flex else 'sdpa-window-mask'} (rows longer "
                                               "than the window)")
        if cfg.moe:
            probe = torch.empty(0, cfg.hidden_size, dtype=self.dtype, device=self.device_of_compute)
            grouped = Experts.grouped and grouped_mm_ok(probe, cfg.intermediate_size)
            out["moe_experts"] = "torch-grouped-mm" if grouped else "torch-loop-over-experts"
        return out

    def effective_settings(self) -> dict[str, Any]:
        """Method settings read from the live modules: train mode, checkpointing, dtype, quantisation,
        parameter counts and LoRA settings (what a benchmark compares with what it asked for)."""
        ckpt = bool(self.gradient_checkpointing and self.training
                    and (self.checkpointed_layers is None or self.checkpointed_layers))
        eff: dict[str, Any] = {"train_mode": bool(self.training), "gradient_checkpointing": ckpt}
        dtypes: dict[torch.dtype, int] = {}  # of the frozen weights; of all weights for full fine-tuning
        all_dtypes: dict[torch.dtype, int] = {}
        quant, dq, compute = None, None, None
        targets, lora = set(), None
        total = trainable = 0
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("nf4_"):
                continue  # an NF4 weight's parts as FSDP-sharded parameters (kernels.trainer.distributed): below
            total += p.numel()
            all_dtypes[p.dtype] = all_dtypes.get(p.dtype, 0) + p.numel()
            if p.requires_grad:
                trainable += p.numel()
            elif p.dtype.is_floating_point:
                dtypes[p.dtype] = dtypes.get(p.dtype, 0) + p.numel()
        for name, mod in self.linears():
            if mod.qweight is not None:
                quant, dq, compute = "nf4", mod.qweight.double_quant, mod.qweight.dtype
                total += mod.qweight.packed.numel()  # packed bytes, as bitsandbytes' Params4bit counts
            if mod.lora_A is not None:
                targets.add(name.rsplit(".", 1)[-1])
                lora = mod
        if dtypes or all_dtypes:
            eff["dtype"] = str(max(dtypes or all_dtypes, key=(dtypes or all_dtypes).get)).removeprefix("torch.")
        eff["quantization"] = quant
        if quant is not None:
            eff["double_quant"] = dq
            eff["dtype"] = str(compute).removeprefix("torch.")
        eff["trainable_params"], eff["total_params"] = trainable, total
        if lora is not None:
            eff.update({"lora_r": lora.lora_r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                        "use_dora": lora.magnitude is not None, "target_modules": sorted(targets)})
        return eff
