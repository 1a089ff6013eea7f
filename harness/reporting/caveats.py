"""The report's "Failures and caveats": everything that makes a number less than a fair measurement."""

from __future__ import annotations

import math

from harness.analysis.aggregate import is_empty
from harness.measuring.environment import machine_kind
from harness.reporting.document import Cell, fmt, short
from harness.storing.sweep import Sweep

# the caveat of a throttled run; runs stored by an earlier worker carry it among their warnings, judged by an
# earlier rule, and those copies are left out
THROTTLE_WARNING = "GPU throttled while measuring"


def caveats(sweep: Sweep, summary, foreign: list[str], parity_df, eval_errors: list[str]) -> list[str | Cell]:
    """The caveats of a sweep, worst first.

    Args:
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        foreign: :func:`harness.reporting.tables.foreign_processes` of it.
        parity_df: :func:`harness.reporting.quality.parity_frame` of it.
        eval_errors: :func:`harness.reporting.quality.eval_errors` of it.

    Returns:
        List items; marked "bad" (a failure or an invalid run) or "warn", or plain text.
    """
    items: list[str | Cell] = [Cell(f"skipped, could not be read: {u}", "bad") for u in sweep.unreadable]
    for r in sweep.runs:
        if not r.ok:
            items.append(Cell(f"{r.framework} r{r.repeat}: {r.status} — {short(r.reason, 400)}", "bad"))
        elif not r.valid:
            items.append(Cell(f"{r.framework} r{r.repeat}: ran but is INVALID — "
                              f"{'; '.join(r.invalid_reasons) or 'marked invalid'}", "bad"))
    for r in sweep.runs:  # e.g. a throttled GPU: the figures stand but are less trustworthy
        # throttling is judged here from the recorded reasons (schema.Metrics), not from a stored warning text
        items += [Cell(f"{r.framework} r{r.repeat}: {w}", "warn") for w in r.warnings
                  if not w.startswith(THROTTLE_WARNING)]
        if r.metrics.throttled:
            reasons = ", ".join(r.metrics.throttle_reasons_seen or []) or "reason not recorded"
            items.append(Cell(f"{r.framework} r{r.repeat}: {THROTTLE_WARNING} ({reasons}): its tokens/s "
                              "understate the framework", "warn"))
    stored = {r.key for r in sweep.runs}
    missing = [k for k in sweep.planned if k not in stored]
    if missing:
        items.append(Cell(f"planned runs with no stored result (sweep interrupted?): {', '.join(missing)}", "warn"))
    if sweep.baseline not in summary.index or is_empty(summary.at[sweep.baseline, "tps_median"]):
        items.append(Cell(f"baseline framework `{sweep.baseline}` has no ok run: no speed-up is shown", "warn"))
    for f in foreign:
        items.append(Cell(f"foreign GPU process: {f} — measurements may be disturbed", "warn"))
    hashes = {r.scenario_hash for r in sweep.runs if r.scenario_hash}
    if len(hashes) > 1:
        items.append(Cell(f"runs carry different scenario hashes ({', '.join(sorted(hashes))}): not all measured "
                          "the same settings", "warn"))
    single = [fw for fw, r in summary.iterrows() if r["n_ok"] == 1]
    if single:
        items.append(f"one ok repeat only for {', '.join(single)}: the spread shown is over steps, not repeats")
    items += _spread(sweep)
    if sweep.environment.git_dirty:
        items.append(Cell("measured from a checkout with uncommitted changes", "warn"))
    device = (sweep.scenario.get("hardware") or {}).get("device")
    if device == "cpu":
        items.append("CPU run: GPU memory and MFU do not apply (shown as —); CPU throughput says nothing about GPUs")
    for r in sweep.runs:
        if r.metrics.nvml_error and device != "cpu":
            items.append(Cell(f"{r.framework} r{r.repeat}: NVML sampling error: {short(r.metrics.nvml_error, 200)}",
                              "warn"))
    items += [Cell(e, "bad") for e in eval_errors]
    for _, row in parity_df[parity_df["parity_status"].isin(["departs", "transient"])].iterrows():
        what, cls = (("departs from", "bad") if row["parity_status"] == "departs"
                     else ("parted for a while from (transient, then agreed again)", "warn"))
        why = (f"max |Δ| {fmt(row['max_abs_diff'], 4)} > tolerance {fmt(row['tolerance'], 4)}"
               if math.isfinite(row["max_abs_diff"]) else "a loss is NaN or infinite")
        items.append(Cell(f"{row['framework']} r{row['repeat']}: loss curve {what} {sweep.baseline} "
                          f"from step {int(row['first_departure_step'])} ({why})", cls))
    if not sweep.runs:
        items.append(Cell("no run is stored: nothing was measured", "bad"))
    if not items:
        items.append("none: every planned run finished ok with valid settings")
    return items


def _machine(env, cards: bool) -> str:  # noqa: ANN001
    """The machine a run's environment names: its GPU kind and, with ``cards``, which cards (else the CPU)."""
    if (kind := machine_kind(env.model_dump())) is None:
        return env.cpu or "unknown machine"
    return kind + (f" (card {', '.join(u.removeprefix('GPU-')[:8] for u in env.gpu_uuids)})" if cards else "")


def _spread(sweep: Sweep) -> list[Cell]:
    """Rows of one sweep measured on more than one machine, or from more than one commit: their ratios cross
    what the table presents as side by side. Machines are told apart by their cards where every run recorded them
    (runs stored before the cards were recorded: by the GPU kind only)."""
    envs = [(r, r.environment) for r in sweep.runs if r.environment is not None]
    cards = bool(envs) and all(e.gpu_uuids for _, e in envs)
    out = []
    for prep, key, what, whose in (("on", lambda e: _machine(e, cards), "machines", "machines'"),
                                   ("from", lambda e: e.code(), "commits", "code's")):
        groups: dict[str, list[str]] = {}
        for r, e in envs:
            if k := key(e):
                groups.setdefault(k, []).append(f"{r.framework} r{r.repeat}")
        if len(groups) > 1:
            said = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
            out.append(Cell(f"rows measured {prep} {len(groups)} {what} ({said}): ratios between their rows "
                            f"include the {whose} difference", "warn"))
    return out
