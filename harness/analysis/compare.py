"""Regression gate between two stored sweeps (the command is ``python -m harness compare``, harness.cli.compare).

Compares two stored sweeps (``results/<run-id>`` directories), pairing rows by (scenario, framework), on:

=====================  ==========  =======================================================================
metric                 better      threshold
=====================  ==========  =======================================================================
tokens_per_s           higher      ``--tokens-drop`` (relative, default 5%)
step_s_median          lower       ``--tokens-drop`` (a step time is the same measurement seen inverted)
peak memory            lower       ``--memory-rise`` (relative, default 5%); NVML per-process, else torch
                                   reserved; "n/a" when neither side measured GPU memory (CPU runs)
final_loss             lower       information only, unless ``--loss-rise`` (relative) is given
=====================  ==========  =======================================================================

Rules:

- Each side's value is the figure the report shows (harness.analysis.aggregate, one rule for both): the median
  over its ok repeats, with the fastest and slowest (lowest and highest value) dropped first when there are 5
  or more, as MLPerf does.
- Noise band: the relative spread seen on either side — (max - min) / median over the (trimmed) repeats, or,
  with a single repeat, the relative per-step p10–p90 spread of tokens/s or step time over sqrt(steps) —
  times ``noise_k`` (default 2). Memory and loss have no per-step spread, so with one repeat their band is 0.
- A metric regresses when it got worse by more than ``max(threshold, noise band)``; it "improved" when it got
  better by more than that; otherwise "ok".
- A framework ok in the baseline but failed or absent in the candidate is REGRESSED (metric ``status``), with
  the candidate's status and reason. One ok now that was not ok before is "new". Not ok on either side:
  "missing" (nothing to compare; not a regression).
- A framework whose candidate runs are ok but INVALID (effective settings differ from the scenario) while the
  baseline's were valid is REGRESSED (metric ``valid``): its speed is not a fair measurement — the trap of
  a silently disabled gradient checkpointing looks like a speed-up.

Different settings (decision): a framework's numbers are comparable only if its own settings are the same on both
sides: the shared scenario settings plus its own row (the description, the report's baseline, repeats, time limits
and the other rows left out; harness.spec.scenario.row_settings). They are read from the two sweeps' stored scenarios,
which also name the keys that changed (printed under the warning, and in the ``changes`` column); where a side has
no stored scenario, the runs' ``settings_hash`` decides, else the whole ``scenario_hash``. So editing one row of a
scenario leaves the other rows comparable. The comparison is still made and printed (it is often what one wants to
see after changing a scenario), but every affected row is flagged "settings differ: not comparable", a warning is
printed above the table and in the verdict line, and the ``comparable`` flag of the JSON output is false. The exit
code is still 1 on a regression and 0 otherwise, so that a nightly job keeps gating; ``--require-same-settings``
turns a mismatch into exit code 2.

Bad input (not a results directory, no run stored, or no scenario in common) raises :class:`NotAResultsDir`; the
command turns it into exit code 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.analysis.aggregate import is_empty, number, over_repeats
from harness.spec.scenario import row_settings
from harness.storing.schema import STATUS_OK, RunResult
from harness.storing.sweep import NotAResultsDir, Sweep, load_sweep

VERDICT_OK, VERDICT_IMPROVED, VERDICT_REGRESSED = "ok", "improved", "REGRESSED"
VERDICT_MISSING, VERDICT_NEW, VERDICT_NA, VERDICT_INFO = "missing", "new", "n/a", "info"
NOT_COMPARABLE = "settings differ: not comparable"
COLUMNS = ["scenario", "framework", "metric", "better", "baseline", "candidate", "change", "threshold", "noise",
           "n_baseline", "n_candidate", "verdict", "note", "comparable", "changes"]


def _step_spread(runs: list[RunResult], lo_key: str, hi_key: str, mid_key: str) -> float:
    """Relative uncertainty of a single repeat's mean, from its per-step p10–p90 spread (0 when not recorded).

    The metric is a mean over the measured steps, so its uncertainty is the per-step spread divided by
    sqrt(steps): with 30 steps a ±12 % per-step spread means ±2 % on the run's tokens/s. (Drift between
    machines or days is not in it; the thresholds cover that, and repeats measure it.)
    """
    if len(runs) != 1:
        return 0.0
    m = runs[0].metrics
    lo, hi, mid = number(getattr(m, lo_key)), number(getattr(m, hi_key)), number(getattr(m, mid_key))
    n = number(m.steps_measured) or 1
    if lo is None or hi is None or not mid:
        return 0.0
    return abs(hi - lo) / abs(mid) / max(1.0, n) ** 0.5


def _side_spread(runs: list[RunResult], key: str) -> float:
    """Noise seen on one side: spread over repeats, or per-step spread with one repeat."""
    if len(runs) >= 2:
        return over_repeats(runs, key).relative_spread
    if key == "tokens_per_s":
        return _step_spread(runs, "tokens_per_s_p10_step", "tokens_per_s_p90_step", "tokens_per_s")
    if key == "step_s_median":
        return _step_spread(runs, "step_s_p10", "step_s_p90", "step_s_median")
    return 0.0


def _memory_key(base: list[RunResult], cand: list[RunResult]) -> str | None:
    """NVML per-process when both sides measured it, else torch reserved; None when no GPU memory on both."""
    for key in ("peak_vram_nvml_gib", "peak_reserved_gib"):
        if over_repeats(base, key).n and over_repeats(cand, key).n:
            return key
    return None


def _metric_row(key: str, label: str, better: str, base: list[RunResult], cand: list[RunResult],
                threshold: float | None, noise_k: float) -> dict[str, Any]:
    b, c = over_repeats(base, key).median, over_repeats(cand, key).median
    row: dict[str, Any] = {"metric": label, "better": better, "baseline": b, "candidate": c, "change": None,
                           "threshold": threshold, "noise": None, "n_baseline": len(base), "n_candidate": len(cand),
                           "note": ""}
    if b is None or c is None:
        row |= {"verdict": VERDICT_NA, "note": "not measured on " + ("either side" if b is None and c is None
                                                                     else "baseline" if b is None else "candidate")}
        return row
    change = (c - b) / abs(b) if b else (0.0 if c == b else math.inf)
    noise = noise_k * max(_side_spread(base, key), _side_spread(cand, key))
    row |= {"change": change, "noise": noise}
    if threshold is None:
        row |= {"verdict": VERDICT_INFO, "note": "information only (give --loss-rise to gate on it)"}
        return row
    allowed = max(threshold, noise)
    worse = -change if better == "higher" else change
    if worse > allowed:
        row["verdict"] = VERDICT_REGRESSED
        row["note"] = f"worse by {100 * worse:.1f}% > allowed {100 * allowed:.1f}%" + (
            " (noise band)" if noise > threshold else "")
    elif -worse > allowed:
        row["verdict"] = VERDICT_IMPROVED
    else:
        row["verdict"] = VERDICT_OK
        if worse > threshold:
            row["note"] = f"worse by {100 * worse:.1f}%, within the noise band ({100 * noise:.1f}%)"
    return row


def _status_text(runs: list[RunResult]) -> str:
    if not runs:
        return "no stored run"
    return "; ".join(f"r{r.repeat} {r.status}: {' '.join(str(r.reason or '').split())[:200]}"
                     for r in runs if r.status != STATUS_OK) or "ok"


def _check_dir(path: Path) -> Sweep:
    sweep = load_sweep(Path(path))
    if not sweep.runs:
        raise NotAResultsDir(f"{path}: no stored run in runs/ (the sweep never finished a run)")
    return sweep


_UNSET = object()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def settings_changes(base: dict, cand: dict, framework: str) -> list[str] | None:
    """The settings of one framework's runs that differ between two stored (resolved) scenarios, as
    ``key: old -> new`` (its own row shown as ``framework.<key>``); None when a side has no such row."""
    try:
        b, c = row_settings(base, framework), row_settings(cand, framework)
    except KeyError:
        return None
    for d in (b, c):
        d["framework"] = d.pop("frameworks")[0]
    fb, fc = _flat(b), _flat(c)
    return [f"{k}: {fb.get(k, '(unset)')} -> {fc.get(k, '(unset)')}" for k in sorted(fb.keys() | fc.keys())
            if fb.get(k, _UNSET) != fc.get(k, _UNSET)]


def _same_settings(b_sw: Sweep, c_sw: Sweep, fw: str, b_all: list[RunResult],
                   c_all: list[RunResult]) -> tuple[bool, list]:
    """Whether one framework's baseline and candidate runs measured the same settings, and what changed.

    From the two sweeps' stored scenarios where both have the framework's row (the changed keys come with it);
    else by the runs' ``settings_hash`` where every run has one, else by ``scenario_hash``. A side with no hash
    at all cannot disagree."""
    changes = settings_changes(b_sw.scenario, c_sw.scenario, fw) if b_sw.scenario and c_sw.scenario else None
    if changes is not None:
        return not changes, changes
    key = "settings_hash" if all(r.settings_hash for r in b_all + c_all) else "scenario_hash"
    hashes_b = {getattr(r, key) for r in b_all if getattr(r, key)}
    hashes_c = {getattr(r, key) for r in c_all if getattr(r, key)}
    return not (hashes_b and hashes_c and hashes_b != hashes_c), []


def compare(baseline_dir: Path, candidate_dir: Path, tps_drop: float = 0.05, mem_rise: float = 0.05,
            loss_rise: float | None = None, noise_k: float = 2.0):
    """Compare a candidate sweep against a baseline sweep.

    Args:
        baseline_dir: results directory of the reference sweep.
        candidate_dir: results directory of the sweep under test.
        tps_drop: relative tokens/s drop (and step-time rise) tolerated, e.g. 0.05 = 5%.
        mem_rise: relative peak-memory rise tolerated.
        loss_rise: relative final-loss rise tolerated; None: final loss is information only.
        noise_k: the noise band is ``noise_k`` times the relative spread seen in repeats (or steps).

    Returns:
        (DataFrame with one row per scenario x framework x metric — columns ``COLUMNS`` —, regressed flag).

    Raises:
        NotAResultsDir: a directory is not a results directory, holds no run, or the two share no scenario.
    """
    import pandas as pd  # heavy optional dependency: only the result table needs it

    base_sw, cand_sw = _check_dir(baseline_dir), _check_dir(candidate_dir)
    scen_b = {r.scenario for r in base_sw.runs}
    scen_c = {r.scenario for r in cand_sw.runs}
    if not scen_b & scen_c:
        raise NotAResultsDir(f"no scenario in common: baseline has {sorted(map(str, scen_b))}, "
                             f"candidate has {sorted(map(str, scen_c))}")
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys([(r.scenario, r.framework) for r in base_sw.runs]
                              + [(r.scenario, r.framework) for r in cand_sw.runs]))
    for scen, fw in keys:
        if scen not in scen_b or scen not in scen_c:
            continue  # a scenario only one side ran is not a pair
        b_all = [r for r in base_sw.runs if r.scenario == scen and r.framework == fw]
        c_all = [r for r in cand_sw.runs if r.scenario == scen and r.framework == fw]
        b_ok = [r for r in b_all if r.ok]
        c_ok = [r for r in c_all if r.ok]
        comparable, changes = _same_settings(base_sw, cand_sw, fw, b_all, c_all)
        ident = {"scenario": scen, "framework": fw, "comparable": comparable, "changes": "; ".join(changes)}
        status_row = {"metric": "status", "better": "", "baseline": None, "candidate": None, "change": None,
                      "threshold": None, "noise": None, "n_baseline": len(b_ok), "n_candidate": len(c_ok)}
        if b_ok and not c_ok:
            why = "missing from candidate" if not c_all else f"failed in candidate: {_status_text(c_all)}"
            rows.append(ident | status_row | {"verdict": VERDICT_REGRESSED, "note": f"ok in baseline, {why}"})
            continue
        if not b_ok and c_ok:
            why = "not in baseline" if not b_all else f"not ok in baseline: {_status_text(b_all)}"
            rows.append(ident | status_row | {"verdict": VERDICT_NEW, "note": why})
        if not b_ok and not c_ok:
            rows.append(ident | status_row | {"verdict": VERDICT_MISSING,
                                              "note": f"no ok run on either side; candidate: {_status_text(c_all)}"})
            continue
        if not b_ok:
            continue
        b_valid = all(r.valid for r in b_ok)
        c_invalid = [x for r in c_ok if not r.valid for x in (r.invalid_reasons or ["invalid"])]
        if b_valid and c_invalid:
            rows.append(ident | status_row | {"metric": "valid", "verdict": VERDICT_REGRESSED,
                                              "note": "candidate ran with settings that differ from the scenario: "
                                              + "; ".join(dict.fromkeys(c_invalid))})
        rows.append(ident | _metric_row("tokens_per_s", "tokens_per_s", "higher", b_ok, c_ok, tps_drop, noise_k))
        rows.append(ident | _metric_row("step_s_median", "step_s_median", "lower", b_ok, c_ok, tps_drop, noise_k))
        mem = _memory_key(b_ok, c_ok)
        if mem is None:
            rows.append(ident | status_row | {"metric": "peak_memory", "better": "lower", "verdict": VERDICT_NA,
                                              "threshold": mem_rise,
                                              "note": "no GPU memory metric on both sides (CPU run?)"})
        else:
            rows.append(ident | _metric_row(mem, mem, "lower", b_ok, c_ok, mem_rise, noise_k))
        rows.append(ident | _metric_row("final_loss", "final_loss", "lower", b_ok, c_ok, loss_rise, noise_k))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if not df.empty:
        nc = ~df["comparable"].astype(bool)
        df.loc[nc, "note"] = [f"{NOT_COMPARABLE}; {n}" if n else NOT_COMPARABLE for n in df.loc[nc, "note"]]
    regressed = bool((df["verdict"] == VERDICT_REGRESSED).any()) if not df.empty else False
    return df, regressed


def _fmt_value(metric: str, v: Any) -> str:
    if is_empty(v):
        return "—"
    if metric in ("tokens_per_s",):
        return f"{v:,.0f}"
    if metric == "step_s_median":
        return f"{v:.4f}"
    if metric == "final_loss":
        return f"{v:.4f}"
    return f"{v:.2f}"


def _pct(v: Any, signed: bool = True) -> str:
    if is_empty(v):
        return "—"
    if math.isinf(v):
        return "inf"
    return f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%"


def render(df, regressed: bool, baseline_dir: Path, candidate_dir: Path) -> str:
    """The comparison as readable plain text (table, warnings and the final verdict line)."""
    header = ["scenario", "framework", "metric", "baseline", "candidate", "change", "allowed", "verdict", "note"]
    rows = []
    for _, r in df.iterrows():
        allowed = None
        if not is_empty(r["threshold"]):
            allowed = max(r["threshold"], r["noise"]) if not is_empty(r["noise"]) else r["threshold"]
        rows.append([str(r["scenario"]), str(r["framework"]), str(r["metric"]), _fmt_value(r["metric"], r["baseline"]),
                     _fmt_value(r["metric"], r["candidate"]), _pct(r["change"]), _pct(allowed, signed=False),
                     str(r["verdict"]), str(r["note"] or "")])
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the note is last and free-length
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [f"baseline:  {baseline_dir}", f"candidate: {candidate_dir}", ""]
    not_comp = {f"{r['scenario']}/{r['framework']}": r["changes"] for _, r in df.iterrows() if not r["comparable"]}
    if not_comp:
        out += [f"WARNING: {NOT_COMPARABLE} — the settings differ for {', '.join(sorted(not_comp))}; "
                "differences below may come from the settings, not the software"]
        out += [f"  {k}: {v}" for k, v in sorted(not_comp.items()) if v] + [""]
    out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    n_reg = int((df["verdict"] == VERDICT_REGRESSED).sum()) if not df.empty else 0
    verdict = (f"VERDICT: REGRESSED ({n_reg} regression(s))" if regressed
               else "VERDICT: ok (no regression beyond thresholds and noise)")
    if not_comp:
        verdict += f" — WARNING: {NOT_COMPARABLE}"
    return "\n".join(out + ["", verdict]) + "\n"
