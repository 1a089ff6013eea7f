"""The report's answer in one line: which framework trained fastest, and which in the least memory.

Only a fair measurement is ranked: a framework qualifies when it has ok runs, every ok run ran with the
scenario's settings (valid), none of its runs diverged, and none of its loss curves departs from the baseline's
(harness.analysis.parity). Everything else is named with the reason it was left out, so an invalid row that
looks fast (a silently disabled gradient checkpointing) or a run whose loss went to NaN is never the winner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.analysis.aggregate import is_empty
from harness.measuring.trained import STATUS_DIVERGED
from harness.reporting.document import fmt
from harness.storing.sweep import Sweep

# memory columns of the summary frame, in order of preference, with what they measure
MEMORY_COLUMNS = (("nvml_gib", "GiB NVML per-process"), ("reserved_gib", "GiB torch reserved"),
                  ("rss_gib", "GiB host RSS"))


@dataclass
class Ranking:
    """The fastest and the leanest qualifying framework, and those left out with why."""

    fastest: str | None = None
    fastest_text: str = ""
    leanest: str | None = None
    leanest_text: str = ""
    excluded: dict[str, str] = field(default_factory=dict)  # framework -> why it is not ranked


def _why_not(sweep: Sweep, fw: str, row, departs: set[str]) -> str | None:
    runs = sweep.runs_of(fw)
    if not runs:
        return "no stored run"
    if any(r.status == STATUS_DIVERGED for r in runs):
        return "diverged: loss not finite"
    if int(row["n_ok"]) == 0:
        return "no ok run"
    if not is_empty(row["valid"]) and not row["valid"]:
        return "INVALID settings"
    if fw in departs:
        return f"loss curve departs from {sweep.baseline}"
    if is_empty(row["tps_median"]):
        return "no tokens/s measured"
    return None


def qualification(sweep: Sweep, summary, parity_df) -> dict[str, str | None]:
    """Why each row of the summary is not a fair measurement, or None when it qualifies.

    The one rule set behind the overall ranking, each tool's best rows (harness.reporting.tool_best) and the
    claims check (harness.reporting.claims).

    Args:
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        parity_df: :func:`harness.reporting.quality.parity_frame` of it.

    Returns:
        Row label -> the reason it is left out (``"INVALID settings"``, ``"diverged: loss not finite"``...), or
        None, in the summary's order.
    """
    departs = set(parity_df.loc[parity_df["parity_status"] == "departs", "framework"]) if not parity_df.empty else set()
    return {str(fw): _why_not(sweep, str(fw), row, departs) for fw, row in summary.iterrows()}


def fastest_of(s) -> str:
    """The row with the highest median tokens/s among the summary rows ``s`` (all qualifying, not empty)."""
    return str(s["tps_median"].astype(float).idxmax())


def leanest_of(s) -> tuple[str, float, str] | None:
    """The row with the lowest peak memory among the summary rows ``s``: ``(row, GiB, what was measured)``.

    Memory is compared in the first of :data:`MEMORY_COLUMNS` that any of the rows measured (NVML per-process on a
    GPU; torch reserved, then host RSS, where NVML could not read); None when none did.
    """
    for col, label in MEMORY_COLUMNS:
        mem = s[col].astype(float).dropna()
        if not mem.empty:
            return str(mem.idxmin()), float(mem.min()), label
    return None


def rank(sweep: Sweep, summary, parity_df) -> Ranking:
    """Rank the qualifying frameworks of a sweep.

    Args:
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        parity_df: :func:`harness.reporting.quality.parity_frame` of it.

    Returns:
        The :class:`Ranking`; ``fastest``/``leanest`` None when no framework qualifies (or none measured memory).
    """
    out = Ranking()
    ok = []
    for fw, why in qualification(sweep, summary, parity_df).items():
        if why:
            out.excluded[fw] = why
        else:
            ok.append(fw)
    if not ok:
        return out
    s = summary.loc[ok]
    out.fastest = fastest_of(s)
    fast = s.loc[out.fastest]
    out.fastest_text = f"{fmt(fast['tps_median'], thousands=True)} tokens/s" + (
        f", {fast['speedup']:.2f}x {sweep.baseline}" if not is_empty(fast["speedup"]) else "")
    lean = leanest_of(s)
    if lean is not None:
        out.leanest = lean[0]
        out.leanest_text = f"{fmt(lean[1])} {lean[2]}"
    return out


def ranking_text(r: Ranking) -> str:
    """The ranking as one paragraph of the report."""
    if r.fastest is None:
        text = "No framework qualifies for a ranking (valid, ok, not diverged, loss curve matching the baseline)."
    else:
        text = f"**Fastest:** {r.fastest} ({r.fastest_text})."
        text += f" **Leanest:** {r.leanest} ({r.leanest_text})." if r.leanest else " No memory was measured."
        text += " Ranked among valid runs whose loss matches the baseline's."
    if r.excluded:
        text += " Not ranked: " + "; ".join(f"{fw} ({why})" for fw, why in r.excluded.items()) + "."
    return text
