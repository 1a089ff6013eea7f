"""Per-step measurement, identical for every framework.

Adapters call one hook at the same point of every optimizer step:

    meter.count_batch(batch)        # each micro-batch the model is fed (we count tokens ourselves)
    meter.step_begin()
    ...forward/backward/optimizer...
    meter.step_end(loss)            # synchronises the device before reading the clock

HF-Trainer-based tools get the same hook through :func:`make_trainer_callback` (a ``TrainerCallback``), with
tokens counted by a forward pre-hook on the model (:meth:`StepMeter.attach`).

What is measured (units in names):
- ``step_s``: wall time of each optimizer step with ``torch.cuda.synchronize()`` on both ends; the first
  ``warmup_steps`` are dropped from the statistics (compile/autotune/allocator warm-up).
- tokens: non-padding input tokens (``attention_mask`` sum, or all ids when there is no mask) and,
  separately, loss-bearing tokens (labels != -100 after the one-position shift) — never a tool's own count.
- GPU memory three ways: NVML per-process used memory sampled by a monitor process beside the run
  (harness.measuring.nvml_sampler), NVML device total used memory, and torch ``max_memory_allocated`` /
  ``max_memory_reserved``. On a CPU these stay ``None``.
- host peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.measuring.nvml_sampler import NVML_READINGS, GpuMemorySampler

GIB = 1024**3


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def sample_spans(batch, per_row: list[int]) -> tuple[int, int, int]:
    """(Sum over samples of length^2, longest sample, samples) of the non-padding tokens.

    Attention FLOPs scale with the first. Samples in packed or padding-free rows (position_ids restarting
    at 0) are counted separately; without position_ids each row is one sample.
    """
    pos = batch.get("position_ids")
    if pos is None or not hasattr(pos, "tolist") or pos.dim() != 2:
        return sum(n * n for n in per_row), max(per_row, default=0), len(per_row)
    total, longest, count = 0, 0, 0
    for row, n in zip(pos.tolist(), per_row, strict=True):
        run = 0
        for p in row[:n]:
            if p == 0 and run:
                total += run * run
                longest = max(longest, run)
                count += 1
                run = 0
            run += 1
        total += run * run
        longest = max(longest, run)
        count += 1 if run else 0
    return total, longest, count


class StepMeter:
    """The common per-optimizer-step hook.

    Args:
        warmup_steps: leading optimizer steps excluded from timing statistics.
        device: ``"cuda"`` or ``"cpu"``; on cuda the clock is read after a device synchronisation.
        progress_path: optional file updated after each step (live tokens/s for the runner's display).
        memory_interval_ms: NVML sampling period.
        device_index: the GPU this process trains on (a multi-GPU run's ``LOCAL_RANK``): the one NVML samples.
        barrier: called after the device synchronisation at both ends of a step (a multi-GPU run's barrier: the
            step then ends when the slowest rank's does).
        ignore_pids: the other ranks of a multi-GPU run, not reported as foreign processes on the GPU.
    """

    def __init__(self, warmup_steps: int, device: str = "cpu", progress_path: Path | None = None,
                 memory_interval_ms: float = 10.0, total_steps: int | None = None, device_index: int = 0,
                 barrier: Callable[[], None] | None = None, ignore_pids: tuple[int, ...] = ()):
        self.warmup_steps = warmup_steps
        self.device = device
        self.total_steps = total_steps
        self.progress_path = Path(progress_path) if progress_path else None
        self.steps: list[dict[str, Any]] = []
        self._pending = {"tokens": 0, "loss_tokens": 0, "samples": 0, "padded_tokens": 0, "max_len": 0,
                         "micro_batches": 0, "ctx_tokens_sq": 0}
        self._t0: float | None = None
        self._sync = None
        self._barrier = barrier
        self.memory = (GpuMemorySampler(device_index, memory_interval_ms / 1000.0, ignore_pids=ignore_pids)
                       if device == "cuda" else None)
        self.started_at = time.time()
        self.first_step_at: float | None = None  # epoch s: the first step's begin, the last step's end
        self.last_step_at: float | None = None
        self.loss_by_step: dict[int, float] = {}
        self.first_forward_training: bool | None = None  # set by attach()
        if device == "cuda":
            import torch

            self._sync = torch.cuda.synchronize
            torch.cuda.reset_peak_memory_stats()
        if self.memory is not None:
            self.memory.start()
        self._telemetry = self.memory.telemetry if self.memory is not None else None

    # -- token counting -----------------------------------------------------------------------------------
    def count_batch(self, batch: dict[str, Any]) -> None:
        """Count one micro-batch the model is fed: non-padding tokens, loss tokens, samples, widths."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        rows = int(ids.shape[0]) if hasattr(ids, "shape") else len(ids)
        width = int(ids.shape[-1]) if hasattr(ids, "shape") else max(len(r) for r in ids)
        if mask is not None and hasattr(mask, "sum") and getattr(mask, "dim", lambda: 2)() == 2:
            per_row = [int(x) for x in mask.sum(-1).tolist()]
        else:
            per_row = [width] * rows
        tokens = sum(per_row)
        loss_tokens = int((labels[..., 1:] != -100).sum()) if labels is not None else tokens - rows
        p = self._pending
        p["tokens"] += tokens
        p["loss_tokens"] += loss_tokens
        sq, longest, samples = sample_spans(batch, per_row)
        p["samples"] += samples  # padding-free/packed rows hold several samples
        p["padded_tokens"] += rows * width
        p["max_len"] = max(p["max_len"], width)
        p["micro_batches"] += 1
        p["rows"] = max(p.get("rows", 0), rows)
        p["samples_per_mb"] = max(p.get("samples_per_mb", 0), samples)
        p["ctx_tokens_sq"] += sq
        p["max_sample_len"] = max(p.get("max_sample_len", 0), longest)

    def attach(self, model) -> None:
        """Count every training forward of ``model`` from the arguments it is called with.

        This sees exactly what the framework feeds the model (after its own collation, packing and padding),
        which is why Trainer-based adapters count here rather than in a collator (accelerate's data loader
        runs one batch ahead of the step it belongs to).
        """

        def pre_hook(module, args, kwargs):
            if self.first_forward_training is None:
                # train mode as the model is actually run (Trainers switch it on inside the step)
                self.first_forward_training = bool(module.training)
            if not module.training:
                return
            batch = dict(kwargs)
            if "input_ids" not in batch and args:
                batch["input_ids"] = args[0]
            if batch.get("input_ids") is None:
                return
            self.count_batch(batch)

        self._hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    # -- step timing --------------------------------------------------------------------------------------
    def step_begin(self) -> None:
        if self._sync:
            self._sync()
        if self._barrier:
            self._barrier()
        if self._telemetry and len(self.steps) >= self.warmup_steps:
            self._telemetry.step_begin()  # energy over the measured steps only, read after the sync
        self._t0 = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def step_end(self, loss: float | None = None) -> None:
        if self._sync:
            self._sync()
        if self._barrier:
            self._barrier()
        t1 = time.perf_counter()
        if self._t0 is None:
            raise RuntimeError("step_end() without step_begin()")
        idx = len(self.steps)
        if self._telemetry and idx >= self.warmup_steps:
            self._telemetry.step_end()
        self.last_step_at = time.time()
        rec = {"step": idx + 1, "step_s": t1 - self._t0, "measured": idx >= self.warmup_steps, "loss": loss,
               **{k: self._pending.get(k, 0) for k in ("tokens", "loss_tokens", "samples", "padded_tokens",
                                                      "max_len", "micro_batches", "rows", "ctx_tokens_sq",
                                                      "samples_per_mb", "max_sample_len")}}
        self.steps.append(rec)
        self._pending = {k: 0 for k in self._pending}
        self._t0 = None
        self._write_progress()

    def record_loss(self, step: int, loss: float) -> None:
        """Loss of optimizer step ``step`` (1-based) when it is known only after step_end (HF Trainer logs)."""
        self.loss_by_step[step] = float(loss)
        if 1 <= step <= len(self.steps) and self.steps[step - 1]["loss"] is None:
            self.steps[step - 1]["loss"] = float(loss)

    def _write_progress(self) -> None:
        if not self.progress_path:
            return
        last = self.steps[-1]
        data = {"step": last["step"], "total": self.total_steps, "tokens_per_s": last["tokens"] / last["step_s"]
                if last["step_s"] > 0 else None, "loss": last["loss"], "measured": last["measured"]}
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.progress_path)

    # -- results --------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Stop sampling and return the metrics dict (``None`` where a quantity does not apply)."""
        if self.memory is not None:
            self.memory.stop()
        torch_peaks = {"peak_alloc_gib": None, "peak_reserved_gib": None}
        if self.device == "cuda":
            import torch

            torch_peaks = {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        stats = summarise(self.steps, self.warmup_steps)
        telemetry = (self._telemetry.summary(stats["measured_s"], stats["tokens_measured"]) if self._telemetry
                     else {"energy_j": None, "joules_per_token": None, "avg_power_w": None, "throttled": None,
                           "power_capped": None})
        nvml = self.memory.readings() if self.memory else dict.fromkeys(NVML_READINGS)
        return stats | torch_peaks | telemetry | nvml | {
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        }


def summarise(steps: list[dict], warmup_steps: int) -> dict[str, Any]:
    """Statistics over the measured (post-warmup) steps."""
    measured = [s for s in steps if s["measured"]]
    step_s = [s["step_s"] for s in measured]
    total_s = sum(step_s)
    tokens = sum(s["tokens"] for s in measured)
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    tps = [s["tokens"] / s["step_s"] for s in measured if s["step_s"] > 0]
    return {
        "steps_total": len(steps),
        "steps_measured": len(measured),
        "warmup_steps": warmup_steps,
        "step_s_median": statistics.median(step_s) if step_s else None,
        "step_s_mean": total_s / len(step_s) if step_s else None,
        "step_s_p10": _percentile(step_s, 0.10),
        "step_s_p90": _percentile(step_s, 0.90),
        "step_s_min": min(step_s) if step_s else None,
        "step_s_max": max(step_s) if step_s else None,
        "tokens_per_s": tokens / total_s if total_s > 0 else None,
        "tokens_per_s_median_step": statistics.median(tps) if tps else None,
        "tokens_per_s_p10_step": _percentile(tps, 0.10),
        "tokens_per_s_p90_step": _percentile(tps, 0.90),
        "loss_tokens_per_s": sum(s["loss_tokens"] for s in measured) / total_s if total_s > 0 else None,
        "samples_per_s": sum(s["samples"] for s in measured) / total_s if total_s > 0 else None,
        "tokens_measured": tokens,
        "tokens_per_step_mean": tokens / len(measured) if measured else None,
        "padding_fraction": 1 - tokens / max(1, sum(s["padded_tokens"] for s in measured)) if measured else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "measured_s": total_s,
    }


def make_trainer_callback(meter: StepMeter, on_first_step=None):
    """A transformers ``TrainerCallback`` that drives ``meter`` at each optimizer step.

    ``on_first_step(model, trainer_state, args, **kw)`` runs once at the first step begin: the place to read
    effective settings back from the live model (train mode and gradient checkpointing are only final here).
    Losses come from the Trainer's per-step log (``logging_steps=1``).
    """
    from transformers import TrainerCallback

    class MeasureCallback(TrainerCallback):
        def __init__(self):
            self._first = True

        def on_step_begin(self, args, state, control, **kw):
            if self._first and on_first_step is not None:
                on_first_step(kw.get("model"), state, args, **kw)
            self._first = False
            meter.step_begin()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end(None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.record_loss(state.global_step, float(logs["loss"]))

    return MeasureCallback()
