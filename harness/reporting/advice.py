"""What to use on a card of N GiB: every stored GPU sweep's and memory frontier's answer at one budget, side by side.

A report answers for one sweep; a team with a 24 GiB card asks across them: for each scenario and GPU stored under
``results/``, which row trains fastest within the budget (the sweep's "fastest at your budget" pick,
:mod:`harness.reporting.pareto`, with the same qualification rules), and from the memory frontiers, which row
reaches the longest context (or biggest micro-batch) within it (:func:`harness.analysis.frontier.frontier_cells`).

One answer per scenario and GPU: the newest sweep of that scenario on that GPU (a ratio is only ever read inside one
sweep), and the newest frontier folder. A frontier answers at the largest budget it probed that is not above the
asked one (a value that trains under 16 GiB also trains under 20), and says which budget that was. Nothing here
measures: every figure is a stored run's, named by its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.analysis.frontier import Cell as FrontierCell
from harness.analysis.frontier import frontier_cells
from harness.reporting import pareto, quality, tables
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.reporting.tool_best import switches_text
from harness.running.frontier_grid import FrontierError, read_plan
from harness.storing.history import sweep_created
from harness.storing.sweep import Sweep, is_results_dir, load_sweep

REACHED = ("found", "incomplete")  # frontier cell states that hold a value that trained
NOT_PROBED = "not probed"
SWEEP_HEADER = ["scenario", "GPU", "sweep", "rows run", "fastest row", "tool", "tokens/s", "NVML peak (GiB)",
                "its settings", "fastest peer row", "peer tokens/s", "tunebench best / peer best"]
FRONTIER_HEADER = ["scenario", "GPU", "frontier", "budget read (GiB)", "longest row", "tool", "longest",
                   "tokens/s there", "longest peer row", "peer longest", "tunebench longest / peer longest"]


@dataclass(frozen=True)
class SweepAnswer:
    """One scenario on one GPU: its newest sweep's pick at the budget."""

    sweep: Sweep
    gpu: str
    pick: pareto.BudgetPick
    left_out: dict[str, str]  # rows with runs that are not points (why)


@dataclass(frozen=True)
class FrontierAnswer:
    """One frontier scenario on one GPU: its newest folder's cells at the largest probed budget within the asked."""

    folder: Path
    scenario: str
    gpu: str
    vary: str
    budget_read: float | None  # None: the folder probed no budget at or below the asked one
    ours: FrontierCell | None
    peer: FrontierCell | None
    probed: tuple[bool, bool]  # whether any tunebench row / any peer row was probed at budget_read

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
        gpu = sweep.environment.gpu_name or ""
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


def _frontier_gpu(folder: Path) -> str:
    """The GPU of a frontier folder: its first probe's (every probe of one folder ran on one kind of machine)."""
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and is_results_dir(p)):
        name = load_sweep(d).environment.gpu_name
        if name:
            return name
    return ""


def _longest(cells: list[FrontierCell]) -> FrontierCell | None:
    reached = [c for c in cells if c.state in REACHED and c.value is not None]
    return max(reached, key=lambda c: (c.value, c.tokens_per_s or 0.0)) if reached else None


def frontier_answers(results_root: Path, budget_gib: float, scenarios: list[str] | None = None,
                     gpus: list[str] | None = None) -> list[FrontierAnswer]:
    """The newest frontier folder per (scenario, GPU) under ``results_root``, read at the largest budget it probed
    that is at most ``budget_gib``: tunebench's longest row and the longest peer row there."""
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
        cells = frontier_cells(d)
        under = [c.budget_gib for c in cells if c.budget_gib <= budget_gib and c.state != NOT_PROBED]
        read = max(under) if under else None
        ours = [c for c in cells if c.budget_gib == read and c.tool == pareto.OURS]
        peers = [c for c in cells if c.budget_gib == read and c.tool != pareto.OURS]
        probed = (any(c.state != NOT_PROBED for c in ours), any(c.state != NOT_PROBED for c in peers))
        out.append(FrontierAnswer(d, scenario, gpu, plan["grid"]["vary"], read, _longest(ours), _longest(peers),
                                  probed))
    return out


def _sweep_row(a: SweepAnswer) -> list[str | Cell]:
    ran = sum(1 for row in a.sweep.framework_order() if a.sweep.runs_of(row))
    head = [a.sweep.name, a.gpu or EMPTY, f"`results/{a.sweep.path.name}`",
            f"{ran} of {len(a.sweep.framework_order())}"]
    f, peer = a.pick.fastest, a.pick.peer
    if f is None:
        return head + [Cell(pareto.NONE_FITS, "warn")] + [EMPTY] * (len(SWEEP_HEADER) - len(head) - 1)
    peer_cells = [peer.row, fmt(peer.tps, thousands=True)] if peer else ["no peer row fits", EMPTY]
    if a.pick.ours is None:
        ratio = "no tunebench row fits"
    elif a.pick.ratio is None:
        ratio = EMPTY
    else:
        ratio = f"{a.pick.ratio:.2f}x" + (f" ({a.pick.ours.row})" if a.pick.ours.row != f.row else "")
    return head + [f.row, f.tool, fmt(f.tps, thousands=True), fmt(f.gib), switches_text(a.sweep, f.row)] \
        + peer_cells + [ratio]


def _value(c: FrontierCell | None, probed: bool) -> str:
    if c is None:
        return "none trains" if probed else NOT_PROBED
    return ("≥ " if c.state == "incomplete" else "") + fmt(c.value, thousands=True)


def _frontier_row(a: FrontierAnswer) -> list[str | Cell]:
    head = [a.scenario, a.gpu, f"`results/{a.folder.name}`"]
    if a.budget_read is None:
        return head + [Cell("no budget this low probed", "warn")] + [EMPTY] * (len(FRONTIER_HEADER) - len(head) - 1)
    best = max((c for c in (a.ours, a.peer) if c is not None), key=lambda c: c.value, default=None)
    best_probed = a.probed[0] if best is a.ours else a.probed[1] if best is a.peer else any(a.probed)
    tps = fmt(best.tokens_per_s, thousands=True) if best and best.measured and best.tokens_per_s else \
        ("not measured" if best else EMPTY)
    ratio = f"{a.ratio:.2f}x" if a.ratio is not None else EMPTY
    if a.ratio is not None and "incomplete" in (a.ours.state, a.peer.state):
        ratio += " (a search not closed)"
    return head + [fmt(a.budget_read, 0), best.framework if best else EMPTY, (best.tool or EMPTY) if best else EMPTY,
                   _value(best, best_probed), tps,
                   a.peer.framework if a.peer else ("no peer row trains" if a.probed[1] else "no peer row probed"),
                   _value(a.peer, a.probed[1]), ratio]


def advice_doc(results_root: Path, budget_gib: float, scenarios: list[str] | None = None,
               gpus: list[str] | None = None) -> tuple[Doc, int]:
    """The answer at ``budget_gib`` as a document, and how many scenario-GPU answers it holds."""
    sweeps = sweep_answers(results_root, budget_gib, scenarios, gpus)
    fronts = frontier_answers(results_root, budget_gib, scenarios, gpus)
    doc = Doc(f"tunebench: what to use within {budget_gib:g} GiB")
    doc.p(f"From the runs stored under `{results_root}`: per scenario and GPU, the newest sweep's fastest row whose "
          f"NVML per-process peak is at most {budget_gib:g} GiB (the rules of each report's \"Fastest at your memory "
          "budget\" table), and the newest memory frontier's longest row at the largest budget it probed that is "
          f"not above {budget_gib:g} GiB. Each ratio is read inside one sweep or one frontier, on one machine; "
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
