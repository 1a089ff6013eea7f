"""A run planned to a memory budget: the budget, the device's rates, the plan before loading, a probe, one re-plan.

:class:`Planner` resolves the budget (GiB, or ``auto``: the device's free memory) minus a safety margin, measures
the device's matmul rate and host link (:func:`measure_speed`), and picks the plan (:func:`kernels.trainer.plan.
choose`) before the model loads, so what the plan puts in host memory never touches the device. After the second
optimizer step (the first compiles) it compares the measured peak and step time with the prediction, corrects the
cost model, and re-plans once: when the peak was above the prediction, or above what the budget leaves once the
allocator's slack it measured is held back (:meth:`Planner._room`), or when the corrected model finds a plan
5 % faster. A step before the probe that runs out of memory re-plans too (:meth:`Planner.after_oom`, once): the
model under-predicted, and the step is done again under a leaner plan. :func:`reconfigure` moves the live model to
the new plan between steps. A graphed plan's first step that only replays is timed against the probe's eager step:
the graph's measured saving beside the predicted one. Everything it decided is in :attr:`Planner.record`:
``predicted_*`` entries are predictions, ``measured_*`` measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kernels.trainer.config import DecoderConfig, MethodOptions, TrainerConfig
from kernels.trainer.offload import WeightStreamer, checkpointed_layer_ids, streamed_layer_ids
from kernels.trainer.plan import GIB, CostModel, DeviceSpeed, Plan, choose, costs_for, lean_plan, predict
from kernels.trainer.remake import mark_remade_mlp
from kernels.trainer.train import GRAPH_WARMUP_STEPS

if TYPE_CHECKING:
    from kernels.trainer.model import DecoderModel

# Held back from the budget: the CUDA context and allocator slack that torch's allocated peak does not show
# (measured on the H100: the tunebench 8B row at 17.28 GiB allocated had 18.25 GiB NVML, a 0.97 GiB gap).
MARGIN_GIB = 0.75
MARGIN_FRACTION = 0.04
PROBE_STEP = 2  # the first step compiles and autotunes; the second is the first that shows the plan's cost
OOM_HEADROOM = 1.05  # after an out-of-memory step: the plan's peak taken as this much over what the device allowed
SWITCH_GAIN = 0.05  # re-plan for speed only for a plan predicted at least this much faster
# a graphed plan's first step that only replays (after the eager warm-up steps and the one that captures): its time
# against the probe's eager step is the graph's measured saving
GRAPH_CHECK_STEP = GRAPH_WARMUP_STEPS + 2


def _timed(fn: Callable[[], object], reps: int = 3) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream (after one call to warm it)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _rates(device: torch.device, n: int = 8192, size: int = 256 * 2**20) -> tuple[float, float, float]:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    return (2 * n**3 / _timed(lambda: a @ b) / 1e12, size / _timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9,
            size / _timed(lambda: host.copy_(dev, non_blocking=True)) / 1e9)


def measure_speed(device: torch.device) -> DeviceSpeed:
    """The device's bf16 matmul rate and pinned host<->device copy rates, measured in ~0.1 s (CUDA); on a CPU the
    defaults (nothing there streams for real)."""
    if device.type != "cuda":
        return DeviceSpeed()
    tflops, h2d, d2h = _rates(device)
    torch.cuda.empty_cache()  # before the model loads: the allocator's mode is set then (loading.configure_allocator)
    return DeviceSpeed(matmul_tflops=tflops, h2d_gbps=h2d, d2h_gbps=d2h, measured=True)


def _costs(cfg: TrainerConfig, decoder: DecoderConfig, seq_len: int, packed: bool, speed: DeviceSpeed) -> CostModel:
    """The cost model of ``cfg``: a preference objective's pairs are two sequences each, packed by default, with
    its forwards without gradient (:attr:`ObjectiveOptions.nograd_forwards`); DPO's and KTO's stream no weights
    (the trainer streams in checkpointed passes only, and their reference passes are not)."""
    t, o = cfg.train, cfg.objective
    untiled = replace(cfg.method, mlp_chunk_tokens=None)  # the plan decides the MLP's tiling, as its other knobs
    costs = costs_for(decoder, untiled, t.micro_batch * o.trained_sequences_per_row, t.grad_accum, seq_len,
                      cfg.dtype, cfg.device, t.optimizer, packed or o.is_preference, speed)
    if not o.is_preference:
        return costs
    return replace(costs, nograd_forwards=o.nograd_forwards,
                   can_stream=costs.can_stream and not o.has_reference)


def usable_bytes(setting: float | str, device: torch.device) -> tuple[int, dict[str, Any]]:
    """The bytes a plan may allocate under ``setting`` (a budget in GiB, or ``"auto"``: the device's free memory).

    A budget loses ``MARGIN_GIB`` + ``MARGIN_FRACTION`` of itself (the CUDA context and allocator slack, which
    torch's allocated count does not show and a per-process cap does); free memory (which already excludes this
    process's context) loses the fraction only. On CUDA the result is never above what is free now. The fraction's
    bytes (``slack_allowance_gib``) are what :meth:`Planner.after_step` trades for the slack its probe measures.

    Returns:
        ``(usable bytes, record)``, the record naming the setting, the free memory and the usable bytes in GiB.
    """
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    rec: dict[str, Any] = {"setting": setting, "free_gib": None if free is None else round(free / GIB, 3)}
    if setting == "auto":
        if free is None:
            raise ValueError("plan: auto plans to the device's free memory, which needs a CUDA device; "
                             "give a budget in GiB instead")
        usable = free * (1 - MARGIN_FRACTION)
    else:
        budget = float(setting) * GIB
        if budget <= 0:
            raise ValueError(f"plan: a memory budget must be positive (got {setting!r})")
        usable = budget * (1 - MARGIN_FRACTION) - MARGIN_GIB * GIB
        if free is not None:
            usable = min(usable, free * (1 - MARGIN_FRACTION))
    rec["usable_gib"] = round(usable / GIB, 3)
    # the part of the margin held for the allocator's slack (the rest is for the CUDA context): the probe replaces it
    # with the slack it measures
    rec["slack_allowance_gib"] = round(MARGIN_FRACTION * (free if setting == "auto" else
                                                          min(budget, free or budget)) / GIB, 3)
    return int(usable), rec


def apply_plan(options: MethodOptions, plan: Plan) -> None:
    """Set the plan's knobs on ``options`` (in place: a loaded model holds the same object)."""
    for name, value in plan.knobs().items():
        setattr(options, name, value)


def plan_of(options: MethodOptions) -> Plan:
    """The plan ``options`` currently describes."""
    return Plan(**{name: getattr(options, name) for name in Plan().knobs()})


def reconfigure(model: DecoderModel, options: MethodOptions) -> None:
    """Move a loaded model to the knobs of ``options`` between optimizer steps (no step in flight).

    What goes to the host goes first (embeddings, head, newly streamed layers), then what comes back to the device,
    so the move itself needs no more device memory than the larger of the two plans; the MLP's tiling changes with
    nothing to move. Trainable parameters do not move, so the optimizer and its state stay valid. The CUDA graph knob
    cannot change here (a run's step graph is made when training starts), nor, in a graphed run, where the input
    embeddings live (the graph reads them from its own buffers).
    """
    dev = model.device_of_compute
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
    n = model.cfg.num_layers
    holders = [(options.offload_embeddings, model.model.embed_tokens),
               (options.offload_lm_head, model.lm_head)] if model.lm_head is not None else []
    for to_host, holder in holders:
        if to_host and holder.weight.device.type != "cpu":
            host = holder.weight.data.to("cpu")
            holder.weight = nn.Parameter(host.pin_memory() if cuda else host, requires_grad=False)
    old = model.streamer.host if model.streamer is not None else {}
    new = streamed_layer_ids(n, options.offload_weights) if options.offload_weights else []
    model.streamer = WeightStreamer(model, new, dev) if new else None  # moves the newly streamed layers to the host
    for i, entries in old.items():
        if i not in new:
            for mod, host in entries:
                mod.stream_weight = None
                mod.weight = nn.Parameter(host.to(dev), requires_grad=False)
    for to_host, holder in holders:
        if not to_host and holder.weight.device != dev:
            holder.weight = nn.Parameter(holder.weight.data.to(dev), requires_grad=False)
    model.offload_checkpoints = options.offload_checkpoints
    model.checkpointed_layers = checkpointed_layer_ids(n, options)
    mark_remade_mlp(model, options)
    for layer in model.model.layers:  # the dense MLP tiled or not (a MoE layer ignores it)
        layer.mlp_chunk_tokens = options.mlp_chunk_tokens


def _solve(g: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """``x`` in ``[lo, hi]`` with ``g(x) = target`` for a non-decreasing ``g`` (clamped at the ends)."""
    if g(lo) >= target:
        return lo
    if g(hi) <= target:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < target else (lo, mid)
    return (lo + hi) / 2


class Planner:
    """Plans a run to a budget before its model loads, probes the first steps and re-plans once.

    Use: ``planner = Planner.start(cfg, decoder, seq_len)`` (sets the knobs on ``cfg.method``), load the model with
    ``cfg.method``, ``planner.attach(model)``, and call ``planner.after_step(step)`` after each optimizer step (the
    ``on_step_end`` hook of :func:`kernels.trainer.train.train`). :attr:`record` holds the budget, the device's
    rates, the plan with its predictions, the probe's measurements and corrections, and a re-plan if one happened;
    it is updated in place, so a caller may store it before training.
    """

    def __init__(self, costs: CostModel, usable: int, budget_record: dict[str, Any], options: MethodOptions):
        self.costs, self.usable, self.options = costs, usable, options
        chosen = choose(costs, usable)
        self.plan = chosen if chosen is not None else lean_plan(costs)
        self.prediction = predict(costs, self.plan)
        apply_plan(options, self.plan)
        self.model: DecoderModel | None = None
        self._static: int | None = None
        self._t: float | None = None
        self.record: dict[str, Any] = {
            "budget": budget_record, "speed": asdict(costs.speed), "plan": self.plan.knobs(),
            # nothing fits the prediction: run the leanest plan anyway and let the allocator decide
            "fits": chosen is not None, **self.prediction.as_record(),
            "predicted_lean_peak_alloc_gib": round(predict(costs, lean_plan(costs)).peak_bytes / GIB, 3),
            "probe": None, "replanned": None, "replanned_after_oom": None, "graph": None}

    @classmethod
    def start(cls, cfg: TrainerConfig, decoder: DecoderConfig, seq_len: int, packed: bool = False,
              speed: DeviceSpeed | None = None) -> Planner:
        """Plan ``cfg`` (``cfg.method.plan``: GiB or ``"auto"``) for rows of up to ``seq_len`` tokens; the chosen
        knobs are set on ``cfg.method``."""
        if cfg.method.plan is None:
            raise ValueError("Planner.start: cfg.method.plan is None (no budget to plan to)")
        usable, budget_record = usable_bytes(cfg.method.plan, cfg.device)
        costs = _costs(cfg, decoder, seq_len, packed, speed or measure_speed(cfg.device))
        return cls(costs, usable, budget_record, cfg.method)

    @staticmethod
    def predicts_fit(cfg: TrainerConfig, decoder: DecoderConfig, seq_len: int, packed: bool = False) -> bool:
        """Whether a plan of ``cfg`` is predicted within its budget (``cfg.method.plan`` in GiB) for rows of
        ``seq_len`` tokens, without a device: what fits does not depend on the rates (the default ones are used),
        and nothing touches the GPU (a memory frontier asks this in its own process, before it probes)."""
        usable = usable_bytes(float(cfg.method.plan), torch.device("cpu"))[0]
        return choose(_costs(cfg, decoder, seq_len, packed, DeviceSpeed()), usable) is not None

    def attach(self, model: DecoderModel) -> None:
        """The loaded model; on CUDA, its allocated bytes now are the static bytes the probe compares."""
        self.model = model
        dev = model.device_of_compute
        if dev.type == "cuda":
            self._static = torch.cuda.memory_allocated(dev)

    def after_oom(self, step: int) -> bool:
        """Optimizer step ``step`` (0-based, before the probe) ran out of memory: the plan needs more than the
        budget, though predicted within it. The activation bytes are corrected so that the plan's peak is
        :data:`OOM_HEADROOM` over what the device allowed (the peak reached, or the usable budget where that is
        more or unknown), and the live model moves to the fastest plan predicted within the budget under that
        correction, else the leanest. Once per run, not in a graphed run (its graph is made in the first steps);
        returns whether the plan changed, i.e. whether the step may be done again."""
        plan = self.plan
        if self.model is None or self.record.get("replanned_after_oom") or step >= PROBE_STEP or plan.cuda_graph:
            return False
        dev = self.model.device_of_compute
        reached = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        need = OOM_HEADROOM * max(reached, self.usable)
        act = _solve(lambda a: predict(self.costs.corrected(act_factor=a), plan).peak_bytes, need, 1.0, 4.0)
        costs = self.costs.corrected(act_factor=act)
        best = choose(costs, self.usable, cuda_graph=False) or lean_plan(costs, cuda_graph=False)
        if predict(costs, best).peak_bytes >= predict(costs, plan).peak_bytes:
            return False  # nothing leaner to go to
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the failed attempt's blocks, before weights come back to the device
        self._move(best, costs, "replanned_after_oom", step=step + 1,
                   measured_peak_alloc_gib=round(reached / GIB, 3) if reached else None, act_factor=round(act, 3))
        return True

    def after_step(self, step: int, step_s: float | None = None) -> bool:
        """Call after optimizer step ``step`` (1-based). After :data:`PROBE_STEP`, corrects the cost model with the
        measured peak and step time and re-plans once. Returns whether the plan changed.

        Args:
            step: the optimizer steps done.
            step_s: that step's time where the caller measured it (a step meter); else the time since the call
                for the step before.
        """
        if step == PROBE_STEP - 1 or step == GRAPH_CHECK_STEP - 1:
            self._t = time.perf_counter()
        if (step == GRAPH_CHECK_STEP and self.plan.cuda_graph and not self.record["replanned"]
                and (self.record["probe"] or {}).get("measured_eagerly")):
            self._graph_check(time.perf_counter() - self._t if step_s is None else step_s)
        if step != PROBE_STEP or self.model is None or (self._t is None and step_s is None):
            return False
        step_s = time.perf_counter() - self._t if step_s is None else step_s
        costs, plan = self.costs, self.plan
        probe: dict[str, Any] = {"after_step": step, "measured_step_s": round(step_s, 4)}
        # a graphed plan's first steps run eagerly (the step graph's warm-up, before its capture): what they
        # measured, time and peak, is the same plan without its graph (no replay's saving, no graph pool)
        probed = replace(plan, cuda_graph=False) if plan.cuda_graph and step <= GRAPH_WARMUP_STEPS else plan
        if probed is not plan:
            probe["measured_eagerly"] = True
        peak, room = None, self.usable
        # after an out-of-memory step the device's peak is that step's, not this plan's: the probe corrects time only
        if self._static is not None and not self.record.get("replanned_after_oom"):
            peak = torch.cuda.max_memory_allocated(self.model.device_of_compute)  # loading included
            room = self._room(peak, probe)
            costs = costs.corrected(static_offset=self._static - (self.prediction.static_bytes - costs.static_offset))
            act = _solve(lambda a: predict(costs.corrected(act_factor=a), probed).peak_bytes, peak, 0.5, 4.0)
            costs = costs.corrected(act_factor=act)
            probe |= {"measured_static_gib": round(self._static / GIB, 3),
                      "measured_peak_alloc_gib": round(peak / GIB, 3), "act_factor": round(act, 3)}
        tf = _solve(lambda f: predict(costs.corrected(time_factor=f), probed).step_s, step_s, 0.25, 4.0)
        costs = costs.corrected(time_factor=tf)
        probe["time_factor"] = round(tf, 3)
        self.record["probe"] = probe
        over = peak is not None and peak > predict(self.costs, probed).peak_bytes
        # the plan's own peak over what the budget leaves once the measured slack is held back
        short = peak is not None and peak > room
        current = predict(costs, plan)
        # the step graph, if any, is already made: it keeps its graph, and where its inputs come from
        fixed = {"cuda_graph": plan.cuda_graph, "embeddings": plan.offload_embeddings if plan.cuda_graph else None}
        best = choose(costs, min(self.usable, room), **fixed)
        if best is None and (over or short):
            best = lean_plan(costs, **fixed)
        faster = best is not None and predict(costs, best).step_s < (1 - SWITCH_GAIN) * current.step_s
        if best is None or best == plan or not (over or short or faster):
            return False
        self._move(best, costs, "replanned", after_step=step,
                   why="peak above the prediction" if over else "slack above the margin" if short else "faster")
        return True

    def _graph_check(self, step_s: float) -> None:
        """The step graph's saving as measured: the probe's eager step (the graph's warm-up) against the first step
        that only replays, beside the saving the cost model predicted (``record["graph"]``)."""
        eager = self.record["probe"]["measured_step_s"]
        predicted = (predict(self.costs, replace(self.plan, cuda_graph=False)).step_s
                     - predict(self.costs, self.plan).step_s)
        self.record["graph"] = {"after_step": GRAPH_CHECK_STEP, "measured_step_s": round(step_s, 4),
                                "measured_saving_s": round(eager - step_s, 4),
                                "predicted_saving_s": round(predicted, 4)}

    def _room(self, peak: int, probe: dict[str, Any]) -> int:
        """The bytes the budget leaves allocations once the probe has measured the caching allocator's slack
        (reserved over allocated, at the peak so far): the budget's margin held ``slack_allowance_gib`` for it, and
        the slack measured takes its place. The plan in use must fit it; another plan is chosen within the smaller
        of it and :attr:`usable` (the graph's pool, made after the probe, has slack of its own). A budget record
        without the allowance (a plan made by hand) leaves :attr:`usable`."""
        allowance = self.record["budget"].get("slack_allowance_gib")
        if allowance is None:
            return self.usable
        slack = max(0, torch.cuda.max_memory_reserved(self.model.device_of_compute) - peak)
        room = int(self.usable + allowance * GIB - slack)
        probe |= {"measured_slack_gib": round(slack / GIB, 3), "room_after_probe_gib": round(room / GIB, 3)}
        return room

    def _move(self, best: Plan, costs: CostModel, key: str, **why: Any) -> None:
        """Move the live model to plan ``best`` under the corrected ``costs``, recorded under ``key`` (``why``
        first): ``plan`` becomes the plan in effect; the one it replaced, which the top-level predictions are of,
        is kept there as ``from_plan``."""
        before = self.plan.knobs()
        self.plan, self.prediction, self.costs = best, predict(costs, best), costs
        apply_plan(self.options, best)
        reconfigure(self.model, self.options)
        self.record[key] = {**why, "from_plan": before, "plan": best.knobs(),
                            "fits": self.prediction.peak_bytes <= self.usable, **self.prediction.as_record()}
        self.record["plan"] = best.knobs()
