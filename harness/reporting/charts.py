"""The report's charts (matplotlib, Agg backend, PNG): throughput, memory, loss curves, throughput against
memory, the Pareto view of a GPU sweep, accuracy against throughput, time to target. Each returns the PNG's
path, or None when there is nothing to plot (the report then says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.analysis.aggregate import is_empty
from harness.reporting.document import EMPTY
from harness.storing.schema import RunResult
from harness.storing.sweep import Sweep

DPI = 110


def _plt():
    import matplotlib  # heavy optional dependency: only charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _invalid(v: Any) -> bool:
    return not is_empty(v) and not bool(v)


def _memory_series(summary) -> tuple[list[tuple[str, str]], str]:
    """Which memory columns to chart: GPU memory three ways, or host RSS where no GPU memory was measured."""
    gpu = [("nvml_gib", "NVML per-process"), ("reserved_gib", "torch reserved"), ("alloc_gib", "torch allocated")]
    if any(summary[c].notna().any() for c, _ in gpu):
        return gpu, "peak GPU memory (GiB)"
    return [("rss_gib", "host peak RSS")], "host peak RSS (GiB) — no GPU memory on this device"


def chart_throughput(summary, baseline: str, path: Path) -> Path | None:
    """Bars of median tokens/s; error bars: min–max over repeats, or per-step p10–p90 with one repeat."""
    s = summary[summary["tps_median"].notna()]
    if s.empty:
        return None
    plt = _plt()
    from matplotlib.patches import Patch  # with matplotlib, above

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(s) + 2), 4))
    lo, hi, labels = [], [], []
    for _fw, row in s.iterrows():
        if row["n_ok"] > 1:
            a, b, lab = row["tps_min"], row["tps_max"], "min–max over repeats"
        else:
            a, b, lab = row["tps_p10_step"], row["tps_p90_step"], "per-step p10–p90"
        a = row["tps_median"] if is_empty(a) else a
        b = row["tps_median"] if is_empty(b) else b
        lo.append(max(0.0, row["tps_median"] - a))
        hi.append(max(0.0, b - row["tps_median"]))
        labels.append(lab)
    colors = ["#7f7f7f" if fw == baseline else ("#d62728" if _invalid(row["valid"]) else "#1f77b4")
              for fw, row in s.iterrows()]
    ax.bar(list(s.index), s["tps_median"], yerr=[lo, hi], capsize=4, color=colors)
    for i, (_fw, row) in enumerate(s.iterrows()):
        txt = f"{row['tps_median']:,.0f}"
        if not is_empty(row["speedup"]):
            txt += f"\n{row['speedup']:.2f}x"
        ax.text(i, row["tps_median"] + hi[i], txt, ha="center", va="bottom", fontsize=8)
    ax.legend(handles=[Patch(color="#7f7f7f", label=f"baseline ({baseline})"), Patch(color="#1f77b4", label="valid"),
                       Patch(color="#d62728", label="INVALID settings")], fontsize=7, loc="lower right")
    ax.set_ylabel("tokens/s (non-padding input tokens)")
    ax.set_title("Throughput (median; bars: " + ", ".join(sorted(set(labels))) + ")", fontsize=10)
    ax.margins(y=0.15)
    return _save(fig, path)


def chart_memory(summary, path: Path) -> Path | None:
    """Peak memory bars, three ways side by side (NVML per-process, torch reserved, torch allocated)."""
    series, ylabel = _memory_series(summary)
    s = summary[summary[[c for c, _ in series]].notna().any(axis=1)]
    if s.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(s) + 2), 4))
    width = 0.8 / len(series)
    for j, (col, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(s))]
        vals = [0.0 if is_empty(v) else float(v) for v in s[col]]  # a bar of height 0 is drawn; labelled "—"
        ax.bar(xs, vals, width=width, label=label)
        for x, v in zip(xs, s[col], strict=True):
            ax.text(x, 0 if is_empty(v) else float(v), EMPTY if is_empty(v) else f"{float(v):.1f}", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(s)), list(s.index))
    ax.set_ylabel(ylabel)
    ax.set_title("Peak memory", fontsize=10)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center")
    ax.set_ylim(0, 1.3 * max([float(v) for c, _ in series for v in s[c] if not is_empty(v)] or [1.0]))
    return _save(fig, path)


def mean_loss_curve(runs: list[RunResult]) -> tuple[list[int], list[float]]:
    """Per-step loss, mean over the repeats that logged that step."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for s in r.steps:
            if not is_empty(s.loss):
                by_step.setdefault(s.step, []).append(float(s.loss))
    steps = sorted(by_step)
    return steps, [sum(by_step[k]) / len(by_step[k]) for k in steps]


def chart_loss(sweep: Sweep, path: Path) -> Path | None:
    """Per-step training loss, one line per framework (mean over ok repeats)."""
    curves = {fw: mean_loss_curve(sweep.ok_runs(fw)) for fw in sweep.framework_order()}
    curves = {fw: c for fw, c in curves.items() if c[0]}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for fw, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=fw,
                linewidth=2.5 if fw == sweep.baseline else 1.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves (mean over ok repeats)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def chart_tps_vs_memory(summary, path: Path) -> Path | None:
    """One point per framework: throughput against peak memory (NVML, else torch reserved, else host RSS)."""
    mem_col, label = next(((c, lab) for c, lab in (("nvml_gib", "peak NVML per-process GiB"),
                                                   ("reserved_gib", "peak torch reserved GiB"),
                                                   ("rss_gib", "host peak RSS GiB (no GPU memory)"))
                           if summary[c].notna().any()), (None, None))
    if mem_col is None:
        return None
    s = summary[summary["tps_median"].notna() & summary[mem_col].notna()]
    if s.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    # an invalid row is drawn red and labelled so: its position is not a fair measurement
    ax.scatter(s[mem_col], s["tps_median"], s=50,
               c=["#d62728" if _invalid(v) else "#1f77b4" for v in s["valid"]])
    for fw, row in s.iterrows():
        ax.annotate(f"{fw} (INVALID)" if _invalid(row["valid"]) else fw, (row[mem_col], row["tps_median"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Throughput against peak memory (up-left is better)", fontsize=10)
    ax.margins(0.2)
    return _save(fig, path)


def chart_pareto(points: list[tuple[str, str, float, float]], tool_fronts: dict[str, list[str]], front: list[str],
                 budgets: tuple[float, ...], path: Path) -> Path | None:
    """Tokens/s against NVML per-process peak, one colour per tool (harness.reporting.pareto computes the fronts).

    Args:
        points: ``(row, tool, NVML peak GiB, tokens/s)`` of each qualifying row.
        tool_fronts: tool -> its frontier's rows, leanest first; drawn as a step line, since within a budget a
            tool reaches the speed of its fastest frontier row that fits, not a blend of two rows.
        front: the overall front's rows, leanest first: ringed and joined by a thick grey step line.
        budgets: memory budgets (GiB), dotted verticals where they fall inside the plotted range.
        path: the PNG to write.
    """
    if not points:
        return None
    plt = _plt()
    at = {row: (gib, tps) for row, _tool, gib, tps in points}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xmax = 1.25 * max(g for _r, _t, g, _s in points)
    for b in budgets:
        if b <= xmax:
            ax.axvline(b, color="#bbbbbb", linestyle=":", linewidth=1)
            ax.text(b, 0.99, f"{b:g} GiB ", rotation=90, va="top", ha="right", fontsize=7, color="#888888",
                    transform=ax.get_xaxis_transform())
    if len(front) > 1:
        ax.plot([at[r][0] for r in front], [at[r][1] for r in front], drawstyle="steps-post", color="#555555",
                linewidth=5, alpha=0.25, label="overall Pareto front", zorder=1)
    for i, (tool, rows) in enumerate(tool_fronts.items()):
        color = f"C{i % 10}"
        mine = [(g, s) for _r, t, g, s in points if t == tool]
        ax.scatter([g for g, _ in mine], [s for _, s in mine], s=40, color=color, label=tool, zorder=3)
        if len(rows) > 1:
            ax.plot([at[r][0] for r in rows], [at[r][1] for r in rows], drawstyle="steps-post", color=color,
                    linewidth=1.5, zorder=2)
    ax.scatter([at[r][0] for r in front], [at[r][1] for r in front], s=140, facecolors="none", edgecolors="black",
               linewidths=1.2, zorder=4)
    for row, _tool, gib, tps in points:
        ax.annotate(row, (gib, tps), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, 1.15 * max(s for _r, _t, _g, s in points))
    ax.set_xlabel("peak NVML per-process GiB (median over repeats)")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Pareto view: speed against memory (up-left is better; ringed: overall front)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def chart_accuracy_vs_tps(quality, summary, path: Path) -> Path | None:
    """Accuracy against tokens/s, one subplot per metric (at most four), one point per framework."""
    if quality.empty:
        return None
    metrics = list(quality.columns)[:4]
    fws = [f for f in quality.index if f in summary.index and not is_empty(summary.at[f, "tps_median"])]
    if not fws:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for fw in fws:
            v = quality.at[fw, m]
            if is_empty(v):
                continue
            ax.scatter(summary.at[fw, "tps_median"], v, s=45)
            ax.annotate(fw, (summary.at[fw, "tps_median"], v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if "untrained model" in quality.index and not is_empty(quality.at["untrained model", m]):
            ax.axhline(quality.at["untrained model", m], color="#999", linestyle="--", label="untrained")
            ax.legend(fontsize=7)
        ax.set_xlabel("tokens/s (median)")
        ax.set_ylabel(m)
        ax.margins(0.2)
    fig.suptitle("Accuracy against throughput (up-right is better)", fontsize=10)
    return _save(fig, path)


def chart_time_to_target(ttt: dict[str, float | None], path: Path) -> Path | None:
    """Bars of time to reach the eval target; frameworks that never reached it are marked."""
    if not ttt:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(ttt) + 2), 3.8))
    names = list(ttt)
    vals = [0.0 if v is None else v for v in ttt.values()]
    ax.bar(names, vals, color=["#1f77b4" if v is not None else "#d62728" for v in ttt.values()])
    for i, v in enumerate(ttt.values()):
        ax.text(i, 0 if v is None else v, "not reached" if v is None else f"{v:.0f} s", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("seconds to target (lower is better)")
    ax.set_title("Time to target", fontsize=10)
    ax.margins(y=0.15)
    return _save(fig, path)


def chart_frontier(cells, vary: str, path: Path) -> Path | None:
    """Each framework row's largest ``vary`` per memory budget (:class:`harness.analysis.frontier.Cell` list), a
    line per row on a log-2 axis; a hollow marker where the search had not closed. None when no cell has a value."""
    rows: dict[str, list] = {}
    for c in cells:
        if c.state in ("found", "incomplete") and c.value:
            rows.setdefault(c.framework, []).append(c)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for fw, mine in rows.items():
        mine.sort(key=lambda c: c.budget_gib)
        (line,) = ax.plot([c.budget_gib for c in mine], [c.value for c in mine], marker="o", label=fw)
        for c in mine:
            if c.state == "incomplete":
                ax.plot([c.budget_gib], [c.value], marker="o", markerfacecolor="white", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    budgets = sorted({c.budget_gib for c in cells})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("memory budget (GiB, the cap of every run)")
    ax.set_ylabel(f"largest {vary} that trains")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Memory frontier: largest {vary} per budget")
    return _save(fig, path)
