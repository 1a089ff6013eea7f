"""A report as a list of blocks, rendered to Markdown and to self-contained HTML from the same content.

Cells carry a mark ("bad" failure, "warn" caveat, "diff" differs from the scenario, "good"): Markdown shows
it as bold or a warning sign, HTML as a CSS class. Numbers go through :func:`fmt`, which writes "—" for a
value that does not apply, never 0.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analysis.aggregate import is_empty

EMPTY = "—"


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


def short(text: Any, n: int = 300) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis; "—" when empty."""
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
        """A heading; level 1 renders as ``##`` (the title is ``#``)."""
        self.blocks.append(("h", (level, text)))

    def p(self, text: str, mark: str | None = None) -> None:
        """A paragraph; marked "bad" or "warn" it stands out."""
        self.blocks.append(("p", (text, mark)))

    def ul(self, items: list[str | Cell]) -> None:
        """A bullet list."""
        self.blocks.append(("ul", items))

    def code(self, text: str) -> None:
        """A code block."""
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list[str | Cell]]) -> None:
        """A table of text cells (a :class:`Cell` carries a mark)."""
        self.blocks.append(("table", (header, rows)))

    def image(self, path: Path, alt: str) -> None:
        """A PNG written beside the report."""
        self.blocks.append(("img", (Path(path), alt)))

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown; images are referenced by file name (the PNGs sit beside report.md)."""
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

    def to_html(self) -> str:
        """One self-contained HTML page: inline CSS, images embedded as ``data:`` URIs, no external asset."""
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
