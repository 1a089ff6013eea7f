"""One way to summarise a framework's repeats, used by the report and by the regression gate alike.

A framework's figure for a metric (tokens/s, step time, peak memory, MFU, final loss, accuracy...) is the
**median** over its ok repeats, after dropping the lowest and the highest value when there are at least
:data:`MLPERF_MIN_REPEATS` of them, as MLPerf does: a one-off hiccup of the machine does not move it. (Dropping
one value at each end never moves the median itself; it keeps an outlier out of the spread.)

Its **spread** is the range of the values kept (``low``–``high``), and relative to the median
``(high - low) / median``: the noise a difference must exceed to mean something. The report prints these
figures and ``compare`` gates on them, so the two cannot tell different numbers about the same sweep.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.storing.schema import RunResult

MLPERF_MIN_REPEATS = 5  # with at least this many values, drop the lowest and highest before the median


def is_empty(v: Any) -> bool:
    """None, NaN, pandas NA or an empty string: a value that does not apply."""
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip() == ""
    if type(v).__name__ == "NAType":  # pandas.NA (nullable integer columns), whose truth value raises
        return True
    try:
        return bool(v != v) or (isinstance(v, float) and math.isnan(v))  # NaN
    except (TypeError, ValueError):
        return False


def number(v: Any) -> float | None:
    """``v`` as a float, or None when it is empty or not a number."""
    if is_empty(v) or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def trimmed(values: Iterable[float]) -> list[float]:
    """Values sorted, with the lowest and highest dropped when there are at least 5 (MLPerf)."""
    v = sorted(values)
    return v[1:-1] if len(v) >= MLPERF_MIN_REPEATS else v


def robust_median(values: Iterable[float]) -> float | None:
    """Median after MLPerf trimming; None when there is no value."""
    v = trimmed(values)
    return statistics.median(v) if v else None


def relative_spread(values: Iterable[float]) -> float:
    """(max - min) / median of the trimmed values; 0 for fewer than two values."""
    v = trimmed(values)
    if len(v) < 2:
        return 0.0
    med = statistics.median(v)
    return (v[-1] - v[0]) / abs(med) if med else 0.0


@dataclass(frozen=True)
class Aggregate:
    """One metric of one framework over its ok repeats (definitions in the module docstring)."""

    metric: str
    values: tuple[float, ...]  # every measured value, in run order (runs that did not measure it left out)

    @property
    def n(self) -> int:
        """How many runs measured the metric."""
        return len(self.values)

    @property
    def kept(self) -> list[float]:
        """The values the median and the spread are taken over (sorted, MLPerf-trimmed)."""
        return trimmed(self.values)

    @property
    def median(self) -> float | None:
        """The framework's figure (None when no ok run measured it)."""
        return robust_median(self.values)

    @property
    def low(self) -> float | None:
        """The lowest value kept (None without values)."""
        return self.kept[0] if self.values else None

    @property
    def high(self) -> float | None:
        """The highest value kept (None without values)."""
        return self.kept[-1] if self.values else None

    @property
    def relative_spread(self) -> float:
        """``(high - low) / median`` (0 with fewer than two values)."""
        return relative_spread(self.values)


def over_repeats(runs: Iterable[RunResult], metric: str) -> Aggregate:
    """:class:`Aggregate` of ``run.metrics.<metric>`` over ``runs`` (give the ok runs)."""
    vals = (number(getattr(r.metrics, metric, None)) for r in runs)
    return Aggregate(metric, tuple(x for x in vals if x is not None))


def step_tokens_per_s(runs: Iterable[RunResult]) -> list[float]:
    """Per-step tokens/s of the measured steps of ``runs``, pooled."""
    return [s.tokens / s.step_s for r in runs for s in r.steps if s.measured and s.step_s and s.tokens is not None]


def quantile(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (numpy's linear interpolation); None without values."""
    return float(np.quantile(np.asarray(xs, dtype=float), q)) if xs else None


SUMMARY_METRICS = ("tokens_per_s", "step_s_median", "peak_vram_nvml_gib", "peak_vram_device_gib", "peak_alloc_gib",
                   "peak_reserved_gib", "peak_rss_gib", "mfu", "model_tflops", "final_loss", "joules_per_token",
                   "avg_power_w")


@dataclass
class FrameworkSummary:
    """A framework's runs in one sweep, summarised (what the report's comparison table shows)."""

    framework: str
    runs: list[RunResult]  # every stored run of the framework
    metrics: dict[str, Aggregate] = field(default_factory=dict)  # SUMMARY_METRICS over the ok runs
    step_p10: float | None = None  # per-step tokens/s pooled over the ok runs (else the runs' own percentiles)
    step_p90: float | None = None

    @property
    def ok_runs(self) -> list[RunResult]:
        """The runs that finished ok (valid or not)."""
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[RunResult]:
        """The runs that did not finish ok."""
        return [r for r in self.runs if not r.ok]

    @property
    def valid(self) -> bool | None:
        """Every ok run ran with the scenario's settings; None without an ok run."""
        ok = self.ok_runs
        return all(r.valid for r in ok) if ok else None

    @property
    def invalid_reasons(self) -> list[str]:
        """Why ok runs are invalid, each reason once."""
        return list(dict.fromkeys(x for r in self.ok_runs for x in r.invalid_reasons))

    def median(self, metric: str) -> float | None:
        """The framework's figure for ``metric`` (:attr:`Aggregate.median`)."""
        agg = self.metrics.get(metric) or over_repeats(self.ok_runs, metric)
        return agg.median


def summarise(framework: str, runs: list[RunResult]) -> FrameworkSummary:
    """Summarise one framework's stored runs (failed ones included: they count in ``repeats ok``).

    Args:
        framework: the framework row's label.
        runs: its stored runs.

    Returns:
        The summary; its aggregates cover only the ok runs.
    """
    ok = [r for r in runs if r.ok]
    out = FrameworkSummary(framework, list(runs), {m: over_repeats(ok, m) for m in SUMMARY_METRICS})
    pooled = step_tokens_per_s(ok)
    if pooled:
        out.step_p10, out.step_p90 = quantile(pooled, 0.10), quantile(pooled, 0.90)
    else:  # no per-step records: the widest of the runs' own percentiles
        p10, p90 = over_repeats(ok, "tokens_per_s_p10_step").values, over_repeats(ok, "tokens_per_s_p90_step").values
        out.step_p10, out.step_p90 = (min(p10) if p10 else None), (max(p90) if p90 else None)
    return out
