"""One rank of a multi-process run, inside the worker: the process group, the step barrier, and one result made of
every rank's figures.

The launcher (:mod:`harness.running.launch`) starts N workers; each is a :class:`Rank`. The worker opens the
process group before the adapter runs (NCCL on CUDA, gloo on a CPU), so the tools find it open and use it
(accelerate, DeepSpeed and our trainer join an initialised group rather than opening their own).

Measurement across ranks:

- **Tokens** are counted by every rank's own meter from the batches that rank is fed, and summed per optimizer step
  (:func:`merge_steps`): the run's tokens/s is the whole job's, never one rank's times the world size.
- **Step time** is rank 0's, read after a barrier at both ends of the step (each rank synchronises its device first;
  the barrier then waits for the slowest rank), so it is the time of the whole job's step.
- **Memory**: NVML per GPU (each rank samples its own, ``LOCAL_RANK``), all of them kept as ``*_per_gpu`` lists; the
  headline figure is the largest, the one a GPU must hold. Energy is summed over the GPUs.
- **Effective settings** are read back on every rank and kept per rank (``extra["ranks"]``): world size, strategy
  and per-device batch; ranks that disagree make the run invalid (:func:`rank_disagreements`).

At the end each rank writes its part (``rank<k>.part.json``, atomically) and rank 0 waits for all of them before it
writes the result: files, not a collective, because some tools close the process group when they finish training.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness.measuring.meter import summarise

SUMMED_STEP_KEYS = ("tokens", "loss_tokens", "samples", "padded_tokens", "ctx_tokens_sq")
PER_GPU_METRICS = ("peak_vram_nvml_gib", "peak_vram_device_gib", "peak_alloc_gib", "peak_reserved_gib",
                   "vram_device_before_gib", "peak_rss_gib", "energy_j", "avg_power_w")
# effective settings every rank must share (per-device values: micro_batch, grad_accum, seq_len)
SHARED_SETTINGS = ("world_size", "strategy", "micro_batch", "grad_accum", "seq_len", "train_mode",
                   "gradient_checkpointing", "dtype", "quantization", "lora_r", "lora_alpha", "target_modules",
                   "trainable_params", "optimizer", "lr")
PART_WAIT_S = 600.0  # rank 0 waits this long for the others' parts after its own training ended


@dataclass
class Rank:
    """This worker's place in the run (from torchrun's environment)."""

    rank: int
    local_rank: int
    world_size: int
    device: str
    work_dir: Path
    siblings: tuple[int, ...] = field(default_factory=tuple)  # pids of the other ranks (not "foreign" on a GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (the meter calls it after synchronising this rank's device)."""
        import torch.distributed as dist  # heavy optional dependency: the worker's environment only

        if self.device == "cuda":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def part_path(self, rank: int | None = None) -> Path:
        return self.work_dir / f"rank{self.rank if rank is None else rank}.part.json"

    def write_part(self, part: dict[str, Any]) -> None:
        """This rank's figures for rank 0 (written atomically)."""
        _atomic_json(self.part_path(), {"rank": self.rank} | part)

    def collect_parts(self, wait_s: float = PART_WAIT_S) -> list[dict[str, Any]]:
        """Every rank's part, rank order (rank 0 only). Waits for the others to finish writing.

        Raises:
            TimeoutError: a rank wrote no part within ``wait_s`` (it died without a result).
        """
        deadline = time.monotonic() + wait_s
        paths = [self.part_path(k) for k in range(self.world_size)]
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                missing = [k for k, p in enumerate(paths) if not p.exists()]
                raise TimeoutError(f"ranks {missing} wrote no result within {wait_s:.0f} s of rank 0's end")
            time.sleep(0.2)  # the others are finishing their last step or their save
        return [json.loads(p.read_text()) for p in paths]

    def close(self) -> None:
        """Close the process group if the tool left it open."""
        import torch.distributed as dist  # heavy optional dependency: the worker's environment only

        if dist.is_initialized():
            dist.destroy_process_group()


def start(device: str, work_dir: Path) -> Rank | None:
    """Open the process group when this worker is one of several (``WORLD_SIZE`` > 1); None for a single process.

    On CUDA the rank's GPU (``LOCAL_RANK``) becomes its current device first, so everything the tool allocates
    without naming a device lands there, and NVML samples the same GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch  # heavy optional dependency: the worker's environment only
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return Rank(rank=rank, local_rank=local, world_size=world, device=device, work_dir=Path(work_dir),
                siblings=_sibling_pids())


def _sibling_pids() -> tuple[int, ...]:
    """The other ranks: children of the launcher that started this one."""
    try:
        return tuple(p.pid for p in psutil.Process(os.getppid()).children() if p.pid != os.getpid())
    except psutil.Error:
        return ()


def merge_steps(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per optimizer step for the whole job: rank 0's (its clock, loss and per-device batch shape) with
    the token counts of :data:`SUMMED_STEP_KEYS` summed over the ranks. Steps that not every rank recorded are left
    out (:func:`rank_disagreements` reports the difference)."""
    n = min(len(steps) for steps in per_rank)
    out = []
    for i in range(n):
        rec = dict(per_rank[0][i])
        for key in SUMMED_STEP_KEYS:
            rec[key] = sum(steps[i].get(key) or 0 for steps in per_rank)
        out.append(rec)
    return out


def merge_metrics(per_rank: list[dict[str, Any]], steps: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Rank 0's metrics with the whole job's step statistics and every GPU's memory and energy.

    Args:
        per_rank: each rank's ``StepMeter.finish()`` (with the worker's additions), rank order.
        steps: :func:`merge_steps` of the ranks' steps.
        warmup_steps: the scenario's untimed first steps.
    """
    out = dict(per_rank[0]) | summarise(steps, warmup_steps) | {"world_size": len(per_rank)}
    for key in PER_GPU_METRICS:
        values = [m.get(key) for m in per_rank]
        out[f"{key}_per_gpu"] = values
        known = [v for v in values if v is not None]
        if key in ("energy_j", "avg_power_w"):
            out[key] = sum(known) if len(known) == len(values) else None
        else:
            out[key] = max(known) if known else None
    if out.get("energy_j") is not None and out.get("tokens_measured"):
        out["joules_per_token"] = out["energy_j"] / out["tokens_measured"]
    throttled = [m.get("throttled") for m in per_rank if m.get("throttled") is not None]
    out["throttled"] = any(throttled) if throttled else None
    out["throttle_reasons_seen"] = sorted({r for m in per_rank for r in (m.get("throttle_reasons_seen") or [])})
    foreign = [f | {"gpu": k} for k, m in enumerate(per_rank) for f in (m.get("foreign_gpu_processes") or [])]
    out["foreign_gpu_processes"] = foreign if any(m.get("foreign_gpu_processes") is not None for m in per_rank) \
        else None
    return out


def rank_summary(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank, what it ran with and what it did: ``extra["ranks"]`` of the result."""
    out = []
    for p in parts:
        eff, met = p.get("effective") or {}, p.get("metrics") or {}
        out.append({"rank": p.get("rank"), "tokens": sum(s.get("tokens") or 0 for s in p.get("steps") or []),
                    "steps": len(p.get("steps") or []),
                    **{k: eff.get(k) for k in ("world_size", "strategy", "micro_batch", "grad_accum")},
                    "peak_vram_nvml_gib": met.get("peak_vram_nvml_gib"), "peak_alloc_gib": met.get("peak_alloc_gib")})
    return out


def rank_disagreements(parts: list[dict[str, Any]]) -> list[str]:
    """Invalid reasons: settings (:data:`SHARED_SETTINGS`) or step counts that differ between ranks."""
    out = []
    effs = [p.get("effective") or {} for p in parts]
    for key in SHARED_SETTINGS:
        values = [e.get(key) for e in effs if key in e]
        if len(values) > 1 and any(v != values[0] for v in values[1:]):
            out.append(f"ranks ran with different {key}: {values}")
    counts = [len(p.get("steps") or []) for p in parts]
    if len(set(counts)) > 1:
        out.append(f"ranks recorded different numbers of optimizer steps: {counts}")
    return out


def read_back_strategy() -> dict[str, Any]:
    """How the tool spread its training, read from accelerate's live state (hf, TRL, Axolotl, LLaMA-Factory all
    train through it): ``strategy`` ``ddp`` | ``fsdp`` | ``zero<stage>`` and, for FSDP, ``fsdp_version``. Empty when
    accelerate was never initialised in this process (a tool that does not use it reads back its own)."""
    if "accelerate" not in sys.modules:
        return {}
    from accelerate.state import AcceleratorState  # heavy optional dependency: loaded by the tool already

    if not AcceleratorState._shared_state:  # constructing it here would initialise it
        return {}
    state = AcceleratorState()
    kind = getattr(state.distributed_type, "value", str(state.distributed_type))
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return {"strategy": "ddp"}
    if kind == "FSDP":
        return {"strategy": "fsdp", "fsdp_version": getattr(state.fsdp_plugin, "fsdp_version", None)}
    if kind == "DEEPSPEED":
        stage = getattr(state.deepspeed_plugin, "zero_stage", None)
        return {"strategy": f"zero{stage}"}
    return {"strategy": kind.lower()}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)
