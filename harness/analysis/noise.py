"""The regression gate's noise model: how large a change between two sweeps the stored data can tell from noise.

A side's figure is the (MLPerf-trimmed) median of its ok repeats (:mod:`harness.analysis.aggregate`). Its
relative standard uncertainty::

    sigma_step  = (p90 - p10) / 2.563 / median of the per-step values of a run (2.563: the p10-p90 width of a
                  normal distribution in standard deviations); the widest of the side's runs
    modelled    = sqrt(floor² + (sigma_step / sqrt(measured steps))²)   what one run's figure varies by
    sigma_run   = max(modelled, the relative standard deviation of the kept repeats when there are 2 or more)
    u           = sigma_run / sqrt(repeats kept)

and the band of the change between baseline and candidate is ``k · sqrt(u_baseline² + u_candidate²)`` (``k`` =
``--noise-k``, default 2: about 95 % of pure-noise changes fall inside it).

Why a floor: a single run measures only its own steps, and steps are not where the noise is. In the 12 repeated
rows of the committed H100 sweeps (3 repeats each, 2 for quality_gpu_parity, interleaved within one sweep), the
per-step standard error of a run's tokens/s is 0.2-1.8 %, while the same framework's repeats differ by a relative
standard deviation of 0.01-4.9 % (median 1.5 %; hf QLoRA 4.9 %, and its medians of two sweeps on the same day
5.4 % apart). A band built from the steps alone would be ±1 % where runs really move by several per cent. So each
run gets a stated run-to-run floor (relative standard deviation of one run's figure), by device class:

=================  ======  ======  =====================================================================
metric             GPU     CPU     why
=================  ======  ======  =====================================================================
tokens/s, step     2 %     10 %    GPU: about the median repeat spread above (a 3-repeat estimate is itself
time                               uncertain by a factor of two, so a lucky tight triple must not narrow the
                                   band below it). CPU: CPU rows run on shared cores (CI, a developer's
                                   machine) whose neighbours set the speed: five repeats of tiny_cpu on the
                                   2-core development VM with other jobs running gave hf 427-3,143 tokens/s;
                                   the quietest committed CPU sweep (quality_small) still shows a per-step
                                   sigma of 3-6 %. 10 % is the least a single CPU run can be trusted to.
peak memory        1 %     1 %     Peaks of repeated runs were identical to 0.01 GiB in every committed sweep
                                   (the same shapes allocate the same); 1 % covers the 10 ms NVML sampler
                                   missing a short peak.
final loss         0.2 %   0.2 %   Repeats of the committed sweeps agree to 0.1 % (relative sd).
=================  ======  ======  =====================================================================

With these floors one repeat per side gives a tokens/s band of ±5.7 % on a GPU and ±28 % on a CPU; three
repeats per side bring the GPU band to ±3.3 %, under the default 5 % threshold.

Verdict of a gated metric (threshold ``t``, the change in the "worse" direction ``w``, band ``b``):

- the data cannot decide — a run of the side measured fewer than :data:`MIN_MEASURED_STEPS` steps (or did not
  record how many), or the metric is measured on one side only: **inconclusive**;
- ``w > max(t, b)``: **REGRESSED**; ``-w > max(t, b)``: **improved**;
- otherwise, when ``b > t`` the band is wider than the change the gate is asked to detect, so "no change" is
  not a finding: **inconclusive** (the note says about how many repeats per side would resolve ``t``);
- otherwise **ok**.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from harness.analysis.aggregate import number, over_repeats
from harness.storing.schema import RunResult

VERDICT_OK, VERDICT_IMPROVED, VERDICT_REGRESSED, VERDICT_INCONCLUSIVE = "ok", "improved", "REGRESSED", "inconclusive"
P10_P90_SIGMAS = 2.563  # width of the 10th-90th percentile range of a normal distribution, in standard deviations
MIN_MEASURED_STEPS = 5  # below this a run's p10/p90 are its extremes: no per-step spread to speak of
# relative standard deviation of one run's figure from run to run, by kind of metric and device class (see above)
RUN_FLOOR: dict[str, dict[str, float]] = {
    "throughput": {"gpu": 0.02, "cpu": 0.10},
    "memory": {"gpu": 0.01, "cpu": 0.01},
    "loss": {"gpu": 0.002, "cpu": 0.002},
}
# metric -> (p10, p90, middle) of its per-step spread in RunResult.metrics
STEP_SPREAD = {"tokens_per_s": ("tokens_per_s_p10_step", "tokens_per_s_p90_step", "tokens_per_s"),
               "step_s_median": ("step_s_p10", "step_s_p90", "step_s_median")}


def metric_kind(metric: str) -> str:
    """"throughput" (tokens/s, step time), "memory" (peak memory) or "loss"."""
    if metric in STEP_SPREAD:
        return "throughput"
    return "loss" if "loss" in metric else "memory"


def device_class(runs: list[RunResult]) -> str:
    """"gpu" when the runs ran on a CUDA device (or recorded a GPU), else "cpu"."""
    for r in runs:
        if str(r.device or "").startswith("cuda") or (r.environment is not None and r.environment.gpu_name):
            return "gpu"
    return "cpu"


@dataclass(frozen=True)
class SideNoise:
    """The uncertainty of one side's figure of one metric (definitions in the module docstring)."""

    repeats: int  # values kept for the median (MLPerf-trimmed)
    device: str  # "gpu" | "cpu"
    floor: float
    sigma_step: float | None  # per-step relative sigma, the widest of the runs; None: not a per-step metric
    steps: int | None  # fewest measured steps of the side's runs; None: not recorded (or not a per-step metric)
    sigma_repeats: float | None  # relative standard deviation of the kept repeats; None: fewer than two
    sigma_run: float
    u: float
    cannot_decide: str | None  # why the data cannot decide, else None

    @property
    def basis(self) -> str:
        """Where ``sigma_run`` comes from, in words."""
        src = "repeats" if self.sigma_repeats is not None and self.sigma_repeats >= self.sigma_run else (
            f"{self.device.upper()} floor" + (" + steps" if self.sigma_step else ""))
        return f"{self.repeats} repeat(s), {100 * self.sigma_run:.1f}%/run ({src})"


def side_noise(runs: list[RunResult], metric: str) -> SideNoise:
    """The uncertainty of the figure of ``metric`` over ``runs`` (the side's ok runs)."""
    agg = over_repeats(runs, metric)
    kept = agg.kept
    measured = [r for r in runs if number(getattr(r.metrics, metric, None)) is not None]
    device = device_class(runs)
    floor = RUN_FLOOR[metric_kind(metric)][device]
    sigma_step, steps, why = None, None, None
    if metric in STEP_SPREAD:
        lo_key, hi_key, mid_key = STEP_SPREAD[metric]
        sigmas = []
        for r in measured:
            lo, hi, mid = (number(getattr(r.metrics, k)) for k in (lo_key, hi_key, mid_key))
            if lo is not None and hi is not None and mid:
                sigmas.append(abs(hi - lo) / P10_P90_SIGMAS / abs(mid))
        sigma_step = max(sigmas, default=0.0)
        counts = [number(r.metrics.steps_measured) for r in measured]
        if counts and all(c is not None for c in counts):
            steps = int(min(counts))
        if measured and steps is None:
            why = "measured steps not recorded"
        elif steps is not None and steps < MIN_MEASURED_STEPS:
            why = f"too few measured steps ({steps} < {MIN_MEASURED_STEPS})"
    modelled = math.hypot(floor, (sigma_step or 0.0) / math.sqrt(max(steps or 1, 1)))
    sigma_repeats = None
    if len(kept) >= 2 and agg.median:
        sigma_repeats = statistics.stdev(kept) / abs(agg.median)
    sigma_run = max(modelled, sigma_repeats or 0.0)
    u = sigma_run / math.sqrt(len(kept)) if kept else math.inf
    return SideNoise(len(kept), device, floor, sigma_step, steps, sigma_repeats, sigma_run, u, why)


@dataclass(frozen=True)
class PairNoise:
    """The noise band of a change between two sides."""

    baseline: SideNoise
    candidate: SideNoise
    k: float

    @property
    def band(self) -> float:
        """``k · sqrt(u_baseline² + u_candidate²)``, relative."""
        return self.k * math.hypot(self.baseline.u, self.candidate.u)

    @property
    def cannot_decide(self) -> str | None:
        """Why the data cannot decide whatever the change, else None."""
        whys = [f"{side}: {s.cannot_decide}" for side, s in (("baseline", self.baseline), ("candidate", self.candidate))
                if s.cannot_decide]
        return "; ".join(whys) or None

    @property
    def basis(self) -> str:
        """Both sides' uncertainty in words (for the row's ``noise_basis``)."""
        return f"baseline {self.baseline.basis}; candidate {self.candidate.basis}"

    def repeats_needed(self, threshold: float) -> int | None:
        """About how many repeats per side would make the band no wider than ``threshold`` (None: no number)."""
        sigma = max(self.baseline.sigma_run, self.candidate.sigma_run)
        if threshold <= 0 or not math.isfinite(sigma):
            return None
        n = math.ceil(2 * (self.k * sigma / threshold) ** 2)
        return n if n <= 1000 else None


def pair_noise(base: list[RunResult], cand: list[RunResult], metric: str, k: float) -> PairNoise:
    """The noise of ``metric`` between two sides' ok runs, ``k`` standard uncertainties wide."""
    return PairNoise(side_noise(base, metric), side_noise(cand, metric), k)


def decide(worse: float, threshold: float, noise: PairNoise) -> tuple[str, str]:
    """(verdict, note) of a gated metric that got worse by ``worse`` (relative; negative: better).

    Args:
        worse: the change in the "worse" direction (a tokens/s drop of 20 % is 0.2).
        threshold: the smallest change the gate is asked to detect (relative).
        noise: the pair's noise (:func:`pair_noise`).
    """
    band = noise.band
    if noise.cannot_decide:
        return VERDICT_INCONCLUSIVE, f"the data cannot decide: {noise.cannot_decide}"
    allowed = max(threshold, band)
    if worse > allowed:
        return VERDICT_REGRESSED, f"worse by {100 * worse:.1f}% > allowed {100 * allowed:.1f}%" + (
            " (noise band)" if band > threshold else "")
    if -worse > allowed:
        return VERDICT_IMPROVED, ""
    if band > threshold:
        need = noise.repeats_needed(threshold)
        moved = "unchanged" if abs(worse) < 5e-4 else f"{'worse' if worse > 0 else 'better'} by {100 * abs(worse):.1f}%"
        return VERDICT_INCONCLUSIVE, (
            f"{moved}, inside a noise band of "
            f"±{100 * band:.1f}% that is wider than the {100 * threshold:.1f}% threshold: cannot tell a change of "
            f"that size from noise" + (f" (about {need} repeats per side would)" if need else ""))
    return VERDICT_OK, ""


def describe(k: float) -> str:
    """The noise model in one paragraph, as the command prints it."""
    floors = "; ".join(f"{kind} {100 * by_dev['gpu']:g}%" if len(set(by_dev.values())) == 1
                       else f"{kind} {', '.join(f'{dev.upper()} {100 * v:g}%' for dev, v in by_dev.items())}"
                       for kind, by_dev in RUN_FLOOR.items())
    return (f"noise model: band = {k:g} x sqrt(u_baseline² + u_candidate²); u = sigma per run / sqrt(repeats kept); "
            f"sigma per run = max(spread of the repeats, sqrt(floor² + (per-step sigma / sqrt(steps))²)); "
            f"per-step sigma = (p90 - p10) / {P10_P90_SIGMAS}; run-to-run floors: {floors}. "
            f"Inconclusive: a band wider than the threshold, fewer than {MIN_MEASURED_STEPS} measured steps, "
            "or a metric measured on one side only (harness/analysis/noise.py says why these numbers).")
