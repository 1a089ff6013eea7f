"""The support matrix's cells, read from a matrix folder's stored runs (``python -m harness matrix``).

One :class:`MatrixCell` per (model, method, framework) of the plan (``matrix.json``), with its ``outcome``:

==================  =============================================================================================
ok                  trained: status ok, effective settings valid (read back from the live run), loss falling
invalid             trained, but the effective settings differ from the scenario (``detail``: the differences)
loss not falling    trained with valid settings, but the loss did not fall (:func:`loss_falling`)
error, oom, ...     the run's status; ``detail`` is the tool's own error
unsupported         the framework declares it cannot run the cell, or validation refused it (``detail``: why)
not run             no stored run (``detail``: why it did not run, e.g. its environment not created)
unreadable          a stored run file that cannot be read (``detail``: the file and why)
==================  =============================================================================================

``matrix.csv`` in the matrix folder holds the cells (:func:`write_matrix_table`); the library versions every
framework ran with come from its runs' environments (:func:`versions`).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import fmean
from typing import Any

from harness.analysis import parity
from harness.running.matrix import read_not_run, read_plan, settings_reasons
from harness.storing import results
from harness.storing.schema import RunResult

OK, INVALID, NOT_FALLING, UNSUPPORTED, NOT_RUN = "ok", "invalid", "loss not falling", "unsupported", "not run"
UNREADABLE = "unreadable"  # a stored run file that cannot be read (truncated, not a run result)
MIN_STEPS_FOR_TREND = 4  # with fewer recorded losses, two halves of one or two steps say little
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")  # shown beside each framework


@dataclass
class MatrixCell:
    """One (model, method, framework) of the matrix (a row of ``matrix.csv``)."""

    family: str
    model: str
    method: str
    framework: str
    outcome: str  # see the module docstring
    detail: str | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    loss_falling: bool | None = None
    framework_version: str | None = None
    run: str | None = None  # the stored run, relative to the matrix folder
    shared_machine: bool | None = None  # it shared the machine with other rows (``--jobs``): timings not comparable
    # its loss curve against the baseline framework's (the plan's first) on the same model and method
    # (harness.analysis.parity): ok, transient or departs, and the largest per-step difference
    parity: str | None = None
    parity_ok: bool | None = None
    parity_max_abs_diff: float | None = None


def loss_falling(losses: list[float]) -> bool | None:
    """Whether the loss fell: the mean of the second half of the steps' losses below that of the first half.

    Halves rather than first and last step: each step sees other data, so one step's loss is noisy. None with
    fewer than :data:`MIN_STEPS_FOR_TREND` recorded losses.
    """
    if len(losses) < MIN_STEPS_FOR_TREND:
        return None
    half = len(losses) // 2
    return fmean(losses[-half:]) < fmean(losses[:half])


def _stored_run(folder: Path, scenario: str, framework: str) -> tuple[RunResult | None, str | None]:
    """The newest stored run of ``framework`` in the sweeps of ``scenario`` under ``folder``, and its path."""
    for sweep in sorted(folder.glob(f"{scenario}-*"), reverse=True):  # <scenario>-<time>: newest first
        p = sweep / "runs" / f"{results.run_key(framework, 0)}.json"
        if p.exists():
            return results.read_result(p), str(p.relative_to(folder))
    return None, None


def _unreadable(planned: dict[str, Any], error: Exception) -> MatrixCell:
    return MatrixCell(family=planned["family"], model=planned["model"], method=planned["method"],
                      framework=planned["framework"], outcome=UNREADABLE, detail=str(error))


def cell_of(planned: dict[str, Any], run: RunResult | None, run_path: str | None, not_run: str | None) -> MatrixCell:
    """The outcome of one planned cell from its stored run (or the absence of one)."""
    cell = MatrixCell(family=planned["family"], model=planned["model"], method=planned["method"],
                      framework=planned["framework"], outcome=NOT_RUN, detail=not_run)
    if planned.get("unsupported"):
        cell.outcome, cell.detail = UNSUPPORTED, planned["unsupported"]
        return cell
    if run is None:
        return cell
    losses = [float(s.loss) for s in run.steps if s.loss is not None]
    cell.run, cell.framework_version = run_path, run.framework_version
    cell.shared_machine = len(settings_reasons(run.invalid_reasons)) < len(run.invalid_reasons)
    if losses:
        cell.loss_first, cell.loss_last, cell.loss_falling = losses[0], losses[-1], loss_falling(losses)
    if not run.ok:
        cell.outcome, cell.detail = run.status, run.reason
    elif not run.valid and (reasons := settings_reasons(run.invalid_reasons)):
        cell.outcome, cell.detail = INVALID, "; ".join(reasons)
    elif cell.loss_falling is False:
        cell.outcome, cell.detail = NOT_FALLING, f"loss {cell.loss_first:.4g} -> {cell.loss_last:.4g}"
    else:
        cell.outcome, cell.detail = OK, None
    return cell


def read_matrix(folder: Path) -> tuple[dict[str, Any], list[MatrixCell]]:
    """The matrix folder's plan and every cell, in plan order.

    Raises:
        harness.running.matrix.MatrixError: ``folder`` is not a matrix folder.
    """
    folder = Path(folder)
    plan = read_plan(folder)
    not_run = read_not_run(folder)
    cells = []
    runs: dict[str, list[tuple[MatrixCell, RunResult]]] = {}  # per scenario: the cells that have a stored run
    for planned in plan["cells"]:
        run, path = (None, None)
        if planned.get("scenario"):
            try:
                run, path = _stored_run(folder, planned["scenario"], planned["framework"])
            except results.ResultSchemaError as e:  # one damaged file is one cell, not a failed report
                cells.append(_unreadable(planned, e))
                continue
        why = (not_run.get(planned.get("scenario") or "") or {}).get(planned["framework"])
        cells.append(cell_of(planned, run, path, why))
        if run is not None:
            runs.setdefault(planned["scenario"], []).append((cells[-1], run))
    for pairs in runs.values():  # one repeat per cell: the run's framework names its cell
        cols = parity.parity_columns([r for _, r in pairs], plan["frameworks"][0])
        for cell, run in pairs:
            c = cols.get((run.framework, run.repeat)) or {}
            diff = c.get("parity_max_abs_diff")
            if diff is not None and not math.isnan(diff):  # NaN: no loss curve on one side
                cell.parity, cell.parity_ok, cell.parity_max_abs_diff = (c["parity_status"], bool(c["parity_ok"]),
                                                                         float(diff))
    return plan, cells


def versions(folder: Path, cells: list[MatrixCell]) -> dict[str, dict[str, str]]:
    """Per framework, the versions its runs were measured with: its own and :data:`LIBRARIES` (several values
    joined with " / " if its runs differ), the machine (GPU name, else CPU), and the harness code (``code``: each
    commit with its number of cells, where a rerun of some cells was made from a later one)."""
    out: dict[str, dict[str, Counter[str]]] = {}
    for c in cells:
        if c.run is None:
            continue
        run = results.read_result(Path(folder) / c.run)
        seen = out.setdefault(c.framework, {})
        env = run.environment
        values = {"version": run.framework_version,
                  "machine": env and (env.gpu_name or env.cpu),
                  "code": env and env.code(),
                  **{lib: env and env.libraries.get(lib) for lib in LIBRARIES}}
        for k, v in values.items():
            if v:
                seen.setdefault(k, Counter())[str(v)] += 1
    return {fw: {k: " / ".join(f"{v} ({n})" if k == "code" and len(vs) > 1 else v for v, n in vs.most_common())
                 for k, vs in d.items()} for fw, d in out.items()}


def matrix_csv(cells: list[MatrixCell]) -> str:
    """The cells as CSV text, one row each."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(MatrixCell)], lineterminator="\n")
    w.writeheader()
    for c in cells:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(c).items()})
    return buf.getvalue()


def write_matrix_table(folder: Path) -> Path:
    """Write ``matrix.csv`` (every cell) into the matrix folder; returns its path."""
    _, cells = read_matrix(folder)
    path = Path(folder) / "matrix.csv"
    results.atomic_write_text(path, matrix_csv(cells))
    return path
