"""The training loop: data order, loss normalisation and optimizer as the HF Trainer's (transformers 5.17).

Data order: :mod:`kernels.trainer.batches` (rows in order, ``micro_batch`` rows per forward, ``grad_accum``
micro-batches per optimizer step, epoch by epoch as the Trainer's sequential sampler reads them).

Loss: each micro-batch's loss is the *sum* of token losses divided by the number of loss tokens of the whole
optimizer step (labels != -100 after the one-position shift, counted over all its micro-batches), which is what
the transformers 5 Trainer does when it passes ``num_items_in_batch`` to the model. The division happens inside
the loss op, before the gradients are rounded to the activation dtype, as transformers divides its fp32 loss
before backward. The reported step loss is the sum of those, i.e. the mean over the step's loss tokens (HF logs
the same number).

Optimizer (:func:`make_optimizer`): the Trainer's two parameter groups (weight decay on all but biases and norm
weights, :func:`decay_parameter_names`), and the same torch AdamW implementation for the same optimizer name.
Clipping runs over the trainable parameters in the model's order, as the Trainer's ``model.parameters()``.

CUDA graphs (``MethodOptions.cuda_graph``): the whole optimizer step (forward, backward with recomputation,
clipping, AdamW) is captured once as one CUDA graph and replayed every step, so the host launches one graph instead
of ~10^4 kernels (:class:`StepGraph`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from kernels.trainer.batches import micro_batches, static_length
from kernels.trainer.config import TrainSettings

if TYPE_CHECKING:  # only a type here: one-process training never imports torch.distributed's FSDP
    from kernels.trainer.distributed import DataParallel

T = TypeVar("T")


class StepHook(Protocol):
    """What :func:`train` reports each step to (a benchmark's step meter, say)."""

    def step_begin(self) -> None:
        """An optimizer step starts (before its batches are counted)."""

    def count_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """One collated micro-batch of the step, as fed to the model."""

    def step_end(self, loss: float) -> None:
        """The step ended with this loss (the hook may synchronise the device to stop its clock)."""


def _graphed(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "options", None), "cuda_graph", False))


# transformers' Trainer.get_decay_parameter_names: no weight decay for these names (lower-cased, searched anywhere)
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                    r"_norm(?:$|\.)"))


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: all but biases and norm weights, by the transformers
    Trainer's rule (name patterns, plus parameters of ``nn.LayerNorm`` modules).

    Why it matters: decaying the RMSNorm weights too moves each of them toward 0 by ``lr * weight_decay * w`` per
    step; measured in fp32 (tiny-llama, weight decay 0.1, lr 3e-3, cosine) that puts the loss 7e-5 off hf's at
    step 2 and 2.3e-3 off by step 12, where the grouped update is bit-identical. In bf16 a decay that small is
    below half a bf16 step of a weight near 1 and rounds away."""
    layer_norms = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                   for n, _ in mod.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters()
            if n not in layer_norms and not any(p.search(n.lower()) for p in NO_DECAY_PATTERNS)}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as the Trainer's two optimizer groups: ``weight_decay`` on
    :func:`decay_parameter_names`, 0 on the rest (each group in the model's parameter order)."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, built as the transformers Trainer builds it.

    Two parameter groups (:func:`parameter_groups`); ``adamw_torch_fused`` is torch's fused AdamW (one kernel for
    all tensors; also on the CPU) and ``adamw_torch`` torch's default implementation for the device (foreach on
    CUDA, per tensor on the CPU), as the Trainer asks torch for them. In bf16 the choice matters beyond rounding
    order: the fused kernel does the whole update in fp32 and rounds once, the others round intermediates to
    bf16. A CUDA-graphed step always uses the fused AdamW, ``capturable`` (step count on the device) with its
    learning rate a device tensor, which the scheduler updates in place between replays (torch's foreach AdamW is
    capturable on CUDA only, and the CPU tests run the graphed step's maths uncaptured)."""
    groups = parameter_groups(model, s.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters")
    groups = [g for g in groups if g["params"]]  # LoRA trains no norm weight or bias: no empty group to step
    graphed = _graphed(model)
    if s.optimizer == "sgd":
        if graphed:
            raise NotImplementedError("cuda_graph: AdamW only (sgd has no capturable step)")
        return torch.optim.SGD(groups, lr=s.lr)
    if s.optimizer not in ("adamw_torch", "adamw_torch_fused"):
        raise NotImplementedError(f"optimizer {s.optimizer!r} (tunebench has adamw_torch, adamw_torch_fused, sgd)")
    fused = s.optimizer == "adamw_torch_fused"
    if graphed:
        return torch.optim.AdamW(groups, lr=torch.tensor(s.lr, dtype=torch.float32, device=params[0].device),
                                 fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=s.lr, fused=fused or None)


def make_scheduler(opt: torch.optim.Optimizer, s: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' constant / linear / cosine schedules with zero warmup, stepped once per optimizer step."""
    n = max(1, s.steps)

    def factor(step: int) -> float:
        if s.lr_scheduler == "linear":
            return max(0.0, (n - step) / n)
        if s.lr_scheduler == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * step / n)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


GRAPH_WARMUP_STEPS = 2  # eager steps of a step graph before its capture (compiles, autotuning, AdamW's state)


class StepGraph:
    """One optimizer step on static buffers, captured as a CUDA graph after ``warmup`` eager steps.

    Every step's micro-batches are copied into static ``[micro_batch, length]`` buffers (right-padded to the
    longest row of the data: shapes must not change between replays; right padding changes no real token's
    output, and pads carry no loss) and the step's loss-token count into a device scalar, then:

    * the first ``warmup`` steps run eagerly (Triton compiles and autotunes, cuBLAS picks its kernels, AdamW
      allocates its state), on the same side stream the capture uses, as CUDA graphs require;
    * the next step is captured (recorded, not run) and then replayed; every later step is one replay.

    Gradients live in the graph's memory pool: the captured backward writes them (``grad`` is None at capture,
    so nothing accumulates across replays) and the captured AdamW reads them; they are never set to None.
    ``capture=False`` runs the same static-buffer step eagerly every time (CPU tests of everything but the
    capture itself).

    An input embedding table on the host (``offload_embeddings``, frozen): a graph cannot capture the host's gather,
    so each step's rows are gathered from it here, into a pinned buffer copied to static device buffers, before
    the replay; the captured forward starts from those (the model's ``_staged_embeddings``: its ``_embed`` takes
    them for these very ``ids`` tensors).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, s: TrainSettings, length: int,
                 device: torch.device, params: list[torch.Tensor], capture: bool = True,
                 warmup: int = GRAPH_WARMUP_STEPS):
        self.model, self.opt, self.s, self.params = model, opt, s, params
        self.capture, self.warmup, self.done = capture, warmup, 0
        shape = (s.micro_batch, length)
        self.ids = [torch.full(shape, s.pad_id, dtype=torch.long, device=device) for _ in range(s.grad_accum)]
        self.labels = [torch.full(shape, -100, dtype=torch.long, device=device) for _ in range(s.grad_accum)]
        self.n_loss = torch.ones((), dtype=torch.float32, device=device)
        table = model.model.embed_tokens.weight if hasattr(model, "model") else None
        offloaded = getattr(getattr(model, "options", None), "offload_embeddings", False)
        # the knob on a tied table leaves it on the device (loading): then the forward's own lookup is captured
        self.table = table if offloaded and table is not None and table.device.type == "cpu" else None
        if self.table is not None:
            width = (*shape, table.shape[1])
            self.hidden = [torch.empty(width, dtype=table.dtype, device=device) for _ in self.ids]
            self.host_hidden = [torch.empty(width, dtype=table.dtype, pin_memory=capture) for _ in self.ids]
            model.__dict__["_staged_embeddings"] = list(zip(self.ids, self.hidden, strict=True))
        else:
            model.__dict__.pop("_staged_embeddings", None)
        self.stream = torch.cuda.Stream(device=device) if capture else None
        if capture:
            # the caching allocator reuses a free block only on the stream it was allocated on: what loading left
            # cached on the current stream (a layer's bf16 weights before NF4, an embedding table moved to the
            # host) would stay reserved beside the eager steps' own blocks on the side stream
            torch.cuda.empty_cache()
        self.graph: Any = None
        self.total: torch.Tensor | None = None

    def fits(self, opt: torch.optim.Optimizer, s: TrainSettings, length: int) -> bool:
        """Whether a new ``train`` call can replay this graph (same optimizer, batch shape and step maths)."""
        t = self.s
        return (opt is self.opt and length <= self.ids[0].shape[1]
                and (s.micro_batch, s.grad_accum, s.max_grad_norm, s.pad_id)
                == (t.micro_batch, t.grad_accum, t.max_grad_norm, t.pad_id))

    def _load(self, batches: list[dict], n_loss: int) -> None:
        """Copy a step's micro-batches into the static buffers. The short step at the end of an epoch has fewer
        micro-batches, its last one fewer rows: the buffers left over hold pads with no loss, whose gradients
        are exact zeros."""
        if len(batches) > len(self.ids):
            raise ValueError(f"cuda_graph: {len(batches)} micro-batches for {len(self.ids)} buffers")
        for i, (ids, labels) in enumerate(zip(self.ids, self.labels, strict=True)):
            ids.fill_(self.s.pad_id)
            labels.fill_(-100)
            if i >= len(batches):
                continue
            rows, n = batches[i]["input_ids"].shape
            if n > ids.shape[1]:
                raise ValueError(f"cuda_graph: a batch of length {n} exceeds the static length {ids.shape[1]}")
            ids[:rows, :n].copy_(batches[i]["input_ids"])
            labels[:rows, :n].copy_(batches[i]["labels"])
        self.n_loss.fill_(max(n_loss, 1))
        if self.table is not None:  # the host gather; the last step's copies finished (its loss was read)
            for ids, host, dev in zip(self.ids, self.host_hidden, self.hidden, strict=True):
                torch.index_select(self.table, 0, ids.view(-1).cpu(), out=host.view(-1, host.shape[-1]))
                dev.copy_(host, non_blocking=True)

    def _step(self) -> torch.Tensor:
        batches = [{"input_ids": ids, "labels": labels} for ids, labels in zip(self.ids, self.labels, strict=True)]
        return optimizer_step(self.model, batches, self.n_loss, self.params, self.s, self.opt)

    def run(self, batches: list[dict], n_loss: int) -> torch.Tensor:
        """One optimizer step on these micro-batches; returns the step loss (a device scalar)."""
        if not self.capture:
            self._load(batches, n_loss)
            total = self._step()
            self.opt.zero_grad(set_to_none=True)
            return total
        self.stream.wait_stream(torch.cuda.current_stream())  # the batches were copied on the current stream
        with torch.cuda.stream(self.stream):
            self._load(batches, n_loss)
            if self.done < self.warmup:
                total = self._step()
                self.opt.zero_grad(set_to_none=True)
            else:
                if self.graph is None:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph gets its own pool
                    self.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.graph, stream=self.stream):
                        self.total = self._step()
                self.graph.replay()
                total = self.total
        torch.cuda.current_stream().wait_stream(self.stream)
        self.done += 1
        return total


def optimizer_step(model: torch.nn.Module, batches: list[dict], n_loss: int | torch.Tensor,
                   params: list[torch.Tensor], s: TrainSettings, opt: torch.optim.Optimizer,
                   sync: Callable[[list[torch.Tensor]], None] | None = None,
                   retry: Callable[[], bool] | None = None) -> torch.Tensor:
    """Forward + backward of each micro-batch (summed token loss / the step's loss tokens), clipping, optimizer
    step; returns the step loss as a device scalar. ``n_loss``: a number, or a device scalar (CUDA graphs).
    ``params``: what to clip, in the model's parameter order (the order the norm sums in, as the Trainer's).
    ``sync``: called with ``params`` after the last backward, before clipping (gradients summed over ranks).
    ``retry``: called when the forwards and backwards run out of memory (nothing stepped yet), once the failed
    attempt's tensors are freed and its gradients dropped; True: they are done again (a planner moved the model to
    a leaner plan), else the error stands."""
    total = retrying(lambda: _forwards_backwards(model, batches, n_loss), opt, retry)
    if sync is not None:
        sync(params)
    if s.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)  # foreach where torch picks it, as accelerate
    opt.step()
    return total


def retrying(work: Callable[[], T], opt: torch.optim.Optimizer, retry: Callable[[], bool] | None) -> T:
    """``work()`` (a step's forwards and backwards), done again while it runs out of memory and ``retry()`` (called
    once the failed attempt's tensors are freed and its gradients dropped) says a leaner plan is in place."""
    while True:
        try:
            return work()
        except torch.OutOfMemoryError as e:
            if retry is None:
                raise
            why = str(e)
        # out of the except block: the failed attempt's activations went with its traceback
        opt.zero_grad(set_to_none=True)
        if not retry():
            raise torch.OutOfMemoryError(f"{why} (and no leaner plan to do the step again with)")


def _forwards_backwards(model: torch.nn.Module, batches: list[dict], n_loss: int | torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=batches[0]["input_ids"].device)
    for b in batches:
        loss = model(b["input_ids"], labels=b["labels"], position_ids=b.get("position_ids"), reduction="sum",
                     num_items=n_loss)
        loss.backward()
        total += loss.detach()
    return total


def prepare_training(model: torch.nn.Module, s: TrainSettings, device: torch.device | str | None,
                     optimizer: torch.optim.Optimizer | None):
    """What every training loop starts with: the device, the optimizer (``optimizer`` or :func:`make_optimizer`),
    its scheduler, the parameters it steps in the model's order (clipped in that order, as the Trainer clips
    ``model.parameters()``), and the model in train mode."""
    device = device or getattr(model, "device", None) or next(model.parameters()).device
    opt = optimizer or make_optimizer(model, s)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    params = [p for p in model.parameters() if id(p) in in_opt]
    model.train()
    return device, opt, make_scheduler(opt, s), params


def begin_step(meter: StepHook | None, step: int, on_first_step: Callable | None, opt: torch.optim.Optimizer,
               counted: Sequence[dict[str, torch.Tensor]]) -> None:
    """Start an optimizer step: the meter's clock, the first-step callback (after the clock, so its work is
    timed like the step's), and the micro-batches the meter counts."""
    if meter is not None:
        meter.step_begin()
    if step == 0 and on_first_step is not None:
        on_first_step(opt)
    if meter is not None:
        for b in counted:
            meter.count_batch(b)


def train(model: torch.nn.Module, rows: Sequence[dict], s: TrainSettings, meter: StepHook | None = None,
          device: torch.device | str | None = None,
          on_first_step: Callable[[torch.optim.Optimizer], None] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          on_step_end: Callable[[int], None] | None = None, dist: DataParallel | None = None,
          on_oom: Callable[[int], bool] | None = None) -> list[float]:
    """Train ``model`` for ``s.steps`` optimizer steps over ``rows`` and return the per-step losses.

    Args:
        model: a :class:`kernels.trainer.model.DecoderModel` (anything with ``model(input_ids, labels,
            position_ids, reduction="sum", num_items=n)`` returning the summed token loss divided by ``n`` works).
        rows: tokenised rows (:mod:`kernels.trainer.batches` describes them).
        s: loop settings.
        meter: a :class:`StepHook` (or None): ``count_batch`` per micro-batch, ``step_begin`` /
            ``step_end(loss)`` per optimizer step.
        device: where batches go (default: the model's device).
        on_first_step: called with the optimizer inside the first timed step, before any compute (the place
            to read effective settings back from the live model).
        optimizer: use this optimizer instead of :func:`make_optimizer`.
        on_step_end: called with the number of finished optimizer steps after the step's clock stopped
            (intermediate saves for time-to-target go here, outside the timed step).
        dist: this process's share of a data-parallel run (:mod:`kernels.trainer.distributed`: its rows of each
            step, loss tokens and gradients summed over ranks, the step loss of all ranks); None: one process.
        on_oom: called with the step (0-based) whose forwards and backwards ran out of memory (an eager step of
            one process); True: the step is done again (its time then includes the failed attempt).

    Returns:
        Loss of each optimizer step (mean over the step's loss tokens).
    """
    device, opt, sched, params = prepare_training(model, s, device, optimizer)
    if dist is not None and getattr(getattr(model, "options", None), "mlp_chunk_tokens", None):
        raise ValueError("mlp_chunk_tokens: one process only (its chunks' backwards reach each parameter's "
                         "gradient hook once per chunk)")
    graph = None
    if _graphed(model):
        if dist is not None:
            raise ValueError("cuda_graph: one process only (the step's collectives are not captured)")
        if any("position_ids" in r for r in rows):
            raise ValueError("cuda_graph: packed rows (position_ids) build a mask per batch; not graphed")
        graph = model.__dict__.get("_step_graph")  # a later train() call with the same optimizer replays it
        if graph is None or not graph.fits(opt, s, static_length(rows)):
            graph = StepGraph(model, opt, s, static_length(rows), torch.device(device), params,
                              capture=torch.device(device).type == "cuda")
            model.__dict__["_step_graph"] = graph
    losses: list[float] = []
    for step in range(s.steps):
        batches = micro_batches(rows, s, step, device) if dist is None else dist.micro_batches(rows, s, step, device)
        # loss tokens of the whole step, like num_items_in_batch (one host sync per step, before timing)
        n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if dist is not None:
            n_loss = dist.global_count(n_loss, device)  # of every rank's micro-batches: the global step's
        begin_step(meter, step, on_first_step, opt, batches)
        if graph is not None:
            total = graph.run(batches, n_loss)
        else:
            total = optimizer_step(model, batches, max(n_loss, 1), params, s, opt,
                                   sync=dist.sync_gradients if dist is not None else None,
                                   retry=partial(on_oom, step) if on_oom and dist is None else None)
            opt.zero_grad(set_to_none=True)
        if dist is not None:
            total = dist.step_loss(total)
        sched.step()
        value = float(total)  # the only sync inside the step besides step_end's own
        if meter is not None:
            meter.step_end(value)
        losses.append(value)
        if on_step_end is not None:
            on_step_end(step + 1)
    return losses
