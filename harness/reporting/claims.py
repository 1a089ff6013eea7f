"""Claimed against measured: the tools' published claims checked against a sweep's stored rows.

The claims live in ``claims.yaml`` beside this module (docs/claims.md is the readable ledger of the same claims):
each names the rows to compare (``row`` against ``against``), the figure (median tokens/s, median peak memory, or
the longest context under a budget), the range the claim promises, and the scenarios whose sweeps can test it.
The report of such a sweep computes each ratio from the stored rows with the comparison table's aggregation
(:func:`harness.reporting.tables.summary_frame`: MLPerf-trimmed medians over ok repeats) and gives a verdict:

- **holds**: the measured ratio lies in the claimed range;
- **does not hold**: it does not;
- **not measured in this sweep**: a row is missing, not a fair measurement (the ranking's rules,
  :func:`harness.reporting.ranking.qualification`: failed, unavailable, invalid, diverged, or its loss curve
  departs from the baseline's), or the sweep does not measure the figure at all (a fixed-length sweep has no
  longest context).

Nothing measured is stored with a claim: every measured figure is computed from the sweep when the report is made.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.analysis.aggregate import is_empty
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.reporting.ranking import MEMORY_COLUMNS, qualification
from harness.storing.sweep import Sweep

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
LEDGER = "docs/claims.md"
Metric = Literal["tokens_per_s", "peak_memory", "max_context"]
# the memory a VRAM claim is about: NVML per-process, else torch reserved (host RSS is not VRAM)
VRAM_COLUMNS = MEMORY_COLUMNS[:2]
HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured in this sweep"
HEADER = ["claim", "source", "their setting", "claimed (as tested)", "measured in this sweep", "verdict"]


class ClaimsFileError(ValueError):
    """The claims file cannot be read or does not follow its schema."""


class Claim(BaseModel):
    """One published claim and how a sweep tests it (field meanings: the header of ``claims.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    text: str = Field(min_length=1)
    source: str = Field(min_length=1)
    url: str | None = None
    source_note: str | None = None
    setting: str = Field(min_length=1)
    metric: Metric
    row: str = Field(min_length=1)
    against: str = Field(min_length=1)
    at_least: float | None = Field(default=None, gt=0)
    at_most: float | None = Field(default=None, gt=0)
    reading: str = Field(min_length=1)
    scenarios: list[str] = Field(min_length=1)
    budget_gib: float | None = Field(default=None, gt=0)  # max_context: the memory budget the claim is tested under

    @model_validator(mode="after")
    def _range(self) -> Claim:
        if self.at_least is None and self.at_most is None:
            raise ValueError("give at_least, at_most or both: the range the claim promises")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError(f"at_least {self.at_least} is above at_most {self.at_most}")
        if self.row == self.against:
            raise ValueError(f"row and against are both {self.row!r}")
        if (self.metric == "max_context") != (self.budget_gib is not None):
            raise ValueError("budget_gib goes with metric max_context, and only with it: the budget the longest "
                             "context is compared under")
        return self

    def holds_for(self, ratio: float) -> bool:
        """Whether a measured ratio lies in the claimed range."""
        return (self.at_least is None or ratio >= self.at_least) and (self.at_most is None or ratio <= self.at_most)


class ClaimsFile(BaseModel):
    """``claims.yaml``: a version and the claims, each id once."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    claims: list[Claim]

    @field_validator("claims")
    @classmethod
    def _unique(cls, claims: list[Claim]) -> list[Claim]:
        seen: set[str] = set()
        for c in claims:
            if c.id in seen:
                raise ValueError(f"claim id {c.id!r} appears twice")
            seen.add(c.id)
        return claims


def load_claims(path: Path | None = None) -> list[Claim]:
    """Read and validate a claims file (``claims.yaml`` beside this module by default).

    Raises:
        ClaimsFileError: the file cannot be read, is not YAML, or breaks the schema (the message names the file
            and the first problems).
    """
    if path is None:
        return list(_shipped_claims())
    return list(_read(Path(path)))


@functools.cache
def _shipped_claims() -> tuple[Claim, ...]:
    """The shipped file, read once per process (every report of a batch uses it)."""
    return _read(CLAIMS_FILE)


def _read(path: Path) -> tuple[Claim, ...]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ClaimsFileError(f"{path}: cannot be read: {' '.join(str(e).split())[:300]}") from e
    try:
        return tuple(ClaimsFile.model_validate(data).claims)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise ClaimsFileError(f"{path}: {problems}") from e


def claims_for(sweep: Sweep | str, claims: list[Claim] | None = None) -> list[Claim]:
    """The claims a sweep's scenario (or the scenario named) can test (its name listed in a claim's ``scenarios``),
    in file order."""
    name = sweep if isinstance(sweep, str) else sweep.name
    return [c for c in (load_claims() if claims is None else claims) if name in c.scenarios]


def claimed_text(c: Claim) -> str:
    """The claimed range as the rows and figure it is tested on, e.g. "unsloth ≥ 2.00x hf (tokens/s)"."""
    pct = c.metric == "peak_memory"

    def bound(x: float) -> str:
        return f"{100 * x:.0f} %" if pct else f"{x:.2f}x"

    lo, hi = c.at_least, c.at_most
    rng = ""  # the validator requires at least one bound
    if lo is not None and hi is not None:
        rng = f"{bound(lo)}–{bound(hi)}"
    elif lo is not None:
        rng = f"≥ {bound(lo)}"
    elif hi is not None:
        rng = f"≤ {bound(hi)}"
    what = {"tokens_per_s": "tokens/s", "peak_memory": "peak memory", "max_context": "longest context"}[c.metric]
    return f"{c.row} {rng} {'of ' if pct else ''}{c.against} ({what})"


def _not_fair(sweep: Sweep, summary, row: str, why: dict[str, str | None]) -> str | None:
    """Why ``row`` cannot be compared, in words for the verdict; None when it is a fair measurement."""
    if row not in summary.index:
        return f"no `{row}` row in this sweep"
    reason = why.get(row)
    if reason is None:
        return None
    runs = sweep.runs_of(row)
    if runs and not any(r.ok for r in runs):  # say what happened instead of "no ok run"
        statuses = sorted({str(r.status) for r in runs})
        first = next((r.reason for r in runs if r.reason), None)
        return f"`{row}`: {'/'.join(statuses)}" + (f" ({' '.join(str(first).split())[:160]})" if first else "")
    return f"`{row}`: {reason}"


def _memory_column(summary, a: str, b: str) -> tuple[str, str] | None:
    """The first memory measure both rows have: (column, label)."""
    for col, label in VRAM_COLUMNS:
        if not is_empty(summary.at[a, col]) and not is_empty(summary.at[b, col]):
            return col, label
    return None


def measure(c: Claim, sweep: Sweep, summary, why: dict[str, str | None]) -> tuple[str, Cell]:
    """The measured cell and the verdict of one claim on one sweep.

    Args:
        c: the claim.
        sweep: the loaded sweep.
        summary: :func:`harness.reporting.tables.summary_frame` of it.
        why: :func:`harness.reporting.ranking.qualification` of it.

    Returns:
        ``(measured text, verdict cell)``.
    """
    if c.metric == "max_context":
        return EMPTY, Cell(f"{NOT_MEASURED}: the sweep trains at one fixed sequence length; the longest context under "
                         "a memory budget is the frontier's (`harness frontier`, its report)", "warn")
    missing = [m for m in (_not_fair(sweep, summary, r, why) for r in (c.row, c.against)) if m]
    if missing:
        return EMPTY, Cell(f"{NOT_MEASURED}: " + "; ".join(missing), "warn")
    if c.metric == "tokens_per_s":
        a, b = summary.at[c.row, "tps_median"], summary.at[c.against, "tps_median"]
        if is_empty(a) or is_empty(b) or not b:
            return EMPTY, Cell(f"{NOT_MEASURED}: no tokens/s measured", "warn")
        ratio = float(a) / float(b)
        text = f"{ratio:.2f}x ({fmt(a, thousands=True)} vs {fmt(b, thousands=True)} tokens/s)"
    else:
        col = _memory_column(summary, c.row, c.against)
        if col is None:
            return EMPTY, Cell(f"{NOT_MEASURED}: no GPU memory peak measured for both rows", "warn")
        a, b = summary.at[c.row, col[0]], summary.at[c.against, col[0]]
        if not b:
            return EMPTY, Cell(f"{NOT_MEASURED}: `{c.against}` peak memory is 0", "warn")
        ratio = float(a) / float(b)
        text = f"{100 * ratio:.1f} % ({fmt(a)} vs {fmt(b)} {col[1]})"
    return text, Cell(HOLDS, "good") if c.holds_for(ratio) else Cell(FAILS, "bad")


def source_cell(c: Claim) -> str:
    # the address as plain text: the HTML report links to nothing outside itself
    src = f"{c.source}, {c.url}" if c.url else c.source
    return src + (f" (note: {c.source_note})" if c.source_note else "")


def claim_rows(sweep: Sweep, summary, parity_df, claims: list[Claim]) -> list[list[str | Cell]]:
    """Rows of the "claimed vs measured" table (:data:`HEADER`), one per claim."""
    why = qualification(sweep, summary, parity_df)
    rows: list[list[str | Cell]] = []
    for c in claims:
        measured, verdict = measure(c, sweep, summary, why)
        rows.append([f"`{c.id}`: “{c.text}”", source_cell(c), c.setting, claimed_text(c), measured, verdict])
    return rows


def add_section(doc: Doc, sweep: Sweep, summary, parity_df, claims: list[Claim] | None = None) -> None:
    """The "Claimed vs measured" section, when some published claim names this sweep's scenario."""
    todo = claims_for(sweep, claims)
    if not todo:
        return
    attn = ((sweep.scenario.get("model") or {}).get("attn_implementation"))
    doc.h(1, "Claimed vs measured")
    doc.p(f"Published claims about the tools, each tested on this sweep's stored rows ({LEDGER} lists them with their "
          "sources). The measured ratio is of the two rows' median figures, the comparison table's aggregation, and "
          "only between fair measurements (ok, valid, not diverged, loss matching the baseline's). Read a verdict "
          "with the setting beside it: a claim measured on another GPU, batch, sequence length or attention "
          f"kernel need not carry over; `{sweep.baseline}` here is transformers + PEFT"
          + (f" with `{attn}` attention" if attn else "") + ", where most claims name Hugging Face + FlashAttention 2.")
    doc.table(HEADER, claim_rows(sweep, summary, parity_df, todo))
