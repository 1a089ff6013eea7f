"""Quality of a trained output through lm-eval: ``python -m harness.analysis.evaluate EVAL_SPEC.json``.

The runner starts this in the base environment after a run finished ``ok`` and the scenario has
``eval.tasks``, so every framework's output is scored by the same evaluator, the same lm-eval and the same
tasks. The spec (JSON) holds ``scenario`` (resolved dict), ``scenario_source``, ``checkpoint`` (the base
model directory every framework loaded), ``output_dir`` (the saved PEFT adapter or full HF checkpoint) and
``work_dir`` (the run's scratch directory, which also holds ``worker_result.json`` and any intermediate
outputs). It writes ``work_dir/eval_result.json``, which the runner stores as ``result["eval"]``::

    {"status": "ok" | "error", "error": str,                  # error only when status is "error"
     "metrics": {"<task>/<metric>": float},                     # the final output
     "baseline_metrics": {...same keys...},                     # the untrained base checkpoint
     "stderr": {...same keys...},                               # lm-eval's standard errors, where it gives one
     "history": [{"step": int, "train_s": float, "wall_s": float, "metrics": {...}}],
     "time_to_target_s": float | None, "target": {"<task>/<metric>": float},
     "lm_eval_version": str, "warmup_s": float, "eval_s": float}

Scoring is lm-eval's own (``lm_eval.simple_evaluate(model="hf", ...)``): no hand-written scorer. Metric keys
are ``<task>/<metric>`` with lm-eval's metric names (``exact_match``, ``acc``, ...); a metric computed
through a filter other than lm-eval's ``none`` keeps it: ``<task>/<metric>,<filter>``. Tasks are any task
lm-eval knows on this machine, or local tasks (YAML + JSONL) in ``scenarios/tasks/`` (registered with
``TaskManager(include_path=...)``; when every task is local, lm-eval's own ~thousands of task YAMLs are not
indexed at all). Runs are offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``).

Baseline: the base checkpoint without the adapter is evaluated once per (checkpoint, tasks, limit, task
files, device, dtype, lm-eval version) and cached under ``<work root>/eval_baselines/``, so a sweep pays for
it once and the report can show the gain of every framework over the untrained model.

Time to target (MLPerf-style: evaluation is on the clock). With ``eval.every_steps: N`` the adapter saves
the model after every N-th optimizer step (``RunContext.intermediate_dir``; the save itself is outside the
step timing). The evaluator scores those intermediate outputs in step order and then the final output;
evaluation point k (k = 1, 2, ...) at optimizer step ``s_k`` gets

    train_s(k) = sum of step_s over optimizer steps 1 .. s_k   (all steps, warmup included; as measured
                 by the common hook: model loading, data loading before the first step and saving excluded)
    eval_s(k)  = sum of wall_s over evaluation points 1 .. k  (each: lm-eval's wall time for that output,
                 model load included; the baseline evaluation and a one-document warm-up
                 evaluation before everything, which absorbs the process's one-time import costs, are not)

and ``time_to_target_s = train_s(k) + eval_s(k)`` for the first k whose metrics reach every target
(``metric >= target value``, for every entry of ``eval.target``); ``None`` if no evaluation point reaches
them. Without ``every_steps`` the only evaluation point is the final output. The evaluation cost is the
same for every framework (same evaluator, same model shape), so it shifts all of them alike; it is counted
because a tool that needs more evaluations to get there really takes longer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from adapters_for_tools.contract import INTERMEDIATE_DIRNAME
from harness.analysis.entry import spec_main
from harness.common.digest import files_digest
from harness.inputs.tasks.local import LOCAL_TASK_DIR, local_task_names
from harness.running.runner import work_root
from harness.spec.scenario import scenario_from_dict
from harness.storing.results import atomic_write_text

BASELINE_CACHE = "eval_baselines"  # under the work root


def _offline() -> None:
    # no hub on our machines: fail fast instead of retrying downloads
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_manager(tasks: list[str], task_dir: Path = LOCAL_TASK_DIR):
    """An lm-eval ``TaskManager`` that knows the local tasks (and lm-eval's own only when needed)."""
    from lm_eval.tasks import TaskManager

    local = local_task_names(task_dir)
    include_defaults = not set(tasks) <= local  # indexing lm-eval's own tasks costs seconds: skip when unused
    return TaskManager(include_path=str(task_dir), include_defaults=include_defaults)


def flatten_results(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's ``results["results"]`` as ``{"<task>/<metric>": value}`` and the matching standard errors."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for task, res in results.items():
        for key, value in res.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias, name, sample_len, and "N/A" standard errors
            metric, filt = key.split(",", 1)
            suffix = "" if filt == "none" else f",{filt}"
            if metric.endswith("_stderr"):
                stderr[f"{task}/{metric.removesuffix('_stderr')}{suffix}"] = float(value)
            else:
                metrics[f"{task}/{metric}{suffix}"] = float(value)
    return metrics, stderr


def model_args(sc, checkpoint: str, output_dir: str | None) -> dict[str, Any]:
    """lm-eval ``hf`` model arguments: base + PEFT adapter, a full checkpoint, or the base alone."""
    args: dict[str, Any] = {"pretrained": checkpoint, "tokenizer": checkpoint, "dtype": sc.model.dtype,
                            "device": "cuda" if sc.hardware.device == "cuda" else "cpu",
                            # training rows start with <bos> (inputs.data.tokenize_example): so must eval prompts
                            "add_bos_token": True}
    if output_dir is not None:
        if (Path(output_dir) / "adapter_config.json").exists():
            args["peft"] = output_dir
        else:
            args["pretrained"] = output_dir  # full fine-tuning; the tokenizer stays the checkpoint's
    return args


def run_lm_eval(sc, margs: dict[str, Any], tm, limit: int | None = None) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` on the scenario's tasks; returns metrics, stderr and wall time."""
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=margs, tasks=list(sc.eval.tasks), task_manager=tm,
                                  batch_size=sc.eval.batch_size, limit=limit or sc.eval.limit, log_samples=False,
                                  bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    wall = time.perf_counter() - t0
    metrics, stderr = flatten_results(out["results"])
    return {"metrics": metrics, "stderr": stderr, "wall_s": wall}


def baseline_key(sc, checkpoint: str, task_dir: Path = LOCAL_TASK_DIR) -> str:
    """Cache key of the untrained model's evaluation: everything that changes its numbers."""
    import lm_eval

    ck = Path(checkpoint)
    weights = sorted(ck.glob("*.safetensors")) + sorted(ck.glob("*.bin")) + sorted(ck.glob("config.json"))
    blob = {"checkpoint": str(ck.resolve()) if ck.exists() else checkpoint,
            "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
            "tasks": sorted(sc.eval.tasks), "limit": sc.eval.limit, "batch_size": sc.eval.batch_size,
            "dtype": sc.model.dtype, "device": sc.hardware.device, "lm_eval": lm_eval.__version__,
            "task_files": files_digest(sorted(task_dir.glob("*"))) if task_dir.exists() else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def baseline(sc, checkpoint: str, tm, cache_dir: Path) -> dict[str, Any]:
    """The untrained model's evaluation, computed once per key and cached in ``cache_dir``."""
    path = cache_dir / f"{baseline_key(sc, checkpoint)}.json"
    if path.exists():
        return json.loads(path.read_text()) | {"cached": True}
    res = run_lm_eval(sc, model_args(sc, checkpoint, None), tm)
    atomic_write_text(path, json.dumps(res, indent=1))
    return res | {"cached": False}


def intermediate_points(work_dir: Path) -> list[tuple[int, Path]]:
    """Intermediate outputs ``<work_dir>/intermediate/step-NNNNNN`` as ``(step, dir)``, in step order."""
    pts = []
    for d in (work_dir / INTERMEDIATE_DIRNAME).glob("step-*"):
        if d.is_dir() and any(d.iterdir()):
            pts.append((int(d.name.removeprefix("step-")), d))
    return sorted(pts)


def reaches(metrics: dict[str, float], target: dict[str, float]) -> bool:
    """Whether every target metric is present and at least its target value."""
    return bool(target) and all(k in metrics and metrics[k] >= v for k, v in target.items())


def time_to_target(history: list[dict[str, Any]], target: dict[str, float]) -> float | None:
    """``train_s + cumulative eval wall_s`` at the first history entry reaching every target (module docstring)."""
    eval_s = 0.0
    for h in history:
        eval_s += h["wall_s"]
        if reaches(h["metrics"], target):
            return h["train_s"] + eval_s
    return None


def evaluate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one finished run as described by the runner's spec; returns the ``eval_result.json`` dict."""
    t0 = time.perf_counter()
    sc = scenario_from_dict(spec["scenario"], spec.get("scenario_source") or "<resolved>")
    work_dir = Path(spec["work_dir"])
    if not spec.get("output_dir"):
        raise ValueError("the run saved no output (output_dir is empty): nothing to evaluate")
    worker = json.loads((work_dir / "worker_result.json").read_text()) if (work_dir / "worker_result.json").exists() \
        else {}
    step_s = [s["step_s"] for s in worker.get("steps") or []]
    n_steps = len(step_s) or sc.train.steps
    tm = task_manager(sc.eval.tasks)
    # untimed warm-up on one document: the first evaluation in a process pays ~10 s of lazy imports and
    # metric loading, which would land on whichever run happens to find the baseline already cached
    warm = run_lm_eval(sc, model_args(sc, spec["checkpoint"], None), tm, limit=1)
    base = baseline(sc, spec["checkpoint"], tm, work_root() / BASELINE_CACHE)
    points = [(s, d) for s, d in intermediate_points(work_dir) if s < n_steps] + [(n_steps, Path(spec["output_dir"]))]
    history = []
    for step, out_dir in points:
        res = run_lm_eval(sc, model_args(sc, spec["checkpoint"], str(out_dir)), tm)
        history.append({"step": step, "train_s": math.fsum(step_s[:step]), "wall_s": res["wall_s"],
                         "metrics": res["metrics"]})
        print(f"tunebench eval step {step}: {json.dumps(res['metrics'])} ({res['wall_s']:.1f} s)", flush=True)
    final = res
    result: dict[str, Any] = {
        "status": "ok", "metrics": final["metrics"], "stderr": final["stderr"],
        "baseline_metrics": base["metrics"], "baseline_cached": base["cached"], "history": history,
        "time_to_target_s": time_to_target(history, sc.eval.target) if sc.eval.target else None,
    }
    if sc.eval.target:
        result["target"] = dict(sc.eval.target)
        missing = sorted(set(sc.eval.target) - set(final["metrics"]))
        if missing:
            result["target_missing"] = missing  # a typo in a target never silently reads as "not reached"
    import lm_eval

    result["lm_eval_version"] = lm_eval.__version__
    result["warmup_s"] = warm["wall_s"]
    result["eval_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: evaluate, and always leave a ``eval_result.json`` (an error is a result too)."""
    _offline()
    return spec_main(argv, "harness.analysis.evaluate", "eval_result.json", evaluate_spec)


if __name__ == "__main__":
    sys.exit(main())
