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
- Noise: :mod:`harness.analysis.noise` gives each change a band from the spread of the repeats, the per-step
  spread and a stated run-to-run floor per device class, so one repeat does not make the band vanish (nor
  steps alone make it swell past any change). A metric regresses when it got worse by more than
  ``max(threshold, band)`` and "improved" when better by more than that. When the data cannot decide — a band
  wider than the threshold, too few measured steps, a metric measured on one side only — the row is
  "inconclusive", never "ok". The command prints the noise model it used.
- A framework ok in the baseline but failed or absent in the candidate is REGRESSED (metric ``status``), with
  the candidate's status and reason (an unreadable run file is named). One ok now that was not ok before is
  "new". Not ok on either side: "missing" (nothing to compare; not a regression).
- A framework whose candidate runs are ok but INVALID (effective settings differ from the scenario) while the
  baseline's were valid is REGRESSED (metric ``valid``): its speed is not a fair measurement — the trap of
  a silently disabled gradient checkpointing looks like a speed-up.
- The comparison's verdict (:func:`overall_verdict`): REGRESSED when any row regressed; else "inconclusive"
  when any row is, or when no framework had ok runs on both sides (nothing was compared); else "ok".

Different settings (decision): a framework's numbers are comparable only if its own settings are the same on both
sides: the shared scenario settings plus its own row (the description, the report's baseline, repeats, time limits
and the other rows left out; harness.spec.scenario.row_settings). They are read from the two sweeps' stored scenarios,
which also name the keys that changed (printed under the warning, and in the ``changes`` column); where a side has
no stored scenario, the runs' ``settings_hash`` decides, else the whole ``scenario_hash``. So editing one row of a
scenario leaves the other rows comparable. The same settings over other rows are other settings too: where the
runs of both sides record the digest of the dataset file they read (``dataset_sha256_16``) and it differs (the
JSONL was edited, or the harness builds it otherwise), the row is not comparable either. The comparison is still
made and printed (it is often what one wants to see after changing a scenario), but every affected row is flagged
"settings differ: not comparable", a warning is printed above the table and in the verdict line, and the
``comparable`` flag of the JSON output is false. The exit code still follows the verdict, so that a nightly job
keeps gating; ``--require-same-settings`` turns a mismatch into exit code 2.

Bad input (not a results directory, no readable run stored, or no scenario in common) raises
:class:`NotAResultsDir`; the command turns it into exit code 2. Unreadable stored files are left out and listed
(``Sweep.unreadable``), never a reason to refuse the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.analysis import noise
from harness.analysis.aggregate import is_empty, over_repeats
from harness.analysis.noise import VERDICT_IMPROVED, VERDICT_INCONCLUSIVE, VERDICT_OK, VERDICT_REGRESSED
from harness.inputs.data import CONVERSATIONS
from harness.spec.scenario import row_settings
from harness.storing.schema import STATUS_OK, RunResult
from harness.storing.sweep import NotAResultsDir, Sweep, load_sweep

__all__ = ["COLUMNS", "NOT_COMPARABLE", "VERDICT_IMPROVED", "VERDICT_INCONCLUSIVE", "VERDICT_OK", "VERDICT_REGRESSED",
           "compare", "load_pair", "overall_verdict", "render", "settings_changes"]

VERDICT_MISSING, VERDICT_NEW, VERDICT_NA, VERDICT_INFO = "missing", "new", "n/a", "info"
NOT_COMPARABLE = "settings differ: not comparable"
COLUMNS = ["scenario", "framework", "metric", "better", "baseline", "candidate", "change", "threshold", "noise",
           "noise_basis", "n_baseline", "n_candidate", "verdict", "note", "comparable", "changes"]
MEMORY_KEYS = ("peak_vram_nvml_gib", "peak_reserved_gib")  # in order of preference


def _memory_key(base: list[RunResult], cand: list[RunResult]) -> tuple[str | None, str]:
    """The memory metric both sides measured (NVML per-process, else torch reserved) and, without one, why."""
    for key in MEMORY_KEYS:
        if over_repeats(base, key).n and over_repeats(cand, key).n:
            return key, ""
    measured = [side for side, runs in (("baseline", base), ("candidate", cand))
                if any(over_repeats(runs, k).n for k in MEMORY_KEYS)]
    if not measured:
        return None, "no GPU memory metric on either side (CPU run?)"
    return None, f"GPU memory measured on the {measured[0]} only"


def _metric_row(key: str, label: str, better: str, base: list[RunResult], cand: list[RunResult],
                threshold: float | None, noise_k: float) -> dict[str, Any]:
    b, c = over_repeats(base, key).median, over_repeats(cand, key).median
    row: dict[str, Any] = {"metric": label, "better": better, "baseline": b, "candidate": c, "change": None,
                           "threshold": threshold, "noise": None, "noise_basis": "", "n_baseline": len(base),
                           "n_candidate": len(cand), "note": ""}
    if b is None and c is None:
        return row | {"verdict": VERDICT_NA, "note": "not measured on either side"}
    if b is None or c is None:
        verdict = VERDICT_INFO if threshold is None else VERDICT_INCONCLUSIVE
        return row | {"verdict": verdict, "note": f"measured on the {'candidate' if b is None else 'baseline'} only"}
    change = (c - b) / abs(b) if b else (0.0 if c == b else math.inf)
    pair = noise.pair_noise(base, cand, key, noise_k)
    row |= {"change": change, "noise": pair.band, "noise_basis": pair.basis}
    if threshold is None:
        return row | {"verdict": VERDICT_INFO, "note": "information only (give --loss-rise to gate on it)"}
    worse = -change if better == "higher" else change
    verdict, note = noise.decide(worse, threshold, pair)
    return row | {"verdict": verdict, "note": note}


def _status_text(runs: list[RunResult]) -> str:
    if not runs:
        return "no stored run"
    return "; ".join(f"r{r.repeat} {r.status}: {' '.join(str(r.reason or '').split())[:200]}"
                     for r in runs if r.status != STATUS_OK) or "ok"


def load_pair(baseline_dir: Path, candidate_dir: Path) -> tuple[Sweep, Sweep]:
    """Both sweeps of a comparison, each with at least one readable stored run.

    Raises:
        NotAResultsDir: a directory is not a results directory or holds no readable run.
    """
    out = []
    for path in (baseline_dir, candidate_dir):
        sweep = load_sweep(Path(path))
        if not sweep.runs:
            why = (f"; {len(sweep.unreadable)} stored file(s) could not be read: {sweep.unreadable[0]}"
                   if sweep.unreadable else " (the sweep never finished a run)")
            raise NotAResultsDir(f"{path}: no readable stored run in runs/{why}")
        out.append(sweep)
    return out[0], out[1]


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
    except (KeyError, TypeError, AttributeError):  # no such row, or a stored scenario of another shape
        return None
    for d in (b, c):
        d["framework"] = d.pop("frameworks")[0]
    fb, fc = _flat(b), _flat(c)
    return [f"{k}: {fb.get(k, '(unset)')} -> {fc.get(k, '(unset)')}" for k in sorted(fb.keys() | fc.keys())
            if fb.get(k, _UNSET) != fc.get(k, _UNSET)]


def _loss_rules(runs: list[RunResult]) -> list[str]:
    """The loss rules (``harness.inputs.data.LOSS_RULE``) of runs on conversation rows, as text: "none recorded"
    for such a run stored before the rule was (it may be an older one); empty where no run read conversations."""
    return sorted({str((r.dataset or {}).get("loss_rule", "none recorded")) for r in runs
                   if (r.dataset or {}).get("format") in CONVERSATIONS})


def _same_settings(b_sw: Sweep, c_sw: Sweep, fw: str, b_all: list[RunResult],
                   c_all: list[RunResult]) -> tuple[bool, list]:
    """Whether one framework's baseline and candidate runs measured the same settings, and what changed.

    From the two sweeps' stored scenarios where both have the framework's row (the changed keys come with it);
    else by the runs' ``settings_hash`` where every run has one, else by ``scenario_hash``. A side with no hash
    at all cannot disagree."""
    data_b = sorted({r.dataset_sha256_16 for r in b_all if r.dataset_sha256_16})
    data_c = sorted({r.dataset_sha256_16 for r in c_all if r.dataset_sha256_16})
    data = [f"dataset_sha256_16: {', '.join(data_b)} -> {', '.join(data_c)} (the rows trained on differ)"] \
        if data_b and data_c and data_b != data_c else []
    rule_b, rule_c = _loss_rules(b_all), _loss_rules(c_all)
    if rule_b and rule_c and rule_b != rule_c:
        data.append(f"loss_rule: {', '.join(rule_b)} -> {', '.join(rule_c)} (other tokens of the conversations bear "
                    "loss)")
    changes = settings_changes(b_sw.scenario, c_sw.scenario, fw) if b_sw.scenario and c_sw.scenario else None
    if changes is not None:
        return not (changes or data), changes + data
    key = "settings_hash" if all(r.settings_hash for r in b_all + c_all) else "scenario_hash"
    hashes_b = {getattr(r, key) for r in b_all if getattr(r, key)}
    hashes_c = {getattr(r, key) for r in c_all if getattr(r, key)}
    return not (hashes_b and hashes_c and hashes_b != hashes_c) and not data, data


def compare(baseline_dir: Path | Sweep, candidate_dir: Path | Sweep, tps_drop: float = 0.05,
            mem_rise: float = 0.05, loss_rise: float | None = None, noise_k: float = 2.0):
    """Compare a candidate sweep against a baseline sweep.

    Args:
        baseline_dir: results directory of the reference sweep (or the sweep, loaded by :func:`load_pair`).
        candidate_dir: results directory of the sweep under test (or the sweep).
        tps_drop: relative tokens/s drop (and step-time rise) tolerated, e.g. 0.05 = 5%.
        mem_rise: relative peak-memory rise tolerated.
        loss_rise: relative final-loss rise tolerated; None: final loss is information only.
        noise_k: the band is ``noise_k`` standard uncertainties of the change (:mod:`harness.analysis.noise`).

    Returns:
        (DataFrame with one row per scenario x framework x metric — columns ``COLUMNS`` —, regressed flag);
        :func:`overall_verdict` of the frame tells ok, REGRESSED and inconclusive apart.

    Raises:
        NotAResultsDir: a directory is not a results directory, holds no readable run, or the two share no
            scenario.
    """
    import pandas as pd  # heavy optional dependency: only the result table needs it

    if isinstance(baseline_dir, Sweep) and isinstance(candidate_dir, Sweep):
        base_sw, cand_sw = baseline_dir, candidate_dir
    else:
        base_sw, cand_sw = load_pair(Path(str(baseline_dir)), Path(str(candidate_dir)))
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
                      "threshold": None, "noise": None, "noise_basis": "", "n_baseline": len(b_ok),
                      "n_candidate": len(c_ok)}
        unreadable = "; ".join(str(u) for u in cand_sw.unreadable_runs(fw))
        if b_ok and not c_ok:
            why = "missing from candidate" if not c_all else f"failed in candidate: {_status_text(c_all)}"
            why += f" (unreadable: {unreadable})" if unreadable else ""
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
        mem, why_not = _memory_key(b_ok, c_ok)
        if mem is None:
            one_side = why_not.startswith("GPU memory measured")
            rows.append(ident | status_row | {"metric": "peak_memory", "better": "lower", "threshold": mem_rise,
                                              "verdict": VERDICT_INCONCLUSIVE if one_side else VERDICT_NA,
                                              "note": why_not})
        else:
            rows.append(ident | _metric_row(mem, mem, "lower", b_ok, c_ok, mem_rise, noise_k))
        rows.append(ident | _metric_row("final_loss", "final_loss", "lower", b_ok, c_ok, loss_rise, noise_k))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if not df.empty:
        nc = ~df["comparable"].astype(bool)
        df.loc[nc, "note"] = [f"{NOT_COMPARABLE}; {n}" if n else NOT_COMPARABLE for n in df.loc[nc, "note"]]
    regressed = bool((df["verdict"] == VERDICT_REGRESSED).any()) if not df.empty else False
    return df, regressed


def overall_verdict(df) -> str:
    """REGRESSED when any row regressed; "inconclusive" when any row is, or no framework was compared (no ok runs
    on both sides); else "ok"."""
    verdicts = set(df["verdict"]) if not df.empty else set()
    if VERDICT_REGRESSED in verdicts:
        return VERDICT_REGRESSED
    compared = verdicts - {VERDICT_MISSING, VERDICT_NEW}
    if VERDICT_INCONCLUSIVE in verdicts or not compared:
        return VERDICT_INCONCLUSIVE
    return VERDICT_OK


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


def render(df, baseline_dir: Path, candidate_dir: Path, noise_k: float = 2.0) -> str:
    """The comparison as readable plain text (noise model, table, warnings and the final verdict line)."""
    header = ["scenario", "framework", "metric", "baseline", "candidate", "change", "allowed", "band", "verdict",
              "note"]
    rows = []
    for _, r in df.iterrows():
        allowed = None
        if not is_empty(r["threshold"]):
            allowed = max(r["threshold"], r["noise"]) if not is_empty(r["noise"]) else r["threshold"]
        rows.append([str(r["scenario"]), str(r["framework"]), str(r["metric"]), _fmt_value(r["metric"], r["baseline"]),
                     _fmt_value(r["metric"], r["candidate"]), _pct(r["change"]), _pct(allowed, signed=False),
                     "—" if is_empty(r["noise"]) else f"±{100 * r['noise']:.1f}%", str(r["verdict"]),
                     str(r["note"] or "")])
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the note is last and free-length
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [f"baseline:  {baseline_dir}", f"candidate: {candidate_dir}", noise.describe(noise_k), ""]
    not_comp = {f"{r['scenario']}/{r['framework']}": r["changes"] for _, r in df.iterrows() if not r["comparable"]}
    if not_comp:
        out += [f"WARNING: {NOT_COMPARABLE} — the settings differ for {', '.join(sorted(not_comp))}; "
                "differences below may come from the settings, not the software"]
        out += [f"  {k}: {v}" for k, v in sorted(not_comp.items()) if v] + [""]
    out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    verdict = overall_verdict(df)
    n_reg = int((df["verdict"] == VERDICT_REGRESSED).sum()) if not df.empty else 0
    n_inc = int((df["verdict"] == VERDICT_INCONCLUSIVE).sum()) if not df.empty else 0
    if verdict == VERDICT_REGRESSED:
        text = f"VERDICT: REGRESSED ({n_reg} regression(s))"
    elif verdict == VERDICT_INCONCLUSIVE:
        text = (f"VERDICT: inconclusive ({n_inc} row(s) the data cannot decide)" if n_inc
                else "VERDICT: inconclusive (no framework has ok runs on both sides: nothing was compared)")
    else:
        text = "VERDICT: ok (no regression beyond thresholds and noise)"
    if not_comp:
        text += f" — WARNING: {NOT_COMPARABLE}"
    return "\n".join(out + ["", text]) + "\n"
