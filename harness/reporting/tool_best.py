"""Each tool at its best: per tool (adapter), its fastest and its leanest row among the fair measurements.

A scenario may run one tool as several labelled rows: its closed-division default (``overrides: {}``) and its own
documented speed or memory switches (Liger-Kernel, a checkpoint mode, offloading), each switch read back from the
live run into ``extra["switches"]`` (adapters_for_tools/switches.py). The overall ranking names one winner; a team
choosing a tool wants each tool's best row beside the others'. Rows qualify by the ranking's own rules
(:func:`harness.reporting.ranking.qualification`), so an invalid, diverged or parity-departing row never stands for
its tool; the fastest is the highest median tokens/s, the leanest the lowest median peak memory (NVML per-process,
else torch reserved where NVML could not read, as in the ranking).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.reporting.ranking import fastest_of, leanest_of, qualification
from harness.storing.sweep import Sweep

FASTEST, LEANEST = "fastest", "leanest"
HEADER = ["tool", "fastest row", "tokens/s", "its switches", "leanest row", "peak memory (GiB)",
          "the leanest row's switches", "rows left out"]
INTRO = ("A tool's rows (its closed-division default and its own speed or memory switches, read back from the live "
         "run) compared with each other: its fastest row (highest median tokens/s) and its leanest row (lowest "
         "median peak memory). Only fair measurements qualify, by the ranking's rules (valid, ok, not diverged, loss "
         "matching the baseline's); switches marked 'as written' are the row's settings where the adapter reads no "
         "switch back.")


@dataclass
class ToolBest:
    """One tool's rows in a sweep and the best of them."""

    tool: str
    rows: list[str]  # its rows in the summary, in scenario order
    fastest: str | None = None  # None when no row qualifies
    fastest_tps: float | None = None
    leanest: str | None = None  # None when no qualifying row measured memory
    leanest_gib: float | None = None
    leanest_measure: str = ""  # what the peak is ("GiB NVML per-process", ...)
    excluded: dict[str, str] = field(default_factory=dict)  # row -> why it does not qualify


def tool_of(sweep: Sweep, row: str) -> str:
    """The tool (adapter) a row ran: from its stored runs, else the scenario's row, else the label itself."""
    adapter = next((r.adapter for r in sweep.runs_of(row) if r.adapter), None)
    if adapter:
        return adapter
    entries = sweep.scenario.get("frameworks")
    for f in entries if isinstance(entries, list) else []:
        if isinstance(f, dict) and (f.get("label") or f.get("name")) == row and f.get("name"):
            return str(f["name"])
    return row


def rows_by_tool(sweep: Sweep, summary) -> dict[str, list[str]]:
    """Tool -> its rows, tools in the order of their first row in the summary."""
    out: dict[str, list[str]] = {}
    for row in summary.index:
        out.setdefault(tool_of(sweep, str(row)), []).append(str(row))
    return out


def best_of_tools(sweep: Sweep, summary, parity_df) -> list[ToolBest]:
    """Each tool's fastest and leanest qualifying row.

    Args:
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        parity_df: :func:`harness.reporting.quality.parity_frame` of it.

    Returns:
        One :class:`ToolBest` per tool, in summary order.
    """
    why = qualification(sweep, summary, parity_df)
    out = []
    for tool, rows in rows_by_tool(sweep, summary).items():
        best = ToolBest(tool, rows, excluded={r: why[r] for r in rows if why[r]})
        fair = [r for r in rows if why[r] is None]
        if fair:
            s = summary.loc[fair]
            best.fastest = fastest_of(s)
            best.fastest_tps = float(s.at[best.fastest, "tps_median"])
            lean = leanest_of(s)
            if lean is not None:
                best.leanest, best.leanest_gib, best.leanest_measure = lean
        out.append(best)
    return out


def _several(sweep: Sweep, rows: list[str]) -> bool:
    """Two or more of the rows have stored runs: only then is one of them its tool's best."""
    return sum(1 for r in rows if sweep.runs_of(r)) >= 2


def has_several_rows(sweep: Sweep, summary) -> bool:
    """Whether some tool ran two or more rows in the sweep."""
    return any(_several(sweep, rows) for rows in rows_by_tool(sweep, summary).values())


def marks(sweep: Sweep, best: list[ToolBest]) -> dict[str, str]:
    """Row -> "fastest", "leanest" or "fastest, leanest" for the rows that are the best of a tool that ran several
    (a tool's only row is trivially its best, and marking it would say nothing)."""
    out: dict[str, list[str]] = {}
    for b in best:
        if not _several(sweep, b.rows):
            continue
        if b.fastest:
            out.setdefault(b.fastest, []).append(FASTEST)
        if b.leanest:
            out.setdefault(b.leanest, []).append(LEANEST)
    return {row: ", ".join(m) for row, m in out.items()}


def mark_column(sweep: Sweep, summary, parity_df) -> list[str] | None:
    """The comparison table's "best of tool" cells in summary order; None when every tool ran one row."""
    if not has_several_rows(sweep, summary):
        return None
    m = marks(sweep, best_of_tools(sweep, summary, parity_df))
    return [m.get(str(row), EMPTY) for row in summary.index]


def _value_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def switches_text(sweep: Sweep, row: str) -> str:
    """A row's variant: the switches its run read back, else its overrides as written, else "default"."""
    runs = sorted(sweep.runs_of(row), key=lambda r: (not r.ok, r.repeat))
    if not runs:
        return EMPTY
    switches = runs[0].extra.get("switches")
    if isinstance(switches, dict) and switches:
        return ", ".join(f"{k}={_value_text(v)}" for k, v in switches.items())
    if runs[0].overrides:
        return ", ".join(f"{k}={_value_text(v)}" for k, v in runs[0].overrides.items()) + " (as written)"
    return "default"


def best_rows(sweep: Sweep, best: list[ToolBest]) -> list[list[str | Cell]]:
    """Rows of the "each tool at its best" table (:data:`HEADER`); a tool with no stored run at all is left to the
    comparison table, which already says so."""
    rows: list[list[str | Cell]] = []
    for b in best:
        if not any(sweep.runs_of(r) for r in b.rows):
            continue
        left_out = "; ".join(f"{r} ({why})" for r, why in b.excluded.items()) or EMPTY
        if b.fastest is None:
            rows.append([b.tool, Cell("no row qualifies", "bad"), EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, left_out])
            continue
        lean = ([b.leanest, f"{fmt(b.leanest_gib)} ({b.leanest_measure.removeprefix('GiB ')})",
                 switches_text(sweep, b.leanest)] if b.leanest else [EMPTY, "not measured", EMPTY])
        rows.append([b.tool, b.fastest, fmt(b.fastest_tps, thousands=True), switches_text(sweep, b.fastest)]
                    + lean + [left_out])
    return rows


def add_section(doc: Doc, sweep: Sweep, summary, parity_df) -> None:
    """The "Each tool at its best" table, when some tool ran more than one row."""
    if not has_several_rows(sweep, summary):
        return
    doc.h(2, "Each tool at its best")
    doc.p(INTRO)
    doc.table(HEADER, best_rows(sweep, best_of_tools(sweep, summary, parity_df)))
