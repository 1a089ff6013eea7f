"""The memory frontier: per framework row and memory budget, the largest seq_len (or micro-batch) that trains.

``python -m harness frontier SCENARIO --vary seq_len --budgets 8,12,16,24,40,80`` (harness.cli.frontier) runs
this. For each row and budget the largest value of a grid (``lo``, multiples of ``step``, ``hi``) that trains
the scenario's steps within the budget is found by a search of the grid, with running out of memory as the
signal: a probe that ends ``oom``, or ok but above its budget by NVML (:data:`harness.measuring.memcap.OVER_BUDGET`),
does not fit; an ok probe fits. Memory use is taken to grow with the value and to shrink with the budget, so
budgets are done smallest first and each starts from the value found under the one below it (verified by a probe
at the new budget, whose tokens/s is then the row's figure there).

The search bisects until it knows two fitting probes of the row with their NVML peaks; from then on it probes
where the line through them reaches the budget (:func:`predicted_max`), inside the bracket, and bisects again if
that stops halving the bracket. On an 8B model a probe costs most of a minute, and a bisection of a 131,072-token
grid ~9 probes per budget; the line puts each later budget's answer within a step or two, so the frontier of a
row over six budgets takes ~15 probes instead of ~55.

Each probe is an ordinary run of a derived scenario (:func:`probe_scenario`: the budget and the value set,
one repeat) stored by the sweep runner under the frontier's folder, ``results/<scenario>-frontier-<time>/``: one
sweep per (budget, value), holding the rows that probed it. So a rerun finds every finished probe by its
scenario's hash and runs only what is missing, and ``retry_failed`` redoes probes stored as error, crashed or
timeout as ``run --retry-failed`` does. A probe that fails otherwise (error, crash, timeout, unavailable,
diverged) stops that row's bisection, at this budget and the ones above, with the reason; the other rows go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from harness.inputs import models
from harness.measuring.memcap import OVER_BUDGET
from harness.running import runner
from harness.running.derive import derive
from harness.spec.scenario import MAX_SEQ_LEN, Scenario
from harness.storing import results
from harness.storing.schema import STATUS_OK, STATUS_OOM, RunResult

VARIES = ("seq_len", "micro_batch")
MIN_VALUE = {"seq_len": 8, "micro_batch": 1}  # the schema's smallest valid values
DEFAULT_STEP = {"seq_len": 256, "micro_batch": 1}  # seq_len: a bisection to the token is ~9 probes more, for nothing
MICRO_BATCH_MAX = 64  # the stated upper bound of a micro_batch frontier (--max changes it)
PLAN_FILE = "frontier.json"

FITS, NO_FIT, FAILED = "fits", "oom", "failed"


class FrontierError(ValueError):
    """The frontier cannot be run as asked (what to vary, the bounds); the message says why."""


@dataclass(frozen=True)
class Grid:
    """The values a frontier tries: ``lo``, the multiples of ``step`` between, and ``hi``."""

    vary: str
    lo: int
    hi: int
    step: int

    def values(self) -> list[int]:
        """Every candidate value, ascending."""
        first = -(-self.lo // self.step) * self.step
        return sorted({self.lo, self.hi, *range(first, self.hi + 1, self.step)})


def model_max_positions(sc: Scenario) -> int:
    """The model's ``max_position_embeddings`` (its preset's, else the checkpoint's config.json)."""
    if sc.model.preset is not None:
        return models.get_preset(sc.model.preset).max_position_embeddings
    cfg = models.load_config_dict(sc.model.weights)
    return int(cfg.get("max_position_embeddings") or MAX_SEQ_LEN)


def make_grid(sc: Scenario, vary: str, hi: int | None = None, step: int | None = None) -> Grid:
    """The grid of a frontier of ``sc`` over ``vary``, checked.

    Args:
        sc: the scenario.
        vary: ``seq_len`` or ``micro_batch``.
        hi: the upper bound; default the model's maximum (seq_len) or :data:`MICRO_BATCH_MAX`.
        step: grid spacing; default :data:`DEFAULT_STEP`.

    Raises:
        FrontierError: an unknown ``vary``, bounds out of range, or a seq_len frontier over data whose rows do not
            all have seq_len tokens (the probe would not measure that length).
    """
    if vary not in VARIES:
        raise FrontierError(f"--vary {vary!r}: one of {', '.join(VARIES)}")
    if vary == "seq_len" and not (sc.data.source == "synthetic" and sc.data.lengths == "fixed") \
            and not sc.data.packing:
        raise FrontierError("--vary seq_len needs rows of exactly seq_len tokens: synthetic data with lengths "
                            "fixed, or packing")
    top = model_max_positions(sc) if vary == "seq_len" else MICRO_BATCH_MAX
    hi = top if hi is None else hi
    step = DEFAULT_STEP[vary] if step is None else step
    lo = MIN_VALUE[vary]
    if vary == "seq_len" and hi > top:
        raise FrontierError(f"--max {hi}: beyond the model's maximum seq_len ({top})")
    if not lo <= hi:
        raise FrontierError(f"--max {hi}: below the smallest {vary} ({lo})")
    if step < 1:
        raise FrontierError(f"--step {step}: must be at least 1")
    return Grid(vary, lo, hi, step)


def probe_name(base: str, budget: float, vary: str, value: int) -> str:
    """The derived scenario's name: its sweeps are ``<name>-<time>`` under the frontier folder."""
    return f"{base[:60]}.{budget:g}gib.{vary}{value}"


def probe_scenario(sc: Scenario, budget: float, vary: str, value: int) -> Scenario:
    """The scenario of one probe: ``sc`` under ``budget`` GiB with ``vary`` set to ``value``, one repeat."""
    sections: dict[str, dict[str, Any]] = {"hardware": {"memory_budget_gib": budget}, "measure": {"repeats": 1}}
    if vary == "seq_len":
        data = {"seq_len": value}
        if sc.data.min_len is not None and sc.data.min_len > value:
            data["min_len"] = value
        sections["data"] = data
    else:
        sections["train"] = {"micro_batch": value}
    return derive(sc, probe_name(sc.name, budget, vary, value), **sections)


def outcome(run: RunResult) -> str:
    """:data:`FITS`, :data:`NO_FIT` (out of memory, or over its budget by NVML) or :data:`FAILED` (anything else)."""
    if run.status == STATUS_OOM:
        return NO_FIT
    if run.status == STATUS_OK:
        return NO_FIT if any(r.startswith(OVER_BUDGET) for r in run.invalid_reasons) else FITS
    return FAILED


# ----------------------------------------------------------------------------------------------------------------
# the frontier folder


def find_frontier(sc: Scenario, grid: Grid, results_root: Path) -> Path | None:
    """The newest frontier folder of this scenario (same hash) over the same grid, or None."""
    cands = []
    for d in Path(results_root).glob(f"{sc.name}-frontier-*"):
        plan = results.read_json(d / PLAN_FILE)
        if plan and plan.get("scenario_hash") == sc.content_hash() and plan.get("grid") == _grid_dict(grid):
            cands.append((plan.get("created", ""), d))
    return max(cands)[1] if cands else None


def _grid_dict(grid: Grid) -> dict[str, Any]:
    return {"vary": grid.vary, "lo": grid.lo, "hi": grid.hi, "step": grid.step}


def open_frontier(sc: Scenario, grid: Grid, budgets: list[float], results_root: Path, new: bool = False) -> Path:
    """The frontier folder to fill: the newest one of this scenario and grid (its budgets extended), or a new one."""
    d = None if new else find_frontier(sc, grid, results_root)
    if d is None:
        results_root.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        d = results_root / f"{sc.name}-frontier-{now}"
        d.mkdir()
        results.atomic_write_text(d / "scenario.yaml", f"# resolved scenario of the frontier; source: "
                                  f"{sc.source_path}\n" + yaml.safe_dump(sc.to_dict(), sort_keys=False))
        plan = {"scenario": sc.name, "scenario_hash": sc.content_hash(), "scenario_source": sc.source_path,
                "created": now, "grid": _grid_dict(grid), "budgets": []}
    else:
        plan = results.read_json(d / PLAN_FILE) or {}
    plan["budgets"] = sorted({*plan.get("budgets", []), *budgets})
    results.atomic_write_text(d / PLAN_FILE, json.dumps(plan, indent=1))
    return d


# ----------------------------------------------------------------------------------------------------------------
# bisection


# The memory model that guides the search: the NVML peak of a fitting probe grows linearly with the value (frozen
# weights and optimizer state fixed, activations and logits per token). The search aims at the budget itself: a
# guess too high costs a probe that runs out of memory within its first step, one too low a whole run.
SLOW_STEPS = 2  # guided probes in a row that did not halve the bracket: bisect instead


def predicted_max(points: list[tuple[int, float]], budget: float) -> float | None:
    """The value at which the memory curve through the largest distinct fitting ``(value, peak GiB)`` points reaches
    ``budget``: a parabola through the three largest when it bends upwards (attention without a fused kernel,
    quadratic in the sequence), else the line through the two largest. None without two points or when the peak
    does not grow with the value."""
    pts = sorted(dict(sorted(points)).items())[-3:]  # the later (larger) peak of a repeated value
    if len(pts) < 2:
        return None
    (v1, p1), (v2, p2) = pts[-2:]
    if len(pts) == 3:
        (v0, p0) = pts[0]
        # the parabola through the three points (divided differences); its upward root beyond the largest point
        d1, d2 = (p1 - p0) / (v1 - v0), (p2 - p1) / (v2 - v1)
        curve = (d2 - d1) / (v2 - v0)
        if curve > 0:
            slope = d2 + curve * (v2 - v1)  # the parabola's slope at v2
            return v2 + (-slope + math.sqrt(slope * slope + 4 * curve * (budget - p2))) / (2 * curve) \
                if slope * slope + 4 * curve * (budget - p2) >= 0 else None
    slope = (p2 - p1) / (v2 - v1)
    if slope <= 0:
        return None
    return v2 + (budget - p2) / slope


@dataclass
class _Row:
    """One row's search at one budget: indices into the grid; ``lo`` fits (-1: none known), ``hi`` does not.

    The next probe is the index the memory model predicts (:func:`predicted_max`, from this row's fitting probes
    and their NVML peaks, this budget's first) kept strictly inside the bracket, or the bracket's midpoint when there
    is no model yet (fewer than two fitting probes with a peak: a CPU, the first probes) or when
    :data:`SLOW_STEPS` guided probes in a row did not halve the bracket (memory not linear in the value).
    """

    key: str
    lo: int
    hi: int
    lo_verified: bool
    stopped: str | None = None
    values: list[int] = field(default_factory=list)
    budget: float = 0.0
    points: list[tuple[int, float]] = field(default_factory=list)  # other budgets' fitting probes
    here: list[tuple[int, float]] = field(default_factory=list)  # this budget's
    slow: int = 0

    def _guess(self) -> int | None:
        v = predicted_max(self.here if len(dict(self.here)) >= 2 else self.points + self.here, self.budget)
        if v is None or self.slow >= SLOW_STEPS:
            return None
        i = max((j for j, x in enumerate(self.values) if x <= v * (1 + 1e-9)), default=0)  # float round-off
        return min(max(i, self.lo + 1), self.hi - 1)

    def next_index(self) -> int | None:
        if self.stopped:
            return None
        if self.hi - self.lo > 1:
            guess = self._guess()
            return guess if guess is not None else (self.lo + self.hi) // 2
        if self.lo >= 0 and not self.lo_verified:  # found under a smaller budget: measure it under this one
            return self.lo
        return None

    def record(self, index: int, result: str, reason: str | None, peak_gib: float | None = None) -> None:
        width = self.hi - self.lo
        guided = self.hi - self.lo > 1 and self._guess() is not None
        if result == FAILED:
            self.stopped = reason or "failed"
        elif result == FITS:
            self.lo, self.lo_verified = index, True
            if peak_gib is not None:
                self.here.append((self.values[index], peak_gib))
        elif index == self.lo:  # fitted under a smaller budget but not this one: search below it afresh
            self.hi, self.lo, self.lo_verified = index, -1, True
        else:
            self.hi = index
        if guided:  # a guess that ran out of memory overshot: bisect next; one that fitted but crept: count it
            self.slow = SLOW_STEPS if result == NO_FIT else self.slow + 1 if 2 * (self.hi - self.lo) > width else 0
        elif self.hi - self.lo < width:
            self.slow = 0


@dataclass
class ProbeLog:
    """What a frontier run did: every probe it needed, and whether it ran now or was found stored."""

    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ran(self) -> int:
        """Probes run by this invocation (not found stored)."""
        return sum(1 for p in self.probes if p["ran"])


def run_frontier(sc: Scenario, grid: Grid, budgets: list[float], results_root: Path, only: list[str] | None = None,
                 new: bool = False, retry_failed: bool = False, quiet: bool = False,
                 on_probe: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, ProbeLog]:
    """Find every row's frontier; each probe is a stored run (see the module docstring).

    Args:
        sc: the scenario (its own seq_len / micro_batch is replaced by each probe's value).
        grid: the values to try (:func:`make_grid`).
        budgets: memory budgets in GiB.
        results_root: where ``<scenario>-frontier-<time>/`` goes (``results/``).
        only: these framework rows only (default: all).
        new: start a new frontier folder even if one of this scenario and grid exists.
        retry_failed: redo probes stored as error, crashed or timeout (the failed attempt is kept).
        quiet: no progress display from the sweep runner.
        on_probe: called with each probe's record (framework, budget_gib, value, status, outcome, ran).

    Returns:
        The frontier folder and the log of probes.

    Raises:
        harness.spec.scenario.ScenarioError: a probe's scenario is not valid (e.g. a budget on a cpu).
        harness.running.locks.Busy: another sweep holds the machine.
    """
    values = grid.values()
    rows = [k for k in sc.framework_names() if not only or k in only]
    folder = open_frontier(sc, grid, budgets, Path(results_root), new=new)
    log = ProbeLog()
    stopped: dict[str, str] = {}
    best: dict[str, int] = {k: -1 for k in rows}
    points: dict[str, list[tuple[int, float]]] = {k: [] for k in rows}  # (value, NVML peak) of fitting probes
    for budget in sorted(set(budgets)):
        state = {k: _Row(k, best[k], len(values), lo_verified=best[k] < 0, stopped=stopped.get(k), values=values,
                         budget=budget, points=list(points[k])) for k in rows}
        while True:
            wanted: dict[int, list[str]] = {}
            for k, st in state.items():
                if (i := st.next_index()) is not None:
                    wanted.setdefault(i, []).append(k)
            if not wanted:
                break
            for i, keys in sorted(wanted.items()):
                probe_sc = probe_scenario(sc, budget, grid.vary, values[i])
                for k, (run, ran) in _probe(probe_sc, keys, folder, retry_failed, quiet).items():
                    result = outcome(run)
                    state[k].record(i, result, f"{run.status}: {run.reason}" if result == FAILED else None,
                                    run.metrics.peak_vram_nvml_gib)
                    rec = {"framework": k, "budget_gib": budget, "value": values[i], "status": run.status,
                           "outcome": result, "reason": run.reason, "ran": ran}
                    log.probes.append(rec)
                    if on_probe:
                        on_probe(rec)
        for k, st in state.items():
            if st.stopped:
                stopped[k] = st.stopped
            best[k] = st.lo if st.lo_verified else -1
            points[k] += st.here
    return folder, log


def _probe(probe_sc: Scenario, keys: list[str], folder: Path, retry_failed: bool,
           quiet: bool) -> dict[str, tuple[RunResult, bool]]:
    """Each row's stored run of ``probe_sc`` and whether it ran now: stored ones are read, missing ones run."""
    stored = _stored(probe_sc, keys, folder)
    todo = [k for k in keys if k not in stored or (retry_failed and stored[k].status in runner.RETRYABLE)]
    if todo:
        runner.run_sweep(probe_sc, folder, quiet=quiet, only=todo, resume_only=True, retry_failed=retry_failed)
        stored = _stored(probe_sc, keys, folder)
    missing = [k for k in keys if k not in stored]
    if missing:  # the runner stores a row for every run it starts: a gap is a bug, not a measurement
        raise RuntimeError(f"no stored probe for {missing} of {probe_sc.name} in {folder}")
    return {k: (stored[k], k in todo) for k in keys}


def _stored(probe_sc: Scenario, keys: list[str], folder: Path) -> dict[str, RunResult]:
    d = runner.newest_sweep(probe_sc, folder)
    if d is None:
        return {}
    out = {}
    for k in keys:
        p = d / "runs" / f"{results.run_key(k, 0)}.json"
        if p.exists():
            out[k] = results.read_result(p)
    return out
