"""The report's "Harness vs hand loop" section: each stored ``selfcheck*.json`` of the sweep as a table.

``python -m harness selfcheck SCENARIO --against results/<sweep>`` stores the checks (:mod:`harness.analysis.
handloop` says what they hold). Per framework the table shows the harness's tokens/s (the report's median), the
plain hand-written loop's, and the verdict: **agrees** within the check's band (3 %), otherwise the measured
difference, flagged, with the settings that differ between the stored run and the loop as the stated cause. A
sweep without a check gets no section; a check file that cannot be read is named, not fatal.

A check run with ``--side-by-side N`` adds a second table: the harness's own runs and the loops, in alternating
pairs on one machine, their medians, each pair's difference and each side's spread. Its verdict is the check's;
a stored-sweep row that differs while the pairs agree says so in its cause (the sweep ran on another lease), and
pairs that differ by less than one side moved between its own rounds say so. Per framework the latest check's
verdict is the section's headline; earlier checks stay in the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.analysis.handloop import AGREE_PCT, PARTIAL_PREFIX, cause, loop_variants, selfcheck_paths, verdict
from harness.reporting.document import EMPTY, Cell, Doc, fmt, short
from harness.storing.results import read_json
from harness.storing.sweep import Sweep

PAIR_HEADER = ["check", "framework", "rounds (order)", "harness tokens/s (median)", "hand loop tokens/s (median)",
               "difference", "each pair", "spread harness / loop", "NVML sampler busy", "verdict",
               "settings that differ"]
PAIR_INTRO = ("Side by side on one machine (`selfcheck --side-by-side N`): each round runs the harness's own worker "
              "for the row (`harness run --only ROW --repeats 1`, stored with the check) and the hand loop, back to "
              "back, the harness first in even rounds and the loop first in odd ones. The medians are compared; "
              "the spread (max − min over the median, per side) is how far the same side moved between rounds on "
              "the same machine. NVML sampler busy: the share of the harness run's time its NVML sampling was busy "
              "(memory every 10 ms, clocks and power every 100 ms); in a thread of the worker (runs before the "
              "monitor process) it bounds what the sampling could take from the run, in its own process it takes "
              "nothing from the run's interpreter. Where a check has pairs, their verdict is the check's.")
HEADER = ["check", "framework", "harness tokens/s", "hand loop tokens/s", "difference", "step s harness / loop",
          "verdict", "settings that differ (stated cause)"]
INTRO = ("Each framework's figure beside the same training in a plain hand-written loop (`python -m harness "
         "selfcheck`, harness/measuring/handloop): the same checkpoint, rows, order and settings, each optimizer step "
         "timed between two device synchronisations, and none of the harness around it (no worker, meter or "
         "callbacks). Difference = (harness − loop) / loop of tokens/s; within {band:g} % the harness's figure "
         "agrees. Beyond it the settings that differ between the stored run and the loop are the stated cause; "
         "where none differs, the settings only the loop records are listed.")


VARIANT_HEADER = ["checks (one lease)", "framework", "loop variant", "check", "tokens/s", "step s (median)",
                  "vs the default loop"]
VARIANT_INTRO = ("The hand loop's variants, each measured on the same lease as the default loop (checks made within "
                 "20 minutes of each other): which part of a tool's step a difference between harness and loop "
                 "sits in. The knobs (harness/measuring/handloop/knobs.py): `trainer=true` trains the loop's model "
                 "with transformers' own Trainer and a bare timing callback, none of the harness around it; "
                 "`nan_inf_filter`, `count_flos`, `train_each_step` and `clip_walks_parameters` are the Trainer's "
                 "bookkeeping inside each step (the NaN/Inf loss check is a device synchronisation, so the host "
                 "work after it — the FLOP count's and the clip's walks over the model, `model.train()` — adds to "
                 "the step's time); `=false` leaves one out. \"harness (side by side)\" is the harness's own run in "
                 "the same lease.")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pct(x: Any) -> str:
    return f"{x:+.1f} %" if _number(x) else EMPTY


def _share(x: Any) -> str:
    return f"{x:.1f} %" if _number(x) else EMPTY


def _not_compared(entry: Any) -> tuple[str, Any] | None:
    """(status, reason) of an entry that holds no comparison; None for a compared one."""
    if isinstance(entry, dict) and entry.get("status") == "compared":
        return None
    return (entry.get("status", "unreadable"), entry.get("reason")) if isinstance(entry, dict) else ("unreadable", None)


def _row(check: str, fw: str, entry: dict[str, Any], band: float,
         paired: dict[str, Any] | None = None) -> list[str | Cell]:
    """One framework's row of one check (``paired``: the same framework's side-by-side comparison, if any)."""
    if failed := _not_compared(entry):
        return [check, fw, EMPTY, EMPTY, EMPTY, EMPTY, Cell(f"{failed[0]}: {short(failed[1], 200)}", "warn"), EMPTY]
    h, lo = entry.get("harness") or {}, entry.get("loop") or {}
    diff = entry.get("difference_pct")
    said = verdict(diff, band)
    differs = entry.get("settings_differ") or []
    if said == "agrees":
        verdict_cell = Cell("agrees", "good")
        cause_cell: str | Cell = (Cell(cause(entry), "warn") if differs else EMPTY)
    elif said == "differs" and paired and paired.get("verdict") == "agrees":
        verdict_cell = Cell(f"differs by {_pct(diff)} from the stored sweep", "warn")
        cause_cell = Cell(f"the machine between leases: side by side on one machine the harness agrees "
                          f"({_pct(paired.get('difference_pct'))}); " + cause(entry), "warn")
    elif said == "differs":
        verdict_cell = Cell(f"differs by {_pct(diff)}", "bad")
        cause_cell = Cell(cause(entry), "bad" if differs else "warn")
    else:
        verdict_cell, cause_cell = Cell("no figure to compare", "warn"), EMPTY
    steps = f"{fmt(h.get('step_s_median'), 4)} / {fmt(lo.get('step_s_median'), 4)}"
    return [check, fw, fmt(h.get("tokens_per_s"), thousands=True), fmt(lo.get("tokens_per_s"), thousands=True),
            _pct(diff), steps, verdict_cell, cause_cell]


def _differs(entry: Any, band: float) -> bool:
    """A side-by-side comparison that failed, or whose medians differ by more than the band."""
    return _not_compared(entry) is not None or verdict(entry.get("difference_pct"), band) == "differs"


def _noise(entry: dict[str, Any]) -> float | None:
    """The larger of the two sides' spreads between rounds when it is at least the medians' difference (that
    difference is then within how far one side moved on its own), else None."""
    spreads = [x for x in (entry.get("harness_spread_pct"), entry.get("loop_spread_pct")) if _number(x)]
    diff = entry.get("difference_pct")
    return max(spreads) if spreads and _number(diff) and max(spreads) >= abs(diff) else None


def _pair_row(check: str, fw: str, entry: dict[str, Any], band: float) -> list[str | Cell]:
    """One framework's side-by-side row of one check."""
    if failed := _not_compared(entry):
        return [check, fw, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY,
                Cell(f"{failed[0]}: {short(failed[1], 200)}", "bad"), EMPTY]
    diff = entry.get("difference_pct")
    said = verdict(diff, band)
    if said == "agrees":
        verdict_cell = Cell("agrees", "good")
    elif said == "differs":
        noise = _noise(entry)
        within = "" if noise is None else \
            f", within one side's own spread between rounds ({noise:.1f} %): more rounds decide"
        verdict_cell = Cell(f"differs by {_pct(diff)}{within}", "bad")
    else:
        verdict_cell = Cell("no figure", "warn")
    order = ", ".join(str(o) for o in entry.get("order") or [])
    pairs = ", ".join(_pct(x) for x in entry.get("pair_differences_pct") or [])
    spread = " / ".join(_share(entry.get(k)) for k in ("harness_spread_pct", "loop_spread_pct"))
    differs = entry.get("settings_differ") or []
    settings = Cell(cause(entry), "warn") if differs else EMPTY
    busy = _share(entry.get("harness_sampler_busy_pct"))
    return [check, fw, f"{entry.get('rounds')} ({order} first)", fmt(entry.get("harness_tokens_per_s"), thousands=True),
            fmt(entry.get("loop_tokens_per_s"), thousands=True), _pct(diff), pairs, spread, busy, verdict_cell,
            settings]


def rows(sweep_dir: Path) -> tuple[list[list[str | Cell]], list[str], int, list[list[str | Cell]], list[str]]:
    """The table rows of every stored check, the check files that cannot be read, how many frameworks differ (by
    each check's verdict: its pairs where it has them), the side-by-side rows, and what the machine did during the
    pairs (another process on the GPU, a slowed GPU)."""
    out: list[list[str | Cell]] = []
    pair_rows: list[list[str | Cell]] = []
    machine: list[str] = []
    unreadable: list[str] = []
    latest: dict[str, tuple[str, bool]] = {}  # per framework, its latest default-loop check: (what it said, differs)
    for path in selfcheck_paths(sweep_dir):
        check = read_json(path)
        entries = check.get("frameworks") if check else None
        if not isinstance(entries, dict):
            unreadable.append(path.name)
            continue
        band = check.get("agree_within_pct")
        band = float(band) if isinstance(band, (int, float)) and not isinstance(band, bool) else AGREE_PCT
        paired = check.get("side_by_side") if isinstance(check.get("side_by_side"), dict) else {}
        variant = bool(check.get("knobs"))  # a loop with knobs set locates a difference; it is no verdict
        for fw, entry in entries.items():
            row = _row(path.name, str(fw), entry, band, paired.get(fw))
            if not paired and not variant:
                latest[str(fw)] = (f"{path.name} {_pct(row[4]) if row[4] != EMPTY else row[6]}",
                                   isinstance(row[6], Cell) and row[6].mark == "bad")
            out.append(row)
        for fw, entry in paired.items():
            row = _pair_row(path.name, str(fw), entry, band)
            if not variant:
                latest[str(fw)] = (f"{path.name} side by side ({entry.get('rounds')} round(s)) "
                                   f"{row[5] if row[5] != EMPTY else 'not compared'}", _differs(entry, band))
            pair_rows.append(row)
            if isinstance(entry, dict):
                machine += [f"{path.name} {fw} {note}" for note in entry.get("machine") or []]
    return out, unreadable, latest, pair_rows, machine


def add_section(doc: Doc, sweep: Sweep) -> None:
    """Add "Harness vs hand loop" when the sweep stores a check or an unfinished one (nothing otherwise)."""
    unfinished = sorted(sweep.path.glob(f"{PARTIAL_PREFIX}*.json"))
    if not selfcheck_paths(sweep.path) and not unfinished:
        return
    table, unreadable, latest, pair_table, machine = rows(sweep.path)
    n_differ = sum(differs for _, differs in latest.values())
    decided = "; ".join(f"{fw}: {said}" for fw, (said, _) in latest.items())
    doc.h(1, "Harness vs hand loop")
    doc.p(INTRO.format(band=AGREE_PCT))
    for path in unfinished:
        stored = read_json(path)
        done = stored.get("done") if isinstance(stored, dict) else None
        doc.p(f"`{path.name}`: an unfinished check ({len(done) if isinstance(done, dict) else 'unreadable: no'} "
              "measurement(s) kept), not in the tables until it is whole; the same `selfcheck` command resumes it.",
              "warn")
    if n_differ:
        doc.p(f"{n_differ} framework figure(s) differ from the hand loop by more than the band in their latest check "
              f"(side by side where it has pairs; {decided}): the cause column says which settings differ.", "bad")
    elif latest:
        doc.p(f"Every framework's latest check agrees with its hand loop within the band (side by side where it has "
              f"pairs; {decided}); earlier checks, also those that differ, stay in the tables below.", "good")
    if table:
        doc.table(HEADER, table)
    if pair_table:
        doc.p(PAIR_INTRO)
        doc.table(PAIR_HEADER, pair_table)
    variants = loop_variants([(p.name, c) for p in selfcheck_paths(sweep.path) if isinstance(c := read_json(p), dict)])
    if variants:
        doc.p(VARIANT_INTRO)
        doc.table(VARIANT_HEADER, [[v["group"], v["framework"], v["variant"], v["check"],
                                    fmt(v["tokens_per_s"], thousands=True), fmt(v["step_s_median"], 4),
                                    _pct(v["vs_defaults_pct"])] for v in variants])
    if machine:
        doc.p("The machine during the pairs (a figure measured beside another process on the GPU, or on a slowed "
              "GPU, moves for that reason): " + "; ".join(machine) + ".", "warn")
    for name in unreadable:
        doc.p(f"`{name}` cannot be read as a check (not JSON, or no per-framework comparison in it): left out.",
              "warn")
