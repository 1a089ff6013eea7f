"""The values a memory frontier tries (:mod:`harness.running.frontier`): a grid from the smallest valid value to the
model's maximum (seq_len) or :data:`MICRO_BATCH_MAX`, checked before anything runs; and the frontier folder: the one
to fill (the newest of the same scenario and grid, or a new one) and its stored plan (grid and budgets), checked when
it is read back, with its probes made by older code set aside on request (:func:`set_aside_older`); the log of a
frontier's probes (:class:`ProbeLog`); and its time limit (:class:`Clock`)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from harness.inputs import models
from harness.measuring import flops
from harness.running.derive import derive
from harness.running.runner import (
    RETRYABLE,
    StopStarting,
    measured_elsewhere,
    newest_sweep,
    refuse_other_machine,
    run_sweep,
    set_aside_failed,
)
from harness.spec.scenario import MAX_BATCH, MAX_NAME, MAX_SEQ_LEN, Scenario, settings_hash_of
from harness.storing import results
from harness.storing.schema import RunResult
from harness.storing.sweep import StoredFileError, read_stored_mapping

VARIES = ("seq_len", "micro_batch")
MIN_VALUE = {"seq_len": 8, "micro_batch": 1}  # the schema's smallest valid values
DEFAULT_STEP = {"seq_len": 256, "micro_batch": 1}  # seq_len: a bisection to the token is ~9 probes more, for nothing
MICRO_BATCH_MAX = 64  # the stated upper bound of a micro_batch frontier (--max changes it)
PLAN_FILE = "frontier.json"  # a frontier folder's plan: scenario, hash, grid, budgets


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
    if vary == "micro_batch" and hi > MAX_BATCH:
        raise FrontierError(f"--max {hi}: beyond the largest micro_batch a scenario takes ({MAX_BATCH})")
    if not lo <= hi:
        raise FrontierError(f"--max {hi}: below the smallest {vary} ({lo})")
    if step < 1:
        raise FrontierError(f"--step {step}: must be at least 1")
    return Grid(vary, lo, hi, step)


def read_plan(folder: Path) -> dict[str, Any]:
    """A frontier folder's stored plan (``frontier.json``), checked for the shape everything reading it relies on: a
    grid (``vary`` one of :data:`VARIES`, whole ``lo`` <= ``hi``, ``step`` >= 1) and a list of budgets (GiB > 0).

    Raises:
        FrontierError: no readable plan, or one of another shape (a damaged or foreign file).
    """
    path = Path(folder) / PLAN_FILE
    plan = results.read_json(path)
    if not plan:
        raise FrontierError(f"{path}: cannot be read as a frontier plan (not a JSON object: damaged?)" if path.exists()
                            else f"{folder}: not a frontier folder (no {PLAN_FILE})")
    g = plan.get("grid")
    ints = isinstance(g, dict) and all(isinstance(g.get(k), int) and not isinstance(g[k], bool)
                                       for k in ("lo", "hi", "step"))
    wrong = [] if ints and g.get("vary") in VARIES and 1 <= g["lo"] <= g["hi"] and g["step"] >= 1 else ["grid"]
    budgets = plan.get("budgets", [])
    if not (isinstance(budgets, list) and all(isinstance(b, int | float) and not isinstance(b, bool)
                                              and math.isfinite(b) and b > 0 for b in budgets)):
        wrong.append("budgets")
    wrong += [k for k in ("scenario", "scenario_hash", "scenario_source", "created")
              if plan.get(k) is not None and not isinstance(plan[k], str)]
    rows = plan.get("rows", {})
    if not (isinstance(rows, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in rows.items())):
        wrong.append("rows")
    if wrong:
        raise FrontierError(f"{path}: not a frontier plan ({', '.join(wrong)}: not of the shape "
                            "`python -m harness frontier` writes)")
    return plan



def find_frontier(sc: Scenario, grid: Grid, results_root: Path) -> Path | None:
    """The newest frontier folder of this scenario (same hash) over the same grid whose probes ran on this kind of
    machine; failing that, the newest one of another kind of GPU, which :func:`open_frontier` refuses (a frontier of
    this machine then takes ``--new``); or None. A damaged plan is never filled in: a new folder starts beside it."""
    here, elsewhere = [], []
    for d in Path(results_root).glob(f"{sc.name}-frontier-*"):
        try:
            plan = read_plan(d)
        except FrontierError:
            continue
        if plan.get("grid") == _grid_dict(grid) and (plan.get("scenario_hash") == sc.content_hash()
                                                      or _same_rows(d / "scenario.yaml", sc)):
            (elsewhere if measured_elsewhere(d) else here).append((plan.get("created", ""), d))
    found = here or elsewhere
    return max(found)[1] if found else None


def _same_rows(stored: Path, sc: Scenario) -> bool:
    """``sc`` measures what the frontier's stored scenario measured for every row the two share, and they share
    one: rows added to the scenario (or left out) leave the other rows' probes valid, as budgets added do."""
    try:
        d = read_stored_mapping(stored)
        names = [f.get("label") or f.get("name") for f in d["frameworks"]]
        shared = [k for k in sc.framework_names() if k in names]
        return bool(shared) and all(settings_hash_of(d, k) == sc.settings_hash(k) for k in shared)
    except (StoredFileError, KeyError, TypeError, AttributeError):  # a damaged copy: never filled in
        return False


def _grid_dict(grid: Grid) -> dict[str, Any]:
    return {"vary": grid.vary, "lo": grid.lo, "hi": grid.hi, "step": grid.step}


def open_frontier(sc: Scenario, grid: Grid, budgets: list[float], results_root: Path, new: bool = False) -> Path:
    """The frontier folder to fill: the newest one of this scenario and grid (its budgets extended), or a new one.

    Raises:
        harness.running.runner.OtherMachine: the folder found ran on another kind of GPU (nothing written)."""
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
        refuse_other_machine(d, "frontier")  # before its plan is touched
        plan = read_plan(d)
    plan["budgets"] = sorted({*plan.get("budgets", []), *budgets})
    # every row a scenario that opened the folder names (row -> tool), grown as budgets are: a row added to the
    # scenario since the folder began is in its table, not probed, before its first probe
    plan["rows"] = {f.key: f.name for f in sc.frameworks} | plan.get("rows", {})
    results.atomic_write_text(d / PLAN_FILE, json.dumps(plan, indent=1))
    return d


def probe_name(base: str, row: str, budget: float, vary: str, value: int, steps: int | None = None,
               shared: bool = False) -> str:
    """The derived scenario's name: its sweeps are ``<name>-<time>`` under the frontier folder, one per row, budget
    and value (and kind of probe: ``.s<steps>`` a shortened search probe, ``.shared`` one run beside others)."""
    name = f"{base[:40]}.{row.replace('+', 'p')}.{budget:g}gib.{vary}{value}"
    name += (f".s{steps}" if steps else "") + (".shared" if shared else "")
    if len(name) > MAX_NAME:  # a long row label: shortened, and kept apart from its neighbours by a hash
        name = f"{name[:MAX_NAME - 9]}.{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def probe_scenario(sc: Scenario, budget: float, vary: str, value: int, row: str | None = None,
                   steps: int | None = None, shared: bool = False) -> Scenario:
    """The scenario of one probe: ``sc`` under ``budget`` GiB with ``vary`` set to ``value``, one repeat, run for
    ``row`` (default: the first row); ``steps``: a search probe shortened to that many optimizer steps."""
    sections: dict[str, dict[str, Any]] = {"hardware": {"memory_budget_gib": budget}, "measure": {"repeats": 1}}
    if vary == "seq_len":
        data = {"seq_len": value}
        if sc.data.min_len is not None and sc.data.min_len > value:
            data["min_len"] = value
        sections["data"] = data
    else:
        sections["train"] = {"micro_batch": value}
    if steps:
        sections["train"] = {**sections.get("train", {}), "steps": steps,
                             "warmup_steps": min(sc.train.warmup_steps, steps - 1)}
    row = row or sc.framework_names()[0]
    return derive(sc, probe_name(sc.name, row, budget, vary, value, steps, shared), **sections)


# an adapter module's predicts_fit (adapters_for_tools/contract.py)
Prediction = Callable[[Scenario, dict[str, Any]], "bool | None"]


def predicted_indices(sc: Scenario, row: str, overrides: dict[str, Any], grid: Grid, budgets: list[float],
                      predict: Prediction) -> tuple[dict[float, int], str | None]:
    """Per budget, the grid index of the largest value that ``predict`` (a tool's own model, for a row that plans
    itself to the budget: its adapter module's ``predicts_fit``) says fits ``row``'s probe scenario there, found by
    bisecting its predictions (what fits is taken not to grow with the value); a budget where nothing is predicted to
    fit has none. ``overrides``: the row's, which ``predict`` is given. Returns the indices and, where the tool made no
    prediction or one failed, why (then none at all: the frontier's search goes on without them)."""
    values, out = grid.values(), {}
    for b in budgets:
        lo, hi = -1, len(values)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                fits = predict(probe_scenario(sc, b, grid.vary, values[mid], row), overrides)
            except Exception as e:  # noqa: BLE001 (a prediction only orders the probes; every answer is a run)
                return {}, f"{row}: no prediction ({type(e).__name__}: {e})"[:300]
            if fits is None:
                return {}, f"{row}: its tool predicts nothing for this scenario"
            lo, hi = (mid, hi) if fits else (lo, mid)
        if lo >= 0:
            out[b] = lo
    return out, None


@dataclass
class ProbeLog:
    """What a frontier run did: every probe it needed, and whether it ran now or was found stored."""

    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ran(self) -> int:
        """Probes run by this invocation (not found stored)."""
        return sum(1 for p in self.probes if p["ran"])

    @property
    def distinct(self) -> int:
        """Stored probes the answers rest on (one read twice, as a search's start and as a measurement, once)."""
        return len({p["run_id"] or (p["framework"], p["budget_gib"], p["value"], p["phase"]) for p in self.probes})


class TimeUp(StopStarting):
    """The frontier's time limit: its next probe would end past it. Every probe it finished is stored."""


def step_work(sc: Scenario, vary: str) -> Callable[[int], float]:
    """A training step's model FLOPs at each value of ``vary`` (:func:`harness.measuring.flops.train_flops`: the
    attention's share grows with seq_len), for :class:`Clock` to scale one probe's time to another value; proportional
    to the value where the model's config cannot be read."""
    try:
        cfg = (dict(models.get_preset(sc.model.preset).config) if sc.model.preset is not None
               else models.load_config_dict(sc.model.weights))
        flops.train_flops(cfg, sc.method.kind, 1, 1)
    except Exception:  # noqa: BLE001 (a checkpoint not at hand, an unknown architecture: the linear estimate)
        return float
    seq, batch, accum = sc.data.seq_len, sc.train.micro_batch, sc.train.grad_accum

    def work(v: int) -> float:
        s, b = (v, batch) if vary == "seq_len" else (seq, v)
        return flops.train_flops(cfg, sc.method.kind, s * b * accum, s * s * b * accum)

    return work


FASTEST_MFU = 0.6  # above every row's MFU measured here (the best, ~54 %): a floor under a probe's steps
# under every long row's MFU measured here (hf at 4,096 tokens ~21 %, host-offloading rows 25-35 %): the slowest
# rate a line between two probes may extend at (a slope steeper than that is the probes' fixed costs and noise)
SLOWEST_MFU = 0.1


def fastest_steps(work: Callable[[int], float], steps: int, gpu_name: str | None) -> Callable[[int], float]:
    """Seconds ``steps`` training steps at a value take at the least: their model FLOPs (``work``, from
    :func:`step_work`) at :data:`FASTEST_MFU` of the GPU's datasheet bf16 peak; 0 where the GPU has no table entry
    or the model's config could not be read (``work`` is then ``float``). The :class:`Clock`'s floor where a row's
    own probes say too little."""
    peak, _ = flops.peak_tflops_for(gpu_name)
    if peak is None or work is float:
        return lambda v: 0.0
    return lambda v: steps * work(v) / (FASTEST_MFU * peak * 1e12)


@dataclass
class _Timed:
    value: int
    wall_s: float
    trained: bool


@dataclass
class Clock:
    """``--time-limit-s``: no probe starts that would end past ``limit_s`` seconds after the frontier started (the
    probes going on finish).

    A probe's expected time comes from its row's probes of the same kind (search, or measured alone) that this
    invocation ran or read, and is the longest of two things. Each probe at its own time (where it trained, its part
    beyond the shortest probe, the fixed part of starting the tool and loading the model, times ``scale``; where it
    trained at a larger value, also times the step's work here over there: a run at 131,072 tokens says little of
    one at 51,200, whose steps cost a fifth of its). And the
    line in ``work`` (a step's FLOPs at a value) through the row's two largest values below the next one where a
    probe trained, extended to it (its slope never below 0, and never steeper than the steps at :data:`SLOWEST_MFU`
    of the peak: ``floor`` times FASTEST_MFU / SLOWEST_MFU). The difference of two probes leaves out what does not
    grow with the value, which at small values is nearly all of a probe: a probe of 8 tokens that took 17 s longer
    than one out of memory in loading says nothing of a step's cost at 10,000 tokens, so one probe alone is not
    scaled; and two probes at a few thousand tokens, 10 s apart from side-by-side load, would extend to 900 s at
    66,560 (Axolotl, 8B LoRA under 24 GiB): the ceiling keeps such a row searchable within a call. Under both,
    ``floor`` (a search probe's steps at the least, :func:`fastest_steps`; a measurement's, times ``scale``) after
    the fixed part, with or without probes to go by.
    A measurement with none of its kind yet: its row's search probes with their trained part times ``scale`` (a
    measurement's steps over a search probe's). With no probe to go by, the floor alone is the estimate (0 without a
    GPU: a probe starts while time is left). The invocation's first probe always starts: one expected to take longer
    than the whole limit would otherwise never run."""

    limit_s: float | None = None
    scale: float = 1.0
    work: Callable[[int], float] = float
    floor: Callable[[int], float] = field(default=lambda v: 0.0)
    t0: float = field(default_factory=time.monotonic)
    seen: dict[tuple[str, bool], list[_Timed]] = field(default_factory=dict)  # (row, alone) -> probes with a time
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0  # probes this invocation let start

    def saw(self, row: str, alone: bool, wall_s: float | None, value: int = 0, trained: bool = False) -> None:
        """A probe of ``row`` at ``value`` (``alone``: measured alone) took ``wall_s`` seconds (``trained``: it ran
        its steps; one out of memory did not)."""
        if wall_s is not None:
            with self.lock:
                self.seen.setdefault((row, alone), []).append(_Timed(value, wall_s, trained))

    def expected(self, row: str, alone: bool, value: int = 0) -> float:
        """Seconds the next probe of ``row`` at ``value`` is expected to take (0: nothing to go by)."""
        probes, scale, steps = self.seen.get((row, alone)), 1.0, self.scale if alone else 1.0
        if not probes and alone:
            probes, scale, steps = self.seen.get((row, False)), self.scale, 1.0
        least = self.floor(value) * (self.scale if alone else 1.0)
        if not probes:
            return least
        fixed = min(p.wall_s for p in probes)

        def own(p: _Timed) -> float:  # a probe's time; one that trained at a larger value, its steps at this work
            part = (p.wall_s - fixed) * (scale if p.trained else 1.0)
            if p.trained and p.value > value > 0 and (wp := self.work(p.value)) > 0:
                part *= min(self.work(value) / wp, 1.0)
            return fixed + part

        out = max(fixed + least, *(own(p) for p in probes))
        longest: dict[int, float] = {}  # value -> the longest probe that trained there, at values below the next
        for p in probes:
            if p.trained and 0 < p.value < value:
                longest[p.value] = max(longest.get(p.value, 0.0), p.wall_s)
        if len(longest) >= 2:
            (va, ta), (vb, tb) = sorted(longest.items())[-2:]
            if (dw := self.work(vb) - self.work(va)) > 0:
                slope = max(tb - ta, 0.0) / dw  # seconds per unit of a step's work
                if (w := self.work(value)) > 0 and (f := self.floor(value)) > 0:  # the probes' steps at the slowest
                    slope = min(slope, steps * f / w * FASTEST_MFU / SLOWEST_MFU)
                out = max(out, tb + slope * (self.work(value) * scale - self.work(vb)))
        return out

    def check(self, row: str, alone: bool, value: int = 0) -> None:
        """Raises :class:`TimeUp` where ``row``'s next probe of that kind, at ``value``, would end past the limit."""
        if self.limit_s is None:
            return
        with self.lock:
            expected = self.expected(row, alone, value)
            left = self.limit_s - (time.monotonic() - self.t0)
            if self.started and (left <= 0 or expected > left):
                raise TimeUp(f"{row}'s next probe would take about {expected:.0f} s, {max(left, 0):.0f} s of the "
                             f"time limit ({self.limit_s:g} s) left")
            self.started += 1


def set_aside_older(folder: Path, rows: list[str], code: dict[str, Any]) -> int:
    """``--redo-older``: the stored probes of ``rows`` made by other code than ``code`` (``git_sha`` and
    ``git_dirty``, as :func:`harness.measuring.environment.git_info` gives them) go to each probe's
    ``runs/attempts/``, kept on record, so those rows are searched again at this code; a probe whose run never
    started (no environment recorded) is left to ``--retry-failed``. Returns how many were set aside."""
    now = (code.get("git_sha"), bool(code.get("git_dirty")))
    moved = 0
    for d in sorted(p for p in Path(folder).iterdir() if (p / "runs").is_dir()):
        for f in sorted((d / "runs").glob("*.json")):
            run = results.read_json(f)
            env = run.get("environment") if isinstance(run, dict) else None
            if not isinstance(env, dict) or run.get("framework") not in rows:
                continue
            if (env.get("git_sha"), bool(env.get("git_dirty"))) != now:
                moved += len(set_aside_failed(d, [f.stem], also=lambda _: True))
    return moved


def stored_probe(probe_sc: Scenario, k: str, folder: Path) -> RunResult | None:
    """Row ``k``'s stored run of the probe scenario ``probe_sc`` in ``folder`` (its newest sweep), or None. A probe
    stored while the scenario had other rows counts where ``k``'s own settings are the same (its run's
    ``settings_hash``): a row added to a frontier's scenario does not make the others' probes run again."""
    key = f"{results.run_key(k, 0)}.json"
    d = newest_sweep(probe_sc, folder)
    if d is not None and (d / "runs" / key).exists():
        return results.read_result(d / "runs" / key)
    want, found = probe_sc.settings_hash(k), []
    for c in Path(folder).glob(f"{probe_sc.name}-*"):
        meta = results.read_json(c / "sweep.json")
        if meta and (c / "runs" / key).exists():
            run = results.read_result(c / "runs" / key)
            if run is not None and run.settings_hash == want:
                found.append((str(meta.get("created", "")), run))
    return max(found, key=lambda x: x[0])[1] if found else None


def run_probe(sc: Scenario, k: str, budget: float, vary: str, value: int, folder: Path, retry_failed: bool,
              quiet: bool, steps: int | None, shared: bool,
              before_run: Callable[[], None]) -> tuple[RunResult, bool]:
    """Row ``k``'s stored probe at (``budget``, ``value``) and whether it ran now. An exact probe stored earlier
    (one at a time, the scenario's steps) answers any search probe; otherwise the probe of this kind is read, or
    run when missing (``before_run`` first: the time limit's check)."""
    kinds = [(steps, shared)] if (steps, shared) == (None, False) else [(None, False), (steps, shared)]
    for st, sh in kinds:
        p_sc = probe_scenario(sc, budget, vary, value, k, st, sh)
        run = stored_probe(p_sc, k, folder)
        if run is not None and not (retry_failed and run.status in RETRYABLE):
            return run, False
    before_run()
    run_sweep(p_sc, folder, quiet=quiet, only=[k], resume_only=True, retry_failed=retry_failed,
              allow_contention=shared)
    run = stored_probe(p_sc, k, folder)
    if run is None:  # the runner stores a row for every run it starts: a gap is a bug, not a measurement
        raise RuntimeError(f"no stored probe for {k} of {p_sc.name} in {folder}")
    return run, True
