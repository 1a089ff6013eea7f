"""The memory frontier: per framework row and memory budget, the largest seq_len (or micro-batch) that trains.

``python -m harness frontier SCENARIO --vary seq_len --budgets 8,12,16,24,40,80`` (harness.cli.frontier) runs
this. For each row and budget the largest value of a grid (``lo``, multiples of ``step``, ``hi``) that trains
the scenario's steps within the budget is found by a search of the grid, with running out of memory as the
signal: a probe that ends ``oom``, or ok but above its budget by NVML (:data:`harness.measuring.memcap.OVER_BUDGET`),
does not fit; an ok probe fits. Memory use is taken to grow with the value and to shrink with the budget, so
each row does its budgets smallest first and each starts from the value found under the one below it (verified by a
probe at the new budget; with :class:`Probing`'s cheaper search, by the cell's measurement alone instead, when no
larger value fits). Rows are independent of each other.

The search bisects until it knows two fitting probes of the row with what they needed (:func:`need_gib`: torch's
allocated peak plus the process's memory outside torch); from then on it probes
where the line through them reaches the budget (:func:`predicted_max`), inside the bracket, and bisects again if
that stops halving the bracket. On an 8B model a probe costs most of a minute, and a bisection of a 131,072-token
grid ~9 probes per budget; the line puts each later budget's answer within a step or two, so the frontier of a
row over six budgets takes ~15 probes instead of ~55. A row that plans itself to the budget (:func:`follows_budget`)
is bisected: it fills the budget whatever the value, so what its probes needed draws no line (on the H100 a
line through tunebench's planned LoRA row crept up a step at a time, ten probes where a bisection takes seven). Its
tool's own prediction of the answer (its adapter's ``predicts_fit``, :func:`predicted_indices`) is probed first,
then the step past it; a right one closes the budget in two probes. Any row can be seeded so with another frontier's
answers (``seeds``: another machine's, where the cap makes the same answer likely): still two probes here per cell,
and with :class:`Probing`'s cheaper search the seed's is run alone first, as the cell's measurement too
(:func:`_measure_seeds`).

Each probe is an ordinary run of a derived scenario (:func:`probe_scenario`: the budget and the value set,
one repeat) stored by the sweep runner under the frontier's folder, ``results/<scenario>-frontier-<time>/``: one
sweep per row, budget and value. So a rerun finds every finished probe by its scenario's hash, starts each budget's
search from all of them (:meth:`_Row.seed`), and runs only what is missing; ``retry_failed`` redoes probes stored
as error, crashed, timeout or unavailable as ``run --retry-failed`` does. A probe that fails otherwise (error,
crash, timeout, unavailable, diverged) stops that row's search, at this budget and the ones above, with the reason;
the other rows go on.

By default each probe runs alone with the scenario's steps, so the probe at the largest fitting value is also the
cell's measurement. A probe answers "does it fit" long before it ends, and most of its minute is the tool starting
and loading the model, so :class:`Probing` can run the search cheaper: rows' probes side by side (``jobs``, within
the GPU's memory) and shortened (``steps``); each cell's largest fitting value is then measured alone, once per row
and value: a row that runs the same under every cap (:func:`follows_budget`) and found the same value under a
smaller budget keeps that budget's measurement (at the grid's top, the larger budgets then cost nothing). Such a
frontier goes a budget at a time: every row's search under it, then its answers measured (:func:`_measure_budgets`).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_for_tools import registry
from harness.measuring import environment
from harness.measuring.memcap import OVER_BUDGET
from harness.running import runner
from harness.running.frontier_grid import (  # noqa: F401 (the grid's names, where the frontier's users look)
    DEFAULT_STEP,
    MICRO_BATCH_MAX,
    MIN_VALUE,
    PLAN_FILE,
    VARIES,
    Clock,
    FrontierError,
    Grid,
    ProbeLog,
    TimeUp,
    fastest_steps,
    find_frontier,
    make_grid,
    model_max_positions,
    open_frontier,
    predicted_indices,
    probe_name,
    probe_scenario,
    read_plan,
    run_probe,
    set_aside_older,
    step_work,
    stored_probe,
)
from harness.running.frontier_search import (  # noqa: F401 (the search's names, where the frontier's users look)
    FAILED,
    FITS,
    NO_FIT,
    SECOND_POINT,
    SLOW_STEPS,
    _Row,
    _RowSearch,
    need_gib,
    predicted_max,
)
from harness.running.locks import machine_lock
from harness.spec.scenario import Scenario
from harness.storing.schema import STATUS_OK, STATUS_OOM, RunResult

SIDE_BY_SIDE = "search probes at a time"  # in the machine lock's note, which each shared probe records


def probing_flags(shortened_steps: set[int], contention: list[str],
                  measured_steps: frozenset[int] = frozenset()) -> str:
    """The ``--jobs``/``--probe-steps``/``--measure-steps`` that made a frontier's stored probes, from the steps of its
    shortened search probes, of its shortened measurements (alone, two steps or more timed) and the contention its
    shared probes recorded (the same flags find those probes again on a rerun). Without side by side or shortened
    search probes, shortened runs alone were the search itself (``--probe-steps``)."""
    jobs = {int(m.group(1)) for r in contention if (m := re.search(rf"(\d+) {SIDE_BY_SIDE}", r))}
    if measured_steps and not (jobs or shortened_steps):
        shortened_steps, measured_steps = set(measured_steps), frozenset()
    return (f" --jobs {max(jobs)}" if jobs else "") + \
        (f" --probe-steps {max(shortened_steps)}" if shortened_steps else "") + \
        (f" --measure-steps {max(measured_steps)}" if measured_steps else "")


def follows_budget(adapter: str | None, overrides: dict[str, Any]) -> bool:
    """Whether a row of ``adapter`` with ``overrides`` chooses its own settings from the memory budget (its
    adapter's ``budget_overrides``; an unknown adapter counts as doing so). Any other row runs the same under every
    cap: the cap only bounds its allocator, so a run that fitted under a smaller budget is a run within a larger one,
    and its speed there can only be the same or lower."""
    try:
        return adapter is None or registry.info(adapter).follows_budget(overrides)
    except KeyError:
        return True


def outcome(run: RunResult) -> str:
    """:data:`FITS`, :data:`NO_FIT` (out of memory, or over its budget by NVML) or :data:`FAILED` (anything else)."""
    if run.status == STATUS_OOM:
        return NO_FIT
    if run.status == STATUS_OK:
        return NO_FIT if any(r.startswith(OVER_BUDGET) for r in run.invalid_reasons) else FITS
    return FAILED


@dataclass
class Probing:
    """How the search probes run.

    ``jobs``: search probes of different rows at once (rows are independent); the memory budgets of the probes
    running together stay within ``capacity_gib`` (the GPU's memory; None: no limit, e.g. a simulated tool), and the
    first probe runs alone (it builds the checkpoint the others share). Such a probe measures the others' load, so
    it is stored as a ``.shared`` probe marked as measured under contention: it answers "does it fit", not "how fast".
    ``steps``: search probes shortened to that many optimizer steps (the memory peak comes with the first steps).
    Either way, every largest fitting value is then run once more alone with the scenario's own steps (a budget's
    answers before the next budget's search), the measurement its cell reports; when that run does not fit, the value
    below it is measured. ``measure_steps``: those measurements shortened to that many steps (fewer than the
    scenario's, at least its warmup steps and two timed), for cells whose whole run outlasts what a lent machine
    gives one command (the planned 8B row at 131,072 tokens: ~70 s a step); the table says so. ``search_first``:
    every budget's search before any measurement, so a machine lent for little time gives the longest-context
    answers at every budget first (the measurements follow, budget by budget, on the same or a later call).
    """

    jobs: int = 1
    steps: int | None = None
    capacity_gib: float | None = None
    measure_steps: int | None = None
    search_first: bool = False

    @property
    def exact(self) -> bool:
        """Search probes are measurements themselves (one at a time, the scenario's steps)."""
        return self.jobs <= 1 and not self.steps


MEASURE_TRIES = 3  # values measured below a largest fitting value whose full run did not fit, before giving up


def run_frontier(sc: Scenario, grid: Grid, budgets: list[float], results_root: Path, only: list[str] | None = None,
                 new: bool = False, retry_failed: bool = False, quiet: bool = False,
                 on_probe: Callable[[dict[str, Any]], None] | None = None,
                 probing: Probing | None = None, time_limit_s: float | None = None,
                 redo_older: list[str] | None = None,
                 seeds: dict[str, dict[float, int]] | None = None) -> tuple[Path, ProbeLog]:
    """Find every row's frontier; each probe is a stored run (see the module docstring).

    Args:
        sc: the scenario (its own seq_len / micro_batch is replaced by each probe's value).
        grid: the values to try (:func:`make_grid`).
        budgets: memory budgets in GiB.
        results_root: where ``<scenario>-frontier-<time>/`` goes (``results/``).
        only: these framework rows only (default: all).
        new: start a new frontier folder even if one of this scenario and grid exists.
        retry_failed: redo probes stored as error, crashed, timeout or unavailable (the failed attempt is kept).
        quiet: no progress display from the sweep runner.
        on_probe: called with each probe's record (framework, budget_gib, value, status, outcome, ran, phase).
        probing: concurrency and shortened search probes (:class:`Probing`; default: one exact probe at a time).
        time_limit_s: start no probe that would end past this many seconds (:class:`Clock`).
        redo_older: rows whose probes made by other code are set aside first (:func:`set_aside_older`).
        seeds: per row and budget, a value to probe first, then the step past it (another machine's answer there,
            ``--seed-from``; it overrides the tool's own prediction): it orders the probes, never answers a cell.

    Returns:
        The frontier folder and the log of probes.

    Raises:
        harness.spec.scenario.ScenarioError: a probe's scenario is not valid (e.g. a budget on a cpu).
        harness.running.locks.Busy: another sweep holds the machine.
        harness.running.runner.OtherMachine: the folder's probes ran on another kind of GPU.
        TimeUp: the time limit came before the frontier's end (the probes going on finished first).
    """
    probing, values = probing or Probing(), grid.values()
    measured, searched = probing.measure_steps or sc.train.steps, probing.steps or sc.train.steps
    gpu = environment.gpu_info()["gpu_name"] if time_limit_s is not None and sc.hardware.device == "cuda" else None
    work = step_work(sc, grid.vary)
    clock = Clock(time_limit_s, measured / searched, work, fastest_steps(work, searched, gpu))
    rows = [k for k in sc.framework_names() if not only or k in only]
    folder = open_frontier(sc, grid, budgets, Path(results_root), new=new)
    if redo_older and (n := set_aside_older(folder, redo_older, environment.git_info())):
        print(f"frontier: {n} probes of {', '.join(redo_older)} made by other code set aside", file=sys.stderr)
    log = ProbeLog()
    lock = threading.Lock()

    def probe(k: str, budget: float, i: int, phase: str) -> dict[str, Any]:
        shared = phase == "search" and probing.jobs > 1
        steps = probing.steps if phase == "search" else probing.measure_steps
        alone = phase != "search" or not (shared or steps)
        run, ran = run_probe(sc, k, budget, grid.vary, values[i], folder, retry_failed, quiet, steps, shared,
                             lambda: clock.check(k, alone, values[i]))
        clock.saw(k, alone, run.wall_s, values[i], run.status == STATUS_OK)
        result = outcome(run)
        rec = {"framework": k, "budget_gib": budget, "value": values[i], "status": run.status, "outcome": result,
               "reason": run.reason, "ran": ran, "phase": phase, "need_gib": need_gib(run.metrics),
               "run_id": run.run_id}
        with lock:
            log.probes.append(rec)
            if on_probe:
                on_probe(rec)
        return rec

    # when each answer is measured alone afterwards, that measurement verifies a value carried up from a smaller
    # budget (memory does not grow with the budget): no search probe at it first
    kinds = [(None, False)] if probing.exact else [(None, False), (probing.steps, probing.jobs > 1)]
    kinds += [(probing.measure_steps, False)] if probing.measure_steps and not probing.exact else []
    known = _known(sc, folder, rows, sorted(set(budgets)), grid.vary, values, kinds, log, clock,
                   probing.measure_steps)
    planned = {f.key for f in sc.frameworks if follows_budget(f.name, f.overrides)}
    seeded = {k: {b: max(bisect_right(values, v) - 1, 0) for b, v in s.items()} for k, s in (seeds or {}).items()}
    hints = {k: (_hints(sc, k, grid, sorted(set(budgets)), quiet) if k in planned else {}) | seeded.get(k, {})
             for k in rows}
    # a search probe has run (not found stored) in this invocation: the first one runs alone
    ran = not probing.exact and _measure_seeds({k: seeded[k] for k in rows if k in seeded}, sorted(set(budgets)),
                                               planned, known, probe)
    searches = {k: _RowSearch(k, sorted(set(budgets)), values, verify=probing.exact, known=known.get(k),
                              guided=k not in planned, hints=hints.get(k)) for k in rows}
    if probing.exact:
        for k, search in searches.items():
            while (nxt := search.next_probe()) is not None:
                _record(search, nxt[1], probe(k, *nxt, "search"))
        return folder, log
    tools = {f.key: f.name for f in sc.frameworks}
    same = {f.key: f.key not in planned for f in sc.frameworks}
    fitted: dict[str, set[int]] = {k: set() for k in searches}  # grid indices each row's measurements fitted at
    for budget in sorted(set(budgets)):
        # probes side by side hold the machine for the search (each is marked shared); one at a time, each its own
        with machine_lock(runner.machine_lock_dir(), folder, f"memory frontier {folder.name}, {probing.jobs} "
                          f"{SIDE_BY_SIDE}") if probing.jobs > 1 else contextlib.nullcontext():
            ran = _search_together(searches, probing, probe, budget, ran) or ran
        if not probing.search_first:
            _measure_budgets([budget], searches, tools, same, fitted, probe)
    if probing.search_first:
        _measure_budgets(sorted(set(budgets)), searches, tools, same, fitted, probe)
    return folder, log


def _hints(sc: Scenario, row: str, grid: Grid, budgets: list[float], quiet: bool) -> dict[float, int]:
    """The grid index per budget that ``row``'s tool predicts as its answer (:func:`predicted_indices`), for a row
    that plans itself to the budget; {} where its tool predicts nothing (said unless ``quiet``)."""
    f = next(f for f in sc.frameworks if f.key == row)
    if f.name not in registry.names():
        return {}
    try:  # the tool's adapter module (heavy: torch, the tool's own code), loaded in this process for its prediction
        predict = getattr(registry.load_adapter(f.name), "predicts_fit", None)
    except ImportError as e:  # its environment is not this process's: the search goes on without a prediction
        found, why = {}, f"{row}: no prediction here ({type(e).__name__}: {e})"[:300]
    else:
        found, why = predicted_indices(sc, row, f.overrides, grid, budgets, predict) if predict else ({}, None)
    if why and not quiet:
        print(f"frontier: {why}; its search bisects", file=sys.stderr)
    return found


def _measure_seeds(seeded: dict[str, dict[float, int]], budgets: list[float], planned: set[str],
                   known: dict[str, dict[float, list]],
                   probe: Callable[[str, float, int, str], dict[str, Any]]) -> bool:
    """Each seeded cell's value (another machine's answer, a grid index per row and budget) run alone first, as the
    cell's measurement: where it fits here, that run is also the search's probe there, which then probes only the
    step past it (two runs a cell, not three). A value known here already is left to the search, as is one that a
    row running the same under every cap (not in ``planned``) fitted under a smaller budget. Outcomes join
    ``known``; one out of time leaves its cell to the search. Returns whether a run was made (not found stored)."""
    ran = False
    for b in budgets:
        for k, at in seeded.items():
            mine = known.get(k, {})
            if (i := at.get(b)) is None or any(j == i for j, _, _ in mine.get(b, [])) or k not in planned and any(
                    (j, r) == (i, FITS) for bb, got in mine.items() if bb < b for j, r, _ in got):
                continue
            try:
                rec = probe(k, b, i, "measure")
            except TimeUp:
                continue
            ran = ran or rec["ran"]
            if rec["outcome"] != FAILED:  # a failure is the search's to meet (it stops the row there)
                known.setdefault(k, {}).setdefault(b, []).append((i, rec["outcome"], rec["need_gib"]))
    return ran


def _measure_budgets(budgets: list[float], searches: dict[str, _RowSearch], tools: dict[str, str],
                     same: dict[str, bool], fitted: dict[str, set[int]],
                     probe: Callable[[str, float, int, str], dict[str, Any]]) -> None:
    """Every answer under each of ``budgets`` in turn measured alone, once every row's search has closed there.
    Under a budget, each tool's row with the longest answer first, tools from the longest (the cells that the
    comparison of tools reads), then the other rows in the scenario's order. A row that runs the same under every
    cap (``same``) skips a value its measurement under a smaller budget fitted at (``fitted``, updated here). One
    out of time lets the others that fit run, under this and later budgets (each alone), then :class:`TimeUp`."""
    late: TimeUp | None = None
    for budget in budgets:
        found = {k: i for k, s in searches.items() if (i := s.found.get(budget)) is not None}
        # each tool's row with the longest answer (the first such row in the scenario's order), the longest first
        first = sorted({t: max((k for k in found if tools[k] == t), key=lambda k: found[k]) for t in
                        dict.fromkeys(tools[k] for k in found)}.values(), key=lambda k: -found[k])
        for k in first + [k for k in found if k not in first]:
            if same[k] and found[k] in fitted[k]:
                continue
            try:
                if (j := _measure(k, budget, found[k], probe)) is not None:
                    fitted[k].add(j)
            except TimeUp as e:  # a shorter measurement of another row or budget may still fit
                late = e
    if late is not None:
        raise late


def _record(search: _RowSearch, i: int, rec: dict[str, Any]) -> None:
    """Tell a row's search what its probe at grid index ``i`` found."""
    failed = rec["outcome"] == FAILED
    search.state.record(i, rec["outcome"], f"{rec['status']}: {rec['reason']}" if failed else None, rec["need_gib"])


def _search_together(searches: dict[str, _RowSearch], probing: Probing,
                     probe: Callable[[str, float, int, str], dict[str, Any]], upto: float,
                     ran: bool = False) -> bool:
    """Every row's search up to budget ``upto``, up to ``probing.jobs`` probes at once within
    ``probing.capacity_gib``. Until a probe has run (``ran``; one found stored does not count) one goes at a time:
    on a fresh machine the first builds the checkpoint the others read. A row whose next probe would outlast the time
    limit stops there and the others go on while theirs fit; then :class:`TimeUp`. Returns whether a probe ran."""
    waiting = {k: nxt for k, s in searches.items() if (nxt := s.next_probe(upto)) is not None}
    running: dict[Future, tuple[str, float, int]] = {}
    late: TimeUp | None = None
    with ThreadPoolExecutor(probing.jobs) as pool, runner.stop_runs_on_interrupt():
        while waiting or running:
            for k, (budget, i) in list(waiting.items()):
                in_use = sum(b for _, b, _ in running.values())
                room = probing.capacity_gib is None or in_use + budget <= probing.capacity_gib
                if len(running) >= (probing.jobs if ran else 1) or (running and not room):
                    break
                running[pool.submit(probe, k, budget, i, "search")] = (k, budget, i)
                del waiting[k]
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                k, budget, i = running.pop(fut)
                try:
                    rec = fut.result()  # a broken folder or an interrupt is the frontier's error
                except TimeUp as e:  # this row stops; the probes going on finish and are stored
                    late = e
                    continue
                ran = ran or rec["ran"]
                _record(searches[k], i, rec)
                if (nxt := searches[k].next_probe(upto)) is not None:
                    waiting[k] = nxt
    if late is not None:
        raise late
    return ran


def _measure(k: str, budget: float, i: int, probe: Callable[[str, float, int, str], dict[str, Any]]) -> int | None:
    """Row ``k``'s largest fitting value under ``budget`` (grid index ``i``) run alone with the scenario's steps;
    when that does not fit, the values below, up to :data:`MEASURE_TRIES` of them. Returns the index whose run
    fitted (None: none did, or one failed otherwise)."""
    for j in range(i, max(i - MEASURE_TRIES, -1), -1):
        result = probe(k, budget, j, "measure")["outcome"]
        if result != NO_FIT:
            return j if result == FITS else None
    return None


def _known(sc: Scenario, folder: Path, rows: list[str], budgets: list[float], vary: str, values: list[int],
           kinds: list[tuple[int | None, bool]], log: ProbeLog, clock: Clock,
           measure_steps: int | None = None) -> dict[str, dict[float, list]]:
    """Each row's stored probes of the given kinds (``(steps, shared)``) by budget: ``[(grid index, outcome, need)]``
    for :meth:`_Row.seed`, each added to ``log`` and its time to ``clock`` (as a measurement where it ran alone with
    the scenario's steps or ``measure_steps``). Failed ones are left to the search, which stops where it meets one.
    Sweep folders are ``<probe name>-<time>``: names are matched first, scenarios derived only for those."""
    names = {d.name[:-16] for d in folder.iterdir() if re.fullmatch(r".+-\d{8}-\d{6}", d.name)}
    out: dict[str, dict[float, list]] = {}
    for k in rows:
        for b in budgets:
            for i, v in enumerate(values):
                for st, sh in kinds:
                    if probe_name(sc.name, k, b, vary, v, st, sh) not in names:
                        continue
                    run = stored_probe(probe_scenario(sc, b, vary, v, k, st, sh), k, folder)
                    if run is None or (result := outcome(run)) == FAILED:
                        continue
                    clock.saw(k, not sh and st in (None, measure_steps), run.wall_s, v, run.status == STATUS_OK)
                    out.setdefault(k, {}).setdefault(b, []).append((i, result, need_gib(run.metrics)))
                    log.probes.append({"framework": k, "budget_gib": b, "value": v, "status": run.status,
                                       "outcome": result, "reason": run.reason, "ran": False, "phase": "known",
                                       "need_gib": need_gib(run.metrics), "run_id": run.run_id})
    return out
