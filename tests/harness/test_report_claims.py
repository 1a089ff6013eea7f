"""harness.reporting.claims: published claims checked against a sweep's stored rows (synthetic sweeps)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import make_run, make_sweep  # noqa: E402

from harness.reporting import claims  # noqa: E402
from harness.reporting.document import Doc  # noqa: E402
from harness.reporting.quality import parity_frame  # noqa: E402
from harness.reporting.report import write_report  # noqa: E402
from harness.reporting.tables import summary_frame  # noqa: E402
from harness.storing.sweep import load_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QLORA = "llama8b_qlora"  # a scenario the shipped claims name


def _run(label: str, tool: str | None = None, repeat: int = 0, *, switches: dict | None = None,
         scenario: str = QLORA, **kw) -> dict:
    """A run of ``tool`` stored under the row label ``label`` (a switch row when they differ)."""
    run = make_run(tool or label, repeat, scenario=scenario, **kw)
    run |= {"framework": label, "log": f"logs/{label}-r{repeat}.log"}
    if switches:
        run["extra"] = {"switches": switches}
    return run


def _section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def _cells(md: str, first: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is text
        if line.startswith("|") and cells[0].strip("*").startswith(first):
            return cells
    raise AssertionError(f"no table row for {first!r}")


def _claim_row(md: str, claim_id: str) -> dict[str, str]:
    """A claim's row of the "Claimed vs measured" table, by column."""
    sec = _section(md, "Claimed vs measured")
    return dict(zip(claims.HEADER, _cells(sec, f"`{claim_id}`"), strict=True))


def _table(tmp_path: Path, runs: list[dict]) -> str:
    """The "Claimed vs measured" section alone (no charts: quicker than a whole report), as Markdown."""
    sweep = load_sweep(make_sweep(tmp_path / "results" / f"{runs[0]['scenario']}-20260101-000000", runs))
    doc = Doc("t")
    claims.add_section(doc, sweep, summary_frame(sweep), parity_frame(sweep))
    return doc.to_markdown()


def test_shipped_claims_load_and_the_ledger_lists_each():
    shipped = claims.load_claims()
    assert len(shipped) >= 10
    ids = {c.id for c in shipped}
    ledger = (REPO / claims.LEDGER).read_text()
    ledger_ids = set(re.findall(r"^\| `([a-z0-9][a-z0-9.-]*)` \|", ledger, re.M))
    assert ledger_ids == ids  # docs/claims.md and claims.yaml list the same claims
    for c in shipped:
        assert c.scenarios and all((REPO / "scenarios" / f"{s}.yaml").is_file() for s in c.scenarios), c.id
        assert c.url is None or c.url.startswith("https://"), c.id


def test_8b_sweep_gets_claimed_vs_measured_with_computed_ratios(tmp_path):
    """hf and unsloth rows: each claim between them gets the ratio of the comparison table's medians."""
    runs = [_run("hf", repeat=r, tokens_per_s=1000 + 20 * r, vram_gib=10.0) for r in range(3)]
    runs += [_run("unsloth", tokens_per_s=2500, vram_gib=2.5), _run("axolotl", tokens_per_s=1040, vram_gib=9.0)]
    md = write_report(make_sweep(tmp_path / "results" / f"{QLORA}-20260101-000000", runs),
                      tmp_path / "rep").read_text()
    comp = _section(md, "Comparison")
    header = _cells(comp, "framework")
    speedup = dict(zip(header, _cells(comp, "unsloth"), strict=True))["speed-up vs hf"]  # e.g. "2.45x"
    mem = dict(zip(header, _cells(comp, "unsloth"), strict=True))["NVML vs hf"]  # "25.0 %"
    fast = _claim_row(md, "unsloth-2x-faster")
    assert fast["measured in this sweep"].startswith(speedup + " (")  # the comparison table's own ratio
    assert fast["verdict"] == "holds" and fast["claimed (as tested)"] == "unsloth ≥ 2.00x hf (tokens/s)"
    assert "github.com/unslothai/unsloth" in fast["source"] and "rank 32" in fast["their setting"]
    assert _claim_row(md, "clore-unsloth-2.8x")["verdict"] == "**does not hold**"
    assert _claim_row(md, "clore-unsloth-2-5x")["verdict"] == "holds"
    lean = _claim_row(md, "unsloth-70pct-less-vram")
    assert lean["measured in this sweep"] == f"{mem} (2.50 vs 10.00 GiB NVML per-process)"
    assert lean["verdict"] == "holds"  # 25 % of hf's peak: at most 30 %
    axo = _claim_row(md, "clore-axolotl-1x")
    assert axo["verdict"] == "holds" and axo["claimed (as tested)"] == "axolotl 0.90x–1.10x hf (tokens/s)"
    assert "is the frontier's" in _claim_row(md, "unsloth-long-context")["verdict"]
    for cid in ("liger-20pct-throughput", "clore-trl-1x"):
        assert _claim_row(md, cid)["verdict"].startswith("⚠ not measured in this sweep: no `")
    assert "## Claimed vs measured" in md.split("## Charts")[0]  # right after the comparison
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Claimed vs measured" in page and 'class="good">holds' in page


def test_sweep_lacking_the_rows_says_not_measured(tmp_path):
    md = _table(tmp_path, [_run("hf"), _run("tunebench", tokens_per_s=3000)])
    for c in claims.claims_for(load_sweep(tmp_path / "results" / f"{QLORA}-20260101-000000")):
        row = _claim_row(md, c.id)
        assert row["measured in this sweep"] == "—"
        assert row["verdict"].startswith("⚠ not measured in this sweep"), c.id
    assert "no `unsloth` row in this sweep" in _claim_row(md, "unsloth-2x-faster")["verdict"]


@pytest.mark.parametrize(("unsloth", "why"), [
    (dict(invalid_reasons=["gradient_checkpointing: ran with False, scenario says True"]),
     "`unsloth`: INVALID settings"),
    (dict(status="unavailable", reason="needs CUDA (synthetic)"), "`unsloth`: unavailable (needs CUDA (synthetic))"),
    (dict(status="oom", reason="CUDA out of memory"), "`unsloth`: oom (CUDA out of memory)"),
    (dict(loss0=3.0), "`unsloth`: loss curve departs from hf"),
])
def test_unfair_rows_are_not_compared(tmp_path, unsloth, why):
    """A faster-looking unsloth row that is invalid, unavailable, OOM or off the baseline's loss is no evidence."""
    md = _table(tmp_path, [_run("hf"), _run("unsloth", tokens_per_s=5000, vram_gib=1.0, **unsloth)])
    row = _claim_row(md, "unsloth-2x-faster")
    assert row["verdict"] == f"⚠ not measured in this sweep: {why}"
    assert row["measured in this sweep"] == "—"


def test_switch_row_is_compared_with_its_tool_default(tmp_path):
    """hf-liger (the hf adapter with Liger-Kernel read back) against hf: both Liger claims computed."""
    runs = [_run("hf", tokens_per_s=1000, vram_gib=10.0),
            _run("hf-liger", "hf", tokens_per_s=1100, vram_gib=6.0, switches={"liger_kernel": True})]
    md = _table(tmp_path, runs)
    speed, mem = _claim_row(md, "liger-20pct-throughput"), _claim_row(md, "liger-60pct-less-memory")
    assert re.fullmatch(r"1\.\d\dx \(1,\d{3} vs 1,\d{3} tokens/s\)", speed["measured in this sweep"])
    assert speed["verdict"] == "**does not hold**"  # ~1.10x: short of +20 %
    assert mem["measured in this sweep"] == "60.0 % (6.00 vs 10.00 GiB NVML per-process)"
    assert mem["verdict"] == "**does not hold**"  # -40 %: short of -60 %


def test_other_scenarios_get_no_claims_section(tmp_path):
    assert _table(tmp_path, [_run("hf", scenario="synthetic-tiny"), _run("unsloth", scenario="synthetic-tiny")]) \
        == "# t\n"


def test_cpu_sweep_has_no_vram_to_compare(tmp_path):
    md = _table(tmp_path, [_run("hf", device="cpu"), _run("unsloth", device="cpu", tokens_per_s=2500)])
    assert _claim_row(md, "unsloth-2x-faster")["verdict"] == "holds"
    assert _claim_row(md, "unsloth-70pct-less-vram")["verdict"] == (
        "⚠ not measured in this sweep: no GPU memory peak measured for both rows")


def test_claimed_range_reading():
    c = claims.Claim(id="x", text="~1x", source="s", setting="none", metric="tokens_per_s", row="a", against="b",
                     at_least=0.9, at_most=1.1, reading="within 10 %", scenarios=["s"])
    assert c.holds_for(0.9) and c.holds_for(1.1) and not c.holds_for(0.89) and not c.holds_for(1.11)
    assert claims.claimed_text(c) == "a 0.90x–1.10x b (tokens/s)"
    m = c.model_copy(update={"metric": "peak_memory", "at_least": None, "at_most": 0.3})
    assert claims.claimed_text(m) == "a ≤ 30 % of b (peak memory)"


@pytest.mark.parametrize(("text", "problem"), [
    ("version: 1\nclaims:\n  - {id: a, text: t, source: s, setting: x, metric: tokens_per_s, row: u, against: h,"
     " reading: r, scenarios: [s]}\n", "at_least, at_most or both"),
    ("version: 1\nclaims:\n  - {id: a, text: t, source: s, setting: x, metric: tokens_per_s, row: u, against: h,"
     " at_least: 2, reading: r, scenarios: [s], measured: 2.5}\n", "measured"),
    ("version: 1\nclaims:\n  - {id: a, text: t, source: s, setting: x, metric: speed, row: u, against: h,"
     " at_least: 2, reading: r, scenarios: [s]}\n", "metric"),
    ("version: 1\nclaims:\n" + "  - {id: a, text: t, source: s, setting: x, metric: tokens_per_s, row: u, against: h,"
     " at_least: 2, reading: r, scenarios: [s]}\n" * 2, "appears twice"),
    ("version: 1\nclaims: [\n", "cannot be read"),
])
def test_a_broken_claims_file_is_refused_with_its_name(tmp_path, text, problem):
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    with pytest.raises(claims.ClaimsFileError, match=re.escape(str(path))) as e:
        claims.load_claims(path)
    assert problem in str(e.value)
