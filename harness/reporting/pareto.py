"""The Pareto view of a GPU sweep: speed against memory, and the fastest row at each memory budget.

A team asks "on my 24 GiB card, which tool trains fastest?", not "which is fastest on an 80 GiB card". Every row
of a GPU sweep (a tool's closed-division default or one of its own speed and memory switches) is a point: median
tokens/s against median NVML per-process peak, the figures of the comparison table
(:func:`harness.reporting.tables.summary_frame`). A row is on its tool's frontier when no other row of the tool is
both faster and leaner; the overall front is the same over every tool. The budget table reads the front at
:data:`BUDGETS_GIB`: the fastest row whose NVML peak fits, and the fastest peer row (a tool other than tunebench)
that fits, with the ratio of tunebench's best to the peer's best. Rows qualify by the ranking's own rules
(:func:`harness.reporting.ranking.qualification`): an invalid, diverged or parity-departing row is never a point.
CPU sweeps measure no GPU memory and get no Pareto view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.analysis.aggregate import is_empty
from harness.reporting import charts
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.reporting.ranking import qualification
from harness.reporting.tool_best import switches_text, tool_of
from harness.storing.sweep import Sweep

BUDGETS_GIB = (8, 12, 16, 24, 40, 80)  # common card sizes, from consumer 8 GiB to an 80 GiB H100/A100
OURS = "tunebench"  # the adapter of our own trainer; every other tool is a peer
NONE_FITS = "none fits"
CHART = "pareto.png"
HEADER = ["budget (GiB)", "fastest row", "tool", "tokens/s", "NVML peak (GiB)", "its settings", "fastest peer row",
          "peer tokens/s", "peer NVML peak (GiB)", "tunebench best / peer best"]
INTRO = ("Each qualifying row (valid, ok, not diverged, loss matching the baseline's, as in the ranking) at its median "
         "tokens/s and median NVML per-process peak, the figures of the comparison table. A row fits a budget when "
         "its NVML peak is at most the budget. Per budget: the fastest row that fits, with its settings (the "
         "switches its run read back, else its overrides as written), and the fastest peer row (any tool but "
         "tunebench) that fits; the last column is tunebench's fastest row within the budget over that peer row "
         "(named when it is not the fastest row). One sweep's rows at one sequence length and batch: a budget's "
         "answer is what these rows reach, not the most a tool could reach under a cap.")


@dataclass(frozen=True)
class Point:
    """One qualifying row of a GPU sweep on the speed-memory plane."""

    row: str  # the row's label in the summary
    tool: str  # the adapter it ran (harness.reporting.tool_best.tool_of)
    gib: float  # median NVML per-process peak
    tps: float  # median tokens/s


def is_gpu_sweep(sweep: Sweep) -> bool:
    """Whether the sweep ran on a GPU: the scenario's ``hardware.device``, else the first stored run's device."""
    device = (sweep.scenario.get("hardware") or {}).get("device") or (sweep.runs[0].device if sweep.runs else None)
    return device == "cuda"


def points(sweep: Sweep, summary, parity_df) -> tuple[list[Point], dict[str, str]]:
    """The qualifying rows with a speed and an NVML peak, and the rows with stored runs left out.

    Args:
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        parity_df: :func:`harness.reporting.quality.parity_frame` of it.

    Returns:
        ``(points in summary order, {row: why it is left out})``; a row with no stored run is in neither (the
        comparison table already says so).
    """
    out, left_out = [], {}
    for row, why in qualification(sweep, summary, parity_df).items():
        if not sweep.runs_of(row):
            continue
        gib = summary.at[row, "nvml_gib"]
        if why is None and is_empty(gib):
            why = "no NVML peak measured"
        if why:
            left_out[row] = why
            continue
        out.append(Point(row, tool_of(sweep, row), float(gib), float(summary.at[row, "tps_median"])))
    return out, left_out


def pareto_front(pts: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (faster and no more memory, or leaner and no slower).

    Returns:
        The front from the leanest to the fastest point (memory and speed both increasing).
    """
    front: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.gib, -p.tps)):
        if not front or p.tps > front[-1].tps:  # leaner points came first: only a faster one is not dominated
            front.append(p)
    return front


def tool_fronts(pts: list[Point]) -> dict[str, list[Point]]:
    """Each tool's own Pareto frontier (:func:`pareto_front` of its rows), tools in order of their first point."""
    by_tool: dict[str, list[Point]] = {}
    for p in pts:
        by_tool.setdefault(p.tool, []).append(p)
    return {tool: pareto_front(rows) for tool, rows in by_tool.items()}


def fastest_within(pts: list[Point], budget_gib: float) -> Point | None:
    """The fastest point whose NVML peak fits ``budget_gib`` (the leaner one on a tie); None when none fits."""
    fits = [p for p in pts if p.gib <= budget_gib]
    return max(fits, key=lambda p: (p.tps, -p.gib)) if fits else None


@dataclass(frozen=True)
class BudgetPick:
    """What one memory budget gets: the fastest row that fits, tunebench's fastest and the fastest peer's."""

    budget_gib: float
    fastest: Point | None
    ours: Point | None
    peer: Point | None

    @property
    def ratio(self) -> float | None:
        """tunebench's best tokens/s over the best peer's within the budget; None when either has no row."""
        return self.ours.tps / self.peer.tps if self.ours and self.peer else None


def budget_picks(pts: list[Point], budgets: tuple[float, ...] = BUDGETS_GIB) -> list[BudgetPick]:
    """The fastest row, tunebench's fastest and the fastest peer row within each budget."""
    ours = [p for p in pts if p.tool == OURS]
    peers = [p for p in pts if p.tool != OURS]
    return [BudgetPick(b, fastest_within(pts, b), fastest_within(ours, b), fastest_within(peers, b))
            for b in budgets]


def ratio_cell(pick: BudgetPick) -> str:
    """The budget table's last cell: tunebench's best over the best peer's, naming tunebench's row when it is not the
    fastest row."""
    if pick.ours is None:
        return "no tunebench row fits"
    if pick.peer is None:
        return EMPTY
    text = f"{pick.ratio:.2f}x"
    if pick.fastest is not None and pick.ours.row != pick.fastest.row:
        text += f" ({pick.ours.row}: {fmt(pick.ours.tps, thousands=True)} tokens/s)"
    return text


def budget_rows(sweep: Sweep, picks: list[BudgetPick]) -> list[list[str | Cell]]:
    """Rows of the "fastest at your budget" table (:data:`HEADER`), one per budget."""
    rows: list[list[str | Cell]] = []
    for pick in picks:
        budget = fmt(pick.budget_gib, 0)
        f = pick.fastest
        if f is None:
            rows.append([budget, Cell(NONE_FITS, "warn")] + [EMPTY] * (len(HEADER) - 2))
            continue
        peer = ([pick.peer.row, fmt(pick.peer.tps, thousands=True), fmt(pick.peer.gib)] if pick.peer
                else ["no peer row fits", EMPTY, EMPTY])
        rows.append([budget, f.row, f.tool, fmt(f.tps, thousands=True), fmt(f.gib), switches_text(sweep, f.row)]
                    + peer + [ratio_cell(pick)])
    return rows


def chart_pareto(pts: list[Point], path: Path) -> Path | None:
    """The speed-memory chart of the points (harness.reporting.charts.chart_pareto); None without a point."""
    fronts = tool_fronts(pts)
    return charts.chart_pareto([(p.row, p.tool, p.gib, p.tps) for p in pts],
                               {tool: [p.row for p in front] for tool, front in fronts.items()},
                               [p.row for p in pareto_front(pts)], BUDGETS_GIB, path)


def add_section(doc: Doc, sweep: Sweep, summary, parity_df, out_dir: Path) -> None:
    """The "Fastest at your memory budget" section of a GPU sweep's report: the budget table and the Pareto chart
    (written into ``out_dir``); nothing for a CPU sweep."""
    if not is_gpu_sweep(sweep):
        return
    doc.h(1, "Fastest at your memory budget")
    doc.p(INTRO)
    pts, left_out = points(sweep, summary, parity_df)
    doc.table(HEADER, budget_rows(sweep, budget_picks(pts)))
    if left_out:
        doc.p("Left out: " + "; ".join(f"{row} ({why})" for row, why in left_out.items()) + ".")
    path = chart_pareto(pts, out_dir / CHART)
    if path is not None:
        doc.image(path, "Pareto view: tokens/s against NVML per-process peak; each tool's frontier drawn, the "
                        "overall front ringed, the budgets dotted")
    else:
        doc.p("(Pareto view: no qualifying row with an NVML peak to plot)")
