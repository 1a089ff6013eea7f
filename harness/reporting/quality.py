"""The report's quality tables: accuracy of the trained output, time to target, loss parity."""

from __future__ import annotations

from harness.analysis import parity
from harness.analysis.aggregate import is_empty, robust_median
from harness.reporting.document import EMPTY, Cell, fmt, short
from harness.storing.schema import RunResult
from harness.storing.sweep import Sweep

UNTRAINED = "untrained model"
PARITY_CELLS = {"ok": Cell("ok", "good"), "transient": Cell("transient", "warn"),
                "seed-spread": Cell("within seed spread", "good"), "departs": Cell("DEPARTS", "bad"),
                "not applicable": Cell("not applicable (loss zero by construction)")}


def evaluated_runs(sweep: Sweep) -> list[RunResult]:
    """The runs that carry an evaluation (ok or not)."""
    return [r for r in sweep.runs if r.eval is not None]


def eval_errors(sweep: Sweep) -> list[str]:
    """One line per run whose evaluation did not succeed."""
    return [f"{r.framework} r{r.repeat}: evaluation {r.eval.status}: {short(r.eval.error or 'no error message', 400)}"
            for r in evaluated_runs(sweep) if not r.eval.ok]


def quality_frame(sweep: Sweep):
    """Framework x metric over the repeats whose evaluation succeeded (harness.analysis.aggregate's median),
    plus an "untrained model" row when the evaluator scored the base checkpoint."""
    import pandas as pd  # heavy optional dependency: the report's tables are pandas frames

    values: dict[str, dict[str, list[float]]] = {}
    base = None
    for r in evaluated_runs(sweep):
        if not r.eval.ok:
            continue
        for k, v in r.eval.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(r.framework, {}).setdefault(k, []).append(float(v))
        if base is None and r.eval.baseline_metrics is not None:
            base = r.eval.baseline_metrics
    if not values:
        return pd.DataFrame()
    metrics = sorted({k for per_fw in values.values() for k in per_fw})
    order = [f for f in sweep.framework_order() if f in values]
    table = pd.DataFrame([[robust_median(values[fw].get(m, [])) for m in metrics] for fw in order],
                         index=pd.Index(order, name="framework"), columns=metrics, dtype=float)
    if base:
        untrained = pd.DataFrame([{k: v for k, v in base.items() if isinstance(v, (int, float))}],
                                 index=pd.Index([UNTRAINED], name="framework"))
        table = pd.concat([table, untrained.reindex(columns=table.columns)])
    return table


def _seed_values(sweep: Sweep) -> dict[str, dict[str, dict[tuple, float]]]:
    """framework -> metric -> {seeds: value}: each evaluated metric and the final loss of the ok runs, one value
    per distinct seed pair (a repeat of the same seeds is not another seed)."""
    out: dict[str, dict[str, dict[tuple, float]]] = {}
    for r in sweep.runs:
        seeds = tuple(sorted((r.seeds or {}).items()))
        if not r.ok or not seeds:
            continue
        vals = dict(r.eval.metrics) if r.eval is not None and r.eval.ok else {}
        vals["final_loss"] = r.metrics.final_loss
        for k, v in vals.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                out.setdefault(r.framework, {}).setdefault(k, {}).setdefault(seeds, float(v))
    return out


def seed_spread_rows(sweep: Sweep) -> tuple[list[str], list[list[str | Cell]]] | None:
    """Header and rows of the seed-spread table: per framework and metric, the mean and range over the seeds it
    trained, and whether that mean lies within the baseline's range over its seeds. None unless the baseline
    trained at least two seeds (``measure.seed_per_repeat``)."""
    values = _seed_values(sweep)
    base = values.get(sweep.baseline, {})
    if not any(len(v) >= 2 for v in base.values()):
        return None
    header = ["framework", "metric", "seeds", "mean", "min", "max", f"mean within {sweep.baseline}'s seed range"]
    rows: list[list[str | Cell]] = []
    for fw in sweep.framework_order():
        for metric, per_seed in sorted(values.get(fw, {}).items()):
            v = list(per_seed.values())
            mean = sum(v) / len(v)
            ref = list(base.get(metric, {}).values())
            if fw == sweep.baseline or len(ref) < 2:
                verdict: str | Cell = EMPTY
            elif min(ref) <= mean <= max(ref):
                verdict = Cell("yes", "good")
            else:  # outside: on the good side (a lower loss, a higher accuracy) or not
                better = mean < min(ref) if metric == "final_loss" else mean > max(ref)
                verdict = Cell("better", "good") if better else Cell("NO", "bad")
            rows.append([fw, metric, str(len(v)), fmt(mean, 4), fmt(min(v), 4), fmt(max(v), 4), verdict])
    return header, rows


def time_to_target(sweep: Sweep) -> dict[str, float | None]:
    """Per framework whose evaluation had a target: the median time to reach it, None when never reached."""
    out: dict[str, list[float]] = {}
    seen: set[str] = set()
    for r in evaluated_runs(sweep):
        if not r.eval.ok or not r.eval.target:
            continue
        seen.add(r.framework)
        if r.eval.time_to_target_s is not None:
            out.setdefault(r.framework, []).append(r.eval.time_to_target_s)
    return {fw: robust_median(out.get(fw, [])) for fw in sweep.framework_order() if fw in seen}


def target_text(sweep: Sweep) -> str:
    """The evaluation target, e.g. `` (arith/acc ≥ 0.5)``; empty when none is recorded."""
    target = next((r.eval.target for r in evaluated_runs(sweep) if r.eval.target), None)
    return f" ({', '.join(f'{k} ≥ {v}' for k, v in target.items())})" if target else ""


def parity_frame(sweep: Sweep):
    """harness.analysis.parity's table over the sweep's runs that have a loss curve (ok or diverged), with the
    scenario's tolerances."""
    _, atol, rtol = parity.settings(sweep.scenario)  # the scenario's tolerances, as in runs.csv
    return parity.parity_table([r for r in sweep.runs if parity.has_curve(r)], sweep.baseline, atol, rtol)


def parity_rows(parity_df) -> tuple[list[str], list[list[str | Cell]]]:
    """Header and rows of the loss-parity table (``parity_ok`` left out: ``parity_status`` says it in words)."""
    cols = [c for c in parity_df.columns if c != "parity_ok"]
    rows = []
    for _, row in parity_df.iterrows():
        cells: list[str | Cell] = []
        for c in cols:
            v = row[c]
            if c == "parity_status":
                cells.append(PARITY_CELLS.get(v, EMPTY) if not is_empty(v) else EMPTY)
            elif c == "first_departure_step":
                cells.append(EMPTY if is_empty(v) else str(int(v)))
            else:
                cells.append(fmt(v, 4) if isinstance(v, float) else (EMPTY if is_empty(v) else str(v)))
        rows.append(cells)
    return cols, rows
