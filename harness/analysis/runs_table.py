"""The runs table of a sweep: the stored rows (``harness.storing.results.ROW_COLUMNS``, ``eval_*``) plus loss parity.

Columns added to each row (definitions in :mod:`harness.analysis.parity`):

======================  =====================================================================================
parity_ok               loss curve within tolerance of the baseline framework's, or only a transient excursion
parity_status           ok | transient | departs
parity_max_abs_diff     largest per-step loss difference to the baseline
======================  =====================================================================================

``python -m harness run`` writes it as ``runs.csv`` when a sweep finishes (:func:`write_table`); the runner
itself rewrites the stored rows alone after every run, so an interrupted sweep still has its table.
"""

from __future__ import annotations

from pathlib import Path

from harness.analysis import parity
from harness.storing import results
from harness.storing.sweep import Sweep, load_sweep

PARITY_COLUMNS = ["parity_ok", "parity_status", "parity_max_abs_diff"]


def runs_frame(sweep: Sweep):
    """The sweep's runs as a pandas DataFrame: ``ROW_COLUMNS``, ``eval_*`` columns, then the parity columns.

    Args:
        sweep: a loaded sweep (:func:`harness.storing.sweep.load_sweep`).

    Returns:
        One row per stored run, in plan order; parity against the scenario's baseline framework with its
        tolerances (``eval.parity_atol`` / ``parity_rtol``, else the defaults by dtype).
    """
    df = results.rows_frame(sweep.runs)
    if df.empty:
        return df.reindex(columns=results.ROW_COLUMNS + PARITY_COLUMNS)
    baseline, atol, rtol = parity.settings(sweep.scenario)
    cols = parity.parity_columns(sweep.runs, baseline, atol, rtol)
    empty = dict.fromkeys(PARITY_COLUMNS)
    for c in PARITY_COLUMNS:
        df[c] = [cols.get((fw, rep), empty)[c] for fw, rep in zip(df["framework"], df["repeat"], strict=True)]
    return df  # rows_frame put ROW_COLUMNS and eval_* first; the parity columns were appended after them


def write_table(results_dir: Path) -> Path:
    """(Re)build ``runs.csv`` of a stored sweep with its parity columns; returns its path."""
    return results.write_table(results_dir, runs_frame(load_sweep(Path(results_dir))))
