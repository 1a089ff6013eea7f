"""Reports from stored results: ``python -m harness report RESULTS_DIR [--out DIR]``.

Reads only what a sweep stored (``runs/*.json``, ``runs.csv`` via :func:`harness.storing.results.runs_frame`,
``scenario.yaml``, ``environment.json``, ``sweep.json``) and writes into the output directory:

- ``report.md``   Markdown, charts referenced as PNG files beside it;
- ``report.html`` self-contained: inline CSS, charts embedded as ``data:image/png;base64`` URIs, no external asset;
- ``*.png``       the charts (matplotlib, Agg backend).

Contents: scenario summary and the command to reproduce; one row per framework aggregated over its ok repeats
(tokens/s median with the spread over repeats and over steps, speed-up against ``measure.baseline``, peak memory
three ways, MFU, final loss, repeats, validity); every failed, unavailable, OOM, timed-out or invalid run with
its reason; the MFU convention; charts; effective settings against the scenario; quality (when runs carry an
``eval`` dict) and loss parity; the environment; how to read it; failures and caveats.

A value that does not apply (GPU memory on a CPU, MFU without a peak) renders as "—", never as 0.

Example::

    python -m harness report results/llama8b_qlora-20261123-101500          # -> reports/llama8b_qlora-2026...
    python -m harness report results/llama8b_qlora-20261123-101500 --out /tmp/rep
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.storing import results

STATUS_OK = "ok"
EMPTY = "—"
DEFAULT_BASELINE = "hf"
DPI = 110
# the convention sentence of harness/measuring/flops.py, stated in every report
MFU_CONVENTION = ("Model FLOPs per trained token: frozen-base LoRA/QLoRA/DoRA = 4·N, full fine-tuning = 6·N "
                  "(N = parameters in the decoder's linear layers plus the LM head; the embedding lookup is not "
                  "counted), plus causal attention 6·L·s·d_attn per token; recomputation from gradient "
                  "checkpointing is NOT counted (that would be hardware FLOPs utilisation). "
                  "MFU = achieved model FLOP/s / peak dense bf16 FLOP/s.")


class NotAResultsDir(ValueError):
    """The path given is not a sweep's results directory."""


# ---------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class Sweep:
    """Everything a sweep stored, loaded once."""

    path: Path
    runs: list[dict[str, Any]]
    frame: Any  # pandas.DataFrame of runs.csv rows
    scenario: dict[str, Any]
    environment: dict[str, Any]
    plan: dict[str, Any]

    @property
    def name(self) -> str:
        return self.scenario.get("name") or self.plan.get("scenario") or self.path.name

    @property
    def baseline(self) -> str:
        return (self.scenario.get("measure") or {}).get("baseline") or DEFAULT_BASELINE

    @property
    def source(self) -> str | None:
        return self.plan.get("scenario_source")

    def framework_order(self) -> list[str]:
        """Frameworks in scenario order, then any others that have stored runs."""
        names = [f.get("label") or f.get("name") for f in self.scenario.get("frameworks") or [] if isinstance(f, dict)]
        names += [r.get("framework") for r in self.runs]
        return [n for n in dict.fromkeys(names) if n]


def is_results_dir(path: Path) -> bool:
    """A sweep directory has a ``runs/`` folder or a ``sweep.json`` plan."""
    path = Path(path)
    return path.is_dir() and ((path / "runs").is_dir() or (path / "sweep.json").is_file())


def load_sweep(results_dir: Path) -> Sweep:
    """Load a stored sweep.

    Args:
        results_dir: ``results/<run-id>``.

    Returns:
        The sweep's runs, flat table, resolved scenario, environment and plan (missing files give empty dicts).

    Raises:
        NotAResultsDir: the directory does not exist or holds neither ``runs/`` nor ``sweep.json``.
    """
    path = Path(results_dir)
    if not is_results_dir(path):
        raise NotAResultsDir(f"{path}: not a results directory (expected runs/ or sweep.json inside; "
                             "give results/<run-id> as written by `python -m harness run`)")
    try:
        runs = results.load_runs(path) if (path / "runs").is_dir() else []
    except json.JSONDecodeError as e:
        raise NotAResultsDir(f"{path}: a stored run is not valid JSON: {e}") from e
    frame = results.runs_frame(path)
    scenario: dict[str, Any] = {}
    if (path / "scenario.yaml").is_file():
        loaded = yaml.safe_load((path / "scenario.yaml").read_text())
        scenario = loaded if isinstance(loaded, dict) else {}
    return Sweep(path, runs, frame, scenario, results.read_json(path / "environment.json") or {},
                 results.read_json(path / "sweep.json") or {})


# ---------------------------------------------------------------------------------------------------------------
# formatting helpers


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


def fmt(v: Any, digits: int = 2, pct: bool = False, thousands: bool = False) -> str:
    """Format a number for a table: "—" when empty, never 0 for a missing value."""
    if is_empty(v):
        return EMPTY
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) or hasattr(v, "__float__"):
        try:
            x = float(v)
        except (TypeError, ValueError):
            return str(v)
        if pct:
            return f"{100 * x:.{digits}f}%"
        if thousands:
            return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.{digits}f}"
        return f"{x:.{digits}f}"
    return str(v)


def _short(text: Any, n: int = 300) -> str:
    s = " ".join(str(text).split()) if not is_empty(text) else EMPTY
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass
class Cell:
    """A table cell with a mark: "bad" (failure), "warn" (caveat), "diff" (differs from the scenario), "good"."""

    text: str
    mark: str | None = None


@dataclass
class Doc:
    """A report as a list of blocks, rendered to Markdown and to self-contained HTML from the same content."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str, mark: str | None = None) -> None:
        self.blocks.append(("p", (text, mark)))

    def ul(self, items: list[str | Cell]) -> None:
        self.blocks.append(("ul", items))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list[str | Cell]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (Path(path), alt)))

    # -- Markdown --------------------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, val in self.blocks:
            if kind == "h":
                out += [f"{'#' * (val[0] + 1)} {val[1]}", ""]
            elif kind == "p":
                text, mark = val
                out += [f"> **{text}**" if mark in ("bad", "warn") else text, ""]
            elif kind == "ul":
                out += [f"- {_md_cell(i)}" for i in val] + [""]
            elif kind == "code":
                out += ["```", val, "```", ""]
            elif kind == "table":
                out += [markdown_table(*val), ""]
            elif kind == "img":
                out += [f"![{val[1]}]({val[0].name})", ""]
        return "\n".join(out).rstrip() + "\n"

    # -- HTML --------------------------------------------------------------------------------------------------
    def to_html(self) -> str:
        body = [f"<h1>{_inline_html(self.title)}</h1>"]
        for kind, val in self.blocks:
            if kind == "h":
                level = min(val[0] + 1, 6)
                anchor = re.sub(r"[^a-z0-9]+", "-", val[1].lower()).strip("-")
                body.append(f'<h{level} id="{anchor}">{_inline_html(val[1])}</h{level}>')
            elif kind == "p":
                text, mark = val
                cls = f' class="{mark}"' if mark else ""
                body.append(f"<p{cls}>{_inline_html(text)}</p>")
            elif kind == "ul":
                items = "".join(f"<li{_cls(i)}>{_inline_html(i.text if isinstance(i, Cell) else i)}</li>"
                                for i in val)
                body.append(f"<ul>{items}</ul>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(val)}</code></pre>")
            elif kind == "table":
                body.append(html_table(*val))
            elif kind == "img":
                path, alt = val
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
td.bad,li.bad,p.bad{background:#fde2e1!important;color:#8a0000;font-weight:600}
td.warn,li.warn,p.warn{background:#fff4d6!important;color:#6b4a00}
td.diff{background:#ffe9c2!important;font-weight:600}
td.good{color:#0a6b2a;font-weight:600}
code,pre{background:#f4f4f4;border-radius:3px;padding:.1em .3em;font-size:.92em}
pre{padding:.6em;overflow-x:auto}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
"""


def _cls(cell: Any) -> str:
    return f' class="{cell.mark}"' if isinstance(cell, Cell) and cell.mark else ""


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inline forms we write: `code` and **bold**."""
    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: str | Cell) -> str:
    if isinstance(cell, Cell):
        t = _md_escape(cell.text)
        if cell.mark in ("bad", "diff") and t and t != EMPTY:
            return f"**{t}**"
        if cell.mark == "warn" and t and t != EMPTY:
            return f"⚠ {t}"
        return t
    return _md_escape(cell)


def markdown_table(header: list[str], rows: list[list[str | Cell]]) -> str:
    """A GitHub-flavoured Markdown table (tabulate is not a dependency)."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str | Cell]]) -> str:
    """An HTML table; marked cells get a CSS class."""
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_cls(c)}>{_inline_html(c.text if isinstance(c, Cell) else c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def _ok_runs(sweep: Sweep, framework: str) -> list[dict[str, Any]]:
    return [r for r in sweep.runs if r.get("framework") == framework and r.get("status") == STATUS_OK]


def _measured_step_tps(run: dict[str, Any]) -> list[float]:
    return [s["tokens"] / s["step_s"] for s in results.load_steps(run)
            if s.get("measured") and s.get("step_s") and s.get("tokens") is not None]


def _quantile(xs: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.quantile(np.asarray(xs, dtype=float), q)) if xs else None


def summary_frame(sweep: Sweep):
    """One row per framework, aggregated over its ok repeats (failed frameworks keep a row with their reasons).

    Returns:
        DataFrame indexed by framework with tokens/s median/min/max over repeats, pooled per-step p10/p90,
        speed-up against the baseline, memory (max over repeats: a peak is a peak; ``memory_ratio``: NVML peak
        against the baseline's), MFU and final loss
        (median/mean over repeats), repeats ok/total, validity and failure reasons.
    """
    import pandas as pd

    df = sweep.frame.copy()
    order = sweep.framework_order()
    if df.empty:
        return pd.DataFrame(index=pd.Index(order, name="framework"))
    num = ["tokens_per_s", "tokens_per_s_p10_step", "tokens_per_s_p90_step", "step_s_median", "peak_vram_nvml_gib",
           "peak_vram_device_gib", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "mfu", "model_tflops",
           "final_loss", "first_loss"]
    for c in num:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    ok = df[df["status"] == STATUS_OK]
    agg = ok.groupby("framework").agg(
        tps_median=("tokens_per_s", "median"), tps_min=("tokens_per_s", "min"), tps_max=("tokens_per_s", "max"),
        tps_p10_col=("tokens_per_s_p10_step", "min"), tps_p90_col=("tokens_per_s_p90_step", "max"),
        step_s_median=("step_s_median", "median"), nvml_gib=("peak_vram_nvml_gib", "max"),
        device_gib=("peak_vram_device_gib", "max"), alloc_gib=("peak_alloc_gib", "max"),
        reserved_gib=("peak_reserved_gib", "max"), rss_gib=("peak_rss_gib", "max"), mfu=("mfu", "median"),
        model_tflops=("model_tflops", "median"), final_loss=("final_loss", "mean"), n_ok=("repeat", "count"))
    total = df.groupby("framework")["repeat"].count().rename("n_total")
    out = pd.DataFrame(index=pd.Index(order, name="framework")).join(agg).join(total)
    out["n_ok"] = out["n_ok"].fillna(0).astype(int)
    out["n_total"] = out["n_total"].fillna(0).astype(int)
    p10, p90, valid, reasons, failures = [], [], [], [], []
    for fw in out.index:
        runs = _ok_runs(sweep, fw)
        pooled = [x for r in runs for x in _measured_step_tps(r)]
        p10.append(_quantile(pooled, 0.10) if pooled else out.at[fw, "tps_p10_col"])
        p90.append(_quantile(pooled, 0.90) if pooled else out.at[fw, "tps_p90_col"])
        valid.append(all(bool(r.get("valid", True)) for r in runs) if runs else None)
        reasons.append("; ".join(dict.fromkeys(x for r in runs for x in r.get("invalid_reasons") or [])))
        bad = [r for r in sweep.runs if r.get("framework") == fw and r.get("status") != STATUS_OK]
        failures.append("; ".join(f"r{r.get('repeat')} {r.get('status')}: {_short(r.get('reason'), 200)}"
                                  for r in bad))
    out["tps_p10_step"], out["tps_p90_step"] = p10, p90
    out["valid"], out["invalid_reasons"], out["failures"] = valid, reasons, failures
    base = sweep.baseline
    base_tps = out.at[base, "tps_median"] if base in out.index else None
    out["speedup"] = out["tps_median"] / base_tps if not is_empty(base_tps) and base_tps else float("nan")
    base_mem = out.at[base, "nvml_gib"] if base in out.index else None
    out["memory_ratio"] = out["nvml_gib"] / base_mem if not is_empty(base_mem) and base_mem else float("nan")
    return out.drop(columns=["tps_p10_col", "tps_p90_col"])


def _loss_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Per-step loss, mean over the repeats that logged that step."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for s in results.load_steps(r):
            if s.get("loss") is not None and not is_empty(s.get("loss")):
                by_step.setdefault(int(s["step"]), []).append(float(s["loss"]))
    steps = sorted(by_step)
    return steps, [sum(by_step[k]) / len(by_step[k]) for k in steps]


# ---------------------------------------------------------------------------------------------------------------
# charts


def _plt():
    import matplotlib

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
    from matplotlib.patches import Patch

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


def chart_loss(sweep: Sweep, path: Path) -> Path | None:
    """Per-step training loss, one line per framework (mean over ok repeats)."""
    curves = {fw: _loss_curve(_ok_runs(sweep, fw)) for fw in sweep.framework_order()}
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
    ax.scatter(s[mem_col], s["tps_median"], s=50)
    for fw, row in s.iterrows():
        ax.annotate(fw, (row[mem_col], row["tps_median"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Throughput against peak memory (up-left is better)", fontsize=10)
    ax.margins(0.2)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# quality


def _evals(sweep: Sweep) -> list[dict[str, Any]]:
    return [r for r in sweep.runs if isinstance(r.get("eval"), dict)]


def quality_frame(sweep: Sweep):
    """Framework x metric, mean over repeats whose eval succeeded, plus an "untrained" row when known."""
    import pandas as pd

    rows, base = [], None
    for r in _evals(sweep):
        ev = r["eval"]
        if ev.get("status", STATUS_OK) != STATUS_OK:
            continue
        for k, v in (ev.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append({"framework": r.get("framework"), "metric": k, "value": float(v)})
        if base is None and isinstance(ev.get("baseline_metrics"), dict):
            base = ev["baseline_metrics"]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).pivot_table(index="framework", columns="metric", values="value", aggfunc="mean")
    order = [f for f in sweep.framework_order() if f in table.index]
    table = table.loc[order]
    if base:
        untrained = pd.DataFrame([{k: v for k, v in base.items() if isinstance(v, (int, float))}],
                                 index=pd.Index(["untrained model"], name="framework"))
        table = pd.concat([table, untrained.reindex(columns=table.columns)])
    return table


def _time_to_target(sweep: Sweep) -> dict[str, float | None]:
    out: dict[str, list[float]] = {}
    seen: set[str] = set()
    for r in _evals(sweep):
        ev = r["eval"]
        if ev.get("status", STATUS_OK) != STATUS_OK or "time_to_target_s" not in ev:
            continue
        seen.add(r["framework"])
        t = ev.get("time_to_target_s")
        if not is_empty(t):
            out.setdefault(r["framework"], []).append(float(t))
    return {fw: (statistics.median(out[fw]) if fw in out else None) for fw in sweep.framework_order() if fw in seen}


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


# ---------------------------------------------------------------------------------------------------------------
# effective settings


def _norm_optimizer(v: Any) -> Any:
    try:
        from harness.measuring.effective import OPTIMIZER_NAMES
    except ImportError:  # pragma: no cover - harness.measuring.effective ships with the harness
        return v
    return OPTIMIZER_NAMES.get(str(v).lower(), v) if v is not None else v


def setting_differs(key: str, want: Any, got: Any) -> bool:
    """Mirror of measuring.effective.check for one key (a key the adapter could not read is not a difference)."""
    if key == "seq_len_max":
        return got is not None and want is not None and got > want
    if got is None and want is not None:
        return False
    if key == "optimizer":
        got, want = _norm_optimizer(got), _norm_optimizer(want)
        if {got, want} <= {"adamw_torch", "adamw_torch_fused"}:
            return False
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(got - want) > 1e-9 * max(1.0, abs(want))
    return got != want


def _setting_text(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "[]"
    if v is None:
        return EMPTY
    return str(v)


def effective_table(sweep: Sweep) -> tuple[list[str], list[list[str | Cell]]] | None:
    """Settings x frameworks: what the scenario asked for and what each framework ran with (repeat 0)."""
    first: dict[str, dict[str, Any]] = {}
    for fw in sweep.framework_order():
        runs = sorted((r for r in sweep.runs if r.get("framework") == fw and r.get("effective")),
                      key=lambda r: r.get("repeat", 0))
        if runs:
            first[fw] = runs[0]
    if not first:
        return None
    expected: dict[str, Any] = {}
    for r in first.values():
        for k, v in (r.get("expected") or {}).items():
            expected.setdefault(k, v)
    keys = list(expected) + sorted({k for r in first.values() for k in r["effective"]} - set(expected) - {"seq_len"})
    header = ["setting", "scenario"] + list(first)
    rows = []
    for k in keys:
        row: list[str | Cell] = [f"`{k}`", _setting_text(expected.get(k)) if k in expected else EMPTY]
        for r in first.values():
            eff = r["effective"]
            got = eff.get("seq_len") if k == "seq_len_max" else eff.get(k)
            present = ("seq_len" if k == "seq_len_max" else k) in eff
            text = _setting_text(got) if present else "not read"
            differs = k in expected and present and setting_differs(k, expected[k], got)
            row.append(Cell(text + (" ≠" if differs else ""), "diff" if differs else None))
        rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------------------------
# the report


def _scenario_line(sc: dict[str, Any], sweep: Sweep) -> list[list[str]]:
    model = sc.get("model") or {}
    method = sc.get("method") or {}
    data = sc.get("data") or {}
    train = sc.get("train") or {}
    quant = method.get("quant") or {}
    model_txt = model.get("preset") or EMPTY
    if model.get("weights") not in (None, "random"):
        model_txt = f"{model.get('weights')}"
    elif model.get("preset"):
        model_txt += " (random weights)"
    method_txt = str(method.get("kind", EMPTY))
    if method.get("kind") in ("lora", "qlora", "dora"):
        method_txt += (f" r={method.get('lora_r')} alpha={method.get('lora_alpha')} "
                       f"targets={method.get('target_modules')}")
    if quant:
        method_txt += f" {quant.get('bits', 4)}-bit {quant.get('quant_type', '')}"
    device = (sc.get("hardware") or {}).get("device") or (sweep.runs[0].get("device") if sweep.runs else None)
    return [
        ["model", model_txt], ["method", method_txt],
        ["seq_len", f"{fmt(data.get('seq_len'), 0)} ({data.get('lengths', 'fixed')}, packing "
                    f"{'on' if data.get('packing') else 'off'})"],
        ["micro_batch", fmt(train.get("micro_batch"), 0)], ["grad_accum", fmt(train.get("grad_accum"), 0)],
        ["steps", fmt(train.get("steps"), 0)], ["warmup (untimed) steps", fmt(train.get("warmup_steps"), 0)],
        ["precision", str(model.get("dtype") or EMPTY)],
        ["gradient checkpointing", fmt(train.get("gradient_checkpointing"))],
        ["optimizer / lr", f"{train.get('optimizer', EMPTY)} / {train.get('lr', EMPTY)}"],
        ["device", f"{device or EMPTY} ({sweep.environment.get('gpu_name') or 'no GPU'})"],
        ["repeats", fmt((sc.get("measure") or {}).get("repeats"), 0)],
        ["baseline framework", sweep.baseline],
        ["scenario hash", str(sweep.plan.get("scenario_hash") or EMPTY)],
    ]


def _comparison_rows(summary, baseline: str) -> list[list[str | Cell]]:
    rows = []
    for fw, r in summary.iterrows():
        n_ok, n_total = int(r["n_ok"]), int(r["n_total"])
        if n_total == 0:
            status = Cell("no stored run", "bad")
        elif n_ok == n_total:
            status = Cell("ok", "good")
        elif n_ok == 0:
            status = Cell(_short(r["failures"], 250), "bad")
        else:
            status = Cell(f"partly failed: {_short(r['failures'], 250)}", "bad")
        spread = (EMPTY if is_empty(r["tps_min"])
                  else f"{fmt(r['tps_min'], thousands=True)}–{fmt(r['tps_max'], thousands=True)}")
        steps = (EMPTY if is_empty(r["tps_p10_step"])
                 else f"{fmt(r['tps_p10_step'], thousands=True)}–{fmt(r['tps_p90_step'], thousands=True)}")
        speed = EMPTY if is_empty(r["speedup"]) else f"{r['speedup']:.2f}x"
        if fw == baseline and not is_empty(r["speedup"]):
            speed = "1.00x (baseline)"
        torch_mem = (EMPTY if is_empty(r["alloc_gib"]) and is_empty(r["reserved_gib"])
                     else f"{fmt(r['alloc_gib'])} / {fmt(r['reserved_gib'])}")
        if is_empty(r["valid"]):
            valid: str | Cell = EMPTY
        elif r["valid"]:
            valid = "yes"
        else:
            valid = Cell("INVALID: " + (_short(r["invalid_reasons"], 250) or "see failures"), "bad")
        rows.append([f"**{fw}**" if fw == baseline else fw, status, f"{n_ok}/{n_total}",
                     fmt(r["tps_median"], thousands=True), spread, steps, speed, fmt(r["nvml_gib"]),
                     EMPTY if is_empty(r["memory_ratio"]) else f"{100 * r['memory_ratio']:.1f} %",
                     fmt(r["device_gib"]), torch_mem, fmt(r["mfu"], 1, pct=True), fmt(r["final_loss"], 4), valid])
    return rows


def _run_rows(sweep: Sweep) -> list[list[str | Cell]]:
    rows = []
    for r in sweep.runs:
        m = r.get("metrics") or {}
        ok = r.get("status") == STATUS_OK
        status = Cell(str(r.get("status")), "good" if ok else "bad")
        valid = EMPTY if not ok else ("yes" if r.get("valid") else Cell("INVALID", "bad"))
        note = "" if ok else _short(r.get("reason"), 200)
        if ok and r.get("invalid_reasons"):
            note = _short("; ".join(r["invalid_reasons"]), 200)
        rows.append([r.get("framework", EMPTY), fmt(r.get("repeat"), 0), status, valid,
                     fmt(m.get("tokens_per_s"), thousands=True), fmt(m.get("step_s_median"), 4),
                     fmt(m.get("peak_vram_nvml_gib")), fmt(m.get("peak_reserved_gib")), fmt(m.get("peak_rss_gib")),
                     fmt(m.get("final_loss"), 4), fmt(r.get("wall_s"), 1), Cell(note, "bad") if note else EMPTY])
    return rows


def _failure_rows(sweep: Sweep) -> list[list[str | Cell]]:
    rows = []
    for r in sweep.runs:
        for a in r.get("previous_attempts") or []:  # failed attempts set aside by `run --retry-failed`
            rows.append([r.get("framework", EMPTY), fmt(r.get("repeat"), 0),
                         Cell(f"{a.get('status')}, then retried", "warn"), _short(a.get("reason"), 1000),
                         f"`{a['file']}`" if a.get("file") else EMPTY])
        ok = r.get("status") == STATUS_OK
        if ok and r.get("valid", True):
            continue
        why = _short(r.get("reason"), 1000) if not ok else "; ".join(r.get("invalid_reasons") or []) or "marked invalid"
        rows.append([r.get("framework", EMPTY), fmt(r.get("repeat"), 0),
                     Cell(str(r.get("status")) if not ok else "ok but INVALID", "bad"), Cell(why, "bad"),
                     f"`{r['log']}`" if r.get("log") else EMPTY])
    return rows


PARITY_CELLS = {"ok": Cell("ok", "good"), "transient": Cell("transient", "warn"), "departs": Cell("DEPARTS", "bad")}


def _parity(sweep: Sweep):
    """(DataFrame | None, message): harness.analysis.parity's table when that module is importable."""
    try:
        from harness.analysis import parity
    except ImportError:
        return None, "parity check not available (harness.analysis.parity is not installed in this checkout)"
    ok_runs = [r for r in sweep.runs if r.get("status") == STATUS_OK]
    try:
        _, atol, rtol = parity.settings(sweep.scenario)  # the scenario's tolerances, as in runs.csv
        return parity.parity_table(ok_runs, sweep.baseline, atol, rtol), ""
    except Exception as e:  # a report must still be written; say what went wrong instead
        return None, f"parity check failed: {type(e).__name__}: {e}"


# what adapters record in a run's ``extra`` about how they fed their tool and where it differs (shown as notes)
NOTE_KEYS = ("differences", "data", "data_order", "packing", "rerun_note")


def how_run_rows(sweep: Sweep) -> list[list[str]]:
    """One row per framework (its first stored run): native config file, rerun command, adapter notes."""
    rows, seen = [], set()
    for r in sorted(sweep.runs, key=lambda r: (r.get("repeat", 0), r.get("framework", ""))):
        fw = r.get("framework")
        if fw in seen:
            continue
        seen.add(fw)
        extra = r.get("extra") or {}
        notes: list[str] = []
        for k in NOTE_KEYS:
            v = extra.get(k)
            notes += [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else [])
        trainer = extra.get("trainer") or {}
        if trainer.get("overrides"):
            notes.append("trainer knobs: " + ", ".join(f"{k}={v}" for k, v in trainer["overrides"].items()))
        native = Path(r["native_config"]).name if r.get("native_config") else EMPTY
        rows.append([str(fw), native, f"`{_short(extra['rerun'], 300)}`" if extra.get("rerun") else EMPTY,
                     "; ".join(_short(n, 400) for n in notes) or EMPTY])
    return rows


def _environment_rows(sweep: Sweep) -> list[list[str]]:
    env = sweep.environment
    run_env = next((r.get("environment") for r in sweep.runs if r.get("environment")), {}) or {}
    cuda = run_env.get("torch_cuda") or env.get("torch_cuda")
    cuda_drv = env.get("cuda_driver_version") or run_env.get("cuda_driver_version")
    sha = env.get("git_sha")
    rows = [
        ["GPU", f"{env.get('gpu_name') or EMPTY} x{env.get('gpu_count') or 0}"
                + (f" ({fmt(env.get('gpu_memory_gib'), 1)} GiB)" if env.get("gpu_memory_gib") else "")],
        ["driver", str(env.get("driver") or EMPTY)],
        ["CUDA (torch build / driver API)", f"{cuda or EMPTY} / {cuda_drv or EMPTY}"],
        ["CPU", f"{env.get('cpu') or EMPTY} ({env.get('cpu_count') or EMPTY} cores)"],
        ["host", f"{env.get('hostname') or EMPTY}, {env.get('platform') or EMPTY}, "
                 f"Python {env.get('python') or EMPTY}"],
        ["git sha", (f"`{sha}`" if sha else EMPTY) + (" (uncommitted changes)" if env.get("git_dirty") else "")],
    ]
    if env.get("nvml_error") and not env.get("gpu_name"):
        rows.append(["NVML", f"not available: {_short(env['nvml_error'], 200)}"])
    # the workers' knob variables (what the runs saw), else the runner's; absent in results before session 6
    variables = run_env.get("variables", env.get("variables"))
    if variables is not None:
        rows.append(["environment variables (knobs)",
                     ", ".join(f"`{k}={_short(str(v), 80)}`" for k, v in variables.items()) or "none set"])
    return rows


def _framework_env_rows(sweep: Sweep) -> list[list[str]]:
    libs = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "triton")
    rows = []
    for fw in sweep.framework_order():
        runs = [r for r in sweep.runs if r.get("framework") == fw]
        r = next((x for x in runs if x.get("environment")), runs[0] if runs else {})
        lib = (r.get("environment") or {}).get("libraries") or {}
        rows.append([fw, str(r.get("framework_version") or EMPTY), str(r.get("env") or EMPTY)]
                    + [str(lib.get(x) or EMPTY) for x in libs])
    return rows


def _foreign_processes(sweep: Sweep) -> list[str]:
    out = []
    for where, env in [("sweep start", sweep.environment)] + [
            (f"{r.get('framework')}-r{r.get('repeat')}", r.get("environment") or {}) for r in sweep.runs]:
        for p in env.get("foreign_gpu_processes") or []:
            out.append(f"{where}: pid {p.get('pid')} on GPU {p.get('gpu')} using {fmt(p.get('used_gib'))} GiB")
    return out


def _caveats(sweep: Sweep, summary, foreign: list[str], parity_df, eval_errors: list[str]) -> list[str | Cell]:
    items: list[str | Cell] = []
    for r in sweep.runs:
        if r.get("status") != STATUS_OK:
            items.append(Cell(f"{r.get('framework')} r{r.get('repeat')}: {r.get('status')} — "
                              f"{_short(r.get('reason'), 400)}", "bad"))
        elif not r.get("valid", True):
            items.append(Cell(f"{r.get('framework')} r{r.get('repeat')}: ran but is INVALID — "
                              f"{'; '.join(r.get('invalid_reasons') or []) or 'marked invalid'}", "bad"))
    planned = sweep.plan.get("planned") or []
    stored = {results.run_key(r.get("framework"), r.get("repeat")) for r in sweep.runs}
    missing = [k for k in planned if k not in stored]
    if missing:
        items.append(Cell(f"planned runs with no stored result (sweep interrupted?): {', '.join(missing)}", "warn"))
    if sweep.baseline not in summary.index or is_empty(summary.at[sweep.baseline, "tps_median"]):
        items.append(Cell(f"baseline framework `{sweep.baseline}` has no ok run: no speed-up is shown", "warn"))
    for f in foreign:
        items.append(Cell(f"foreign GPU process: {f} — measurements may be disturbed", "warn"))
    hashes = {r.get("scenario_hash") for r in sweep.runs if r.get("scenario_hash")}
    if len(hashes) > 1:
        items.append(Cell(f"runs carry different scenario hashes ({', '.join(sorted(hashes))}): not all measured "
                          "the same settings", "warn"))
    single = [fw for fw, r in summary.iterrows() if r["n_ok"] == 1]
    if single:
        items.append(f"one ok repeat only for {', '.join(single)}: the spread shown is over steps, not repeats")
    if sweep.environment.get("git_dirty"):
        items.append(Cell("measured from a checkout with uncommitted changes", "warn"))
    device = (sweep.scenario.get("hardware") or {}).get("device")
    if device == "cpu":
        items.append("CPU run: GPU memory and MFU do not apply (shown as —); CPU throughput says nothing about GPUs")
    for r in sweep.runs:
        err = (r.get("metrics") or {}).get("nvml_error")
        if err and device != "cpu":
            items.append(Cell(f"{r.get('framework')} r{r.get('repeat')}: NVML sampling error: {_short(err, 200)}",
                              "warn"))
    items += [Cell(e, "bad") for e in eval_errors]
    if parity_df is not None and "parity_status" in getattr(parity_df, "columns", []):
        for _, row in parity_df[parity_df["parity_status"].isin(["departs", "transient"])].iterrows():
            what, cls = (("departs from", "bad") if row["parity_status"] == "departs"
                         else ("parted for a while from (transient, then agreed again)", "warn"))
            items.append(Cell(f"{row.get('framework')} r{row.get('repeat')}: loss curve {what} {sweep.baseline} "
                              f"from step {int(row['first_departure_step'])} (max |Δ| "
                              f"{fmt(row.get('max_abs_diff'), 4)} > tolerance {fmt(row.get('tolerance'), 4)})", cls))
    if not items:
        items.append("none: every planned run finished ok with valid settings")
    return items


def default_out_dir(results_dir: Path) -> Path:
    """``reports/<run-id>`` beside ``results/`` when the sweep lives in a ``results`` folder, else ``<dir>/report``."""
    p = Path(results_dir)
    if p.resolve().parent.name == "results":
        return p.resolve().parent.parent / "reports" / p.resolve().name
    return p / "report"


def build_report(sweep: Sweep, out_dir: Path) -> Doc:
    """Assemble the report's content (charts are written into ``out_dir`` as it goes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sc = sweep.scenario
    summary = summary_frame(sweep)
    base = sweep.baseline
    doc = Doc(f"tunebench report: {sweep.name}")
    doc.p(f"Results: `{sweep.path}` — {len(sweep.runs)} stored runs"
          + (f" of {len(sweep.plan.get('planned') or [])} planned" if sweep.plan.get("planned") else "") + ".")
    if sc.get("description"):
        doc.p(str(sc["description"]))

    n_bad = sum(1 for r in sweep.runs if r.get("status") != STATUS_OK or not r.get("valid", True))
    if n_bad:
        doc.p(f"{n_bad} run(s) failed or are invalid — see the table and 'Failures and caveats'.", "bad")
    foreign = _foreign_processes(sweep)
    if foreign:
        doc.p(f"Foreign processes were found on the GPU ({len(foreign)}): measurements may be disturbed.", "warn")

    doc.h(1, "Scenario")
    doc.table(["setting", "value"], _scenario_line(sc, sweep))
    doc.p("Reproduce with:")
    doc.code(f"python -m harness run {sweep.source or '<scenario.yaml>'}\n"
             f"python -m harness report {sweep.path}")

    doc.h(1, "Comparison")
    if base not in summary.index or is_empty(summary.at[base, "tps_median"]):
        doc.p(f"Baseline `{base}` has no ok run: speed-ups are not shown.", "warn")
    doc.table(["framework", "status", "repeats ok", "tokens/s (median)", "repeats min–max", "steps p10–p90",
               f"speed-up vs {base}", "peak VRAM NVML (GiB)", f"NVML vs {base}", "device total (GiB)",
               "torch alloc / reserved (GiB)",
               "MFU", "final loss", "valid"], _comparison_rows(summary, base))
    peak = next(((r.get("metrics") or {}).get("peak_tflops") for r in sweep.runs
                 if (r.get("metrics") or {}).get("peak_tflops")), None)
    src = next(((r.get("metrics") or {}).get("peak_tflops_source") for r in sweep.runs
                if (r.get("metrics") or {}).get("peak_tflops_source")), None)
    doc.p(f"**MFU convention.** {MFU_CONVENTION} Peak used: {fmt(peak, 1)} TFLOP/s"
          + (f" ({src})." if src else "."))

    doc.h(2, "All runs")
    doc.table(["framework", "repeat", "status", "valid", "tokens/s", "step s (median)", "NVML GiB", "reserved GiB",
               "host RSS GiB", "final loss", "wall s", "reason / invalid"], _run_rows(sweep))
    fails = _failure_rows(sweep)
    if fails:
        doc.h(2, "Failed, retried and invalid runs")
        doc.table(["framework", "repeat", "status", "reason", "log"], fails)

    doc.h(1, "Charts")
    charts = [("throughput.png", chart_throughput(summary, base, out_dir / "throughput.png"),
               "Throughput: median tokens/s per framework, error bars show the spread"),
              ("memory.png", chart_memory(summary, out_dir / "memory.png"), "Peak memory, measured three ways"),
              ("loss.png", chart_loss(sweep, out_dir / "loss.png"), "Training loss per optimizer step"),
              ("tps_vs_memory.png", chart_tps_vs_memory(summary, out_dir / "tps_vs_memory.png"),
               "Throughput against peak memory")]
    for _name, path, alt in charts:
        if path is not None:
            doc.image(path, alt)
        else:
            doc.p(f"({alt}: no data to plot)")

    doc.h(1, "Effective settings")
    doc.p("What each framework actually ran with (read back from the live model and trainer, repeat 0), against "
          "what the scenario asks for. Cells marked ≠ differ and make the run invalid; 'not read' means the "
          "adapter could not read that setting back.")
    eff = effective_table(sweep)
    if eff:
        doc.table(*eff)
    else:
        doc.p("No run recorded effective settings.", "warn")

    doc.h(1, "How each framework was run")
    doc.p("Each tool runs through its own entry point from a native config the adapter generated (stored with the "
          "run, rerunnable with the tool alone); the notes say where a tool was fed differently or behaves "
          "differently from the scenario's letter, and why.")
    doc.table(["framework", "native config", "rerun with the tool alone", "notes"], how_run_rows(sweep))

    eval_errors: list[str] = []
    if _evals(sweep):
        doc.h(1, "Quality")
        for r in _evals(sweep):
            ev = r["eval"]
            if ev.get("status", STATUS_OK) != STATUS_OK:
                eval_errors.append(f"{r.get('framework')} r{r.get('repeat')}: evaluation {ev.get('status')}: "
                                   f"{_short(ev.get('error') or 'no error message', 400)}")
        quality = quality_frame(sweep)
        if not quality.empty:
            doc.p("Accuracy of the trained output (mean over repeats whose evaluation succeeded).")
            doc.table(["framework"] + list(quality.columns),
                      [[str(fw)] + [fmt(v, 4) for v in row] for fw, row in quality.iterrows()])
            p = chart_accuracy_vs_tps(quality, summary, out_dir / "accuracy_vs_tps.png")
            if p:
                doc.image(p, "Accuracy against throughput")
        else:
            doc.p("No successful evaluation.", "bad")
        ttt = _time_to_target(sweep)
        if ttt:
            targets = next((r["eval"].get("target") for r in _evals(sweep) if r["eval"].get("target")), None)
            doc.p("Time to target" + (f" ({', '.join(f'{k} ≥ {v}' for k, v in targets.items())})" if targets else "")
                  + ": " + ", ".join(f"{fw} {fmt(v, 0) + ' s' if v is not None else 'not reached'}"
                                     for fw, v in ttt.items()) + ".")
            p = chart_time_to_target(ttt, out_dir / "time_to_target.png")
            if p:
                doc.image(p, "Time to target (lower is better)")
        for e in eval_errors:
            doc.p(e, "bad")

    doc.h(2, "Loss parity")
    parity_df, msg = _parity(sweep)
    if parity_df is None:
        doc.p(msg, "warn")
    elif getattr(parity_df, "empty", True):
        doc.p(f"No loss curve to compare against `{base}`.")
    else:
        cols = [c for c in parity_df.columns if c != "parity_ok"]  # parity_status says it, in words
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
        doc.p(f"Per-step training loss of each framework against `{base}` (harness.analysis.parity): "
              f"'transient' means the "
              "curves agreed through the first quarter of the steps, parted for a while (typically at a loss "
              "spike, where rounding differences are amplified) and agree again over the last tenth; "
              "'DEPARTS' means they did not come back, or were apart from the start.")
        doc.table(cols, rows)

    doc.h(1, "Environment")
    doc.table(["", "value"], _environment_rows(sweep))
    if foreign:
        doc.ul([Cell(f"foreign GPU process — {f}", "warn") for f in foreign])
    else:
        doc.p("No foreign GPU process was found" + (" (no GPU)." if not sweep.environment.get("gpu_name") else "."))
    doc.p("Per framework (each runs in its own environment; versions from the worker):")
    doc.table(["framework", "framework version", "env", "torch", "transformers", "peft", "trl", "accelerate",
               "bitsandbytes", "triton"], _framework_env_rows(sweep))
    libs = sweep.environment.get("libraries") or {}
    if libs:
        doc.p("Runner environment libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v) + ".")

    doc.h(1, "How to read this")
    doc.ul([
        "tokens/s counts non-padding input tokens, counted by the harness from each batch (never a tool's own "
        "figure), over the measured optimizer steps; warmup steps are left out.",
        "'repeats min–max' is the spread of the per-run tokens/s over ok repeats; 'steps p10–p90' is the spread "
        "of per-step tokens/s pooled over ok repeats. Differences smaller than these spreads are noise.",
        f"Speed-up is median tokens/s over the baseline `{base}`'s median tokens/s.",
        "Peak memory, three ways: NVML per-process (what the GPU gave the worker, sampled), NVML device total "
        "(everything on the GPU), and torch's allocated / reserved peaks (the caching allocator's view). "
        "Peaks are the maximum over repeats.",
        "A run is invalid when the settings it really ran with differ from the scenario (see Effective settings); "
        "an invalid run's speed is not a fair comparison.",
        "— means the value does not apply or was not measured (e.g. GPU memory on a CPU), never zero.",
    ])
    doc.h(1, "Failures and caveats")
    doc.ul(_caveats(sweep, summary, foreign, parity_df, eval_errors))
    return doc


def write_report(results_dir: Path, out_dir: Path) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG charts of a stored sweep.

    Args:
        results_dir: the sweep's results directory (``results/<run-id>``).
        out_dir: where the report goes (created if needed).

    Returns:
        Path of ``report.md``.

    Raises:
        NotAResultsDir: ``results_dir`` is not a sweep's results directory.
    """
    sweep = load_sweep(Path(results_dir))
    out_dir = Path(out_dir)
    doc = build_report(sweep, out_dir)
    md = out_dir / "report.md"
    results.atomic_write_text(md, doc.to_markdown())
    results.atomic_write_text(out_dir / "report.html", doc.to_html())
    return md


def main(argv: list[str] | None = None) -> int:
    """``python -m harness report RESULTS_DIR [--out DIR]``; returns the exit code (2 on bad input)."""
    ap = argparse.ArgumentParser(
        prog="python -m harness report", description="Tables, charts and a report from a stored sweep.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness report results/tiny_cpu-20261123-101500\n"
               "  python -m harness report results/tiny_cpu-20261123-101500 --out /tmp/report")
    ap.add_argument("results_dir", type=Path, help="a sweep's results directory (results/<run-id>)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: reports/<run-id> beside results/, else RESULTS_DIR/report)")
    args = ap.parse_args(argv)
    out = args.out or default_out_dir(args.results_dir)
    try:
        md = write_report(args.results_dir, out)
    except NotAResultsDir as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {md}\n        {md.with_name('report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
