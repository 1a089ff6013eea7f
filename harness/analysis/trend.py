"""The nightly gate: tonight's figure against the rolling median of the last N comparable nights.

A *night* is one stored sweep; its figure for a (scenario, framework, metric) is the median of that sweep's ok
runs. Nights are *comparable* when they ran the same settings (same ``settings_hash``: same scenario settings
and the same framework row), so a changed scenario starts a new series instead of looking like a regression, and
trained on the same rows: a past night whose runs read another dataset file (its digest, ``dataset_sha256_16``,
where both nights record one) is left out of tonight's reference, as after an edit of the scenario's JSONL; so is
one whose conversation rows bore loss on other tokens (``loss_rule``, recorded since it was, with the digest).

For tonight's figure ``v`` against the ``n`` most recent comparable nights before it (at most
``reference_nights``; fewer than ``min_nights``: **inconclusive**):

    reference = median of their figures
    sigma     = max(1.4826 · MAD / reference, floor)      robust spread of one night, relative
    band      = k · sigma · sqrt(1 + pi / (2n))           tonight's noise plus the median's own uncertainty

1.4826 · MAD estimates a standard deviation that a single odd night cannot inflate. The floor is the stated
run-to-run floor of :data:`harness.analysis.noise.RUN_FLOOR` (GPU 2 %, CPU 10 % for tokens/s; 1 % memory; 0.2 %
loss): a few nights that happened to agree closely must not make the band narrower than a run is ever trusted
to (pi / 2n is the variance of a median of n normal values relative to one value). Verdict, with ``w`` the change
in the worse direction and ``t`` the suite's threshold: ``w > max(t, band)`` **REGRESSED**, ``-w > max(t, band)``
**improved**, otherwise **ok** (with a note when the band is wider than ``t``: that night could not show a change
of size ``t``). A framework that has figures in the past but no ok run tonight is **REGRESSED**.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from harness.analysis.noise import (
    RUN_FLOOR,
    VERDICT_IMPROVED,
    VERDICT_INCONCLUSIVE,
    VERDICT_OK,
    VERDICT_REGRESSED,
    metric_kind,
)
from harness.spec.suite import GATED_METRICS

MAD_TO_SIGMA = 1.4826  # MAD x 1.4826 = the standard deviation of normal data
EXIT_OK, EXIT_REGRESSED, EXIT_INCONCLUSIVE = 0, 1, 3


@dataclass(frozen=True)
class Night:
    """One sweep's figure for a (scenario, framework, settings, metric) series."""

    sweep_id: str
    created: datetime
    value: float | None  # median of the sweep's ok runs; None: no ok run measured it
    statuses: tuple[str, ...]
    device: str
    git_sha: str | None
    framework_version: str | None
    libraries: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None
    # the digest of the dataset file its runs read, with the loss rule of conversation rows (None: not recorded)
    dataset: str | None = None


@dataclass(frozen=True)
class Judgement:
    """The verdict of one (scenario, framework, metric) tonight."""

    scenario: str
    framework: str
    settings_hash: str | None
    metric: str
    tonight: Night
    reference: float | None
    band: float | None  # relative half-width
    threshold: float
    change: float | None  # relative, in the worse direction (0.3: 30 % worse)
    verdict: str
    note: str
    nights: int  # comparable past nights used

    def describe(self) -> str:
        """One line: scenario / framework / metric, the verdict and why."""
        if self.reference is None or self.tonight.value is None:
            return f"{self.scenario} / {self.framework} / {self.metric}: {self.verdict}: {self.note}"
        return (f"{self.scenario} / {self.framework} / {self.metric}: {self.verdict}: {self.tonight.value:.4g} vs "
                f"median {self.reference:.4g} of {self.nights} nights (worse by {100 * self.change:+.1f}%, "
                f"threshold {100 * self.threshold:.1f}%, band ±{100 * self.band:.1f}%)"
                + (f"; {self.note}" if self.note else ""))


def floor_for(metric: str, device: str) -> float:
    """The run-to-run floor of a metric on a device ("cuda..." is GPU)."""
    # energy per token moves with time per step: it gets the throughput floor, not memory's
    kind = "throughput" if metric == "joules_per_token" else metric_kind(metric)
    return RUN_FLOOR[kind]["gpu" if str(device or "").startswith("cuda") else "cpu"]


def series(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, str | None], list[Night]]:
    """History rows grouped into nights, oldest first, per (scenario, framework, settings_hash)."""
    by_night: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by_night.setdefault((r["scenario"], r["framework"], r["settings_hash"], r["sweep_id"]), []).append(r)
    out: dict[tuple[str, str, str | None], list[Night]] = {}
    for (sc, fw, sh, sweep_id), runs in by_night.items():
        values = [float(r[metric]) for r in runs if r["status"] == "ok" and r.get(metric) is not None
                  and math.isfinite(float(r[metric]))]
        first = runs[0]
        libs = json.loads(first["libraries"]) if isinstance(first.get("libraries"), str) else (
            first.get("libraries") or {})
        out.setdefault((sc, fw, sh), []).append(Night(
            sweep_id, first["created"], statistics.median(values) if values else None,
            tuple(sorted({r["status"] for r in runs})), first.get("device") or "", first.get("git_sha"),
            first.get("framework_version"), libs, first.get("gpu_name"), _rows_identity(first)))
    for nights in out.values():
        nights.sort(key=lambda n: (n.created, n.sweep_id))
    return out


def reference_of(past: list[Night], metric: str, k: float) -> tuple[float, float] | None:
    """(median, relative band) of the past nights' figures; None when none has a figure or the median is 0."""
    values = [n.value for n in past if n.value is not None]
    if not values:
        return None
    ref = statistics.median(values)
    if ref == 0:
        return None
    mad = statistics.median(abs(v - ref) for v in values)
    device = next((n.device for n in past if n.device), "")
    sigma = max(MAD_TO_SIGMA * mad / abs(ref), floor_for(metric, device))
    return ref, k * sigma * math.sqrt(1 + math.pi / (2 * len(values)))


def _rows_identity(row: dict[str, Any]) -> str | None:
    """What a night trained on, as :class:`Night` compares it: the dataset file's digest, and for conversation rows
    the loss rule their runs recorded (a night on the same file stored before the rule was differs from one after)."""
    digest = row.get("dataset_sha256_16")
    if not digest or row.get("loss_rule") is None:
        return digest or None
    return f"{digest} (loss rule {row['loss_rule']})"


def judge_night(nights: list[Night], i: int, metric: str, threshold: float, reference_nights: int,
                min_nights: int, k: float) -> tuple[str, str, float | None, float | None, float | None, int]:
    """(verdict, note, reference, band, change, nights used) of night ``i`` of a series against the nights before."""
    tonight = nights[i]
    same_rows = [n for n in nights[:i] if not (n.dataset and tonight.dataset and n.dataset != tonight.dataset)]
    past = [n for n in same_rows if n.value is not None][-reference_nights:]
    if len(past) < min_nights:
        other = i - len(same_rows)
        return (VERDICT_INCONCLUSIVE, f"{len(past)} comparable night(s) with a figure before tonight, "
                f"{min_nights} needed" + (f" ({other} earlier night(s) trained on other rows: another dataset "
                                          "file or loss rule)"
                                          if other else ""), None, None, None, len(past))
    ref_band = reference_of(past, metric, k)
    if ref_band is None:
        return VERDICT_INCONCLUSIVE, "the past nights' median is 0", None, None, None, len(past)
    ref, band = ref_band
    if tonight.value is None:
        return (VERDICT_REGRESSED, f"no ok run measured it tonight (status: {', '.join(tonight.statuses)})",
                ref, band, None, len(past))
    higher_better = GATED_METRICS.get(metric, False)
    change = (ref - tonight.value) / abs(ref) if higher_better else (tonight.value - ref) / abs(ref)
    allowed = max(threshold, band)
    if change > allowed:
        return (VERDICT_REGRESSED, "outside the noise band" if band > threshold else "", ref, band, change,
                len(past))
    if -change > allowed:
        return VERDICT_IMPROVED, "", ref, band, change, len(past)
    note = (f"the band (±{100 * band:.1f}%) is wider than the threshold: a change of {100 * threshold:.1f}% "
            "cannot be told from noise on these nights") if band > threshold else ""
    return VERDICT_OK, note, ref, band, change, len(past)


def judge(rows: list[dict[str, Any]], tonight: set[str], gate: dict[str, float], reference_nights: int = 7,
          min_nights: int = 3, k: float = 3.0) -> list[Judgement]:
    """Judge every (scenario, framework, metric) of tonight's sweeps against their comparable past nights.

    Args:
        rows: history rows (:func:`harness.storing.history.query`), tonight's included.
        tonight: the sweep ids that make tonight.
        gate: metric -> threshold (relative change tolerated in the worse direction).
        reference_nights: at most this many past nights form the reference.
        min_nights: fewer past nights with a figure: inconclusive.
        k: the band's width in robust standard deviations.

    Returns:
        One judgement per tonight's (scenario, framework, settings, metric), in row order.
    """
    out = []
    for metric, threshold in gate.items():
        for (sc, fw, sh), nights in series(rows, metric).items():
            for i, night in enumerate(nights):
                if night.sweep_id not in tonight:
                    continue
                verdict, note, ref, band, change, n = judge_night(nights, i, metric, threshold, reference_nights,
                                                                  min_nights, k)
                out.append(Judgement(sc, fw, sh, metric, night, ref, band, threshold, change, verdict, note, n))
    return out


def exit_code(judgements: list[Judgement]) -> int:
    """1 when anything regressed; else 3 when anything (or everything, being nothing) is inconclusive; else 0."""
    verdicts = {j.verdict for j in judgements}
    if VERDICT_REGRESSED in verdicts:
        return EXIT_REGRESSED
    if not judgements or VERDICT_INCONCLUSIVE in verdicts:
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def changes(before: Night, after: Night) -> list[str]:
    """What changed between two nights: git sha, library and framework versions, GPU (``"transformers 5.17 ->
    5.18"``)."""
    out = []
    if before.git_sha and after.git_sha and before.git_sha != after.git_sha:
        out.append(f"git {before.git_sha[:8]} -> {after.git_sha[:8]}")
    if before.framework_version != after.framework_version and (before.framework_version or after.framework_version):
        out.append(f"version {before.framework_version} -> {after.framework_version}")
    for lib in sorted(set(before.libraries) | set(after.libraries)):
        a, b = before.libraries.get(lib), after.libraries.get(lib)
        if a != b:
            out.append(f"{lib} {a or 'absent'} -> {b or 'absent'}")
    if before.gpu != after.gpu:
        out.append(f"GPU {before.gpu or 'none'} -> {after.gpu or 'none'}")
    return out
