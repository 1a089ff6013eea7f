"""Per-layer recomputation (gradient checkpointing) and host offload of frozen weights and layer inputs.

- :class:`LayerCheckpoint`: a reentrant-style checkpoint of one decoder layer. Its forward runs without a graph
  (nothing, not even a weight reference, is kept per layer, and no saved-tensor hooks cost host time), optionally
  keeps the layer input in pinned host memory, and its backward re-fetches the input, recomputes the layer and
  backpropagates through it.
- :class:`WeightStreamer`: frozen base weights of some decoder layers in pinned host memory, copied in on a side
  stream just before use, one layer prefetched ahead in the direction of travel.
- :func:`streamed_layer_ids` / :func:`checkpointed_layer_ids`: which layers stream and which recompute.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels.ops.lora_linear import reuse_dequantised
from kernels.trainer.config import MethodOptions
from kernels.trainer.linear import Linear

_COPY_STREAMS: dict[int, Any] = {}


def copy_stream(device: torch.device):  # noqa: ANN202
    """The side stream of ``device`` that host<->device copies run on (one per device, made once)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _COPY_STREAMS[idx]


class WeightStreamer:
    """Frozen base weights of some decoder layers in pinned host memory, copied in just before use.

    ``enter(i, direction)`` makes layer ``i``'s weights usable on the compute stream (waiting for its copy) and
    starts copying the next streamed layer in ``direction`` (+1 forward, -1 backward) on a side stream, so the
    copy overlaps this layer's compute; ``exit(i)`` drops the device copies (``record_stream`` keeps the
    allocator from reusing them before the compute stream is done). At most two streamed layers are on the
    device at any time. On a CPU model (tests) the "device copy" is the host tensor itself.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int], device: torch.device):
        self.device, self.layer_ids = device, sorted(layer_ids)
        self.cuda = device.type == "cuda"
        self.host: dict[int, list[tuple[Linear, torch.Tensor]]] = {}
        for i in self.layer_ids:
            entries = []
            for _, mod in _layer_linears(model.model.layers[i]):
                if mod.weight is None or mod.weight.requires_grad:
                    raise ValueError("offload_weights needs a dense frozen base (LoRA/DoRA, not full or QLoRA)")
                host = mod.weight.data.to("cpu")
                if self.cuda and not host.is_pinned():
                    host = host.pin_memory()
                mod.weight = nn.Parameter(host, requires_grad=False)  # the parameter itself now lives on the host
                entries.append((mod, host))
            self.host[i] = entries
        self.on_device: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.released: Any = None  # compute-stream event after the last released layer's work

    def _issue(self, i: int) -> None:
        if i in self.on_device or i not in self.host:
            return
        if not self.cuda:
            self.on_device[i] = ([h for _, h in self.host[i]], None)
            return
        if self.released is not None:
            # Throttle the CPU: the host runs far ahead of the GPU, and a block freed with record_stream is only
            # reusable once the compute stream has passed it, so without this wait every prefetch issued ahead
            # would take fresh device memory (up to all streamed layers). Waiting for the last released layer
            # bounds the device copies at ~2 layers and still leaves the GPU a layer of queued work.
            self.released.synchronize()
            self.released = None
        stream = copy_stream(self.device)
        # the copy must not start before the compute stream has finished with the memory it may reuse
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            ts = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
        self.on_device[i] = (ts, stream.record_event())

    def _next(self, i: int, direction: int) -> int | None:
        later = [j for j in self.layer_ids if (j - i) * direction > 0]
        return (min(later) if direction > 0 else max(later)) if later else None

    def enter(self, i: int, direction: int) -> None:
        if i in self.host:
            self._issue(i)
            ts, event = self.on_device[i]
            if event is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(event)
                for t in ts:
                    t.record_stream(cur)
            for (mod, _), t in zip(self.host[i], ts, strict=True):
                mod.stream_weight = t
        nxt = self._next(i, direction)
        if nxt is not None:
            self._issue(nxt)

    def exit(self, i: int, direction: int) -> None:
        if i in self.host:
            for mod, _ in self.host[i]:
                mod.stream_weight = None
            if direction > 0 and i == self.layer_ids[-1]:
                return  # the last streamed layer of the forward is the first one backward needs: keep it
            self.on_device.pop(i, None)
            if self.cuda:
                self.released = torch.cuda.current_stream(self.device).record_event()


def _layer_linears(layer: nn.Module):  # noqa: ANN202
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, Linear)]


class LayerCheckpoint(torch.autograd.Function):
    """Reentrant-style checkpoint of one decoder layer, with host offload of its input and/or its weights.

    torch's non-reentrant checkpoint holds the layer input alive through its recompute closure (so
    ``save_on_cpu`` around it would offload nothing) and its forward keeps every reference an op stores on
    ``ctx`` (``lora_linear`` keeps its weight): a streamed weight would stay on the GPU until backward. Here
    the forward runs under ``no_grad`` (no graph at all), the input is copied to pinned memory on a side stream
    when asked, and backward brings the input (and the layer's streamed weights) back, recomputes the layer
    with a graph (same RNG state, for dropout) and backpropagates through it; parameters get their gradients
    from that inner backward.

    QLoRA (``LayerCall.reuse_dequant``): the recompute runs inside
    :func:`~kernels.ops.lora_linear.reuse_dequantised`, so each NF4 projection keeps the bf16 weight it dequantised
    for the recompute until its own backward GEMM uses it (one dequantisation per weight saved, of three): from the
    end of the recompute, where the whole layer's weights are alive (436 MB at the 8B shapes), down to none as the
    inner backward reaches the first projection. The layers that keep their activations run outside it and keep no
    dense weight.
    """

    @staticmethod
    def forward(ctx, call, h, *args):  # noqa: ANN001, ANN205
        ctx.call, ctx.device = call, h.device
        ctx.cpu_rng = torch.get_rng_state() if call.rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(h.device) if (call.rng and h.is_cuda) else None
        with torch.no_grad():
            out = call.run(h, *args, direction=1)
        ctx.event = None
        if call.offload_input and h.is_cuda:
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            stream = copy_stream(h.device)
            stream.wait_stream(torch.cuda.current_stream(h.device))
            with torch.cuda.stream(stream):
                host.copy_(h, non_blocking=True)
            h.record_stream(stream)  # h's memory is not reused before the copy has read it
            ctx.event = stream.record_event()
            ctx.h = host
        else:
            ctx.h = h.detach()
        # tensors through save_for_backward; other arguments (a SharedPrompts attention spec) kept as they are
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(a for a in args if isinstance(a, torch.Tensor)))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if a is None else a for a in ctx.others]
        if ctx.event is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.event)
            h = ctx.h.to(ctx.device, non_blocking=True)
        else:
            h = ctx.h
        h = h.detach().requires_grad_(True)
        ctx.h = None
        index = None
        if ctx.cuda_rng is not None:
            index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        devices = [index] if index is not None else []
        # RNG replay only where the layer draws random numbers (LoRA dropout): forking the CUDA generator
        # costs host time at every layer of every step
        with torch.random.fork_rng(devices=devices, enabled=ctx.cpu_rng is not None):
            if ctx.cpu_rng is not None:
                torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, index)
            with torch.enable_grad(), reuse_dequantised(ctx.call.reuse_dequant):
                out = ctx.call.run(h, *args, direction=-1, keep=True)
            torch.autograd.backward(out, grad_out)
        ctx.call.release(-1)
        return (None, h.grad) + (None,) * len(args)


class LayerCall:
    """What :class:`LayerCheckpoint` runs: ``layer(h, cos, sin, mask)`` with its weights streamed in.

    ``reuse_dequant``: the recompute keeps its dequantised NF4 weights for the backward that follows
    (``MethodOptions.reuse_dequant``, which ``apply_method`` sets on each decoder layer; a layer without that
    attribute: off).
    """

    def __init__(self, layer: nn.Module, index: int, offload_input: bool, streamer: WeightStreamer | None,
                 rng: bool):
        self.layer, self.index = layer, index
        self.offload_input, self.streamer = offload_input, streamer
        self.rng = rng  # the layer draws random numbers (dropout): its recompute must replay the RNG state
        self.reuse_dequant = bool(getattr(layer, "reuse_dequant", False))

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, *,
            direction: int, keep: bool = False) -> torch.Tensor:
        if self.streamer is not None:
            self.streamer.enter(self.index, direction)
        out = self.layer(h, cos, sin, mask)  # mask is passed (saved) only for packed rows
        if not keep:
            self.release(direction)
        return out

    def release(self, direction: int) -> None:
        if self.streamer is not None:
            self.streamer.exit(self.index, direction)


def streamed_layer_ids(n_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over ``n_layers`` (-1 or >= n_layers: all).

    Spread, not the first ``count``: each streamed layer's copy then overlaps the compute of the resident
    layers before it, instead of a run of streamed layers waiting on the PCIe link back to back.
    """
    if count < 0 or count >= n_layers:
        return list(range(n_layers))
    return sorted({int(k * n_layers / count) for k in range(count)}) if count else []


def checkpointed_layer_ids(n_layers: int, o: MethodOptions) -> frozenset[int] | None:
    """Layers that recompute in backward under ``o`` (None: all of them, the plain case).

    ``recompute_layers`` layers spread evenly (so the kept activations do not pile up in one stretch of the
    forward), always including the layers whose weights stream from the host (they cannot keep a graph that
    holds their device weights).
    """
    k = o.recompute_layers
    if not o.gradient_checkpointing or k < 0 or k >= n_layers:
        return None
    if k == 0:
        raise ValueError("recompute_layers: 0 would switch gradient checkpointing off; set "
                         "train.gradient_checkpointing: false in the scenario for that")
    streamed = set(streamed_layer_ids(n_layers, o.offload_weights))
    if len(streamed) > k:
        raise ValueError(f"recompute_layers: {k} is fewer than the {len(streamed)} layers offload_weights "
                         "streams from the host (those always recompute)")
    ids = set(streamed)
    # then evenly spread layers, then (if those collided with streamed ones) the first free layers
    for c in [*streamed_layer_ids(n_layers, k), *range(n_layers)]:
        if len(ids) >= k:
            break
        ids.add(c)
    return frozenset(ids)


