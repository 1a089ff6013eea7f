"""Synthetic sweep directories for report/compare tests (clearly fake numbers; no torch, no GPU).

The files follow the layout of :mod:`harness.storing.results`; runs are built with the keys
``harness.running.runner.execute_run`` / ``harness.running.worker.run_spec`` write and stored through
:func:`harness.storing.results.write_result` (checked against :class:`harness.storing.schema.RunResult`), as the
runner stores them. The metrics are computed from the synthetic steps with the real
:func:`harness.measuring.meter.summarise`, so the fixtures cannot drift from the stored format silently.

Example::

    runs = [make_run("hf", 0, tokens_per_s=1000), make_run("tunebench", 0, tokens_per_s=1500)]
    sweep = make_sweep(tmp_path / "results" / "tiny-20260101-000000", runs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from harness.analysis import runs_table  # noqa: E402
from harness.measuring.meter import summarise  # noqa: E402
from harness.storing import results  # noqa: E402

SCENARIO_NAME = "synthetic-tiny"
SCENARIO_HASH = "5y47h371c000"  # synthetic
SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 128, 2, 2
TOKENS_PER_STEP = SEQ_LEN * MICRO_BATCH * GRAD_ACCUM


def scenario_dict(name: str = SCENARIO_NAME, frameworks: list[str] | None = None, device: str = "cuda",
                  repeats: int = 1, steps: int = 10, warmup: int = 2, baseline: str = "hf",
                  eval_tasks: list[str] | None = None) -> dict[str, Any]:
    """A resolved scenario as ``scenario.yaml`` stores it (only the keys the report reads need be right)."""
    return {
        "version": 1, "name": name, "description": "synthetic scenario for tests",
        "model": {"preset": "tiny-llama", "weights": "random", "dtype": "bfloat16", "seed": 0,
                  "attn_implementation": "sdpa"},
        "method": {"kind": "lora", "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.0,
                   "target_modules": "all-linear", "quant": None},
        "data": {"source": "synthetic", "seq_len": SEQ_LEN, "lengths": "fixed", "packing": False, "seed": 0},
        "train": {"micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "steps": steps, "warmup_steps": warmup,
                  "lr": 2e-4, "optimizer": "adamw_torch", "gradient_checkpointing": True, "seed": 42},
        "hardware": {"device": device, "gpus": 1},
        "frameworks": [{"name": f, "overrides": {}, "timeout_s": None} for f in (frameworks or ["hf"])],
        "measure": {"repeats": repeats, "memory_interval_ms": 10, "timeout_s": 1800, "baseline": baseline,
                    "peak_tflops": None},
        "eval": {"tasks": eval_tasks or [], "limit": None, "every_steps": None, "target": {}, "batch_size": 16},
    }


def environment_dict(device: str = "cuda", foreign: list[dict] | None = None) -> dict[str, Any]:
    """An ``environment.json``; GPU fields empty on a CPU, as harness.measuring.environment.capture leaves them."""
    gpu = device == "cuda"
    return {
        "python": "3.11.9", "platform": "Linux-synthetic", "hostname": "fixture-host", "cpu": "Synthetic CPU @ 1 GHz",
        "cpu_count": 2,
        "libraries": {"torch": "2.13.0", "transformers": "5.17.0", "peft": "0.20.0", "trl": None, "pandas": "3.1.1"},
        "git_sha": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
        "gpu_name": "NVIDIA H100 80GB HBM3" if gpu else None, "gpu_count": 1 if gpu else 0,
        "driver": "580.00" if gpu else None, "gpu_memory_gib": 79.2 if gpu else None,
        "foreign_gpu_processes": foreign or [], "nvml_error": None if gpu else "NVMLError: synthetic no driver",
        "torch_cuda": "13.0" if gpu else None,
    }


def _steps(tokens_per_s: float, n: int, warmup: int, jitter: float, loss0: float, loss_slope: float) -> list[dict]:
    """Synthetic per-step records: step time alternates +/- ``jitter`` around the mean (deterministic)."""
    out = []
    base_s = TOKENS_PER_STEP / tokens_per_s
    for i in range(n):
        wobble = jitter * (1 if i % 2 else -1) * (1 + (i % 3) / 3)
        step_s = base_s * (1 + wobble) * (3.0 if i < warmup else 1.0)
        out.append({"step": i + 1, "step_s": step_s, "measured": i >= warmup, "loss": loss0 - loss_slope * i,
                    "tokens": TOKENS_PER_STEP, "loss_tokens": TOKENS_PER_STEP - MICRO_BATCH * GRAD_ACCUM,
                    "samples": MICRO_BATCH * GRAD_ACCUM, "padded_tokens": TOKENS_PER_STEP, "max_len": SEQ_LEN,
                    "micro_batches": GRAD_ACCUM, "rows": MICRO_BATCH, "ctx_tokens_sq": MICRO_BATCH * GRAD_ACCUM
                    * SEQ_LEN**2})
    return out


def expected_settings() -> dict[str, Any]:
    """What the synthetic scenario asks for, in harness.measuring.effective keys."""
    return {"train_mode": True, "gradient_checkpointing": True, "dtype": "bfloat16", "quantization": None,
            "micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "optimizer": "adamw_torch", "lr": 2e-4,
            "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.0, "use_dora": False,
            "target_modules": sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            "seq_len_max": SEQ_LEN}


def make_run(framework: str, repeat: int = 0, *, status: str = "ok", reason: str | None = None,
             tokens_per_s: float = 1000.0, jitter: float = 0.01, steps: int = 10, warmup: int = 2,
             device: str = "cuda", vram_gib: float | None = 10.0, loss0: float = 2.0, loss_slope: float = 0.05,
             invalid_reasons: list[str] | None = None, effective: dict[str, Any] | None = None,
             scenario: str = SCENARIO_NAME, scenario_hash: str = SCENARIO_HASH, eval: dict | None = None,
             framework_version: str | None = "1.0.0-synthetic", with_metrics: bool = True) -> dict[str, Any]:
    """One synthetic run result, shaped like ``runs/<framework>-r<k>.json``.

    Args:
        framework: adapter name.
        repeat: repeat index.
        status: ok | error | oom | timeout | crashed | unavailable.
        reason: why, when not ok (a default is made up for failures).
        tokens_per_s: mean throughput over measured steps (exact up to the jitter pattern).
        jitter: relative step-time wobble; drives the per-step p10–p90 spread.
        steps: optimizer steps in total; warmup: steps left out of the timing.
        device: "cuda" or "cpu" (cpu: every GPU memory metric is None).
        vram_gib: NVML per-process peak; torch reserved/allocated are derived from it.
        loss0, loss_slope: linear synthetic loss curve.
        invalid_reasons: differences between effective settings and the scenario (non-empty: invalid).
        effective: overrides of the effective settings (defaults equal the expected ones).
        scenario, scenario_hash: identity of the scenario.
        eval: the evaluator's dict, stored as is.
        framework_version: version of the tool.
        with_metrics: False for failures that never produced metrics (unavailable, crashed).
    """
    base = {"run_id": f"{scenario}-20260101-000000", "scenario": scenario, "scenario_hash": scenario_hash,
            "framework": framework, "adapter": framework, "repeat": repeat, "overrides": {},
            "schema_version": results.RESULT_SCHEMA_VERSION,
            "device": device, "dataset_sha256_16": "feedfacefeedface", "checkpoint": "/synthetic/checkpoint"}
    if status == "unavailable":
        return base | {"status": status, "reason": reason or "needs CUDA (synthetic)", "valid": False,
                       "invalid_reasons": []}
    if not with_metrics:
        return base | {"status": status, "reason": reason or f"synthetic {status}", "valid": False,
                       "invalid_reasons": [], "wall_s": 3.0, "exit_code": -9, "env": "base",
                       "log": f"logs/{framework}-r{repeat}.log"}
    st = _steps(tokens_per_s, steps, warmup, jitter, loss0, loss_slope)
    metrics = summarise(st, warmup)
    gpu = device == "cuda" and vram_gib is not None
    metrics |= {
        "peak_alloc_gib": vram_gib * 0.8 if gpu else None, "peak_reserved_gib": vram_gib * 0.9 if gpu else None,
        "peak_vram_nvml_gib": vram_gib if gpu else None, "peak_vram_device_gib": vram_gib + 0.5 if gpu else None,
        "vram_device_before_gib": 0.5 if gpu else None, "nvml_samples": 1000 if gpu else None,
        "nvml_error": None, "peak_rss_gib": 3.25,
        "mfu": 0.000123 * tokens_per_s if device == "cuda" else None,
        "model_tflops": 0.1 * tokens_per_s / 1000, "peak_tflops": 989.4 if device == "cuda" else None,
        "peak_tflops_source": "datasheet dense bf16 (H100 80GB HBM3)" if device == "cuda" else "cpu: no MFU",
        "matmul_params": 1_000_000,
    }
    exp = expected_settings()
    eff = {k: v for k, v in exp.items() if k != "seq_len_max"} | {"seq_len": SEQ_LEN, "trainable_params": 4096,
                                                                  "tokens_per_step": TOKENS_PER_STEP}
    eff |= effective or {}
    env = environment_dict(device) | {"libraries": environment_dict(device)["libraries"] | {framework: "1.0.0"}}
    out = base | {
        "status": status, "reason": reason if status == "ok" else (reason or f"synthetic {status}"),
        "started_at": 1.0, "valid": status == "ok" and not invalid_reasons,
        "invalid_reasons": list(invalid_reasons or []), "metrics": metrics, "steps": st, "effective": eff,
        "expected": exp, "environment": env, "framework_version": framework_version,
        "native_config": None, "output_dir": None, "extra": {}, "load_s": 1.5, "finished_at": 2.0,
        "wall_s": 12.0, "exit_code": 0 if status == "ok" else 1, "env": "base",
        "log": f"logs/{framework}-r{repeat}.log",
    }
    if eval is not None:
        out["eval"] = eval
    return out


def make_sweep(sweep_dir: Path, runs: list[dict[str, Any]], *, scenario: dict[str, Any] | None = None,
               environment: dict[str, Any] | None = None, device: str | None = None) -> Path:
    """Write a results directory (scenario.yaml, sweep.json, environment.json, runs/*.json, runs.csv with parity).

    Args:
        sweep_dir: the directory to create, e.g. ``tmp/results/<run-id>``.
        runs: run results from :func:`make_run`.
        scenario: resolved scenario dict; by default built from the runs' frameworks and repeats.
        environment: environment.json content; by default matches ``device``.
        device: "cuda" or "cpu"; by default the first run's device.

    Returns:
        ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    device = device or (runs[0]["device"] if runs else "cuda")
    fws = list(dict.fromkeys(r["framework"] for r in runs)) or ["hf"]
    repeats = max((r["repeat"] for r in runs), default=0) + 1
    name = runs[0]["scenario"] if runs else SCENARIO_NAME
    sc = scenario or scenario_dict(name=name, frameworks=fws, device=device, repeats=repeats)
    (sweep_dir / "runs").mkdir(parents=True)
    (sweep_dir / "logs").mkdir()
    (sweep_dir / "scenario.yaml").write_text("# resolved scenario (synthetic); source: scenarios/synthetic.yaml\n"
                                             + yaml.safe_dump(sc, sort_keys=False))
    plan = {"scenario": sc["name"], "scenario_hash": runs[0]["scenario_hash"] if runs else SCENARIO_HASH,
            "created": "20260101-000000", "scenario_source": "scenarios/synthetic.yaml",
            "planned": [results.run_key(f["name"], r) for r in range(sc["measure"]["repeats"])
                        for f in sc["frameworks"]]}
    (sweep_dir / "sweep.json").write_text(json.dumps(plan, indent=1))
    (sweep_dir / "environment.json").write_text(json.dumps(environment or environment_dict(device), indent=1))
    for r in runs:
        results.write_result(sweep_dir / "runs" / f"{results.run_key(r['framework'], r['repeat'])}.json", r)
        (sweep_dir / "logs" / f"{results.run_key(r['framework'], r['repeat'])}.log").write_text("synthetic log\n")
    runs_table.write_table(sweep_dir)
    return sweep_dir


def eval_dict(acc: float, *, baseline: float | None = 0.25, tt_target: float | None = 30.0,
              status: str = "ok") -> dict[str, Any]:
    """A synthetic evaluator result (the contract of harness.analysis.evaluate), one task with one metric."""
    if status != "ok":
        return {"status": status, "error": "synthetic evaluator failure"}
    out: dict[str, Any] = {"status": "ok", "metrics": {"arith/acc": acc, "arith/exact_match": acc / 2},
                           "history": [{"step": 5, "wall_s": 10.0, "metrics": {"arith/acc": acc / 2}},
                                       {"step": 10, "wall_s": 20.0, "metrics": {"arith/acc": acc}}],
                           "time_to_target_s": tt_target, "target": {"arith/acc": 0.5}}
    if baseline is not None:
        out["baseline_metrics"] = {"arith/acc": baseline, "arith/exact_match": baseline / 2}
    return out


def make_night(results_root: Path, day: int, hf_tps: float, git_sha: str = "a" * 40,
               transformers: str = "5.17.0", dataset: str | None = None, loss_rule: int | None = None) -> Path:
    """One stored sweep ("night") of hf and tunebench, created at 02:00 on 2026-12-<day>, with this git sha and
    transformers version in every run's environment (what the nightly history annotates), and ``dataset`` as the
    digest of the rows its runs read (None: not recorded), with ``loss_rule`` those of conversation rows, read
    under that rule (None: text rows, or a run stored before the rule was recorded)."""
    created = f"202612{day:02d}-020000"
    env = environment_dict() | {"git_sha": git_sha}
    env["libraries"] = env["libraries"] | {"transformers": transformers}
    runs = [make_run("hf", 0, tokens_per_s=hf_tps), make_run("tunebench", 0, tokens_per_s=1500.0)]
    for r in runs:
        r["environment"] = env
        r["dataset_sha256_16"] = dataset
        if loss_rule is not None:
            r["dataset"] = {"format": "messages", "loss_rule": loss_rule}
    d = make_sweep(results_root / f"synthetic-tiny-{created}", runs, environment=env)
    plan = json.loads((d / "sweep.json").read_text())
    (d / "sweep.json").write_text(json.dumps(plan | {"created": created}))
    return d
