"""One run in its own process: ``python -m harness.running.worker SPEC.json``.

The runner starts this in the framework's environment with a timeout. It loads the adapter, trains,
measures, and writes ``worker_result.json`` atomically into the run's work directory; the runner then
finishes and stores the result. Any exception becomes a result with status ``error`` or ``oom`` and the
tool's own message; a crash that kills the process is recorded by the runner from the exit code and log.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTERMEDIATE_DIRNAME = "intermediate"  # <work_dir>/intermediate/step-000050: outputs saved during training

# Axolotl depends on a PyPI package called `kernels`; our repository root must not shadow it on sys.path.
# The runner starts workers from the run's work directory, so '' on sys.path is not the repo root.


@dataclass
class RunContext:
    """What an adapter gets: the scenario, the files to use, the hook to drive, and where to put things."""

    scenario: Any  # harness.spec.scenario.Scenario
    framework: str
    overrides: dict[str, Any]
    repeat: int
    checkpoint: str  # directory (or hub id) every framework loads
    dataset_path: Path  # the sweep's dataset (JSONL) and its .meta.json beside it
    work_dir: Path  # scratch for this run: native configs, logs
    output_dir: Path  # the trained output (PEFT adapter / HF checkpoint)
    device: str
    meter: Any  # harness.measuring.meter.StepMeter
    effective: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    native_config: str | None = None  # path of the tool's own config, saved for rerunning with the tool alone
    unsupported: list[str] = field(default_factory=list)  # scenario settings the tool could not honour
    load_s: float | None = None

    @property
    def seed(self) -> int:
        return self.scenario.train.seed

    def set_effective(self, **settings: Any) -> None:
        """Record effective settings read back from the live model/trainer (merged over earlier calls)."""
        self.effective.update(settings)

    def save_native_config(self, name: str, text: str) -> Path:
        p = self.work_dir / name
        p.write_text(text)
        self.native_config = str(p)
        return p

    def cannot_honour(self, setting: str, why: str) -> None:
        """Report a scenario setting the tool cannot honour (it also marks the run invalid)."""
        self.unsupported.append(f"{setting}: {why}")

    # -- intermediate outputs for time-to-target (scenario ``eval.every_steps``) ------------------------------
    def intermediate_dir(self, step: int) -> Path | None:
        """The directory to save the model in after optimizer step ``step``, or None when no save is due.

        With ``eval.every_steps: N`` (and eval tasks) a save is due after every N-th optimizer step, except
        the last one (the final output in ``output_dir`` stands for it). ``harness.analysis.evaluate`` later evaluates
        every ``<work_dir>/intermediate/step-<step:06d>`` in step order to find the time to the target.

        Call it after ``meter.step_end()`` and before the next ``meter.step_begin()``, so that saving is not
        counted as step time::

            ctx.meter.step_end(loss)
            if (d := ctx.intermediate_dir(step + 1)) is not None:
                model.save_pretrained(d)       # PEFT adapter, or the full HF checkpoint

        :meth:`save_intermediate` does exactly this; HF-Trainer-based tools add
        :meth:`intermediate_callback` after the measurement callback.

        Args:
            step: optimizer steps completed (1-based).

        Returns:
            An existing, empty directory, or None.
        """
        ev = self.scenario.eval
        last = self.scenario.train.steps
        if not ev.every_steps or not ev.tasks or step <= 0 or step % ev.every_steps or step >= last:
            return None
        d = self.work_dir / INTERMEDIATE_DIRNAME / f"step-{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_intermediate(self, model: Any, step: int | None = None, save: Any = None) -> Path | None:
        """Save ``model`` (anything with ``save_pretrained``) if a save is due after ``step``.

        Args:
            model: the live model (a PEFT model saves only its adapter).
            step: optimizer steps completed; default: the steps the meter has recorded so far.
            save: ``save(directory)`` for models without ``save_pretrained`` (our trainer's).

        Returns:
            The directory written, or None when no save was due.
        """
        step = len(self.meter.steps) if step is None else step
        d = self.intermediate_dir(step)
        if d is None:
            return None
        t0 = time.perf_counter()
        save(d) if save is not None else model.save_pretrained(d)
        saves = self.extra.setdefault("intermediate_saves", [])
        saves.append({"step": step, "save_s": time.perf_counter() - t0, "dir": str(d)})
        return d

    def trainer_callbacks(self) -> list[Any]:
        """The callbacks an HF-Trainer-based tool gets: the measuring callback, whose first step reads the
        effective settings back from the live model and optimizer, then the intermediate-save callback, in that
        order (see :meth:`intermediate_callback`)."""
        from harness.measuring.effective import read_back_model, read_back_optimizer
        from harness.measuring.meter import make_trainer_callback

        def on_first_step(live_model, state, targs, **kw):  # noqa: ANN001, ANN003, ANN202
            self.set_effective(**read_back_model(live_model), **read_back_optimizer(kw.get("optimizer")))

        cbs = [make_trainer_callback(self.meter, on_first_step)]
        return cbs + [self.intermediate_callback()]

    def intermediate_callback(self) -> Any:
        """A transformers ``TrainerCallback`` that calls :meth:`save_intermediate` at each step end.

        Pass it to the Trainer *after* the measurement callback: callbacks run in list order, so the step's
        clock has stopped before the save starts.
        """
        from transformers import TrainerCallback

        ctx = self

        class IntermediateSaveCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                ctx.save_intermediate(model, state.global_step)

        return IntermediateSaveCallback()


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text or "cuda error: out of memory" in text


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Execute one run described by the runner's spec and return the worker result dict."""
    from adapters_for_tools import registry
    from harness.inputs.models import load_config_dict
    from harness.measuring import effective as eff_mod
    from harness.measuring import environment, flops
    from harness.measuring.meter import StepMeter
    from harness.spec.scenario import scenario_from_dict

    t0 = time.time()
    sc = scenario_from_dict(spec["scenario"], spec.get("scenario_source") or "<resolved>")
    work_dir = Path(spec["work_dir"])
    out: dict[str, Any] = {"status": "error", "reason": None, "started_at": t0}
    meter = StepMeter(sc.train.warmup_steps, device=sc.hardware.device,
                      progress_path=work_dir / "progress.json", memory_interval_ms=sc.measure.memory_interval_ms,
                      total_steps=sc.train.steps)
    ctx = RunContext(scenario=sc, framework=spec["framework"], overrides=spec.get("overrides") or {},
                     repeat=spec["repeat"], checkpoint=spec["checkpoint"], dataset_path=Path(spec["dataset_path"]),
                     work_dir=work_dir, output_dir=work_dir / "output", device=sc.hardware.device, meter=meter)
    info = registry.info(spec["framework"])
    try:
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
    metrics = meter.finish()
    eff = eff_mod.from_meter(meter, sc.data.packing) | ctx.effective
    if meter.first_forward_training is not None:
        eff["train_mode"] = meter.first_forward_training
    env = environment.capture()
    try:
        cfg = load_config_dict(ctx.checkpoint)
        peak = sc.measure.peak_tflops
        peak_src = "scenario measure.peak_tflops"
        if peak is None:
            peak, peak_src = flops.peak_tflops_for(env.get("gpu_name"))
        if sc.hardware.device == "cpu":
            peak, peak_src = None, "cpu: no MFU"
        metrics["mfu"], metrics["model_tflops"] = flops.mfu(cfg, sc.method.kind, meter.steps, peak)
        metrics["peak_tflops"], metrics["peak_tflops_source"] = peak, peak_src
        metrics["matmul_params"] = flops.matmul_params(cfg)
    except (OSError, KeyError) as e:
        metrics["mfu_error"] = f"{type(e).__name__}: {e}"
    invalid = []
    if out["status"] == "ok":
        invalid = eff_mod.check(sc, eff) + [f"not honoured: {u}" for u in ctx.unsupported]
        if metrics["steps_measured"] == 0:
            invalid.append("no measured steps")
        if meter.steps and sum(s["tokens"] for s in meter.steps) == 0:
            invalid.append("measurement hook counted no tokens")
        if len(meter.steps) != sc.train.steps:
            invalid.append(f"ran {len(meter.steps)} optimizer steps, scenario says {sc.train.steps}")
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
            from harness import __version__

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m harness.running.worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    result = run_spec(spec)
    _atomic_json(Path(spec["work_dir"]) / "worker_result.json", result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
