"""The memory frontier's report: per framework and budget the longest context (or biggest micro-batch) that trains,
as a table and a chart, tunebench's longest against the best peer's, and the published long-context claims checked.

Made from a frontier folder's stored probes only (:func:`harness.analysis.frontier.frontier_cells`), like every
report: ``python -m harness report results/<scenario>-frontier-<time>`` rebuilds it, and ``harness frontier`` writes
it after each invocation, into ``reports/<the folder's name>/`` (report.md, report.html, frontier.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.analysis.frontier import MIXED_CODE, cell_text, cells_by_code, frontier_cells, read_probes
from harness.analysis.frontier import Cell as FrontierCell
from harness.common.paths import REPO_ROOT
from harness.reporting import tables
from harness.reporting.charts import chart_frontier
from harness.reporting.claims import FAILS, HOLDS, LEDGER, NOT_MEASURED, Claim, claimed_text, claims_for, source_cell
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.running.frontier import probing_flags
from harness.storing.results import atomic_write_text
from harness.storing.sweep import is_results_dir, load_sweep

OURS = "tunebench"  # the tool whose rows are set against the best peer's
CONTEXT_TARGET = 1.5  # tunebench's longest context over the best peer's, at every budget (the project's target)
REACHED = ("found", "incomplete")
OPEN = ("incomplete", "not probed")  # a cell whose search could still move its value


def write_frontier_report(folder: Path, out_dir: Path, claims: list[Claim] | None = None) -> Path:
    """Write report.md, report.html and frontier.png of the frontier in ``folder`` into ``out_dir``.

    Returns:
        The path of report.md.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    plan, probes = read_probes(folder)
    cells = frontier_cells(folder)
    vary, g = plan["grid"]["vary"], plan["grid"]
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = Doc(f"tunebench memory frontier: {plan.get('scenario', folder.name)}")
    measured = sum(1 for c in cells if c.measured)
    short = sum(1 for c in cells if c.measured and c.measured_steps)
    doc.p(f"Results: `results/{folder.name}` — {len(probes)} stored probes; {measured} of "
          f"{sum(1 for c in cells if c.state in REACHED)} cells with a value measured alone"
          f"{f' ({short} of them with fewer steps than the scenario)' if short else ''}. "
          f"Per framework row and memory budget (GiB, the cap every run had), the largest {vary} on the grid "
          f"{g['lo']}, multiples of {g['step']}, {g['hi']} that trains without running out of memory, and tokens/s "
          "there.")
    source = _shown_path(plan.get("scenario_source") or f"scenarios/{plan.get('scenario')}.yaml")
    budgets = ",".join(f"{b:g}" for b in plan.get("budgets", []))
    flags = probing_flags({p.steps for p in probes if p.steps and not p.exact},
                          [r for p in probes for r in p.run.invalid_reasons],
                          frozenset(p.steps for p in probes if p.steps and p.exact))
    doc.code(f"python -m harness frontier {source} --vary {vary} --budgets {budgets} --step {g['step']} --max {g['hi']}"
             f"{flags}\npython -m harness report results/{folder.name}")
    _table(doc, cells, vary)
    _uncapped(doc, plan.get("budgets", []), probes)
    chart = chart_frontier(cells, vary, out_dir / "frontier.png")
    if chart is not None:
        doc.image(chart, f"Longest {vary} per memory budget, per framework row (hollow: the search had not closed)")
    _ours_against_peers(doc, cells, vary)
    _planner(doc, probes, vary)
    _claims(doc, cells, plan.get("scenario", ""), claims)
    _environment(doc, folder, probes)
    md = out_dir / "report.md"
    atomic_write_text(md, doc.to_markdown())
    atomic_write_text(out_dir / "report.html", doc.to_html())
    return md


def _shown_path(p: str) -> str:
    """A scenario path as a reader reruns it: relative to the repository when inside it, or when it names a shipped
    scenario inside another copy of the repository (the frontier ran in a clean copy on a GPU machine)."""
    path = Path(p)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        parts = path.parts
        if "scenarios" in parts:
            shipped = Path(*parts[len(parts) - 1 - parts[::-1].index("scenarios"):])
            if (REPO_ROOT / shipped).is_file():
                return str(shipped)
        return p


def _table(doc: Doc, cells: list[FrontierCell], vary: str) -> None:
    budgets = sorted({c.budget_gib for c in cells})
    by = {(c.framework, c.budget_gib): c for c in cells}
    doc.h(1, f"Longest {vary} per memory budget")
    doc.p(f"Each cell: the largest {vary} that trained within the budget and its tokens/s, from the run at that value "
          "made alone with the scenario's steps. `≥`: the search had not closed; `*`: that run was invalid; "
          "`not measured`: found by search probes (side by side or shortened) and not yet run alone; "
          "`run under N GiB`: the same value's run under that smaller budget, for a row that runs the same under "
          "every cap (every row but one that plans itself to the budget); `N steps`: measured with N steps, fewer "
          "than the scenario's, two or more of them timed (`frontier --measure-steps`).")
    rows = []
    for fw in dict.fromkeys(c.framework for c in cells):
        line: list[str | Cell] = [fw]
        for b in budgets:
            c = by.get((fw, b))
            text = cell_text(c) if c else EMPTY
            line.append(Cell(text, "bad") if c and c.state == "stopped" else
                        Cell(text, "warn") if c and c.state in REACHED and not c.measured else text)
        rows.append(line)
    doc.table(["framework", *[f"{b:g} GiB" for b in budgets]], rows)
    notes = [f"{c.framework} at {c.budget_gib:g} GiB: {c.reason}" for c in cells if c.reason]
    if notes:
        doc.ul(notes)
    if by_code := cells_by_code(cells):
        doc.p(f"{MIXED_CODE}; the cells each one's probes made (the environment section names each commit in full):")
        doc.ul(by_code)


def _uncapped(doc: Doc, budgets: list[float], probes: list[Any]) -> None:
    """A budget at least the GPU's memory caps nothing (the worker runs such a probe on the whole GPU): its column
    is what the whole card holds, which the table's heading does not say (an "80 GiB" column on an 80 GB H100)."""
    cards = {(e.gpu_name, e.gpu_memory_gib) for p in probes if (e := p.run.environment) and e.gpu_memory_gib}
    if not cards:
        return
    name, gib = min(cards, key=lambda c: c[1])
    over = [b for b in budgets if b >= gib]
    if over:
        doc.p(f"{', '.join(f'{b:g} GiB' for b in over)}: at least the GPU's {gib:.1f} GiB ({name}), so no cap: "
              "those cells are what the whole card holds.")


def _planner(doc: Doc, probes: list[Any], vary: str) -> None:
    """For the rows that plan themselves to the budget (a run that records ``extra.trainer.plan``): how the plan's
    predicted peak (of its first plan, before any re-plan) compared with the run's allocated peak, and every probe
    whose plan was predicted within the budget and ran out of memory (the run stopped, or re-planned and went on):
    where the planner was wrong."""
    planned = [(p, rec) for p in probes if isinstance(t := p.run.extra.get("trainer"), dict)
               and isinstance(rec := t.get("plan"), dict)
               and isinstance(rec.get("predicted_peak_alloc_gib"), int | float)]
    if not planned:
        return
    doc.h(1, "The planner's predictions")
    misses = [(p, rec) for p, rec in planned if rec.get("fits") and (p.run.status == "oom"
                                                                      or rec.get("replanned_after_oom"))]
    errors = [p.run.metrics.peak_alloc_gib - rec["predicted_peak_alloc_gib"] for p, rec in planned
              if p.run.status == "ok" and p.run.metrics.peak_alloc_gib is not None]
    spread = f"; measured minus predicted allocated peak where it trained: {min(errors):+.2f} to " \
             f"{max(errors):+.2f} GiB" if errors else ""
    doc.p(f"{len(planned)} probes planned themselves to their budget; {len(misses)} of those whose plan was predicted "
          f"within the budget ran out of memory{spread}. The prediction is of the first plan, before the re-plan "
          "that follows the first steps' measurements.")
    if misses:
        doc.table(["framework", "budget (GiB)", vary, "predicted peak (GiB)", "then", "commit"],
                  [[p.run.framework, f"{p.budget:g}", f"{p.value:,}", Cell(fmt(rec["predicted_peak_alloc_gib"]), "bad"),
                    "stopped" if p.run.status == "oom" else f"a leaner plan, {p.run.status}",
                    (p.run.environment.code() if p.run.environment else None) or EMPTY]
                   for p, rec in sorted(misses, key=lambda x: (x[0].run.framework, x[0].budget, x[0].value))])


def _tool(cells: list[FrontierCell], fw: str) -> str | None:
    return next((c.tool for c in cells if c.framework == fw and c.tool), None)


def _longest(cells: list[FrontierCell]) -> FrontierCell | None:
    reached = [c for c in cells if c.state in REACHED and c.value is not None]
    return max(reached, key=lambda c: (c.value, c.tokens_per_s or 0.0)) if reached else None


def _ours_against_peers(doc: Doc, cells: list[FrontierCell], vary: str) -> None:
    tools = {fw: _tool(cells, fw) for fw in dict.fromkeys(c.framework for c in cells)}
    if OURS not in tools.values() or not any(t not in (OURS, None) for t in tools.values()):
        return
    doc.h(1, f"{OURS} against the best peer")
    doc.p(f"Per budget: {OURS}'s longest {vary} over any of its rows, and the longest any other tool's row reached; "
          f"the project's target is at least {CONTEXT_TARGET:g}x the best peer's at every budget where a peer trains. "
          f"Tokens/s are each row's at its own longest {vary}, so they compare speed at different lengths.")
    rows = []
    for b in sorted({c.budget_gib for c in cells}):
        here = [c for c in cells if c.budget_gib == b]
        ours = _longest([c for c in here if tools.get(c.framework) == OURS])
        peers = [c for c in here if tools.get(c.framework) not in (OURS, None)]
        peer = _longest(peers)
        # a search not closed (or not begun) could still move the best peer up, or ours: no verdict on it yet, unless
        # ours already meets the target (then it can only rise)
        open_peers = [c.framework for c in peers if c.state in OPEN]
        open_ours = [c.framework for c in here if tools.get(c.framework) == OURS and c.state in OPEN]
        rising = bool(open_ours) and ours is not None and peer is not None and \
            ours.value / peer.value >= CONTEXT_TARGET
        if rising:
            open_ours = []
        # the two answers compared, still a search probe's (shortened or shared): their runs alone may step down
        unmeasured = [c.framework for c in (ours, peer) if c is not None and c.state in REACHED and not c.measured]
        pending = "; ".join(f"{what}: {', '.join(names) if len(names) <= 3 else f'{len(names)} rows'}"
                            for what, names in (("peer searches not closed", open_peers),
                                                (f"{OURS} searches not closed", open_ours),
                                                ("not yet run alone", unmeasured))
                            if names)
        bound = _peer_ceiling(peers) if ours is not None and ours.measured and not open_ours else None
        if ours is None and peer is None:
            verdict: str | Cell = Cell(f"no row trains yet ({pending})", "warn") if pending else "no row trains"
        elif pending and bound is not None and ours.value / bound[0] >= CONTEXT_TARGET:
            verdict = Cell(f"at least {ours.value / bound[0]:.2f}x, whatever the open peer searches close at "
                           f"({bound[1]})", "good")
        elif ours is not None and peer is not None:
            verdict = _ratio_verdict(ours, peer, pending, rising)
        elif pending:
            verdict = Cell(f"open ({pending})", "warn")
        elif peer is None:
            verdict = Cell(f"no peer row trains; {OURS} does", "good")
        else:
            verdict = Cell(f"no {OURS} row trains", "bad")
        rows.append([f"{b:g}", *_side(ours), *_side(peer), verdict])
    doc.table(["budget (GiB)", f"{OURS} row", vary, "tokens/s", "best peer row", vary, "tokens/s",
               f"{OURS} / peer ({vary})"], rows)


def _peer_ceiling(peers: list[FrontierCell]) -> tuple[int, str] | None:
    """What no peer row can pass, however its open search closes: the first value out of memory of each open search
    (its answer lies below it), the answer of each closed one (a run alone can only step it down); with what bounds
    the open ones, for the report. None where an open search has no value out of memory yet (not begun, or every
    probe trained): it could still reach the grid's top."""
    top, ooms = 0, []
    for c in peers:
        if c.state in OPEN:
            if c.next_oom_value is None:
                return None
            top = max(top, c.next_oom_value)
            ooms.append((c.framework, c.next_oom_value))
        elif c.state in REACHED and c.value is not None:
            top = max(top, c.value)
    if not ooms:
        return None
    why = "; ".join(f"{fw} out of memory at {v:,}" for fw, v in ooms) if len(ooms) <= 3 else \
        f"{len(ooms)} rows, each out of memory at {max(v for _, v in ooms):,} or less"
    return top, why


def _at_top(c: FrontierCell) -> bool:
    """The cell's value is the grid's top: nothing above it was tried (the model's maximum, or --max)."""
    return c.state == "found" and c.next_oom_value is None


def _ratio_verdict(ours: FrontierCell, peer: FrontierCell, pending: str, rising: bool) -> Cell:
    """Ours over the best peer's value against the target. A row at the grid's top may train longer still, and
    ``rising``: a search of ours not closed can only raise ours; either way the ratio is bounded from one side only."""
    ratio = ours.value / peer.value
    if pending:
        return Cell(f"{ratio:.2f}x, not final ({pending})", "warn")
    if _at_top(peer):
        return Cell(f"no ratio: {peer.framework} trains the grid's top ({peer.value:,})", "warn")
    if _at_top(ours) or rising:  # at least the ratio: enough when that already meets the target
        why = f"{ours.framework} trains the grid's top" if _at_top(ours) else f"{OURS} searches not closed"
        return Cell(f"at least {ratio:.2f}x ({why})", "good" if ratio >= CONTEXT_TARGET else "warn")
    return Cell(f"{ratio:.2f}x", "good" if ratio >= CONTEXT_TARGET else "bad")


def _side(c: FrontierCell | None) -> list[str]:
    if c is None:
        return [EMPTY, EMPTY, EMPTY]
    mark = "≥ " if c.state == "incomplete" else ""
    return [c.framework, f"{mark}{c.value:,}", fmt(c.tokens_per_s, thousands=True)]


def _claims(doc: Doc, cells: list[FrontierCell], scenario: str, claims: list[Claim] | None) -> None:
    todo = [c for c in claims_for(scenario, claims) if c.metric == "max_context"]
    if not todo:
        return
    doc.h(1, "Claimed vs measured")
    doc.p(f"Published long-context claims ({LEDGER}), each tested under its budget on this frontier's cells: the "
          "ratio of the two rows' longest values. Budgets here are GiB (a claim's \"80 GB\" is 74.5 GiB, so an "
          "80 GiB cap is slightly more generous to both rows); read the verdict with the claim's setting beside it.")
    rows = []
    for c in todo:
        measured, verdict = measure_context(c, cells)
        claimed = f"{claimed_text(c)} under {c.budget_gib:g} GiB"
        rows.append([f"`{c.id}`: “{c.text}”", source_cell(c), c.setting, claimed, measured, verdict])
    doc.table(["claim", "source", "their setting", "claimed (as tested)", "measured on this frontier", "verdict"], rows)


def measure_context(c: Claim, cells: list[FrontierCell]) -> tuple[str, Cell]:
    """The measured text and the verdict of a ``max_context`` claim on a frontier's cells."""
    by = {(x.framework, x.budget_gib): x for x in cells}
    a, b = by.get((c.row, c.budget_gib)), by.get((c.against, c.budget_gib))
    for name, x in ((c.row, a), (c.against, b)):
        if x is None:
            return EMPTY, Cell(f"{NOT_MEASURED}: no `{name}` cell under {c.budget_gib:g} GiB", "warn")
        if x.state not in (*REACHED, "none fits"):
            return EMPTY, Cell(f"{NOT_MEASURED}: `{name}` under {c.budget_gib:g} GiB: {x.state}"
                               + (f" ({x.reason})" if x.reason else ""), "warn")
        if x.state == "incomplete":
            return EMPTY, Cell(f"{NOT_MEASURED}: `{name}`'s search under {c.budget_gib:g} GiB had not closed", "warn")
        if x.state in REACHED and not x.measured:  # a shortened or shared probe's answer: its full run may not fit
            return EMPTY, Cell(f"{NOT_MEASURED}: `{name}`'s {x.value:,} under {c.budget_gib:g} GiB is a search "
                               "probe's answer, not yet run alone", "warn")
    if a.state == "none fits":
        return f"{c.row}: none fits", Cell(FAILS, "bad")
    if b.state == "none fits":  # "vs OOM": any context is more than none
        text = f"{a.value:,} vs none ({c.against} out of memory at {b.next_oom_value:,})" \
            if b.next_oom_value is not None else f"{a.value:,} vs none"
        return text, Cell(HOLDS, "good") if c.at_most is None else Cell(f"{NOT_MEASURED}: no finite ratio", "warn")
    ratio = a.value / b.value
    text = f"{ratio:.2f}x ({a.value:,} vs {b.value:,})"
    # a row at the grid's top (nothing above it was tried: the model's maximum, or --max) may train longer still
    if b.next_oom_value is None:
        return text, Cell(f"{NOT_MEASURED}: `{c.against}` trains the grid's top ({b.value:,}): no ratio beyond it",
                          "warn")
    if a.next_oom_value is None and not c.holds_for(ratio):
        return text, Cell(f"{NOT_MEASURED}: `{c.row}` trains the grid's top ({a.value:,}), so the ratio is at least "
                          f"{ratio:.2f}x", "warn")
    return text, Cell(HOLDS, "good") if c.holds_for(ratio) else Cell(FAILS, "bad")


def _environment(doc: Doc, folder: Path, probes: list[Any]) -> None:
    """The machine as the sweep report gives it (from the first probe sweep), each row's versions, and the commits
    the probes were made from (a frontier may span several invocations)."""
    first = next((d for d in sorted(folder.iterdir()) if is_results_dir(d)), None)
    if first is None:
        return
    doc.h(1, "Environment")
    doc.table(["", "value"], tables.environment_rows(load_sweep(first)))
    by_row: dict[str, list] = {}
    for p in probes:
        by_row.setdefault(p.run.framework, []).append(p.run)
    doc.table(["framework", "framework version", "env", *tables.FRAMEWORK_LIBRARIES],
              [tables.framework_env_row(fw, runs) for fw, runs in by_row.items()])
    shas = sorted({(r.environment.git_sha if r.environment else None) or "(none recorded)"
                   for runs in by_row.values() for r in runs})
    doc.p(f"Commits the probes were made from: {', '.join(f'`{s[:12]}`' for s in shas)}.")
