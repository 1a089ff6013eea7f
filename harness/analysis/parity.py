"""Loss parity: does a framework's per-step loss curve match the baseline framework's?

In the closed division every framework trains the same checkpoint on the same data in the same order with
the same seed, optimizer and learning rate, so the per-step training losses (``RunResult.steps[i].loss``)
should agree up to floating-point noise. A faster framework whose curve departs from the baseline's is
flagged, not celebrated (a skipped loss term, wrong label masking, a different effective LR or a broken
kernel all show here first).

The check, per run, against the baseline framework's run of the same repeat index (repeat 0 when the
baseline has no such repeat; the baseline's own repeats are compared with its repeat 0, which measures its
run-to-run determinism)::

    d_i            = |loss_i - baseline_loss_i|        over the n steps both runs logged a loss for
                     (infinite where either loss is NaN or infinite)
    max_abs_diff   = max_i d_i,   mean_abs_diff = mean_i d_i
    tolerance      = atol + rtol * mean_i |baseline_loss_i|
    first_departure_step = the first step with d_i > tolerance (None if none)
    parity_status  = "ok"        if max_abs_diff <= tolerance
                     "departs"   if either curve has a NaN or infinite loss at a common step (a departure at
                                 that step, whatever comes after)
                     "transient" if not, but n >= 20, every d_i of the first quarter of the steps is within
                                 tolerance, and the mean d_i of the last tenth is too
                     "departs"   otherwise
    parity_ok      = parity_status != "departs"

GRPO without a KL term (``beta`` 0) is not compared: its loss, the group-normalised advantages times a ratio of
1 on the sampling policy, is zero at every step whatever the tool computes, so any two curves would agree. Its
runs get ``parity_status`` "not applicable" (``parity_ok`` None); their reward curves are what the report
compares (harness.reporting.objective).

Which runs have a curve: ok runs and runs stored as "diverged" (harness.measuring.trained: a loss became NaN or
infinite). A diverged run is compared like any other, so the report shows where its curve left the baseline's;
a NaN is never dropped before comparing (dropping it would let a run trained at ``lr: .inf`` read "ok, max diff
0" over the one step before its loss went to NaN). Failed runs (error, OOM, timeout, ...) have no curve.

Why "transient": two implementations of the same step that agree bit for bit for tens of steps can still part
at a loss spike, where a rounding difference of 1e-6 is amplified for a few steps before both curves settle
again (seen on the CPU quality scenario: TRL identical to the hf Trainer for 46 steps, 2e-6 apart at step 47,
up to 0.21 apart inside hf's spike at steps 84-91, back within 1e-4 from step 120 on). A framework that computes
something else (wrong masking, a missing loss term, another learning rate, a planted ``loss_scale``) departs
from the start or does not come back, and stays "departs". The report shows transients as warnings with the
step where the curves parted.

Default tolerances, by the scenario's ``model.dtype`` (``eval.parity_atol`` / ``eval.parity_rtol`` in the
scenario override them):

- float32: atol 0.01, rtol 0.01. Two float32 implementations of the same step differ only in summation
  order (~1e-6 relative per step), which training amplifies over steps: the hf Trainer and the plain loop
  of ``dummy`` differ by < 1e-3 over 60 steps of the CPU quality scenario. The margin is for other kernels
  (fused cross-entropy, different attention) which round differently.
- bfloat16 / float16: atol 0.05, rtol 0.05. bf16 keeps 8 bits of mantissa (relative rounding 4e-3 per
  operation); GPU kernels differ in accumulation order and atomics, and at a high LR the curves drift
  apart by a few hundredths over hundreds of steps without anything being wrong. A real bug (a missing loss
  term, double-counted accumulation, wrong masking) moves the loss by tens of percent.

A planted divergence (``dummy`` with ``overrides: {loss_scale: 1.5}``, 50% higher losses) is flagged by
either tolerance.

Seed spread. Training from random weights in bf16 is chaotic: two correct implementations of the same step part
within a hundred steps and never meet again step for step (on quality_gpu, TRL — the hf Trainer underneath — parts
from hf at step 94 on an H100), so "departs" alone cannot tell a bug from chaos there. When the baseline ran
several seeds (``measure.seed_per_repeat``: its repeats trained different seeds), the sweep measures how far two
correct curves may lie apart: the seed band ``s_i = max - min`` of the baseline's seed curves at step i. A run
that departs is then judged against that band::

    D_j, S_j     = the means of d_i and s_i over the window of w = max(5, n // 50) steps ending at step j
    parity_status = "seed-spread" if D_j <= S_j + tolerance for every j (and no NaN or infinite loss):
                    it differs from the baseline's same-seed run no more than the baseline differs from itself
                    across seeds, i.e. it trains the same model as far as one can tell; else "departs".

The window keeps one batch's loss spike from deciding it; a planted 50% loss scale lies far outside the band of
any real seed spread. ``seed-spread`` counts as parity (``parity_ok``) and the report says which band it met.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from harness.measuring.trained import STATUS_DIVERGED
from harness.storing.schema import RunResult
from harness.storing.sweep import DEFAULT_BASELINE, NotAResultsDir, load_sweep

# (atol, rtol) by training dtype; see the module docstring for why
DEFAULT_TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (0.01, 0.01),
    "bfloat16": (0.05, 0.05),
    "float16": (0.05, 0.05),
}
COLUMNS = ["framework", "repeat", "max_abs_diff", "mean_abs_diff", "tolerance", "first_departure_step",
           "parity_status", "parity_ok"]
TRANSIENT_MIN_STEPS = 20  # fewer common steps: no early and final windows to speak of, any departure departs


def loss_curve(run: RunResult) -> dict[int, float]:
    """``{optimizer step: loss}`` of a run (steps that logged no loss left out; NaN and infinite losses kept)."""
    return {s.step: float(s.loss) for s in run.steps if s.loss is not None}


def has_curve(run: RunResult) -> bool:
    """The run trained to the end (ok) or until its loss diverged: it has a loss curve to compare."""
    return run.ok or run.status == STATUS_DIVERGED


def tolerance_for(run: RunResult, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """``(atol, rtol)``: the given values, else the default for the run's training dtype."""
    dtype = run.expected.get("dtype") or run.effective.get("dtype") or "bfloat16"
    d_atol, d_rtol = DEFAULT_TOLERANCE.get(str(dtype), DEFAULT_TOLERANCE["bfloat16"])
    return (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)


def compare_curves(curve: dict[int, float], ref: dict[int, float], atol: float, rtol: float) -> dict[str, Any]:
    """Compare two loss curves on their common steps (definitions in the module docstring)."""
    common = sorted(set(curve) & set(ref))
    if not common:
        return {"max_abs_diff": None, "mean_abs_diff": None, "tolerance": None, "first_departure_step": None,
                "parity_status": None, "parity_ok": None, "steps": 0}
    # a NaN or infinite loss on either side is an infinite difference: a departure at that step
    diffs = [abs(curve[s] - ref[s]) if math.isfinite(curve[s]) and math.isfinite(ref[s]) else math.inf
             for s in common]
    n = len(common)
    finite_ref = [abs(ref[s]) for s in common if math.isfinite(ref[s])]
    tol = atol + rtol * (math.fsum(finite_ref) / len(finite_ref) if finite_ref else 0.0)
    mx = max(diffs)
    first = next((s for s, d in zip(common, diffs, strict=True) if d > tol), None)
    if mx <= tol:
        status = "ok"
    elif math.isinf(mx):
        status = "departs"
    else:
        early = diffs[: math.ceil(n / 4)]
        late = diffs[n - math.ceil(n / 10):]
        settled = n >= TRANSIENT_MIN_STEPS and max(early) <= tol and math.fsum(late) / len(late) <= tol
        status = "transient" if settled else "departs"
    return {"max_abs_diff": mx, "mean_abs_diff": math.fsum(diffs) / n if not math.isinf(mx) else math.inf,
            "tolerance": tol,
            "first_departure_step": first, "parity_status": status, "parity_ok": status != "departs", "steps": n}


def seed_band(baseline_runs: list[RunResult]) -> dict[int, float] | None:
    """``{step: max - min}`` of the baseline's loss over its runs that trained different seeds, on the steps all of
    them logged; None without at least two distinct seeds (a band from one seed's repeats would measure
    run-to-run noise, not chaos)."""
    curves: dict[tuple, dict[int, float]] = {}
    for r in baseline_runs:
        seeds = tuple(sorted((r.seeds or {}).items()))
        curve = loss_curve(r) if has_curve(r) else {}
        if seeds and curve and seeds not in curves:
            curves[seeds] = curve
    if len(curves) < 2:
        return None
    common = set.intersection(*(set(c) for c in curves.values()))
    band = {}
    for step in sorted(common):
        vals = [c[step] for c in curves.values()]
        if all(math.isfinite(v) for v in vals):
            band[step] = max(vals) - min(vals)
    return band or None


def _windowed(values: list[float], w: int) -> list[float]:
    """Mean of each window of ``w`` values ending at every position (shorter windows at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= w:
            total -= values[i - w]
        out.append(total / min(i + 1, w))
    return out


def within_seed_band(curve: dict[int, float], ref: dict[int, float], band: dict[int, float], tol: float) -> bool:
    """The windowed distance of ``curve`` from ``ref`` never exceeds the windowed seed band plus ``tol``
    (definitions in the module docstring); False when they share no step of the band or a loss is not finite."""
    common = sorted(set(curve) & set(ref) & set(band))
    if not common or not all(math.isfinite(curve[s]) and math.isfinite(ref[s]) for s in common):
        return False
    w = max(5, len(common) // 50)
    d = _windowed([abs(curve[s] - ref[s]) for s in common], w)
    b = _windowed([band[s] for s in common], w)
    return all(dj <= bj + tol for dj, bj in zip(d, b, strict=True))


def _reference(idx: dict[tuple[str, int], RunResult], framework: str, repeat: int,
               baseline: str) -> RunResult | None:
    if framework != baseline and (baseline, repeat) in idx and loss_curve(idx[(baseline, repeat)]):
        return idx[(baseline, repeat)]
    return idx.get((baseline, 0))


def zero_by_construction(run: RunResult) -> bool:
    """GRPO without a KL term: its loss is zero at every step (module docstring), nothing to compare."""
    return run.expected.get("objective") == "grpo" and not run.expected.get("beta")


NOT_APPLICABLE = {"max_abs_diff": None, "mean_abs_diff": None, "tolerance": None, "first_departure_step": None,
                  "parity_status": "not applicable", "parity_ok": None, "steps": 0}


def _compare_all(runs: list[RunResult], baseline: str, atol: float | None, rtol: float | None):
    idx = {(r.framework, r.repeat): r for r in runs}
    band = seed_band([r for r in runs if r.framework == baseline])
    for r in runs:
        if zero_by_construction(r):
            yield r.framework, r.repeat, dict(NOT_APPLICABLE)
            continue
        ref = _reference(idx, r.framework, r.repeat, baseline)
        curve = loss_curve(r) if has_curve(r) else {}
        ref_curve = loss_curve(ref) if ref is not None and has_curve(ref) else {}
        a, rt = tolerance_for(ref or r, atol, rtol)
        c = compare_curves(curve, ref_curve, a, rt)
        if c["parity_status"] == "departs" and band and within_seed_band(curve, ref_curve, band, c["tolerance"]):
            c |= {"parity_status": "seed-spread", "parity_ok": True}
        yield r.framework, r.repeat, c


def parity_table(runs: list[RunResult], baseline: str, atol: float | None = None, rtol: float | None = None):
    """Loss parity of every run against the baseline framework.

    Args:
        runs: stored runs (``harness.storing.results.load_results``).
        baseline: framework name every curve is compared with (the scenario's ``measure.baseline``).
        atol: absolute tolerance; default by training dtype (:data:`DEFAULT_TOLERANCE`).
        rtol: tolerance relative to the baseline's mean loss; default by training dtype.

    Returns:
        A pandas DataFrame with columns :data:`COLUMNS`, one row per run. Rows whose run (or its baseline) did
        not finish or logged no loss have NaN differences and ``parity_ok`` None.
    """
    import pandas as pd  # heavy optional dependency: only the tables need it

    rows = [{"framework": fw, "repeat": rep, **{k: c[k] for k in COLUMNS[2:]}}
            for fw, rep, c in _compare_all(runs, baseline, atol, rtol)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["parity_ok"] = df["parity_ok"].astype(object)
    df["first_departure_step"] = df["first_departure_step"].astype("Int64")  # a step number or <NA>, not a float
    return df


def parity_columns(runs: list[RunResult], baseline: str, atol: float | None = None,
                   rtol: float | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """Per-run columns of the runs table: ``{(framework, repeat): {"parity_ok", "parity_status",
    "parity_max_abs_diff"}}``."""
    return {(fw, rep): {"parity_ok": c["parity_ok"], "parity_status": c["parity_status"],
                        "parity_max_abs_diff": c["max_abs_diff"]}
            for fw, rep, c in _compare_all(runs, baseline, atol, rtol)}


def settings(scenario: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """Baseline framework and parity tolerances (``eval.parity_atol`` / ``parity_rtol``) of a resolved scenario."""
    ev = scenario.get("eval") or {}
    baseline = (scenario.get("measure") or {}).get("baseline", DEFAULT_BASELINE)
    return baseline, ev.get("parity_atol"), ev.get("parity_rtol")


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.analysis.parity RESULTS_DIR``: print the parity table of a stored sweep."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m harness.analysis.parity RESULTS_DIR", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(Path(argv[0]))
    except NotAResultsDir as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    baseline, atol, rtol = settings(sweep.scenario)
    df = parity_table(sweep.runs, baseline, atol, rtol)
    print(df.to_string(index=False))
    print(json.dumps({"baseline": baseline, "all_ok": bool(df["parity_ok"].fillna(False).all())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
