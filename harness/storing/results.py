"""The results store: one directory per sweep, one JSON per run, one flat table.

Layout of ``results/<run-id>/`` (``run-id`` = ``<scenario name>-<UTC yyyymmdd-HHMMSS>``)::

    scenario.yaml        the resolved scenario (every default filled in)
    sweep.json           the plan: scenario hash, runs planned, when created
    environment.json     the machine at sweep start (GPU, driver, libraries, git sha)
    runs/<framework>-r<k>.json   one result per run (harness.storing.schema.RunResult), written atomically,
                                 never overwritten
    logs/<framework>-r<k>.log    the worker's stdout/stderr
    runs.csv             one row per run, rebuilt from runs/*.json: ROW_COLUMNS below, then eval_* columns
                         (harness.analysis.runs_table adds the loss-parity columns)

Row schema (runs.csv; units in names; empty = not applicable, e.g. GPU memory on a CPU):

======================  =====================================================================================
scenario                scenario name
scenario_hash           hash of the resolved scenario; equal hashes measured the same settings
settings_hash           hash of the shared settings and this framework's own entry only (other rows, the
                        description and the report's baseline left out); empty where the run recorded none
framework               the framework row's label (its adapter name unless the row has a label)
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

from pydantic import ValidationError

from harness.storing.migrate import ResultSchemaError, migrate
from harness.storing.schema import RESULT_SCHEMA_VERSION, RunResult, run_key

__all__ = ["RESULT_SCHEMA_VERSION", "ROW_COLUMNS", "ResultSchemaError", "atomic_write_text", "load_results",
           "load_runs", "parse_result", "read_json", "read_result", "rows_frame", "run_key", "to_row",
           "write_json_once", "write_result", "write_table"]

ROW_COLUMNS = [
    "scenario", "scenario_hash", "settings_hash", "framework", "repeat", "status", "reason", "valid",
    "invalid_reasons", "tokens_per_s", "tokens_per_s_p10_step", "tokens_per_s_p90_step", "loss_tokens_per_s",
    "samples_per_s", "step_s_median", "step_s_p10", "step_s_p90", "steps_measured", "peak_vram_nvml_gib",
    "peak_vram_device_gib", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "mfu", "model_tflops",
    "first_loss", "final_loss", "gpu_name", "device", "framework_version", "torch_version", "git_sha", "load_s",
    "wall_s",
]
# the row columns that come from RunResult.metrics under the same name
_METRIC_COLUMNS = ROW_COLUMNS[ROW_COLUMNS.index("tokens_per_s"): ROW_COLUMNS.index("final_loss") + 1]


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
    """Store a JSON object; refuses to overwrite one that exists (stored runs are never overwritten)."""
    if path.exists():
        raise FileExistsError(f"{path} exists: stored results are never overwritten")
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def parse_result(data: dict[str, Any], source: str = "<result>") -> RunResult:
    """A stored result dict of any schema version as a :class:`RunResult`.

    Args:
        data: the JSON object (version 1 is migrated, :mod:`harness.storing.migrate`).
        source: where it came from, for the error message.

    Raises:
        ResultSchemaError: the dict is not a run result of a known version (names the key and the problem).
    """
    try:
        return RunResult.model_validate(migrate(data))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ResultSchemaError(f"{source}: not a run result: {problems}") from e


def read_result(path: Path) -> RunResult:
    """One stored run.

    Raises:
        ResultSchemaError: the file is not valid JSON or not a run result.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ResultSchemaError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ResultSchemaError(f"{path}: not a JSON object")
    return parse_result(data, str(path))


def write_result(path: Path, result: RunResult | dict[str, Any]) -> RunResult:
    """Store one run in the current schema, once (an existing file is never overwritten).

    Args:
        path: ``runs/<framework>-r<k>.json``.
        result: the typed result, or the dict the runner assembled (checked and completed here).

    Returns:
        The result as stored.

    Raises:
        ResultSchemaError: the dict is not a run result; nothing is written.
        FileExistsError: a result is already stored there.
    """
    res = result if isinstance(result, RunResult) else parse_result(result, str(path))
    write_json_once(Path(path), res.to_dict())
    return res


def load_results(results_dir: Path) -> list[RunResult]:
    """Every stored run of a sweep (``runs/*.json``, not the set-aside attempts), in plan order where a plan exists.

    Raises:
        ResultSchemaError: a stored file is not a run result.
    """
    results_dir = Path(results_dir)
    runs = [read_result(p) for p in sorted((results_dir / "runs").glob("*.json"))]
    plan = read_json(results_dir / "sweep.json") or {}
    order = {k: i for i, k in enumerate(plan.get("planned") or [])}
    runs.sort(key=lambda r: order.get(r.key, 1 << 30))  # stable: unplanned runs keep file order, at the end
    return runs


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """:func:`load_results` as plain dicts in the current schema (for scripts and JSON-shaped checks)."""
    return [r.to_dict() for r in load_results(results_dir)]


def to_row(result: RunResult) -> dict[str, Any]:
    """Flatten one run into a ``runs.csv`` row (:data:`ROW_COLUMNS`, then ``eval_*``)."""
    env = result.environment
    row: dict[str, Any] = {c: None for c in ROW_COLUMNS}
    row |= {c: getattr(result.metrics, c) for c in _METRIC_COLUMNS}
    row |= {
        "scenario": result.scenario, "scenario_hash": result.scenario_hash, "settings_hash": result.settings_hash,
        "framework": result.framework, "repeat": result.repeat, "status": result.status, "reason": result.reason,
        "valid": result.valid, "invalid_reasons": "; ".join(result.invalid_reasons),
        "gpu_name": env.gpu_name if env else None, "device": result.device,
        "framework_version": result.framework_version,
        "torch_version": env.libraries.get("torch") if env else None, "git_sha": env.git_sha if env else None,
        "load_s": result.load_s, "wall_s": result.wall_s,
    }
    if result.eval is not None:
        ev = result.eval.model_dump()
        for k, v in ev.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                row[f"eval_{k}"] = v
        for k, v in result.eval.metrics.items():  # lm-eval's numbers, e.g. eval_tb_last/exact_match
            row[f"eval_{k}"] = v
    return row


def rows_frame(runs: list[RunResult]):
    """The runs as a pandas DataFrame of :func:`to_row` rows (:data:`ROW_COLUMNS` first)."""
    import pandas as pd  # heavy optional dependency: only the table writers need it

    df = pd.DataFrame([to_row(r) for r in runs])
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    return df[ROW_COLUMNS + [c for c in df.columns if c not in ROW_COLUMNS]]


def write_table(results_dir: Path, frame: Any = None) -> Path:
    """(Re)build ``runs.csv`` (derived data, so rebuilding is safe).

    Args:
        results_dir: the sweep's directory.
        frame: the table to write; default :func:`rows_frame` of the stored runs (the analysis layer passes
            the same rows with its parity columns, :func:`harness.analysis.runs_table.write_table`).

    Returns:
        Path of ``runs.csv``.
    """
    df = rows_frame(load_results(results_dir)) if frame is None else frame
    out = Path(results_dir) / "runs.csv"
    atomic_write_text(out, df.to_csv(index=False))
    return out
