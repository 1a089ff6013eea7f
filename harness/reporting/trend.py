"""The nightly trend report (self-contained HTML, inline SVG) and the short Markdown verdict a CI job posts.

Per scenario and metric, one chart per framework: each night's figure, the band its own reference nights give
(rolling median ± band, :mod:`harness.analysis.trend`), regressions in red, and beside each night what changed
since the night before (git sha, library and framework versions, GPU). No script, stylesheet or image is
fetched from anywhere: the file opens offline and can be attached to a CI run.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from harness.analysis.noise import VERDICT_IMPROVED, VERDICT_INCONCLUSIVE, VERDICT_REGRESSED
from harness.analysis.trend import Judgement, changes, judge_night, series
from harness.storing.results import atomic_write_text

_W, _H, _PAD = 640, 200, 40
_MARK = {VERDICT_REGRESSED: "❌", VERDICT_INCONCLUSIVE: "❔", VERDICT_IMPROVED: "⬆️"}


def verdict_markdown(suite: str, judgements: list[Judgement], code: int, report: Path | None = None) -> str:
    """The verdict in a few Markdown lines: the overall word, then every row that is not plainly ok."""
    word = {0: "no regression", 1: "REGRESSION", 3: "inconclusive"}.get(code, f"exit {code}")
    lines = [f"## Nightly `{suite}`: {word}", ""]
    if not judgements:
        lines.append("Nothing was judged: no run of tonight's sweeps is in the history.")
    shown = [j for j in judgements if j.verdict != "ok" or j.note]
    for j in sorted(shown, key=lambda j: (j.verdict != VERDICT_REGRESSED, j.scenario, j.framework, j.metric)):
        lines.append(f"- {_MARK.get(j.verdict, '')} {j.describe()}".replace("  ", " "))
    ok = len(judgements) - len(shown)
    if ok:
        lines.append(f"- {ok} of {len(judgements)} (scenario, framework, metric) within their band")
    if report is not None:
        lines += ["", f"Trend report: `{report}`"]
    return "\n".join(lines) + "\n"


def _svg(points: list[tuple[Any, float | None, float | None, float | None, str]]) -> str:
    """A line chart of (label, value, reference, band, verdict) per night, with the band shaded."""
    vals = [v for _, v, ref, band, _ in points for v in (v, ref * (1 + band) if ref and band else None,
                                                          ref * (1 - band) if ref and band else None) if v is not None]
    if not vals:
        return "<p>no figure on any night</p>"
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or abs(hi) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    n = len(points)

    def x(i: int) -> float:
        return _PAD + (i * (_W - 2 * _PAD) / max(n - 1, 1))

    def y(v: float) -> float:
        return _H - _PAD / 2 - (v - lo) / (hi - lo) * (_H - _PAD)

    parts = [f'<svg width="{_W}" height="{_H}" role="img">',
             f'<text x="2" y="{y(hi) + 10:.0f}" font-size="10">{hi:.4g}</text>',
             f'<text x="2" y="{y(lo):.0f}" font-size="10">{lo:.4g}</text>']
    band_pts = [(i, ref * (1 + band), ref * (1 - band)) for i, (_, _, ref, band, _) in enumerate(points)
                if ref is not None and band is not None]
    if band_pts:
        upper = " ".join(f"{x(i):.1f},{y(u):.1f}" for i, u, _ in band_pts)
        lower = " ".join(f"{x(i):.1f},{y(d):.1f}" for i, _, d in reversed(band_pts))
        parts.append(f'<polygon points="{upper} {lower}" fill="#9ecae1" fill-opacity="0.4"><title>noise band'
                     '</title></polygon>')
        parts.append('<polyline fill="none" stroke="#3182bd" stroke-dasharray="4 3" points="'
                     + " ".join(f"{x(i):.1f},{y(ref):.1f}" for i, (_, _, ref, _, _) in enumerate(points)
                                if ref is not None) + '"/>')
    line = [f"{x(i):.1f},{y(v):.1f}" for i, (_, v, _, _, _) in enumerate(points) if v is not None]
    parts.append(f'<polyline fill="none" stroke="#333" points="{" ".join(line)}"/>')
    for i, (label, v, _, _, verdict) in enumerate(points):
        if v is None:
            continue
        color = "#d62728" if verdict == VERDICT_REGRESSED else "#333"
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{5 if verdict == VERDICT_REGRESSED else 3}" '
                     f'fill="{color}"><title>{html.escape(str(label))}: {v:.4g} ({verdict})</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def trend_html(rows: list[dict[str, Any]], gate: dict[str, float], reference_nights: int, min_nights: int,
               k: float, title: str, verdict_md: str = "") -> str:
    """The whole report as one HTML document (inline SVG and CSS only)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if verdict_md:
        body.append(f"<pre>{html.escape(verdict_md)}</pre>")
    body.append(f"<p>Reference: the median of the last {reference_nights} comparable nights (same settings hash); "
                f"band: {k:g} robust standard deviations of those nights, never below the run-to-run floor; "
                f"fewer than {min_nights} nights: inconclusive. Dashed line: reference; shaded: band; red: "
                "regression.</p>")
    for metric, threshold in gate.items():
        for (sc, fw, sh), nights in sorted(series(rows, metric).items(), key=lambda kv: (kv[0][0], kv[0][1])):
            points, table = [], []
            for i, night in enumerate(nights):
                verdict, note, ref, band, change, _ = judge_night(nights, i, metric, threshold, reference_nights,
                                                                  min_nights, k)
                points.append((night.created, night.value, ref, band, verdict))
                what = "; ".join(changes(nights[i - 1], night)) if i else ""
                cls = ' class="bad"' if verdict == VERDICT_REGRESSED else ""
                table.append(
                    f"<tr{cls}><td>{html.escape(str(night.created))}</td><td>{html.escape(night.sweep_id)}</td>"
                    f"<td>{'' if night.value is None else f'{night.value:.4g}'}</td>"
                    f"<td>{'' if ref is None else f'{ref:.4g} ± {100 * band:.1f}%'}</td>"
                    f"<td>{html.escape(verdict)}{(': ' + html.escape(note)) if note else ''}</td>"
                    f"<td>{html.escape(what)}</td></tr>")
            body.append(f"<h2>{html.escape(sc)} — {html.escape(metric)} — {html.escape(fw)}</h2>"
                        f"<p class=small>settings {html.escape(str(sh))}; threshold {100 * threshold:.1f}%</p>")
            body.append(_svg(points))
            body.append("<table><tr><th>night</th><th>sweep</th><th>value</th><th>reference ± band</th>"
                        "<th>verdict</th><th>changed since the night before</th></tr>" + "".join(table) + "</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}tr.bad{background:#fdd}.small{color:#666;font-size:12px}"
             "pre{white-space:pre-wrap}")  # a verdict line is longer than the page is wide: wrap, do not scroll
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_trend(out_dir: Path, rows: list[dict[str, Any]], gate: dict[str, float], reference_nights: int,
                min_nights: int, k: float, title: str, verdict_md: str) -> tuple[Path, Path]:
    """Write ``verdict.md`` and ``trend.html`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    md, page = out_dir / "verdict.md", out_dir / "trend.html"
    atomic_write_text(md, verdict_md)
    atomic_write_text(page, trend_html(rows, gate, reference_nights, min_nights, k, title, verdict_md))
    return md, page
