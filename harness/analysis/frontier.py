"""The frontier table from a frontier folder's stored probes: per framework and budget, the largest value that
trained and its tokens/s (``frontier.csv``, ``frontier.md``).

Read only from stored results (every probe sweep under ``results/<scenario>-frontier-<time>/``, each probe's
budget and value taken from its sweep's stored scenario), so the table can be rebuilt at any time, also from an
interrupted frontier. A cell's ``state``:

- ``found``: the largest fitting value is the grid's top, or the next grid value ran out of memory (its tokens/s and
  memory come from the run at that value made alone with the scenario's steps, or with fewer where the frontier
  shortened its measurements (``--measure-steps``: ``measured_steps`` says how many; at least two were timed);
  ``measured`` false until that run exists, when the search probes ran side by side or shortened);
- ``incomplete``: a value fits but the bisection has not closed above it (the frontier was interrupted).

A value that fits under a smaller budget fits here (a cap only bounds the allocator) unless a probe here says no. For
a row that runs the same under every cap (:func:`harness.running.frontier.follows_budget`), a run made alone at that
value under a smaller budget is also this cell's measurement (``measured_at_gib`` says which budget): the frontier
does not run it again.
- ``none fits``: only out-of-memory probes at this budget, and nothing fitted under a smaller one;
- ``stopped``: a probe failed otherwise (error, crash, timeout, ...), here or under a smaller budget;
- ``not probed``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.running.frontier import FAILED, FITS, NO_FIT, Grid, follows_budget, outcome, read_plan
from harness.running.runner import CONTENTION
from harness.storing import results
from harness.storing.schema import RunResult
from harness.storing.sweep import StoredFileError, is_results_dir, load_sweep, read_stored_mapping

COLUMNS = ("framework", "tool", "budget_gib", "vary", "value", "state", "measured", "tokens_per_s",
           "peak_vram_nvml_gib", "peak_reserved_gib", "valid", "next_oom_value", "probes", "reason",
           "measured_at_gib", "code", "measured_steps")


@dataclass
class Cell:
    """One framework at one budget (a row of ``frontier.csv``)."""

    framework: str
    tool: str | None  # the adapter the row runs (rows of one tool share it)
    budget_gib: float
    vary: str
    value: int | None  # the largest value that trained within the budget
    state: str  # see the module docstring
    measured: bool = False  # the figures below come from a run at ``value`` made alone with the scenario's steps
    tokens_per_s: float | None = None  # of the probe at ``value``
    peak_vram_nvml_gib: float | None = None
    peak_reserved_gib: float | None = None
    valid: bool | None = None  # the probe at ``value`` was valid (invalid reasons in ``reason``)
    next_oom_value: int | None = None  # the smallest value above ``value`` that did not fit
    probes: int = 0  # probes stored at this budget
    reason: str | None = None
    measured_at_gib: float | None = None  # the budget the measurement ran under (a smaller one: see the docstring)
    code: str | None = None  # the commits the probes at this budget ran, short, space-separated, in order of first use
    measured_steps: int | None = None  # the measurement's optimizer steps, where fewer than the scenario's


@dataclass
class _Probe:
    budget: float
    value: int
    run: RunResult
    exact: bool = True  # run alone with the scenario's steps, or shortened with two timed: a measurement
    steps: int | None = None  # a shortened probe's optimizer steps (None: the scenario's)


def read_probes(folder: Path) -> tuple[dict[str, Any], list[_Probe]]:
    """The frontier's plan (``frontier.json``) and every stored probe under ``folder``."""
    plan = read_plan(folder)
    vary = plan["grid"]["vary"]
    steps = (_frontier_scenario(Path(folder)).get("train") or {}).get("steps")
    probes = []
    for d in sorted(p for p in Path(folder).iterdir() if is_results_dir(p)):
        sweep = load_sweep(d)
        budget = (sweep.scenario.get("hardware") or {}).get("memory_budget_gib")
        section = "data" if vary == "seq_len" else "train"
        value = (sweep.scenario.get(section) or {}).get(vary)
        if not (isinstance(budget, int | float) and isinstance(value, int)) or isinstance(value, bool):
            continue  # not a probe (or its stored scenario is damaged: load_sweep named it)
        train = sweep.scenario.get("train") or {}
        own = train.get("steps")
        short = steps is not None and own != steps
        # a shortened run alone measures where two of its steps are timed (frontier --measure-steps)
        timed = isinstance(own, int) and own - (train.get("warmup_steps") or 0) >= 2
        probes += [_Probe(float(budget), int(value), r,
                          (not short or timed) and not any(x.startswith(CONTENTION) for x in r.invalid_reasons),
                          own if short else None)
                   for r in sweep.runs]
    return plan, probes


def frontier_cells(folder: Path) -> list[Cell]:
    """Every (framework, budget) cell of a frontier folder, budgets ascending: every row the frontier's scenario
    names, in its order, then the rows a later scenario added (the plan's ``rows``), then any other row that has
    probes. A row left out of every invocation (``--only``) is ``not probed`` at every budget: a table or verdict over
    the scenario's rows must not read as if it had been tried."""
    plan, probes = read_probes(folder)
    g = plan["grid"]
    values = Grid(g["vary"], g["lo"], g["hi"], g["step"]).values()
    named = _scenario_rows(Path(folder))
    named |= {k: v for k, v in plan.get("rows", {}).items() if k not in named}
    frameworks = list(dict.fromkeys([*named, *(p.run.framework for p in probes)]))
    budgets = sorted({float(b) for b in plan.get("budgets", [])} | {p.budget for p in probes})
    out = []
    for fw in frameworks:
        stopped: str | None = None
        floor: int | None = None  # the largest value that fitted under a smaller budget
        row = [p for p in probes if p.run.framework == fw]
        same_under_every_cap = not any(follows_budget(p.run.adapter, p.run.overrides) for p in row)
        for budget in budgets:
            mine = [p for p in row if p.budget == budget]
            earlier = [p for p in row if p.budget < budget and p.exact and outcome(p.run) == FITS] \
                if same_under_every_cap else []
            cell = _cell(fw, budget, g["vary"], mine, values, stopped, floor, earlier)
            cell.tool = cell.tool or named.get(fw)
            stopped = stopped or (cell.reason if cell.state == "stopped" else None)
            if cell.state in ("found", "incomplete") and cell.value is not None:
                floor = max(floor or 0, cell.value)
            out.append(cell)
    return out


def _frontier_scenario(folder: Path) -> dict[str, Any]:
    try:
        sc = read_stored_mapping(folder / "scenario.yaml")
    except StoredFileError:
        return {}
    return sc if isinstance(sc, dict) else {}


def _scenario_rows(folder: Path) -> dict[str, str | None]:
    """The rows the frontier's stored scenario names, in its order: label (or name) -> the tool it runs."""
    rows = _frontier_scenario(folder).get("frameworks")
    return {f.get("label") or f.get("name"): f.get("name") for f in rows if isinstance(f, dict)} \
        if isinstance(rows, list) else {}


def _cell(fw: str, budget: float, vary: str, probes: list[_Probe], values: list[int], stopped: str | None,
          floor: int | None = None, earlier: list[_Probe] | None = None) -> Cell:
    """One cell from the row's probes at this budget; ``floor``: the largest value that fitted under a smaller
    budget; ``earlier``: the row's measurements that fitted under smaller budgets, when its runs stand for every
    cap."""
    cell = Cell(fw, probes[0].run.adapter if probes else None, budget, vary, None, "not probed", probes=len(probes))
    order = sorted(probes, key=lambda p: p.run.launched_at or 0.0)
    codes = dict.fromkeys(c for p in order if p.run.environment and (c := p.run.environment.code()))
    cell.code = " ".join(codes) or None
    by_value: dict[int, list[_Probe]] = {}
    for p in probes:
        by_value.setdefault(p.value, []).append(p)
    # at each value the runs made alone with the scenario's steps decide; search probes only where there are none
    decisive = [p for ps in by_value.values() for p in ([q for q in ps if q.exact] or ps)]
    fits = [p for p in decisive if outcome(p.run) == FITS]
    no_fit = sorted(p.value for p in decisive if outcome(p.run) == NO_FIT)
    failed = [p for p in decisive if outcome(p.run) == FAILED]
    # a value that fitted under a smaller budget, unless a probe here says no; with no probe here at all, only the
    # grid's top (nothing above it to search)
    carried = floor is not None and floor not in no_fit and (bool(probes) or floor == values[-1])
    reached = [p.value for p in fits] + ([floor] if carried else [])
    if reached:
        cell.value = max(reached)
        cell.next_oom_value = next((v for v in no_fit if v > cell.value), None)
        above = [v for v in values if v > cell.value]
        cell.state = "found" if not above or cell.next_oom_value == above[0] else "incomplete"
        here = sorted((p for p in fits if p.value == cell.value and p.exact), key=lambda p: -(p.steps or 1 << 30))
        top = here[0] if here else max((p for p in earlier or [] if p.value == cell.value), default=None,
                                       key=lambda p: p.budget)
        if top is not None:
            m = top.run.metrics
            cell.measured, cell.tokens_per_s, cell.valid = True, m.tokens_per_s, top.run.valid
            cell.peak_vram_nvml_gib, cell.peak_reserved_gib = m.peak_vram_nvml_gib, m.peak_reserved_gib
            cell.measured_at_gib, cell.measured_steps = top.budget, top.steps
            cell.tool = cell.tool or top.run.adapter
            if not top.run.valid:
                cell.reason = "invalid: " + "; ".join(top.run.invalid_reasons)
    elif no_fit:
        cell.state, cell.next_oom_value = "none fits", no_fit[0]
    if failed:
        p = failed[0]
        cell.state, cell.reason = "stopped", f"{vary} {p.value}: {p.run.status}: {p.run.reason}"
    elif stopped and not probes:
        cell.state, cell.reason = "stopped", f"under a smaller budget: {stopped}"
    return cell


def to_csv(cells: list[Cell]) -> str:
    """``frontier.csv``: one row per (framework, budget), :data:`COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for c in cells:
        w.writerow(asdict(c))
    return buf.getvalue()


def to_markdown(cells: list[Cell], title: str) -> str:
    """``frontier.md``: frameworks x budgets, each cell the largest value and its tokens/s."""
    budgets = sorted({c.budget_gib for c in cells})
    frameworks = list(dict.fromkeys(c.framework for c in cells))
    by = {(c.framework, c.budget_gib): c for c in cells}
    vary = cells[0].vary if cells else "value"
    lines = [f"# {title}", "",
             f"Largest {vary} that trains the scenario's steps within each memory budget (bisection, out of memory "
             "as the signal), and tokens/s there, measured alone with the scenario's steps. `≥`: interrupted before "
             "the search closed; `*`: the run was invalid (reasons below); `not measured`: found by search probes "
             "(side by side or shortened) and not yet run alone; `run under N GiB`: measured under that smaller "
             "budget (the row runs the same under every cap); `N steps`: measured with N steps, fewer than the "
             "scenario's (two or more timed).", "",
             "| framework | " + " | ".join(f"{b:g} GiB" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    notes = []
    for fw in frameworks:
        row = []
        for b in budgets:
            c = by.get((fw, b))
            row.append(cell_text(c) if c else "—")
            if c and c.reason:
                notes.append(f"- {fw} at {b:g} GiB: {c.reason}")
        lines.append(f"| {fw} | " + " | ".join(row) + " |")
    if notes:
        lines += ["", *notes]
    if by_code := cells_by_code(cells):
        lines += ["", f"{MIXED_CODE}:", *(f"- {x}" for x in by_code)]
    return "\n".join(lines) + "\n"


MIXED_CODE = "Probes ran at more than one commit of the code"


def cells_by_code(cells: list[Cell]) -> list[str]:
    """Where a frontier's probes ran at more than one commit, which cells each commit's probes made, one line per
    commit (a change of the code between invocations may move a row's answer; each run records its commit); else
    nothing."""
    by_code: dict[str, dict[float, list[str]]] = {}
    for c in cells:
        for code in (c.code or "").split():
            by_code.setdefault(code, {}).setdefault(c.budget_gib, []).append(c.framework)
    if len(by_code) < 2:
        return []
    every = list(dict.fromkeys(c.framework for c in cells))
    return [f"{code}: " + "; ".join(f"{b:g} GiB: " + ("every row" if rows == every else ", ".join(rows))
                                    for b, rows in sorted(budgets.items()))
            for code, budgets in by_code.items()]


def cell_text(c: Cell) -> str:
    """A cell as the tables show it: the largest value and its tokens/s, or what happened."""
    if c.state in ("found", "incomplete") and c.value is not None:
        under = f", run under {c.measured_at_gib:g} GiB" \
            if c.measured_at_gib is not None and c.measured_at_gib != c.budget_gib else ""
        steps = f", {c.measured_steps} steps" if c.measured_steps else ""
        speed = f" ({c.tokens_per_s:,.0f} tok/s{steps}{under})" if c.tokens_per_s is not None else \
            f" ({under[2:]})" if under else "" if c.measured else " (not measured)"
        mark = "≥ " if c.state == "incomplete" else ""
        return f"{mark}{c.value:,}{speed}{'' if c.valid or not c.measured else ' *'}"
    if c.state == "none fits":
        return f"none ({c.next_oom_value:,} out of memory)" if c.next_oom_value is not None else "none"
    return c.state


def write_frontier_table(folder: Path) -> tuple[Path, Path]:
    """Write ``frontier.csv`` and ``frontier.md`` into the frontier folder (derived data: rebuilt each time).

    Returns:
        The two paths.
    """
    folder = Path(folder)
    cells = frontier_cells(folder)
    csv_path, md_path = folder / "frontier.csv", folder / "frontier.md"
    results.atomic_write_text(csv_path, to_csv(cells))
    results.atomic_write_text(md_path, to_markdown(cells, f"Memory frontier: {folder.name}"))
    return csv_path, md_path
