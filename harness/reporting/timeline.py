"""The report's "Where the time went" section: each framework row's wall time per run, by phase.

Tokens/s describes the timed steps only; what a team waits for, and what a lent GPU is paid for, is the whole run:
start-up, the tool's imports and loading, compilation in the warm-up steps, saving. The table shows the median of
each phase (:mod:`harness.analysis.timeline`) over a row's ok runs, and what share of the run the timed steps
were. A sweep whose runs stored none of the timestamps gets no section.
"""

from __future__ import annotations

from harness.analysis.timeline import PHASES, by_framework, totals
from harness.reporting.document import Doc, fmt
from harness.storing.sweep import Sweep

HEADER = ["framework", "runs", "wall s", "start-up s", "to first step s (of it loading)", "warm-up steps s",
          "timed steps s", "between steps s", "after last step s", "exit s", "timed share"]
INTRO = ("Median over each row's ok runs, in seconds; the phases add up to the run's wall time (launch to exit). "
         "Start-up: launch to the worker's start (interpreter, imports). To first step: the tool's imports, model "
         "loading (in brackets: the tool's own load time), data and trainer set-up. Warm-up and timed steps: the "
         "meter's step times (tokens/s is the timed steps' figure). Between steps: the gaps between one step's end "
         "and the next one's begin (the tool's logging and callbacks, the harness's hooks). After last step: saving "
         "the trained output, reading the environment. Exit: writing the result, teardown. A dash: the run did not "
         "store that timestamp.")


def add_section(doc: Doc, sweep: Sweep) -> None:
    """Add "Where the time went" when any ok run stored its step timestamps."""
    table = by_framework(sweep.runs)
    if not any(row["timed_s"] is not None for row in table.values()):
        return
    doc.h(1, "Where the time went")
    doc.p(INTRO)
    rows = []
    for fw, row in table.items():
        cells = [fmt(row[k], 1) for k in PHASES]
        load = fmt(row["load_s"], 1)
        cells[1] = f"{cells[1]} ({load})" if row["load_s"] is not None else cells[1]
        rows.append([fw, str(row["runs"]), fmt(row["wall_s"], 1), *cells, fmt(row["timed_share"], 0, pct=True)])
    doc.table(HEADER, rows)
    tot = totals(sweep.runs)
    if tot["wall_s"]:
        doc.p(f"All {len(sweep.runs)} stored runs: {tot['wall_s']:,.0f} s of wall time, {tot['timed_s']:,.0f} s "
              f"({tot['timed_s'] / tot['wall_s']:.0%}) in timed steps, {tot['before_first_step_s']:,.0f} s before "
              "the first step (where the runs stored it).")
