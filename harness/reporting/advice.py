"""What to use on a card of N GiB: every stored GPU sweep's and memory frontier's answer at one budget, side by side.

A report answers for one sweep; a team with a 24 GiB card asks across them: for each scenario and GPU stored under
``results/``, which row trains fastest within the budget (the sweep's "fastest at your budget" pick,
:mod:`harness.reporting.pareto`, with the same qualification rules), and from the memory frontiers, which row
reaches the longest context (or biggest micro-batch) within it (:func:`harness.analysis.frontier.frontier_cells`).

One answer per scenario and GPU: the newest sweep of that scenario on that GPU (a ratio is only ever read inside one
sweep), and the newest frontier folder. A frontier's answer is each side's longest value over every budget it probed
that is not above the asked one (a run capped at 12 GiB fits a 16 GiB card too), with the cap it ran under; its ratio
says when a search within the budget had not closed, or rows were not probed under the largest budget within it
(either side could still reach further). Nothing here measures: every figure is a stored run's, named by its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.analysis.frontier import Cell as FrontierCell
from harness.analysis.frontier import frontier_cells
from harness.reporting import pareto, quality, tables
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.reporting.frontier import REACHED
from harness.reporting.tool_best import switches_text
from harness.running.frontier_grid import FrontierError, read_plan
from harness.storing.history import sweep_created
from harness.storing.sweep import Sweep, is_results_dir, load_sweep

NOT_PROBED = "not probed"
SWEEP_HEADER = ["scenario", "GPU", "sweep", "rows run", "fastest row", "tool", "tokens/s", "NVML peak (GiB)",
                "its settings", "fastest peer row", "peer tokens/s", "tunebench best / peer best"]
FRONTIER_HEADER = ["scenario", "GPU", "frontier", "longest row", "tool", "longest", "under (GiB)", "tokens/s there",
                   "longest peer row", "peer longest", "peer under (GiB)", "tunebench longest / peer longest"]


@dataclass(frozen=True)
class SweepAnswer:
    """One scenario on one GPU: its newest sweep's pick at the budget."""

    sweep: Sweep
    gpu: str
    pick: pareto.BudgetPick
    left_out: dict[str, str]  # rows with runs that are not points (why)


@dataclass(frozen=True)
class FrontierAnswer:
    """One frontier scenario on one GPU: the longest tunebench and peer cells of its newest folder within the asked
    budget."""

    folder: Path
    scenario: str
    gpu: str
    vary: str
    ours: FrontierCell | None
    peer: FrontierCell | None
    probed: tuple[bool, bool]  # whether any tunebench row / any peer row was probed under a budget within the asked
    open_search: bool = False  # a cell within the budget whose search had not closed: the ratio may still move
    unprobed: tuple[float, int] | None = None  # (the largest budget within the asked, rows not probed there) if any

    @property
    def ratio(self) -> float | None:
        """tunebench's longest over the best peer's; None when either reached nothing."""
        if self.ours is None or self.peer is None or not self.peer.value:
            return None
        return self.ours.value / self.peer.value


def _matches(text: str, wanted: list[str] | None) -> bool:
    return not wanted or any(w.lower() in text.lower() for w in wanted)


def _newest(found: dict[tuple[str, str], tuple], key: tuple[str, str], item: tuple) -> None:
    if key not in found or item[0] > found[key][0]:
        found[key] = item


def sweep_answers(results_root: Path, budget_gib: float, scenarios: list[str] | None = None,
                  gpus: list[str] | None = None) -> list[SweepAnswer]:
    """The newest GPU sweep per (scenario, GPU) directly under ``results_root`` (a frontier's probes and a matrix's
    cells live one level down and are not sweeps of their own here), each with its pick at ``budget_gib``;
    ``scenarios``/``gpus`` keep those whose scenario name or GPU name contains one of the given texts."""
    newest: dict[tuple[str, str], tuple] = {}
    for d in sorted(Path(results_root).iterdir()):
        if not d.is_dir() or not is_results_dir(d):
            continue
        sweep = load_sweep(d)
        gpu = _gpu_of(sweep)
        if not sweep.runs or not pareto.is_gpu_sweep(sweep) or not _matches(sweep.name, scenarios) \
                or not _matches(gpu, gpus):
            continue
        _newest(newest, (sweep.name, gpu), (sweep_created(sweep), d.name, sweep))
    out = []
    for (_, gpu), (_, _, sweep) in sorted(newest.items()):
        summary, parity_df = tables.summary_frame(sweep), quality.parity_frame(sweep)
        pts, left_out = pareto.points(sweep, summary, parity_df)
        out.append(SweepAnswer(sweep, gpu, pareto.budget_picks(pts, (budget_gib,))[0], left_out))
    return out


def _gpu_of(sweep: Sweep) -> str:
    """The sweep's GPU: its environment.json's, else the first run's own record of its machine ("" when neither)."""
    names = [sweep.environment.gpu_name] + [r.environment.gpu_name for r in sweep.runs if r.environment]
    return next((n for n in names if isinstance(n, str) and n), "")


def _frontier_gpu(folder: Path) -> str:
    """The GPU of a frontier folder: its first probe's (every probe of one folder ran on one kind of machine)."""
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and is_results_dir(p)):
        if name := _gpu_of(load_sweep(d)):
            return name
    return ""


def _shown(path: Path) -> str:
    """A stored folder as a reader finds it: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _longest(cells: list[FrontierCell]) -> FrontierCell | None:
    """The cell with the largest value that trained (a closed search before an open one, then a measured one, then
    the one under the smaller budget)."""
    reached = [c for c in cells if c.state in REACHED and c.value is not None]
    return max(reached, key=lambda c: (c.value, c.state == "found", c.measured, -c.budget_gib)) if reached else None


def frontier_answers(results_root: Path, budget_gib: float, scenarios: list[str] | None = None,
                     gpus: list[str] | None = None) -> list[FrontierAnswer]:
    """The newest frontier folder per (scenario, GPU) under ``results_root``: tunebench's longest row and the longest
    peer row over every budget it probed that is at most ``budget_gib``."""
    newest: dict[tuple[str, str], tuple] = {}
    for d in sorted(Path(results_root).glob("*-frontier-*")):
        try:
            plan = read_plan(d)
        except FrontierError:  # not a frontier folder, or its plan is damaged: nothing to read
            continue
        scenario, gpu = str(plan.get("scenario") or d.name), _frontier_gpu(d)
        if gpu and _matches(scenario, scenarios) and _matches(gpu, gpus):
            _newest(newest, (scenario, gpu), (str(plan.get("created") or ""), d.name, d, plan))
    out = []
    for (scenario, gpu), (_, _, d, plan) in sorted(newest.items()):
        cells = [c for c in frontier_cells(d) if c.budget_gib <= budget_gib]
        top = max((c.budget_gib for c in cells), default=None)
        gaps = sum(1 for c in cells if c.budget_gib == top and c.state == NOT_PROBED)
        within = [c for c in cells if c.state != NOT_PROBED]
        ours = [c for c in within if c.tool == pareto.OURS]
        peers = [c for c in within if c.tool != pareto.OURS]
        out.append(FrontierAnswer(d, scenario, gpu, plan["grid"]["vary"], _longest(ours), _longest(peers),
                                  (bool(ours), bool(peers)), any(c.state == "incomplete" for c in within),
                                  (top, gaps) if gaps else None))
    return out


def _sweep_row(a: SweepAnswer) -> list[str | Cell]:
    ran = sum(1 for row in a.sweep.framework_order() if a.sweep.runs_of(row))
    head = [a.sweep.name, a.gpu or EMPTY, f"`{_shown(a.sweep.path)}`",
            f"{ran} of {len(a.sweep.framework_order())}"]
    f, peer = a.pick.fastest, a.pick.peer
    if f is None:
        return head + [Cell(pareto.NONE_FITS, "warn")] + [EMPTY] * (len(SWEEP_HEADER) - len(head) - 1)
    peer_cells = [peer.row, fmt(peer.tps, thousands=True)] if peer else ["no peer row fits", EMPTY]
    return head + [f.row, f.tool, fmt(f.tps, thousands=True), fmt(f.gib), switches_text(a.sweep, f.row)] \
        + peer_cells + [pareto.ratio_cell(a.pick)]


def _value(c: FrontierCell) -> str:
    return ("≥ " if c.state == "incomplete" else "") + fmt(c.value, thousands=True)


def _frontier_row(a: FrontierAnswer) -> list[str | Cell]:
    head = [a.scenario, a.gpu, f"`{_shown(a.folder)}`"]
    if not any(a.probed):
        return head + [Cell("no budget this low probed", "warn")] + [EMPTY] * (len(FRONTIER_HEADER) - len(head) - 1)
    best = max((c for c in (a.ours, a.peer) if c is not None), key=lambda c: c.value, default=None)
    if best is None:
        best_cells = [EMPTY, EMPTY, "none trains", EMPTY, EMPTY]
    else:
        tps = fmt(best.tokens_per_s, thousands=True) if best.measured and best.tokens_per_s else "not measured"
        best_cells = [best.framework, best.tool or EMPTY, _value(best), f"{best.budget_gib:g}", tps]
    peer = [a.peer.framework, _value(a.peer), f"{a.peer.budget_gib:g}"] if a.peer else \
        ["no peer row trains" if a.probed[1] else "no peer row probed", EMPTY, EMPTY]
    notes = ["a search within the budget not closed"] if a.open_search else []
    if a.unprobed:
        n = a.unprobed[1]
        notes.append(f"{n} row{'s' if n > 1 else ''} not probed under {a.unprobed[0]:g} GiB")
    ratio = f"{a.ratio:.2f}x" if a.ratio is not None else EMPTY
    return head + best_cells + peer + [ratio + (f" ({'; '.join(notes)})" if notes else "")]


def advice_doc(results_root: Path, budget_gib: float, scenarios: list[str] | None = None,
               gpus: list[str] | None = None) -> tuple[Doc, int]:
    """The answer at ``budget_gib`` as a document, and how many scenario-GPU answers it holds."""
    sweeps = sweep_answers(results_root, budget_gib, scenarios, gpus)
    fronts = frontier_answers(results_root, budget_gib, scenarios, gpus)
    doc = Doc(f"tunebench: what to use within {budget_gib:g} GiB")
    doc.p(f"From the runs stored under `{results_root}`: per scenario and GPU, the newest sweep's fastest row whose "
          f"NVML per-process peak is at most {budget_gib:g} GiB (the rules of each report's \"Fastest at your memory "
          "budget\" table), and the newest memory frontier's longest row under any budget it probed that is "
          f"not above {budget_gib:g} GiB (with the cap it ran under). Each ratio is read inside one sweep or one "
          "frontier, on one machine; "
          "`rows run`: the scenario's rows that the sweep ran (a sweep run with `--only` answers for those alone).")
    doc.h(1, "Fastest within the budget")
    if sweeps:
        doc.table(SWEEP_HEADER, [_sweep_row(a) for a in sweeps])
        left = [f"{a.sweep.path.name}: {row} ({why})" for a in sweeps for row, why in a.left_out.items()]
        if left:
            doc.p("Rows left out (not qualifying): " + "; ".join(left) + ".")
    else:
        doc.p("No GPU sweep matches.")
    doc.h(1, "Longest within the budget (memory frontiers)")
    if fronts:
        doc.table(FRONTIER_HEADER, [_frontier_row(a) for a in fronts])
        doc.p("`≥`: the search of that cell had not closed. `not measured`: found by search probes, not yet run "
              "alone. `python -m harness report results/<frontier>` has every row and budget.")
    else:
        doc.p("No memory frontier matches.")
    return doc, len(sweeps) + len(fronts)
