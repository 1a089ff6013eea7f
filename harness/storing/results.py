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
status                  ok | error | oom | timeout | crashed | unavailable | diverged
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
energy_j                GPU energy over the measured steps (NVML total-energy counter), J
joules_per_token        energy_j / tokens of the measured steps
avg_power_w             energy_j / measured seconds, W
throttled               a slowing reason was seen while measuring (thermal or hardware slowdown, power brake, a power
                        limit below the GPU's default: harness.measuring.telemetry.SLOWING)
power_capped            the software power cap was seen while measuring (normal for a GPU under a dense load)
throttle_reasons_seen   "; "-joined NVML throttle reasons seen while measuring (slowing or not)
telemetry_<when>_<key>  GPU readings at ``start``, at ``peak_power`` and at the ``end`` of the run, for
                        <key> in sm_clock_mhz, mem_clock_mhz, power_w, power_limit_w, temperature_c
eval_*                  quality metrics (lm-eval) when the scenario has an eval section
gpu_name, device        where it ran
framework_version       version of the tool
torch_version, git_sha  software
load_s, wall_s          model load time, whole run time (s)
======================  =====================================================================================
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness.storing.migrate import ResultSchemaError, migrate
from harness.storing.schema import RESULT_SCHEMA_VERSION, RunResult, run_key

__all__ = ["RESULT_SCHEMA_VERSION", "ROW_COLUMNS", "ResultSchemaError", "Unreadable", "atomic_write_text",
           "file_mode", "load_results", "load_runs", "parse_result", "read_json", "read_result", "read_runs",
           "read_stored_bytes",
           "rows_frame", "run_key", "to_row", "write_json_once", "write_result", "write_table"]

ROW_COLUMNS = [
    "scenario", "scenario_hash", "settings_hash", "framework", "repeat", "status", "reason", "valid",
    "invalid_reasons", "tokens_per_s", "tokens_per_s_p10_step", "tokens_per_s_p90_step", "loss_tokens_per_s",
    "samples_per_s", "step_s_median", "step_s_p10", "step_s_p90", "steps_measured", "peak_vram_nvml_gib",
    "peak_vram_device_gib", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "mfu", "model_tflops",
    "first_loss", "final_loss", "energy_j", "joules_per_token", "avg_power_w", "throttled", "power_capped",
    "throttle_reasons_seen",
]
# GPU readings of harness.measuring.telemetry, flattened as telemetry_<when>_<key>
TELEMETRY_MOMENTS = ("start", "peak_power", "end")
TELEMETRY_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "power_limit_w", "temperature_c")
ROW_COLUMNS += [f"telemetry_{when}_{key}" for when in TELEMETRY_MOMENTS for key in TELEMETRY_KEYS]
ROW_COLUMNS += ["gpu_name", "device", "framework_version", "torch_version", "git_sha", "load_s", "wall_s"]
# the row columns that come from RunResult.metrics under the same name
_METRIC_COLUMNS = ROW_COLUMNS[ROW_COLUMNS.index("tokens_per_s"): ROW_COLUMNS.index("power_capped") + 1]


# what reading a stored file can raise besides a schema error: a missing or unreadable file, bytes that are not
# UTF-8 (UnicodeDecodeError is a ValueError), JSON nested deeper than the parser's recursion limit or an integer of
# more digits than Python converts (ValueError too)
_READ_ERRORS = (OSError, ValueError, RecursionError)
MAX_STORED_BYTES = 256 << 20  # a run's JSON with every step's figures is a few MB; a bigger "result" is no result


def read_stored_bytes(path: Path, limit: int = MAX_STORED_BYTES) -> bytes:
    """The bytes of a file the harness stored, which may since have been replaced by anything: a FIFO or a device
    would block the reader or never end, so only a regular file (a symlink to one included) is read.

    Raises:
        OSError: missing, unreadable, a directory (``IsADirectoryError``), not a regular file or larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO does not wait for a writer
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", str(path))
    return data


def read_json(path: Path) -> dict | None:
    """A stored JSON object, or None when the file is missing, unreadable, half-written or not an object."""
    try:
        data = json.loads(read_stored_bytes(Path(path)).decode("utf-8"))
    except _READ_ERRORS:
        return None
    return data if isinstance(data, dict) else None


def file_mode() -> int:
    """The mode a file created with ``open()`` gets here: 0o666 less the process umask (0o644 under umask 022)."""
    # os.umask can only be read by setting it; set it back at once (no thread of the harness creates files)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file.

    The file gets the mode of a plain ``open()`` (:func:`file_mode`), not mkstemp's private 0600: results and
    reports are read by other users and by the web server that publishes reports.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
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
    except ResultSchemaError as e:  # migrate's: a schema_version it cannot read
        raise ResultSchemaError(f"{source}: not a run result: {e}") from e
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ResultSchemaError(f"{source}: not a run result: {problems}") from e


def read_result(path: Path) -> RunResult:
    """One stored run.

    Raises:
        ResultSchemaError: the file cannot be read, is not valid UTF-8 JSON, or is not a run result (the message
            names the file and why).
    """
    try:
        text = read_stored_bytes(Path(path)).decode("utf-8")
    except OSError as e:
        raise ResultSchemaError(f"{path}: cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ResultSchemaError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else "not valid JSON (truncated?)"
        raise ResultSchemaError(f"{path}: {what}: {e}") from e
    except RecursionError as e:
        raise ResultSchemaError(f"{path}: JSON nested too deeply to read") from e
    except ValueError as e:  # an integer of thousands of digits
        raise ResultSchemaError(f"{path}: not a readable JSON value: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(data, dict):
        raise ResultSchemaError(f"{path}: not a run result: a JSON {type(data).__name__}, not an object")
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


@dataclass(frozen=True)
class Unreadable:
    """A stored file that could not be read, left out of everything built from the sweep."""

    path: Path
    why: str  # the message of the error, naming the file

    def __str__(self) -> str:
        return self.why


def read_runs(results_dir: Path) -> tuple[list[RunResult], list[Unreadable]]:
    """Every readable stored run of a sweep, and the run files that are not (truncated, not JSON, not a result).

    One bad file never hides the rest of a sweep: reports and compare name it and go on.

    Returns:
        (runs in plan order where a plan exists, else file order; the unreadable files, each with why).
    """
    results_dir = Path(results_dir)
    runs, bad = [], []
    for p in sorted((results_dir / "runs").glob("*.json")):
        try:
            runs.append(read_result(p))
        except ResultSchemaError as e:
            bad.append(Unreadable(p, str(e)))
    planned = (read_json(results_dir / "sweep.json") or {}).get("planned")
    order = {k: i for i, k in enumerate(planned)} if isinstance(planned, list) and all(
        isinstance(k, str) for k in planned) else {}
    runs.sort(key=lambda r: order.get(r.key, 1 << 30))  # stable: unplanned runs keep file order, at the end
    return runs, bad


def load_results(results_dir: Path) -> list[RunResult]:
    """Every stored run of a sweep (``runs/*.json``, not the set-aside attempts), in plan order where a plan exists.

    Raises:
        ResultSchemaError: a stored file is not a run result (:func:`read_runs` skips such files instead).
    """
    runs, bad = read_runs(results_dir)
    if bad:
        raise ResultSchemaError(bad[0].why)
    return runs


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """:func:`load_results` as plain dicts in the current schema (for scripts and JSON-shaped checks)."""
    return [r.to_dict() for r in load_results(results_dir)]


def to_row(result: RunResult) -> dict[str, Any]:
    """Flatten one run into a ``runs.csv`` row (:data:`ROW_COLUMNS`, then ``eval_*``)."""
    env = result.environment
    m = result.metrics
    row: dict[str, Any] = {c: None for c in ROW_COLUMNS}
    row |= {c: getattr(m, c) for c in _METRIC_COLUMNS}
    row["throttle_reasons_seen"] = "; ".join(map(str, m.throttle_reasons_seen)) if m.throttle_reasons_seen else None
    telemetry = m.telemetry if isinstance(m.telemetry, dict) else {}
    for when in TELEMETRY_MOMENTS:
        reading = telemetry.get(when) if isinstance(telemetry.get(when), dict) else {}
        row |= {f"telemetry_{when}_{key}": reading.get(key) for key in TELEMETRY_KEYS}
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
        frame: the table to write; default :func:`rows_frame` of the readable stored runs (the analysis layer
            passes the same rows with its parity columns, :func:`harness.analysis.runs_table.write_table`).

    Returns:
        Path of ``runs.csv``.
    """
    df = rows_frame(read_runs(results_dir)[0]) if frame is None else frame
    out = Path(results_dir) / "runs.csv"
    atomic_write_text(out, df.to_csv(index=False))
    return out
