"""The report's section on a preference or RL objective (DPO, ORPO, KTO, GRPO): what an SFT report has no words for.

- reward accuracy and margin of each framework's saved output on the held-out pairs, and the likelihood accuracy
  of the trained and the untrained model (``RunResult.reward_eval``, :mod:`harness.analysis.reward`);
- the training batches' own reward statistics as the tool logged them, first and last steps
  (``extra["train_rewards"]``), and the tokens of the forwards without gradient (the reference pass: not in
  tokens/s, ``extra["reference_pass"]``);
- GRPO: sampling against training per step, generated tokens/s, completions/s (``extra["generation"]``), and the
  reward curve of every framework (``extra["reward_curve"]``) as a chart: do the rewards rise, and alike?
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean
from typing import Any

from harness.analysis.aggregate import robust_median
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.storing.schema import RunResult
from harness.storing.sweep import Sweep

WINDOW = 10  # steps averaged at each end of a per-step curve: one step's batch is a handful of pairs
SAMPLING_SIGMAS = 3.0  # GRPO: how many standard errors of two windows' mean rewards still count as alike


def kind(sweep: Sweep) -> str:
    """The sweep's objective (``sft`` when the stored scenario names none)."""
    return str((sweep.scenario.get("objective") or {}).get("kind") or "sft")


def _median(runs: list[RunResult], get) -> float | None:  # noqa: ANN001
    vals = [v for r in runs if (v := get(r)) is not None]
    return robust_median([float(v) for v in vals]) if vals else None


def _ends(curve: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """Mean of ``key`` over the first and the last :data:`WINDOW` entries of a per-step curve."""
    vals = [float(p[key]) for p in curve if isinstance(p.get(key), int | float)]
    if not vals:
        return None, None
    return fmean(vals[:WINDOW]), fmean(vals[-WINDOW:])


def reward_rows(sweep: Sweep) -> list[list[str | Cell]]:
    """framework x held-out reward accuracy, margin, likelihood accuracy (trained, untrained); medians over the
    repeats whose scoring succeeded; a failed scoring as a marked row."""
    rows: list[list[str | Cell]] = []
    for fw in sweep.framework_order():
        runs = [r for r in sweep.runs_of(fw) if r.reward_eval is not None]
        ok = [r for r in runs if r.reward_eval.ok]
        if not ok:
            if runs:
                rows.append([fw, Cell(f"scoring {runs[0].reward_eval.status}: {runs[0].reward_eval.error}", "bad"),
                             EMPTY, EMPTY, EMPTY, EMPTY])
            continue
        rows.append([fw, fmt(_median(ok, lambda r: r.reward_eval.reward_accuracy), 3),
                     fmt(_median(ok, lambda r: r.reward_eval.reward_margin), 3),
                     fmt(_median(ok, lambda r: r.reward_eval.likelihood_accuracy), 3),
                     fmt(_median(ok, lambda r: r.reward_eval.baseline_likelihood_accuracy), 3),
                     str(ok[0].reward_eval.pairs)])
    return rows


# what the training batches are judged by, and its name in the report: KTO's margin between its good and bad
# completions' mean rewards (unpaired rows: no accuracy of pairs), GRPO's mean reward, else the pairs' accuracy
STATISTIC = {"kto": "margin"}
STATISTIC_NAME = {"grpo": "reward", "kto": "batch reward margin"}


def _curve_ends(run: RunResult, objective: str) -> tuple[float | None, float | None]:
    if objective == "grpo":
        return _ends(run.extra.get("reward_curve") or [], "reward")
    return _ends(run.extra.get("train_rewards") or [], STATISTIC.get(objective, "accuracy"))


def _window_completions(run: RunResult) -> int | None:
    """GRPO: how many completions the last :data:`WINDOW` steps of ``run`` rewarded (None when not recorded)."""
    steps = (run.extra.get("generation") or {}).get("per_step") or []
    n = sum(int(p.get("completions") or 0) for p in steps[-WINDOW:])
    return n or None


def sampling_tolerance(p: float, n: int) -> float:
    """How far two windows' mean rewards of ``n`` completions each may lie apart by sampling alone:
    :data:`SAMPLING_SIGMAS` standard errors of their difference, ``sqrt(2 p (1 - p) / n)`` at the pooled mean
    ``p``. A reward in [0, 1] with mean p has a variance of at most p (1 - p), so this bounds exact match's binomial
    noise and any other reward of that range."""
    p = min(max(p, 0.0), 1.0)
    return SAMPLING_SIGMAS * math.sqrt(2.0 * p * (1.0 - p) / n)


def _grpo_alike(lasts: list[float], base_last: float, n: int | None) -> str | Cell:
    """GRPO with one baseline repeat: is this tool's last-window mean reward within sampling noise of it?"""
    if not lasts or not n:
        return EMPTY
    last = robust_median(lasts)
    tol = sampling_tolerance((last + base_last) / 2, n)
    return f"yes (±{fmt(tol, 3)})" if abs(last - base_last) <= tol else Cell(f"no (±{fmt(tol, 3)})", "bad")


def _spread_text(vals: list[float]) -> str:
    """The median of one value per repeat, with their range when there are several."""
    text = fmt(robust_median(vals), 3)
    return text + (f" ({fmt(min(vals), 3)}–{fmt(max(vals), 3)})" if len(vals) > 1 else "")


def training_rows(sweep: Sweep, objective: str) -> list[list[str | Cell]]:
    """framework x the training batches' rewards at the start and the end (medians over the ok repeats, with their
    range), whether the end lies within the baseline's range over its repeats, and the reference pass's tokens.

    With ``measure.seed_per_repeat`` the repeats train different seeds, so the baseline's range is how far its own
    correct runs lie apart; a tool whose median falls inside it trains as well as far as these batches tell. Without
    two baseline repeats there is no range to judge by (a dash), except for GRPO, whose rewards average many
    completions: there the two last windows are compared within their sampling noise (:func:`sampling_tolerance`)."""
    ends = {fw: [e for r in sweep.runs_of(fw) if r.ok and (e := _curve_ends(r, objective))[1] is not None]
            for fw in sweep.framework_order()}
    base = [last for _, last in ends.get(sweep.baseline, [])]
    rows: list[list[str | Cell]] = []
    for fw in sweep.framework_order():
        runs = [r for r in sweep.runs_of(fw) if r.ok]
        if not runs:
            continue
        firsts, lasts = [f for f, _ in ends[fw] if f is not None], [last for _, last in ends[fw]]
        within: str | Cell = EMPTY
        if fw == sweep.baseline:
            within = "baseline" if len(base) > 1 else EMPTY
        elif len(base) > 1 and lasts:
            inside = min(base) <= robust_median(lasts) <= max(base)
            within = "yes" if inside else Cell("no", "bad")
        elif objective == "grpo" and len(base) == 1:
            base_run = next(r for r in sweep.runs_of(sweep.baseline)
                            if r.ok and _curve_ends(r, objective)[1] is not None)
            within = _grpo_alike(lasts, base[0], _window_completions(base_run))
        ref = _median(runs, lambda r: (r.extra.get("reference_pass") or {}).get("tokens_per_step_mean"))
        rows.append([fw, _spread_text(firsts) if firsts else EMPTY, _spread_text(lasts) if lasts else EMPTY, within,
                     fmt(ref, 0, thousands=True) if ref is not None else EMPTY])
    return rows


def generation_rows(sweep: Sweep) -> list[list[str | Cell]]:
    """GRPO: framework x sampling and training time per step, sampling share, generated tokens/s, completions/s."""
    rows: list[list[str | Cell]] = []
    for fw in sweep.framework_order():
        runs = [r for r in sweep.runs_of(fw) if r.ok and r.extra.get("generation")]
        if not runs:
            continue
        g = {key: _median(runs, lambda r, key=key: r.extra["generation"].get(key))
             for key in ("generation_s_median", "training_s_median", "generation_fraction", "generated_tokens_per_s")}
        rows.append([fw, fmt(g["generation_s_median"], 3), fmt(g["training_s_median"], 3),
                     fmt(g["generation_fraction"], 1, pct=True), fmt(g["generated_tokens_per_s"], 0, thousands=True),
                     fmt(_median(runs, lambda r: r.metrics.samples_per_s), 1)])
    return rows


def chart_reward_curves(sweep: Sweep, path: Path) -> Path | None:
    """Each framework's per-step mean reward (its first ok repeat); None when no run logged one."""
    curves = {}
    for fw in sweep.framework_order():
        run = next((r for r in sweep.runs_of(fw) if r.ok and r.extra.get("reward_curve")), None)
        if run is not None:
            curves[fw] = run.extra["reward_curve"]
    if not curves:
        return None
    import matplotlib  # heavy optional dependency: only charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for fw, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["reward"] for p in curve], label=fw, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of the step's completions")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_section(doc: Doc, sweep: Sweep, out_dir: Path) -> None:
    """The objective's section; nothing for an SFT sweep."""
    objective = kind(sweep)
    if objective == "sft":
        return
    settings = {k: v for k, v in (sweep.scenario.get("objective") or {}).items() if v is not None and k != "kind"}
    doc.h(1, f"Objective: {objective}")
    doc.p("Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ". Tokens/s counts every token of the "
          "forwards that train (chosen and rejected alike); the forwards without gradient (the reference pass, KTO's "
          "KL estimate, GRPO's sampling-policy log-probs) are counted apart, per step, below.")
    if rows := reward_rows(sweep):
        doc.p("Held-out pairs, scored from each saved output (harness.analysis.reward): reward accuracy is the share "
              "of pairs whose right answer gets the higher reward beta·(log π − log π_ref), π_ref the starting "
              "model; likelihood accuracy the share whose right answer is the more likely one, for the trained and "
              "for the untrained model (every reward of the untrained model is 0).")
        doc.table(["framework", "reward accuracy", "reward margin", "likelihood accuracy",
                   "untrained likelihood accuracy", "pairs"], rows)
    first = STATISTIC_NAME.get(objective, "batch reward accuracy")
    if rows := training_rows(sweep, objective):
        doc.p(f"During training, as the tool logged it: the {first} of the first and of the last {WINDOW} steps "
              f"(the median over the repeats, their range in brackets), whether that last median lies within "
              f"{sweep.baseline}'s range over its repeats (its seeds, with measure.seed_per_repeat); the tokens per "
              "step of the forwards without gradient."
              + (f" With one {sweep.baseline} repeat, GRPO's last windows are compared within their sampling noise "
                 f"instead: {SAMPLING_SIGMAS:g} standard errors of the difference of two means of the window's "
                 "completions (±, the bound of a reward in [0, 1])." if objective == "grpo" else ""))
        doc.table(["framework", f"{first}, first steps", f"{first}, last steps",
                   f"last within {sweep.baseline}'s range", "no-gradient tokens per step"], rows)
    if objective == "grpo":
        if rows := generation_rows(sweep):
            doc.p("Sampling against training, per measured step (the device synchronised around the tool's "
                  "generation call); completions/s counts the completions the training forwards took.")
            doc.table(["framework", "sampling s/step", "training s/step", "sampling share", "generated tokens/s",
                       "completions/s"], rows)
        if p := chart_reward_curves(sweep, out_dir / "reward_curve.png"):
            doc.image(p, "Mean reward per step")
