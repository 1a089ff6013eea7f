"""What a plan costs, and which plan to run under a memory budget: which layers recompute and what lives in host memory.

- :class:`CostModel`: per decoder layer, the bytes a layer keeps when it does not recompute, its checkpoint (its
  input) when it does, its frozen weights, the transient of its recompute + backward, and its forward / backward
  time; per model, what always stays on the device (trainable parameters, their gradients and optimizer state),
  the embeddings, the LM head, the loss chunk, and the host link's speed. :func:`costs_for` builds it
  analytically from the architecture, the method and the loop; :meth:`CostModel.corrected` applies what the first
  steps measured (one factor on activation bytes, one on compute time, the static bytes seen after loading).
- :class:`Plan`: the knobs the planner sets (``recompute_layers``, ``remake_mlp_layers``, ``offload_weights``,
  ``offload_checkpoints``, ``offload_embeddings``, ``offload_lm_head``, ``cuda_graph``, and for long rows
  ``mlp_chunk_tokens``); :func:`predict` gives its peak allocated bytes and step time under a cost model.
- :func:`choose`: the plan with the lowest predicted step time whose predicted peak fits the budget (None when none
  does); pure, so a bigger budget never gives a slower predicted plan. :func:`lean_plan`: the smallest peak.

A run plans through :class:`kernels.trainer.planner.Planner` (budget, device rates, probe, re-plan).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from itertools import accumulate
from typing import Any

import torch

from kernels.ops.fused_linear_cross_entropy import default_chunk_size
from kernels.trainer.config import DecoderConfig, MethodOptions
from kernels.trainer.flex import flex_layer
from kernels.trainer.offload import checkpointed_layer_ids, streamed_layer_ids
from kernels.trainer.remake import mlp_remake_needs, remade_mlp_layer_ids

GIB = 2**30
# A CUDA-graphed step reserves more than the eager steps the probe measures: its private pool's slack. QLoRA 8B
# planned to 12 GiB (H200, 8 recomputing layers): 9.25 GiB allocated eagerly, 10.99 reserved graphed with the default
# allocator, 0.50 GiB less with expandable segments (results/alloc_ab_h200-20261206): 1.24 GiB over the eager peak,
# of which the budget's margin holds 0.48 (4 %), so 0.76 GiB is the graph's; 1 GiB keeps a quarter spare. And the
# host launches it saves per layer and micro-batch: LoRA ~0.25 ms per kept layer,
# ~0.03 ms per recomputed one (H100, 4-recompute row: 278 -> 271 ms; all-recompute: 376 -> 375 ms); QLoRA ~1.05 ms
# per layer (H200, all-recompute rows of one sweep, three repeats each: 397 -> 363 ms), kernels/NOTES.md.
GRAPH_EXTRA_BYTES = GIB
GRAPH_SAVING_S = 0.25e-3
GRAPH_SAVING_RECOMPUTED_S = 0.03e-3
QLORA_GRAPH_SAVING_S = 1.05e-3
# The chunk a plan runs the dense MLP over when it tiles it (kernels/trainer/remake.py, TiledMLP): the frontier
# scenarios' tunebench-long row. Offered only to micro-batches of more tokens than this.
MLP_CHUNK_TOKENS = 8192
# Realised GEMM rate in a training step over the best-tile rate a bare matmul measures (8B step on the H100:
# lora_linear ran at ~520 TFLOP/s where the best tile reached ~730).
STEP_EFFICIENCY = 0.7
# The blocked NF4 dequantisation kernel's traffic (NF4 read + bf16 written) over the HBM rate: 2,546 GB/s measured on
# the H100 at 4096 x 14336 against the 3.0 TB/s the notes take for it (kernels/NOTES.md, "nf4 dequant"). What a
# recomputing QLoRA layer saves with reuse_dequant (one dequantisation per weight) is timed at this rate: an estimate.
DEQUANT_HBM_SHARE = 0.85


@dataclass(frozen=True)
class DeviceSpeed:
    """Rates the time model uses: bf16 matmul, pinned host<->device copies, host memory (embedding gather)."""

    matmul_tflops: float = 700.0
    h2d_gbps: float = 50.0  # PCIe 5 x16, pinned
    d2h_gbps: float = 50.0
    host_gbps: float = 10.0
    hbm_gbps: float = 3000.0
    measured: bool = False


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer, per micro-batch.

    Attributes:
        weight_bytes: frozen base weights on the device (bf16, or NF4 as stored).
        keep_bytes: activations kept for backward when the layer does not recompute.
        checkpoint_bytes: its input, kept (on the device or the host) when it recomputes.
        transient_bytes: extra memory while it recomputes and backpropagates.
        forward_s: its forward; also what recomputing it costs.
        backward_s: its backward.
        reuse_bytes: when it recomputes, the dense weights its recompute keeps for its backward (QLoRA's
            ``reuse_dequant``: every NF4 projection's bf16 copy, all alive as its backward starts), on top of
            ``transient_bytes``; not scaled by the activation correction.
        reuse_saving_s: when it recomputes, the backward time that reuse saves (the dequantisations not repeated).
        mlp_remake_bytes: when it keeps its activations and remakes its MLP's gate and up (``remake_mlp_layers``),
            the kept bytes that frees (0: it cannot).
        mlp_remake_s: what making gate and up again in its backward costs.
    """

    weight_bytes: int
    keep_bytes: int
    checkpoint_bytes: int
    transient_bytes: int
    forward_s: float
    backward_s: float
    reuse_bytes: int = 0
    reuse_saving_s: float = 0.0
    mlp_remake_bytes: int = 0
    mlp_remake_s: float = 0.0


@dataclass(frozen=True)
class CostModel:
    """What a plan costs in memory and time (:func:`predict`), per layer and for the rest of the model.

    Attributes:
        layers: one :class:`LayerCost` per decoder layer.
        grad_accum: micro-batches per optimizer step.
        fixed_bytes: on the device after loading whatever the plan (norms, biases, trainable parameters).
        trainable_state_bytes: gradients and optimizer state, allocated by the first step.
        embed_bytes / head_bytes: the input embedding table / untied LM head (0: tied).
        loss_bytes: the fused LM head + loss at its peak (logits chunk, hidden states and their gradient).
        hidden_bytes: one ``[tokens, hidden]`` activation (what an offloaded embedding ships per micro-batch).
        loss_s / optimizer_s: LM head + loss per micro-batch; the optimizer step.
        speed: the device's rates.
        checkpointing: gradient checkpointing on (else nothing recomputes and nothing streams).
        can_stream / can_offload_embeddings / can_offload_head / can_graph: which knobs apply.
        graph_saving_s: what a CUDA graph saves per micro-batch in a layer that keeps its activations, and in one
            that recomputes (host launches).
        tiled_layers: the layers with the dense MLP over chunks of :data:`MLP_CHUNK_TOKENS` (what a plan with
            ``mlp_chunk_tokens`` costs); empty where a plan may not tile it.
        nograd_forwards: the forwards without gradient in each micro-batch (a preference step's reference and KL
            passes, run before its forward with gradient), each as a multiple of the micro-batch's tokens: every
            layer's forward and the LM head's (half of ``loss_s``: the head's gradient GEMM is not run), nothing
            kept, the offloaded embeddings and LM head fetched again.
        act_factor / time_factor / static_offset: measured corrections (activation bytes, compute time, bytes on
            the device after loading beyond the model's count).
    """

    layers: tuple[LayerCost, ...]
    grad_accum: int
    fixed_bytes: int
    trainable_state_bytes: int
    embed_bytes: int
    head_bytes: int
    loss_bytes: int
    hidden_bytes: int
    loss_s: float
    optimizer_s: float
    speed: DeviceSpeed = DeviceSpeed()
    checkpointing: bool = True
    can_stream: bool = True
    can_offload_embeddings: bool = True
    can_offload_head: bool = True
    can_graph: bool = False
    graph_saving_s: tuple[float, float] = (GRAPH_SAVING_S, GRAPH_SAVING_RECOMPUTED_S)
    act_factor: float = 1.0
    time_factor: float = 1.0
    static_offset: int = 0
    tiled_layers: tuple[LayerCost, ...] = ()
    nograd_forwards: tuple[float, ...] = ()

    def corrected(self, **factors: float) -> CostModel:
        """This model with measured corrections (``act_factor``, ``time_factor``, ``static_offset``)."""
        return replace(self, **factors)


@dataclass(frozen=True)
class Plan:
    """The knobs a plan sets (:class:`~kernels.trainer.config.MethodOptions` names; -1 = all layers)."""

    recompute_layers: int = -1
    offload_weights: int = 0
    offload_checkpoints: bool = False
    offload_embeddings: bool = False
    offload_lm_head: bool = False
    cuda_graph: bool = False
    mlp_chunk_tokens: int | None = None
    remake_mlp_layers: int = 0

    @property
    def offloads(self) -> bool:
        return bool(self.offload_weights or self.offload_checkpoints or self.offload_embeddings
                    or self.offload_lm_head)

    @property
    def graphable(self) -> bool:
        """Whether a CUDA graph can take this plan: no host copy inside the step (an offloaded input embedding is
        gathered before the graph's replay, :class:`kernels.trainer.train.StepGraph`), no tiled MLP."""
        return not (self.offload_weights or self.offload_checkpoints or self.offload_lm_head or self.mlp_chunk_tokens)

    def knobs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted cost: peak allocated bytes (torch's count), bytes after loading, optimizer step time."""

    peak_bytes: int
    static_bytes: int
    step_s: float

    def as_record(self) -> dict[str, float]:
        return {"predicted_peak_alloc_gib": round(self.peak_bytes / GIB, 3),
                "predicted_static_gib": round(self.static_bytes / GIB, 3),
                "predicted_step_s": round(self.step_s, 4)}


@lru_cache(maxsize=4096)
def _layout(n: int, recompute: int, streamed: int, checkpointing: bool) -> tuple[tuple[int, ...], frozenset[int]]:
    """The streamed layers (sorted) and the recomputed ones, as the trainer picks them (:mod:`~.offload`)."""
    stream = tuple(sorted(streamed_layer_ids(n, streamed))) if streamed else ()
    if not checkpointing:
        return stream, frozenset()
    ids = checkpointed_layer_ids(n, MethodOptions(recompute_layers=recompute, offload_weights=streamed))
    return stream, frozenset(range(n)) if ids is None else ids


@lru_cache(maxsize=4096)
def _remade(n: int, rec: frozenset[int], checkpointing: bool, count: int) -> frozenset[int]:
    return remade_mlp_layer_ids(n, None if checkpointing and len(rec) == n else rec, checkpointing, count)


def _streamed_on_device(lay: tuple[LayerCost, ...], streamed: tuple[int, ...], i: int) -> int:
    """Streamed weight bytes on the device during layer ``i``'s backward (:class:`~.offload.WeightStreamer`): its own
    if it streams, and the next streamed layer under it, copied in ahead (by the streamed layer above, or kept from the
    forward's end)."""
    k = bisect_left(streamed, i)  # streamed[:k] are under layer i
    own = k < len(streamed) and streamed[k] == i
    return (lay[i].weight_bytes if own else 0) + (lay[streamed[k - 1]].weight_bytes if k else 0)


def _prefix(xs: list[float]) -> list[float]:
    return [0.0, *accumulate(xs)]


def predict(m: CostModel, p: Plan) -> Prediction:
    """Peak allocated bytes and step time of plan ``p`` under cost model ``m``.

    Memory: what stays after loading (fixed bytes, resident layers, embeddings and head unless offloaded), then
    gradients and optimizer state, and the larger of two moments. The forward's end: every checkpoint (on the host:
    the one in flight and the one fetched back), every kept layer's activations (less gate and up where remade), the
    loss chunk, the LM head's device copy when it lives on the host, and the last streamed layer's weights (kept for
    backward). Each layer's backward, going down: its recompute + backward (a recomputing layer's with the dense
    weights it keeps for its backward, :attr:`LayerCost.reuse_bytes`) beside what the layers under it still hold,
    the layers above having freed theirs, and the streamed weights then on the device (its own, and the next
    streamed layer's under it, copied in ahead).

    Time per micro-batch: every layer's forward and backward, the recomputed layers' forward again (less what their
    backward saves by reusing the recompute's dequantised weights, :attr:`LayerCost.reuse_saving_s`), the gate / up
    projections of the kept layers that remake them (``remake_mlp_layers``), the loss; plus the host copies the
    compute does not hide: a streamed layer's copy overlaps the layers since the previous streamed one (forward) or
    after it (backward; the forward's last streamed layer stays), with offloaded checkpoints sharing the copy stream
    in forward and fetched back on the compute stream in backward; an offloaded embedding is gathered on the host
    and shipped; the LM head's copy overlaps the whole forward. A CUDA graph saves
    host launches in every layer (:attr:`CostModel.graph_saving_s`). A tiled MLP changes the layers' costs
    (:attr:`CostModel.tiled_layers`). A preference step's forwards without gradient
    (:attr:`CostModel.nograd_forwards`) add their time, and a third moment: one layer's activations, or the head's
    chunk, at their tokens, beside the gradients and optimizer state only.
    """
    lay = m.tiled_layers if p.mlp_chunk_tokens and m.tiled_layers else m.layers  # else the method tiles already
    n, a, f, sp = len(lay), m.act_factor, m.time_factor, m.speed
    streamed, rec = _layout(n, p.recompute_layers, p.offload_weights, m.checkpointing)
    in_stream = set(streamed)
    static = (m.fixed_bytes + m.static_offset + sum(c.weight_bytes for i, c in enumerate(lay) if i not in in_stream)
              + (0 if p.offload_embeddings else m.embed_bytes) + (0 if p.offload_lm_head else m.head_bytes))
    ckpts = [lay[i].checkpoint_bytes for i in rec]
    remade = _remade(n, rec, m.checkpointing, p.remake_mlp_layers)
    # what each layer holds from its forward until its own backward: a recomputing layer its checkpoint (one on the
    # host holds nothing here: the device has the one in flight and the one fetched back, ``in_flight``), a kept one
    # its activations (less gate and up where remade)
    held = [(0 if p.offload_checkpoints else c.checkpoint_bytes) if i in rec
            else c.keep_bytes - (c.mlp_remake_bytes if i in remade else 0) for i, c in enumerate(lay)]
    in_flight = 2 * max(ckpts, default=0) if p.offload_checkpoints else 0
    below = _prefix(held)  # below[i]: held by the layers under layer i
    # the forward's last streamed layer stays on the device for backward, which needs it first
    forward_end = (a * (below[n] + in_flight + m.loss_bytes) + (m.head_bytes if p.offload_lm_head else 0)
                   + (lay[streamed[-1]].weight_bytes if streamed else 0))
    # backward goes down the layers, each freeing what it held: layer i's recompute + backward runs beside what the
    # layers under it hold (and a recomputing layer's own checkpoint; a kept layer's activations are in its transient)
    backward = max(a * ((below[i + 1] if i in rec else below[i]) + in_flight + c.transient_bytes)
                   + (c.reuse_bytes if i in rec else 0) + _streamed_on_device(lay, streamed, i)
                   for i, c in enumerate(lay))
    # a forward without gradient holds one layer's activations, then the head's chunk, and nothing of them after
    nograd = max((a * r * max(max(c.keep_bytes for c in lay), m.loss_bytes) + (m.head_bytes if p.offload_lm_head else 0)
                  for r in m.nograd_forwards), default=0)
    dynamic = (m.trainable_state_bytes + max(forward_end, backward, nograd)
               + (GRAPH_EXTRA_BYTES if p.cuda_graph else 0))

    h2d, d2h = sp.h2d_gbps * 1e9, sp.d2h_gbps * 1e9
    fwd = [c.forward_s * f for c in lay]
    # + the recompute, less the dequantisations its backward then skips (reuse_dequant)
    bwd = [c.backward_s * f + ((c.forward_s - c.reuse_saving_s) * f if i in rec else 0.0)
           + (c.mlp_remake_s * f if i in remade else 0.0) for i, c in enumerate(lay)]
    ck_out = [lay[i].checkpoint_bytes / d2h if (p.offload_checkpoints and i in rec) else 0.0 for i in range(n)]
    pf, pb, pc = _prefix(fwd), _prefix(bwd), _prefix(ck_out)
    exposed, prev = 0.0, 0
    for j in streamed:  # j's copy is issued on entering the previous streamed layer (or the first layer)
        exposed += max(0.0, lay[j].weight_bytes / h2d + pc[j] - pc[prev] - (pf[j] - pf[prev]))
        prev = j
    exposed += sum(max(0.0, ck_out[i] - fwd[i]) for i in range(prev, n))
    for hi, j in zip(streamed[::-1], streamed[-2::-1], strict=False):  # backward: copy j while hi..j+1 run
        exposed += max(0.0, lay[j].weight_bytes / h2d - (pb[hi + 1] - pb[j + 1]))
    if p.offload_checkpoints:
        exposed += sum(ckpts) / h2d  # fetched back on the compute stream
    if p.offload_embeddings:
        exposed += m.hidden_bytes / h2d + m.hidden_bytes / (sp.host_gbps * 1e9)
    if p.offload_lm_head:
        exposed += max(0.0, m.head_bytes / h2d - pf[n])
    compute = pf[n] + pb[n] + m.loss_s * f
    for r in m.nograd_forwards:
        compute += r * (pf[n] + m.loss_s * f / 2)
        if p.offload_embeddings:
            exposed += r * (m.hidden_bytes / h2d + m.hidden_bytes / (sp.host_gbps * 1e9))
        if p.offload_lm_head:
            exposed += max(0.0, m.head_bytes / h2d - r * pf[n])
    kept_s, recomputed_s = m.graph_saving_s
    saving = kept_s * (n - len(rec)) + recomputed_s * len(rec) if p.cuda_graph else 0.0
    step = m.grad_accum * (compute + exposed - saving) + m.optimizer_s
    return Prediction(peak_bytes=int(static + dynamic), static_bytes=int(static), step_s=step)


def candidates(m: CostModel, cuda_graph: bool | None = None, embeddings: bool | None = None) -> Iterator[Plan]:
    """Every plan the cost model allows (streamed layers always among the recomputed ones; a CUDA graph only on a
    :attr:`Plan.graphable` plan); ``cuda_graph`` True / False keeps only plans with / without one, ``embeddings``
    only those with / without the input embeddings on the host (what a made step graph fixes)."""
    n = len(m.layers)
    flags = (False, True)
    recompute = [-1, *range(n - 1, 0, -1)] if m.checkpointing else [-1]
    for chunk in (None, MLP_CHUNK_TOKENS) if m.tiled_layers else (None,):
        for k in recompute:
            stream_max = (n if k == -1 else k) if (m.checkpointing and m.can_stream) else 0
            for r in _remade_counts(m, k, chunk):
                for s in range(stream_max + 1):
                    for ck in flags if m.checkpointing else (False,):
                        for emb in flags if m.can_offload_embeddings else (False,):
                            if embeddings is not None and emb != embeddings:
                                continue
                            for head in flags if m.can_offload_head else (False,):
                                plan = Plan(k, s, ck, emb, head, mlp_chunk_tokens=chunk,
                                            remake_mlp_layers=r)
                                for g in flags if (m.can_graph and plan.graphable) else (False,):
                                    if cuda_graph is None or g == cuda_graph:
                                        yield replace(plan, cuda_graph=g)


def _remade_counts(m: CostModel, recompute: int, chunk: int | None) -> list[int]:
    """The ``remake_mlp_layers`` values worth predicting beside ``recompute`` recomputing layers.

    Freeing a kept layer's memory by remaking its gate and up costs less per byte than recomputing it (one
    projection against the whole forward), and recomputing a layer that already remakes frees only its other
    activations: so the fastest plan at a budget either remakes in every kept layer and recomputes in some, or
    recomputes in as few as it can and remakes in some. Hence: none or all of the kept layers, and every count
    where the fewest layers recompute.
    """
    if chunk or not m.layers or not m.layers[0].mlp_remake_bytes:
        return [0]
    n = len(m.layers)
    kept = n if not m.checkpointing else 0 if recompute == -1 else n - recompute
    if kept == 0:
        return [0]
    fewest = not m.checkpointing or recompute == 1
    return [0, *(range(1, kept) if fewest else ()), -1]


def _ranked(m: CostModel, cuda_graph: bool | None, embeddings: bool | None) -> list[tuple[Prediction, Plan]]:
    return [(predict(m, p), p) for p in candidates(m, cuda_graph, embeddings)]


def _order(p: Plan) -> tuple:
    """A total order on plans for ties: fewer knobs away from their defaults first (a host copy the model predicts
    to be hidden still takes the link and pinned memory), then the knobs' values."""
    moved = sum(map(bool, (p.remake_mlp_layers, p.offload_weights, p.offload_checkpoints, p.offload_embeddings,
                           p.offload_lm_head, p.cuda_graph, p.mlp_chunk_tokens)))
    return (moved, p.recompute_layers == -1, p.recompute_layers, p.remake_mlp_layers == -1, p.remake_mlp_layers,
            p.offload_weights, p.offload_checkpoints, p.offload_embeddings, p.offload_lm_head, p.cuda_graph,
            p.mlp_chunk_tokens or 0)


def choose(m: CostModel, budget_bytes: float, cuda_graph: bool | None = None,
           embeddings: bool | None = None) -> Plan | None:
    """The plan with the lowest predicted step time whose predicted peak is within ``budget_bytes``.

    Ties go to the plan with fewer knobs moved, then to the smaller peak (a fixed order of plans), so the choice
    is a function of the cost model and the budget only: a bigger budget keeps every plan a smaller one allowed,
    so it never gives a slower predicted plan.

    Returns:
        The plan, or None when even the leanest one is predicted over the budget.
    """
    fitting = [(pr.step_s, _order(p)[0], pr.peak_bytes, _order(p), p) for pr, p in _ranked(m, cuda_graph, embeddings)
               if pr.peak_bytes <= budget_bytes]
    return min(fitting, key=lambda t: t[:4])[4] if fitting else None


def lean_plan(m: CostModel, cuda_graph: bool | None = None, embeddings: bool | None = None) -> Plan:
    """The plan with the smallest predicted peak (ties: the faster one)."""
    return min(_ranked(m, cuda_graph, embeddings), key=lambda t: (t[0].peak_bytes, t[0].step_s, _order(t[1])))[1]


def _layer_params(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each linear module of a layer, under the family's names (Mixtral's experts are not linear
    modules: :func:`costs_for` counts them apart)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = ({"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h)} if cfg.fused_qkv
            else {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)})
    if cfg.moe:
        return attn
    mlp = ({"gate_up_proj": (h, 2 * i), "down_proj": (i, h)} if cfg.fused_gate_up
           else {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
    return attn | mlp


def costs_for(cfg: DecoderConfig, method: MethodOptions, micro_batch: int, grad_accum: int, seq_len: int,
              dtype: torch.dtype, device: torch.device, optimizer: str = "adamw_torch", packed: bool = False,
              speed: DeviceSpeed | None = None) -> CostModel:
    """The analytic cost model of a run (before any correction from measured steps).

    Per layer and token, the kept activations are what the block saves for backward: its input, both norms'
    outputs, the residual after attention, q / k / v, the attention output, gate, up and the SwiGLU output, plus the
    LoRA ``x A^T`` intermediates (at the 8B shapes 570 MB per layer at 4096 tokens, the figure in
    kernels/trainer/README.md), less the norm outputs and the SwiGLU output with ``remake_activations``
    (kernels/trainer/remake.py: 387 MB); a recompute + backward needs about twice that, or, where a tiled
    MLP keeps little, what it keeps less the MLP's chunk plus flash attention's backward (60 KB a token at the 8B
    shapes: gradients, the fp32 dq accumulator, dk / dv expanded to every query head). The families' parts: Mixtral's
    experts (dense, resident, ``k`` of them per token in FLOPs and activations; never streamed: the streamer moves
    linear weights only), Gemma-2's extra norms, its soft-capped attention (through FlexAttention where
    :func:`~kernels.trainer.flex.flex_layer` sends it: an fp32 ``[B, H, S]`` logsumexp kept; else eager: fp32
    ``[B, H, S, S]`` scores and probabilities kept)
    and its chunked soft-capped LM head (fp32 chunk logits, recomputed in backward).
    Times are FLOPs at ``STEP_EFFICIENCY`` of the measured matmul rate; the backward of a frozen base computes dX
    only (one GEMM per projection, as the forward), a trained one dX and dW. QLoRA's dequantisation adds 12 %
    (kernels/NOTES.md); with ``reuse_dequant`` a recomputing layer's backward skips one dequantisation per NF4
    weight (:attr:`LayerCost.reuse_saving_s`, timed at :data:`DEQUANT_HBM_SHARE` of the HBM rate) for its bf16
    weights held into its backward (:attr:`LayerCost.reuse_bytes`). A kept layer that remakes its dense MLP's gate
    and up keeps ``2 x intermediate`` widths per token less for one gate / up projection more in its backward
    (:attr:`LayerCost.mlp_remake_bytes`, :attr:`LayerCost.mlp_remake_s`).

    Args:
        cfg: the architecture.
        method: the method and its fixed knobs (LoRA rank, targets, dtype of A/B, checkpointing, dropout).
        micro_batch / grad_accum / seq_len: the loop's shapes (``seq_len``: the longest row).
        dtype: the base weights' (and activations') dtype.
        device: where the model computes (a CUDA graph needs CUDA).
        optimizer: the optimizer's name (``sgd`` keeps no state and cannot be graphed).
        packed: rows packed with ``position_ids`` (not graphed).
        speed: the device's rates (default: :class:`DeviceSpeed`'s H100-like figures).

    Returns:
        The cost model.
    """
    speed = speed or DeviceSpeed()
    act = torch.empty((), dtype=dtype).element_size()
    tokens, h, inter = micro_batch * seq_len, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = _layer_params(cfg)
    n_proj = sum(i * o for i, o in shapes.values())
    peft, full, qlora = method.is_peft, method.kind == "full", method.kind == "qlora"
    targets = [name for name in shapes if name in method.target_modules] if peft else []
    # NF4: half a byte per weight plus the block absmaxes (one byte each with double quantisation, else fp32)
    nf4_bytes = 0.5 + (1 + 4 / 256 if method.double_quant else 4) / 64
    if qlora:
        weight = int(n_proj * nf4_bytes)
    else:
        weight = n_proj * act
    # Mixtral: experts and router stay dense (bitsandbytes and our QLoRA quantise linear modules only)
    experts = cfg.num_experts * (3 * h * inter + h)
    active = cfg.experts_per_token * 3 * h * inter if cfg.moe else 0  # expert weights each token goes through
    weight += experts * act
    biases = (2 * kv + q) * cfg.qkv_bias + h * cfg.o_bias + (2 * inter + h) * cfg.mlp_bias
    lora_bytes = torch.empty((), dtype=method.lora_dtype).element_size()
    lora_params = sum(method.lora_r * sum(shapes[t]) + (shapes[t][1] if method.kind == "dora" else 0)
                      for t in targets)
    norms = 4 if cfg.sandwich_norms else 2
    per_layer_small = (norms * h + 2 * cfg.head_dim * cfg.qk_norm + biases) * act  # norms, biases stay on the device
    embed = cfg.vocab_size * h * act
    head = 0 if cfg.tie_word_embeddings else embed
    n = cfg.num_layers
    if full:
        trainable = (n * (n_proj + experts + norms * h + biases)
                     + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h)
        state_bytes_per = act if optimizer == "sgd" else 3 * act  # grad, then Adam m and v in the weights' dtype
        fixed = n * per_layer_small + h * act
        trainable_state = trainable * state_bytes_per
    else:
        trainable = n * lora_params
        fixed = n * (per_layer_small + lora_params * lora_bytes) + h * act
        trainable_state = trainable * lora_bytes * (1 if optimizer == "sgd" else 3)
    r_cols = method.lora_r * len(targets)
    # MoE: each token's k expert inputs, gate, up and SwiGLU outputs, and its router probabilities (fp32)
    mlp_cols = cfg.experts_per_token * (h + 3 * inter) + 4 * cfg.num_experts // act if cfg.moe else 3 * inter
    keep = tokens * (act * ((norms + 2) * h + q + 2 * kv + q + mlp_cols + r_cols) + norms * 4)  # + fp32 rstd
    if cfg.qk_norm:  # qwen3: the queries and keys before their norms too, and the norms' fp32 rstd per head
        keep += tokens * ((q + kv) * act + (cfg.num_heads + cfg.num_kv_heads) * 4)
    if method.remake_activations:  # two norm outputs and the dense MLP's gated activation remade in backward
        keep -= tokens * act * (2 * h + (0 if cfg.moe else inter))
    if cfg.attn_softcap is not None and flex_layer(device, dtype, method.flex_attention, cfg.attn_softcap, None,
                                                   seq_len):  # FlexAttention: the fp32 logsumexp beside the output
        keep += micro_batch * cfg.num_heads * seq_len * 4
    elif cfg.attn_softcap is not None:  # eager attention: fp32 scores and probabilities, probabilities in act
        keep += micro_batch * cfg.num_heads * seq_len * seq_len * (2 * 4 + act)
    ckpt = tokens * h * act
    # the fused head (soft-capped or not): a [chunk, V] logits buffer, overwritten by its gradient in place
    chunk, chunk_bytes = method.fused_ce_chunk or default_chunk_size(tokens, full), 2 * act
    loss_bytes = chunk * cfg.vocab_size * chunk_bytes + 2 * tokens * h * act + (cfg.vocab_size * h * 4 if full else 0)
    rate = speed.matmul_tflops * 1e12 * STEP_EFFICIENCY
    attn = 2 * tokens * seq_len * q  # causal QK^T and PV
    lora_flops = 2 * tokens * method.lora_r * sum(sum(shapes[t]) for t in targets)  # x A^T, then B
    fwd_flops = 2 * tokens * (n_proj + active) + lora_flops + attn
    bwd_flops = (2 if full else 1) * 2 * tokens * (n_proj + active) + 2 * lora_flops + 2.5 * attn
    slow = 1.12 if qlora else 1.0
    # reuse_dequant: a recomputing layer's backward takes the bf16 copies its recompute dequantised, every NF4
    # projection's, all alive as that backward starts (kernels/trainer/offload.py, LayerCheckpoint); a tiled MLP runs
    # without a graph inside the recompute and keeps none. Saved: one pass of the blocked kernel over those weights
    # (NF4 read, bf16 written) at DEQUANT_HBM_SHARE of the HBM rate.
    reuse = qlora and method.reuse_dequant and method.gradient_checkpointing
    attn_proj = sum(i * o for name, (i, o) in shapes.items() if name in ("q_proj", "k_proj", "v_proj", "qkv_proj",
                                                                         "o_proj"))
    dequant_s = (nf4_bytes + act) / (DEQUANT_HBM_SHARE * speed.hbm_gbps * 1e9)  # per weight
    # remake_mlp_layers: the gate / up projection (base and LoRA) once more in a kept layer's backward
    gate_up = ("gate_proj", "up_proj", "gate_up_proj")
    gate_up_flops = 2 * tokens * (2 * h * inter + method.lora_r * sum(sum(shapes[t]) for t in targets if t in gate_up))

    # flash attention's backward: the layer's and the attention output's gradients, dq / dk / dv, the fp32 dq
    # accumulator, and with fewer KV heads than query heads dk / dv expanded to every head before they are summed
    attn_bwd = tokens * (act * (h + 2 * q + 2 * kv + (2 * q if kv < q else 0)) + 4 * q)

    def layer_cost(chunk: int | None) -> LayerCost:
        keep_c, bwd_c, chunk_bytes = keep, bwd_flops, 0
        if chunk:  # the MLP keeps its input only; gate, up (and the activation) exist for one chunk at a time
            chunk_bytes = min(tokens, chunk) * act * 3 * inter
            keep_c += chunk_bytes - tokens * act * (2 * inter + (0 if method.remake_activations else inter))
            bwd_c += 2 * tokens * 3 * h * inter  # each chunk's MLP forward again in backward
        # the backward's peak: the MLP's (untiled: twice what the layer keeps; tiled: one chunk's gradients more,
        # and the gradients of the layer's output and of the MLP's input), or the attention's, after the MLP's
        # chunks are gone, which decides from ~31,000 tokens at the 8B shapes (kernels/NOTES.md)
        mlp_bwd = keep_c + chunk_bytes + 2 * tokens * h * act if chunk else 2 * keep_c
        transient = max(mlp_bwd, keep_c - chunk_bytes + attn_bwd)
        reused = (attn_proj if chunk else n_proj) if reuse else 0  # NF4 weights a recompute keeps for backward
        remakes = not mlp_remake_needs(method, cfg.moe, chunk)  # gate and up made again in a kept layer's backward
        return LayerCost(weight_bytes=weight, keep_bytes=keep_c, checkpoint_bytes=ckpt, transient_bytes=transient,
                         forward_s=slow * fwd_flops / rate, backward_s=slow * bwd_c / rate,
                         reuse_bytes=reused * act, reuse_saving_s=reused * dequant_s,
                         mlp_remake_bytes=tokens * act * 2 * inter if remakes else 0,
                         mlp_remake_s=slow * gate_up_flops / rate if remakes else 0.0)

    layer = layer_cost(None if cfg.moe else method.mlp_chunk_tokens)
    # a plan may tile a dense MLP where it was not asked for and the rows are longer than a chunk
    may_tile = not cfg.moe and not method.mlp_chunk_tokens and tokens > MLP_CHUNK_TOKENS
    head_gemms = 3 if full else 2
    loss_s = head_gemms * 2 * tokens * cfg.vocab_size * h / rate
    optimizer_s = trainable * (act if full else lora_bytes) * 8 / (speed.hbm_gbps * 1e9)
    untied = not cfg.tie_word_embeddings
    return CostModel(
        layers=(layer,) * n, grad_accum=grad_accum, fixed_bytes=fixed, trainable_state_bytes=trainable_state,
        embed_bytes=embed, head_bytes=head, loss_bytes=loss_bytes, hidden_bytes=tokens * h * act, loss_s=loss_s,
        optimizer_s=optimizer_s, speed=speed, checkpointing=method.gradient_checkpointing,
        can_stream=method.kind in ("lora", "dora") and not cfg.moe, can_offload_embeddings=peft and untied,
        can_offload_head=peft and untied,
        can_graph=(device.type == "cuda" and method.lora_dropout == 0 and not packed and optimizer != "sgd"),
        graph_saving_s=(QLORA_GRAPH_SAVING_S,) * 2 if qlora else (GRAPH_SAVING_S, GRAPH_SAVING_RECOMPUTED_S),
        tiled_layers=(layer_cost(MLP_CHUNK_TOKENS),) * n if may_tile else ())
