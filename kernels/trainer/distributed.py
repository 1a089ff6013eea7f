"""The trainer as one of several processes of one host: DDP for adapters, FSDP2 for full fine-tuning and a sharded
frozen base (4-bit NF4 included).

The caller starts the processes (torchrun, or a benchmark's launcher) and initialises ``torch.distributed``;
:class:`DataParallel` then gives :func:`kernels.trainer.train.train` what it needs to run as one rank:

- **Data.** The HF Trainer's order under accelerate: the sequential sampler's micro-batches are dealt round-robin
  (micro-batch ``j`` of an epoch to rank ``j % world``), each rank takes ``grad_accum`` of its own per optimizer
  step. One optimizer step of ``world`` ranks with micro-batch ``B`` therefore reads the rows one process with
  micro-batch ``world * B`` (or ``grad_accum * world``) reads: the same global batch. Where an epoch's last step
  leaves a rank short, it runs an empty micro-batch (one pad, no loss): every rank must run the same forwards and
  backwards, or the collectives of the next one would pair with the wrong partner.
- **Loss.** Each micro-batch's summed token loss is divided by the loss tokens of the whole *global* step (summed
  over ranks, one all-reduce of one number per step) and gradients are summed, not averaged, over ranks: the
  gradient of the global batch, as the HF Trainer's ``average_tokens_across_devices`` gives it (the harness's CPU
  test of two ranks finds hf's and our per-step losses equal). The step loss reported is the sum over ranks (the
  mean over all the step's loss tokens).
- **DDP** (``strategy="ddp"``; LoRA, DoRA, QLoRA): every rank holds the whole model; the trainable parameters (the
  adapters) start from rank 0's values and their gradients are all-reduced in buckets once per optimizer step,
  after the last micro-batch's backward, before clipping. Not overlapped with backward: at the 8B LoRA shapes the
  adapters' fp32 gradients are 168 MB, an estimated ~2 ms at NVLink's bus bandwidth against a step of ~0.65 s
  (hf's 6300 tokens/s on an H100).
- **FSDP2** (``strategy="fsdp"``; full fine-tuning, LoRA and QLoRA): ``torch.distributed.fsdp.fully_shard`` on
  every decoder layer and on the model, so each rank stores ``1/world`` of every parameter; a layer's parameters
  are all-gathered for its forward and for its backward, its gradients reduce-scattered (summed). A 4-bit base is
  sharded too: each NF4 projection's packed bytes and absmaxes become frozen parameters of its layer (FSDP2
  shards parameters only), and a forward pre-hook of the layer rebuilds its :class:`~kernels.ops.nf4.NF4Tensor` s
  from the gathered ones. Cost of our reentrant checkpoint: a recomputed layer is gathered three times per micro-batch
  (forward, recompute, backward) instead of twice.

Not with host offload (``offload_*``, host-driven copies of whole weights) or a CUDA-graphed step (collectives are
not captured); DoRA with DDP only (its row norms need each whole weight).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from kernels.trainer.batches import IGNORE_INDEX, collate, step_rows
from kernels.trainer.config import TrainSettings
from kernels.trainer.linear import Linear

# the knobs a rank refuses: host offload and the step graph run in one process
ONE_PROCESS = ("offload_weights", "offload_embeddings", "offload_lm_head", "offload_checkpoints", "cuda_graph")

STRATEGIES = ("ddp", "fsdp")
BUCKET_BYTES = 64 << 20  # gradients all-reduced per call: few launches, a bounded flat copy
# NF4 fields that FSDP2 shards, as parameters named nf4_<field> of their Linear (code tables stay replicated)
NF4_SHARDED = ("packed", "absmax_q", "absmax", "absmax_scale")
NF4_PARAM_PREFIX = "nf4_"


class DataParallel:
    """One rank's share of a data-parallel run (see the module docstring).

    Args:
        strategy: ``"ddp"`` or ``"fsdp"``; the ranks are those of the default process group (the world).
    """

    def __init__(self, strategy: str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: tunebench has {STRATEGIES}")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start the ranks with torchrun")
        self.strategy = strategy
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    # -- the model ------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Make ``model`` (a :class:`kernels.trainer.model.DecoderModel`, loaded whole on this rank's device) one
        rank of the run: DDP starts every rank from rank 0's trainable values; FSDP shards it in place.

        Raises:
            ValueError: a knob that cannot run over several processes.
        """
        o = model.options
        bad = [k for k in ONE_PROCESS if getattr(o, k)]
        if bad:
            raise ValueError(f"{self.strategy} over {self.world_size} processes: not with {', '.join(bad)}")
        if self.strategy == "ddp":
            if not o.is_peft:
                raise ValueError("ddp replicates the whole model and its optimizer state on every GPU: tunebench "
                                 "runs it for adapters (lora, dora, qlora); full fine-tuning shards with fsdp")
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        dist.broadcast(p.data, src=0)
            return model
        if o.kind == "dora":
            raise ValueError("fsdp: DoRA's row norms need the whole weight; use ddp")
        return self._fully_shard(model)

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        mesh = init_device_mesh(model.device_of_compute.type, (self.world_size,))
        for layer in model.model.layers:
            nf4 = [lin for lin in layer.modules() if isinstance(lin, Linear) and lin.qweight is not None]
            for lin in nf4:
                _nf4_as_parameters(lin)
            fully_shard(layer, mesh=mesh)
            if nf4:
                # after FSDP's own pre-forward (it prepends its hook), which has gathered the layer's parameters;
                # on the layer, not on each Linear: grouped q/k/v and gate/up calls read qweight without calling it
                layer.register_forward_pre_hook(functools.partial(_rebind_layer, nf4))
        fully_shard(model, mesh=mesh)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # summed, not averaged: the loss is already divided by the global step's loss tokens. Sum-type
                # collectives only: gloo has no pre-multiplied sum, and NCCL transfers them zero-copy
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        for lin in model.modules():
            if isinstance(lin, Linear) and lin.qweight is not None:
                _rebind_nf4(lin)  # read-back before the first forward sees the (sharded) parameters
        return model

    @contextmanager
    def whole_parameters(self, model: nn.Module) -> Iterator[None]:
        """Inside, every parameter of an FSDP-sharded ``model`` is whole on every rank (to save it); a collective:
        every rank enters. Nothing to do for DDP."""
        if self.strategy != "fsdp":
            yield
            return
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        for lin in model.modules():
            if isinstance(lin, Linear) and lin.qweight is not None:
                _rebind_nf4(lin)
        try:
            yield
        finally:
            for m in reversed(sharded):
                m.reshard()

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def micro_batches(self, rows: Sequence[dict], s: TrainSettings, step: int,
                      device: torch.device | str) -> list[dict]:
        """This rank's collated micro-batches of optimizer step ``step`` (0-based), on ``device``."""
        ranges = step_rows(len(rows), dataclasses.replace(s, grad_accum=s.grad_accum * self.world_size), step)
        mine = ranges[self.rank::self.world_size]
        most = len(ranges[0::self.world_size])  # rank 0 has the most (round-robin from rank 0)
        batches = [collate([rows[i] for i in idx], s.pad_id) for idx in mine]
        batches += [_empty_batch(s.pad_id, "position_ids" in rows[0]) for _ in range(most - len(mine))]
        return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]

    def global_count(self, n: int, device: torch.device | str) -> int:
        """``n`` summed over the ranks (the global step's loss tokens)."""
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def sync_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """DDP: sum the gradients of ``params`` over the ranks, in buckets of :data:`BUCKET_BYTES` (a parameter
        without a gradient on this rank contributes zeros). FSDP reduce-scatters in backward: nothing to do."""
        if self.strategy != "ddp":
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def step_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The global step's loss from this rank's part (its summed, globally normalised token losses)."""
        total = total.detach().clone()
        dist.all_reduce(total)
        return total

    def effective(self) -> dict[str, object]:
        """What the run spreads with, for a benchmark's read-back: world size and strategy."""
        return {"world_size": self.world_size, "strategy": self.strategy}


def _buckets(grads: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients of one dtype, at most ``limit`` bytes a bucket (a larger tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and (g.dtype != bucket[0].dtype or size + nbytes > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def _empty_batch(pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """One pad token without loss or attention mask: a micro-batch that adds nothing to the step."""
    row = {"input_ids": [pad_id], "labels": [IGNORE_INDEX]}
    if packed:
        row["position_ids"] = [0]
    b = collate([row], pad_id)
    b["attention_mask"].zero_()
    return b


def _nf4_as_parameters(lin: Linear) -> None:
    """Register the NF4 weight's sharded fields as frozen parameters of ``lin`` (FSDP2 shards parameters only)."""
    for name in NF4_SHARDED:
        t = getattr(lin.qweight, name)
        if t is not None:
            lin.register_parameter(NF4_PARAM_PREFIX + name, nn.Parameter(t, requires_grad=False))


def _rebind_layer(nf4: list[Linear], module: nn.Module, args: tuple) -> None:
    """A layer's forward pre-hook: its NF4 projections read the parameters FSDP has just gathered."""
    for lin in nf4:
        _rebind_nf4(lin)


def _rebind_nf4(lin: Linear) -> None:
    """``lin.qweight`` reading its fields from the module's current parameters (gathered inside forward)."""
    fields = {name: getattr(lin, NF4_PARAM_PREFIX + name) for name in NF4_SHARDED
              if getattr(lin.qweight, name) is not None}
    lin.qweight = dataclasses.replace(lin.qweight, **fields)
