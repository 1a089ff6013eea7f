"""One run in its own process: ``python -m harness.running.worker SPEC.json``.

The runner starts this in the framework's environment with a timeout. It loads the adapter, trains,
measures, and writes ``worker_result.json`` atomically into the run's work directory; the runner then
finishes and stores the result. Any exception becomes a result with status ``error`` or ``oom`` and the
tool's own message; a crash that kills the process is recorded by the runner from the exit code and log.

A multi-GPU run starts one worker per GPU (:mod:`harness.running.launch`); each is a rank
(:mod:`harness.running.ranks`) that trains and measures its share, and rank 0 writes the one result with every
rank's figures. A rank whose tool raised writes its own ``worker_result.rank<k>.json`` and exits at once (the others
may be waiting for it in a collective; the launcher then stops them).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from adapters_for_tools import registry
from adapters_for_tools.contract import RunContext
from harness.common.version import __version__
from harness.inputs.models import load_config_dict
from harness.measuring import effective as eff_mod
from harness.measuring import environment, flops, memcap
from harness.measuring.meter import StepMeter, make_trainer_callback
from harness.measuring.trained import check_training
from harness.running import launch, ranks
from harness.spec.scenario import scenario_from_dict

# Axolotl depends on a PyPI package called `kernels`; our repository root must not shadow it on sys.path.
# The runner starts workers from the run's work directory, so '' on sys.path is not the repo root.


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text or "cuda error: out of memory" in text


def _measure_callback(ctx: RunContext) -> Any:
    """The measuring ``TrainerCallback`` for HF-Trainer-based tools (``RunContext.trainer_callbacks``): it drives
    the meter at each optimizer step, and its first step reads the effective settings back from the live model and
    optimizer (train mode and gradient checkpointing are only final there)."""

    def on_first_step(live_model, state, targs, **kw):  # noqa: ANN001, ANN003, ANN202
        ctx.set_effective(**eff_mod.read_back_model(live_model), **eff_mod.read_back_optimizer(kw.get("optimizer")))
        if hasattr(targs, "logging_nan_inf_filter"):  # the Trainer's per-micro-batch NaN/Inf check: a device sync
            ctx.set_effective(logging_nan_inf_filter=bool(targs.logging_nan_inf_filter))

    return make_trainer_callback(ctx.meter, on_first_step)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_warnings(metrics: dict[str, Any]) -> list[str]:
    """What makes a measured run's figures less trustworthy without making them wrong: shown in the report."""
    out = []
    if foreign := metrics.get("foreign_gpu_processes"):
        out.append(f"{len(foreign)} other process(es) used the GPU during the run: "
                   + ", ".join(f"pid {f['pid']} ({f['max_gib']:.1f} GiB)" for f in foreign))
    return out  # a throttled GPU: the report derives it from the recorded reasons (reporting/caveats.py)


def run_spec(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Execute one run described by the runner's spec and return the worker result dict.

    Returns None in a rank other than 0 of a multi-GPU run (rank 0 writes the result), and in a rank whose tool
    failed, after writing that rank's own result (:func:`harness.running.launch.rank_result_path`).
    """
    t0 = time.time()
    sc = scenario_from_dict(spec["scenario"], spec.get("scenario_source") or "<resolved>")
    work_dir = Path(spec["work_dir"])
    out: dict[str, Any] = {"status": "error", "reason": None, "started_at": t0}
    rank = ranks.start(sc.hardware.device, work_dir)  # None: one process
    main = rank is None or rank.is_main
    meter = StepMeter(sc.train.warmup_steps, device=sc.hardware.device,
                      progress_path=work_dir / "progress.json" if main else None,
                      memory_interval_ms=sc.measure.memory_interval_ms, total_steps=sc.train.steps,
                      device_index=rank.local_rank if rank else 0, barrier=rank.barrier if rank else None,
                      ignore_pids=rank.siblings if rank else ())
    info = registry.info(spec["framework"])
    overrides = spec.get("overrides") or {}
    ctx = RunContext(scenario=sc, framework=spec["framework"], overrides=overrides, repeat=spec["repeat"],
                     checkpoint=spec["checkpoint"], dataset_path=Path(spec["dataset_path"]), work_dir=work_dir,
                     output_dir=work_dir / "output", device=sc.hardware.device, meter=meter,
                     options=info.overrides.model_validate(overrides))
    ctx.measure_callback = lambda: _measure_callback(ctx)
    cap: dict[str, Any] = {}
    try:
        # before the adapter imports its tool: every framework's allocations then go through the same cap
        cap = memcap.apply(sc.hardware.memory_budget_gib, sc.hardware.device)
        _seed_everything(sc.train.seed)
        adapter = registry.load_adapter(spec["framework"])
        adapter.run(ctx)
        out["status"] = "ok"
    except BaseException as e:  # record the tool's own error; the sweep goes on
        out["status"] = "oom" if is_oom(e) else "error"
        out["reason"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-8000:]
        if isinstance(e, KeyboardInterrupt):
            raise
    if rank is not None and out["status"] != "ok":
        meter.finish()
        _atomic_json(launch.rank_result_path(work_dir, rank.rank),
                     out | {"rank": rank.rank, "valid": False, "invalid_reasons": [], "finished_at": time.time()})
        return None
    metrics = meter.finish() | cap
    eff = eff_mod.from_meter(meter, sc.data.packing) | ctx.effective
    if cap:
        eff["memory_budget_gib"] = cap["memory_budget_gib"]
    if meter.first_forward_training is not None:
        eff["train_mode"] = meter.first_forward_training
    rank_problems: list[str] = []
    if rank is not None:
        # what the tool ran with on this rank; its own read-back (ctx.effective) wins over accelerate's state
        eff = {"world_size": rank.world_size} | ranks.read_back_strategy() | eff
        rank.write_part({"steps": meter.steps, "metrics": metrics, "effective": eff})
        if not rank.is_main:
            rank.close()
            return None
        parts = rank.collect_parts()
        meter.steps = ranks.merge_steps([p["steps"] for p in parts])
        metrics = ranks.merge_metrics([p["metrics"] for p in parts], meter.steps, sc.train.warmup_steps)
        eff["tokens_per_step"] = eff_mod.from_meter(meter, sc.data.packing).get("tokens_per_step")
        ctx.extra["ranks"] = ranks.rank_summary(parts)
        rank_problems = ranks.rank_disagreements(parts)
        rank.close()
    env = environment.capture()
    if rank is not None:  # the run's other ranks, still finishing on their GPUs, are no one else's load
        env["foreign_gpu_processes"] = [p for p in env.get("foreign_gpu_processes") or []
                                        if p.get("pid") not in rank.siblings]
    try:
        cfg = load_config_dict(ctx.checkpoint)
        peak = sc.measure.peak_tflops
        peak_src = "scenario measure.peak_tflops"
        if peak is None:
            peak, peak_src = flops.peak_tflops_for(env.get("gpu_name"))
        if sc.hardware.device == "cpu":
            peak, peak_src = None, "cpu: no MFU"
        # the job's FLOPs (tokens of every rank) against the peak of all its GPUs; peak_tflops stays one GPU's
        gpus = launch.world_size(sc)
        metrics["mfu"], metrics["model_tflops"] = flops.mfu(cfg, sc.method.kind, meter.steps,
                                                            peak * gpus if peak is not None else None)
        metrics["peak_tflops"], metrics["peak_tflops_source"] = peak, peak_src
        metrics["matmul_params"] = flops.matmul_params(cfg)
    except (OSError, KeyError) as e:
        metrics["mfu_error"] = f"{type(e).__name__}: {e}"
    invalid = []
    if out["status"] == "ok":
        invalid = eff_mod.check(sc, eff) + [f"not honoured: {u}" for u in ctx.unsupported] + rank_problems
        invalid += eff_mod.cut_shorter(eff, _dataset_meta(ctx.dataset_path).get("widest_row_tokens"))
        if metrics["steps_measured"] == 0:
            invalid.append("no measured steps")
        if meter.steps and sum(s["tokens"] for s in meter.steps) == 0:
            invalid.append("measurement hook counted no tokens")
        if len(meter.steps) != sc.train.steps:
            invalid.append(f"ran {len(meter.steps)} optimizer steps, scenario says {sc.train.steps}")
        over_budget, cap_warnings = memcap.check(cap, metrics)
        invalid += over_budget
        out["warnings"] = run_warnings(metrics) + cap_warnings
        status, not_trained = check_training(meter.steps, ctx.extra.get("reward_curve"))
        invalid += not_trained
        if status is not None:
            out["status"], out["reason"] = status, not_trained[0]
    out.update({
        "valid": out["status"] == "ok" and not invalid,
        "invalid_reasons": invalid,
        "metrics": metrics,
        "steps": meter.steps,
        "effective": eff,
        "expected": eff_mod.expected(sc),
        "environment": env,
        "framework_version": _version(info.version_of),
        "native_config": ctx.native_config,
        "output_dir": str(ctx.output_dir) if ctx.output_dir.exists() else None,
        "extra": ctx.extra,
        "load_s": ctx.load_s,
        "first_step_at": meter.first_step_at,
        "last_step_at": meter.last_step_at,
        "device": sc.hardware.device,
        "finished_at": time.time(),
    })
    return out


def _version(dist: str | None) -> str | None:
    if not dist:
        return None
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        if dist == "tunebench":  # running from a checkout that was not pip-installed (the GPU box)
            return __version__
        return None


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _dataset_meta(dataset_path: Path) -> dict[str, Any]:
    """The sweep's ``dataset.meta.json`` beside the dataset (empty where there is none, as in some tests)."""
    try:
        return json.loads(dataset_path.with_suffix(".meta.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m harness.running.worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    result = run_spec(spec)
    work_dir = Path(spec["work_dir"])
    if result is None:  # a rank other than 0, or a rank whose tool failed (it wrote its own result)
        if launch.rank_result_path(work_dir, int(os.environ.get("RANK", "0"))).exists():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # at once: the other ranks may wait in a collective that this one will never join
        return 0
    _atomic_json(work_dir / launch.RESULT_NAME, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    code = main()
    # the result is stored: skip the interpreter's teardown of the tool's modules (seconds per run, in which the GPU
    # idles between runs); the runner ends whatever the tool left running in the worker's process group
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
