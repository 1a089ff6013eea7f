"""Where a run's wall time goes, from the timestamps every run stores.

A run's wall time (the runner's clock, from launching the worker to its exit) splits into phases that add up to it:

- ``start_up_s``: launch to the worker's first line of work (interpreter start, the harness's and its imports);
  ``launched_at`` -> ``started_at``.
- ``to_first_step_s``: the worker's start to the first optimizer step's begin (the tool's imports, building the
  model, of which ``load_s`` is the tool's own loading, the data and trainer set-up); -> ``first_step_at``.
- ``warmup_s`` and ``timed_s``: the step times of the warm-up steps and of the measured ones (the meter's
  ``step_s``; tokens/s is the timed steps' figure).
- ``between_steps_s``: the rest of first step begin -> last step end, the gaps between one step's end and the
  next one's begin (the tool's logging and callbacks, the harness's own hooks).
- ``after_last_step_s``: the last step's end to the worker's result (saving the trained output, reading the
  environment); -> ``finished_at``.
- ``exit_s``: the result to the process's exit (writing it, interpreter and driver teardown).

A phase whose timestamps a run lacks (runs stored before ``launched_at`` existed, a run that failed before its
first step) is None, and so is every phase that would need it; the others stand.
"""

from __future__ import annotations

import statistics
from typing import Any

from harness.storing.schema import RunResult

PHASES = ("start_up_s", "to_first_step_s", "warmup_s", "timed_s", "between_steps_s", "after_last_step_s", "exit_s")


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def phases(run: RunResult) -> dict[str, float | None]:
    """The run's wall time by phase (module docstring), with ``wall_s``, ``load_s`` and ``timed_share`` (timed
    steps over wall time)."""
    exited = run.launched_at + run.wall_s if run.launched_at is not None and run.wall_s is not None else None
    steps = [s for s in run.steps if s.step_s is not None]
    warmup = sum(s.step_s for s in steps if not s.measured) if steps else None
    timed = sum(s.step_s for s in steps if s.measured) if steps else None
    span = _minus(run.last_step_at, run.first_step_at)
    between = span - warmup - timed if span is not None and steps else None
    out = {"start_up_s": _minus(run.started_at, run.launched_at),
           "to_first_step_s": _minus(run.first_step_at, run.started_at),
           "warmup_s": warmup if span is not None else None, "timed_s": timed if span is not None else None,
           "between_steps_s": between, "after_last_step_s": _minus(run.finished_at, run.last_step_at),
           "exit_s": _minus(exited, run.finished_at)}
    wall = run.wall_s
    return out | {"wall_s": wall, "load_s": run.load_s,
                  "timed_share": timed / wall if timed is not None and wall else None}


def by_framework(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per framework row, the median of each phase over its ok runs that have it, and how many runs those are."""
    grouped: dict[str, list[dict[str, float | None]]] = {}
    for run in runs:
        if run.ok:
            grouped.setdefault(run.framework, []).append(phases(run))
    out: dict[str, dict[str, Any]] = {}
    for fw, rows in grouped.items():
        med = {}
        for key in (*PHASES, "wall_s", "load_s", "timed_share"):
            vals = [r[key] for r in rows if r[key] is not None]
            med[key] = statistics.median(vals) if vals else None
        out[fw] = med | {"runs": len(rows)}
    return out


def totals(runs: list[RunResult]) -> dict[str, float]:
    """Over every run of a sweep (failed ones too): the wall time, the timed steps' time and the time before the
    first step, in seconds."""
    wall = sum(r.wall_s or 0.0 for r in runs)
    ph = [phases(r) for r in runs]
    return {"wall_s": wall, "timed_s": sum(p["timed_s"] or 0.0 for p in ph),
            "before_first_step_s": sum((p["start_up_s"] or 0.0) + (p["to_first_step_s"] or 0.0) for p in ph)}
