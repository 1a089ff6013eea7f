"""The results store: one directory per sweep, one JSON per run, one flat table.

Layout of ``results/<run-id>/`` (``run-id`` = ``<scenario name>-<UTC yyyymmdd-HHMMSS>``)::

    scenario.yaml        the resolved scenario (every default filled in)
    sweep.json           the plan: scenario hash, runs planned, when created
    environment.json     the machine at sweep start (GPU, driver, libraries, git sha)
    runs/<framework>-r<k>.json   one result per run, written atomically, never overwritten
    logs/<framework>-r<k>.log    the worker's stdout/stderr
    runs.csv             ROW_COLUMNS below, one row per run (rebuilt from runs/*.json)

Row schema (runs.csv; units in names; empty = not applicable, e.g. GPU memory on a CPU):

======================  =====================================================================================
scenario                scenario name
scenario_hash           hash of the resolved scenario; equal hashes measured the same settings
settings_hash           hash of the shared settings and this framework's own entry only (other rows, the
                        description and the report's baseline left out); empty in results before session 6
framework               adapter name
repeat                  0-based repeat index
status                  ok | error | oom | timeout | crashed | unavailable
reason                  why, when status is not ok (the tool's own error where there is one)
valid                   effective settings matched the scenario (False: see invalid_reasons)
invalid_reasons         "; "-joined differences between effective settings and the scenario
tokens_per_s            non-padding input tokens / measured seconds (counted by the harness)
tokens_per_s_p10_step   10th percentile of per-step tokens/s
tokens_per_s_p90_step   90th percentile of per-step tokens/s
loss_tokens_per_s       loss-bearing tokens / measured seconds
samples_per_s           samples / measured seconds
step_s_median           median optimizer-step time over measured steps (s)
step_s_p10, step_s_p90  spread of the step time (s)
steps_measured          optimizer steps after warmup
peak_vram_nvml_gib      NVML peak memory of the worker process (sampled)
peak_vram_device_gib    NVML peak used memory of the whole device
peak_alloc_gib          torch.cuda.max_memory_allocated
peak_reserved_gib       torch.cuda.max_memory_reserved
peak_rss_gib            host peak resident memory of the worker
mfu                     model FLOPs utilisation (harness.measuring.flops convention)
model_tflops            achieved model TFLOP/s
first_loss, final_loss  training loss of the first and last step
parity_ok               loss curve within tolerance of the baseline framework's, or only a transient excursion
parity_status           ok | transient | departs (definitions in harness.analysis.parity)
parity_max_abs_diff     largest per-step loss difference to the baseline
eval_*                  quality metrics (lm-eval) when the scenario has an eval section
gpu_name, device        where it ran
framework_version       version of the tool
torch_version, git_sha  software
load_s, wall_s          model load time, whole run time (s)
======================  =====================================================================================
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

ROW_COLUMNS = [
    "scenario", "scenario_hash", "settings_hash", "framework", "repeat", "status", "reason", "valid",
    "invalid_reasons", "tokens_per_s", "tokens_per_s_p10_step", "tokens_per_s_p90_step", "loss_tokens_per_s",
    "samples_per_s", "step_s_median", "step_s_p10", "step_s_p90", "steps_measured", "peak_vram_nvml_gib",
    "peak_vram_device_gib", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "mfu", "model_tflops",
    "first_loss", "final_loss", "gpu_name", "device", "framework_version", "torch_version", "git_sha", "load_s",
    "wall_s",
]
RESULT_SCHEMA_VERSION = 1


def read_json(path: Path) -> dict | None:
    """A stored JSON object, or None when the file is missing, unreadable, half-written or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_once(path: Path, data: dict) -> None:
    """Store a result; refuses to overwrite one that exists (stored runs are never overwritten)."""
    if path.exists():
        raise FileExistsError(f"{path} exists: stored results are never overwritten")
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def run_key(framework: str, repeat: int) -> str:
    return f"{framework}-r{repeat}"


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every stored run result of a sweep, in plan order where a plan exists."""
    results_dir = Path(results_dir)
    runs = [json.loads(p.read_text()) for p in sorted((results_dir / "runs").glob("*.json"))]
    plan_path = results_dir / "sweep.json"
    if plan_path.exists():
        order = {k: i for i, k in enumerate(json.loads(plan_path.read_text()).get("planned", []))}
        runs.sort(key=lambda r: order.get(run_key(r["framework"], r["repeat"]), 1 << 30))
    return runs


def to_row(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run result into a ``runs.csv`` row."""
    m = result.get("metrics") or {}
    env = result.get("environment") or {}
    row = {c: m.get(c) for c in ROW_COLUMNS}
    row.update({
        "scenario": result.get("scenario"),
        "scenario_hash": result.get("scenario_hash"),
        "settings_hash": result.get("settings_hash"),
        "framework": result.get("framework"),
        "repeat": result.get("repeat"),
        "status": result.get("status"),
        "reason": result.get("reason"),
        "valid": result.get("valid"),
        "invalid_reasons": "; ".join(result.get("invalid_reasons") or []),
        "gpu_name": env.get("gpu_name"),
        "device": result.get("device"),
        "framework_version": result.get("framework_version"),
        "torch_version": (env.get("libraries") or {}).get("torch"),
        "git_sha": env.get("git_sha"),
        "load_s": result.get("load_s"),
        "wall_s": result.get("wall_s"),
    })
    ev = result.get("eval") or {}
    for k, v in ev.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            row[f"eval_{k}"] = v
    for k, v in (ev.get("metrics") or {}).items():  # lm-eval's numbers, e.g. eval_tb_last/exact_match
        row[f"eval_{k}"] = v
    return row


def runs_frame(results_dir: Path):
    """The sweep's runs as a pandas DataFrame (ROW_COLUMNS first, then parity and eval columns)."""
    import pandas as pd

    from harness.analysis import parity

    runs = load_runs(results_dir)
    rows = [to_row(r) for r in runs]
    if rows:
        # loss parity against the baseline framework is part of each row (harness.analysis.parity states the tolerance)
        baseline, atol, rtol = parity.sweep_settings(Path(results_dir))
        cols = parity.parity_columns(runs, baseline, atol, rtol)
        for row in rows:
            row.update(cols.get((row["framework"], row["repeat"]),
                                {"parity_ok": None, "parity_status": None, "parity_max_abs_diff": None}))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    extra = [c for c in df.columns if c not in ROW_COLUMNS]
    return df[ROW_COLUMNS + extra]


def write_table(results_dir: Path) -> Path:
    """(Re)build ``runs.csv`` from the stored run JSONs (derived data, so rebuilding is safe)."""
    df = runs_frame(results_dir)
    out = Path(results_dir) / "runs.csv"
    atomic_write_text(out, df.to_csv(index=False))
    return out


def load_steps(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result.get("steps") or []
