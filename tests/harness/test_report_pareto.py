"""harness.reporting.pareto: the fastest row at each memory budget and the Pareto chart (synthetic sweeps)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import make_run, make_sweep  # noqa: E402

from harness.reporting import pareto  # noqa: E402
from harness.reporting.pareto import Point  # noqa: E402
from harness.reporting.report import write_report  # noqa: E402

INVALID = "gradient_checkpointing: ran with False, scenario says True"
SECTION = "Fastest at your memory budget"


def _run(label: str, tool: str, tps: float, gib: float, *, switches: dict | None = None, **kw) -> dict:
    """A run of ``tool`` stored as row ``label``, steady steps so its median tokens/s is exactly ``tps``."""
    run = make_run(tool, 0, tokens_per_s=tps, vram_gib=gib, jitter=0.0, **kw)
    run |= {"framework": label, "log": f"logs/{label}-r0.log"}
    if switches:
        run["extra"] = {"switches": switches}
    return run


def _diverged(label: str, tps: float, gib: float) -> dict:
    run = _run(label, label, tps, gib)
    for s in run["steps"][3:]:
        s["loss"] = float("nan")
    return run | {"status": "diverged", "valid": False, "reason": "loss is nan at step 4"}


def _runs() -> list[dict]:
    """Rows at known speeds and peaks; the three fastest-looking lean rows are unfair and must never be picked."""
    return [
        _run("hf", "hf", 1400, 20.0),
        _run("tunebench", "tunebench", 1500, 14.0),
        _run("tunebench-lean", "tunebench", 1200, 9.0, switches={"offload_checkpoints": True}),
        _run("tunebench-fast", "tunebench", 2000, 30.0, switches={"recompute_layers": 1}),
        _run("unsloth", "unsloth", 1300, 11.0),
        _run("trl", "trl", 5000, 6.0, effective={"gradient_checkpointing": False}, invalid_reasons=[INVALID]),
        _diverged("axolotl", 4000, 5.0),
        _run("llamafactory", "llamafactory", 3000, 7.0, loss0=3.0),  # loss departs from hf's
        make_run("litgpt", 0, status="oom", reason="torch.OutOfMemoryError: CUDA out of memory"),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pareto")
    return write_report(make_sweep(tmp / "results" / "synthetic-tiny-20260101-000000", _runs()), tmp / "rep")


def _section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def _budget_rows(md: str) -> dict[str, dict[str, str]]:
    """The budget table by budget, each row by column."""
    out = {}
    for line in _section(md, SECTION).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            out[cells[0]] = dict(zip(pareto.HEADER, cells, strict=True))
    return out


def test_table_picks_the_fastest_fair_row_at_each_budget(report):
    rows = _budget_rows(report.read_text())
    assert list(rows) == ["8", "12", "16", "24", "40", "80"]
    # 12 GiB: unsloth (1,300 at 11 GiB) beats tunebench's best that fits (tunebench-lean, 1,200 at 9 GiB)
    assert [rows["12"][k] for k in ("fastest row", "tool", "tokens/s", "NVML peak (GiB)", "its settings")] == [
        "unsloth", "unsloth", "1,300", "11.00", "default"]
    assert rows["12"]["fastest peer row"] == "unsloth"
    assert rows["12"]["tunebench best / peer best"] == "0.92x (tunebench-lean: 1,200 tokens/s)"
    # 16 GiB: the default tunebench row fits; the peer is still unsloth (hf needs 20 GiB)
    assert [rows["16"][k] for k in ("fastest row", "tokens/s", "fastest peer row", "peer tokens/s",
                                    "peer NVML peak (GiB)", "tunebench best / peer best")] == [
        "tunebench", "1,500", "unsloth", "1,300", "11.00", "1.15x"]
    # 24 GiB: hf fits and is the fastest peer now
    assert (rows["24"]["fastest row"], rows["24"]["fastest peer row"], rows["24"]["tunebench best / peer best"]) == (
        "tunebench", "hf", "1.07x")
    for b in ("40", "80"):
        assert (rows[b]["fastest row"], rows[b]["its settings"], rows[b]["tunebench best / peer best"]) == (
            "tunebench-fast", "recompute_layers=1", "1.43x")


def test_nothing_fair_fits_the_smallest_budget(report):
    """At 8 GiB only unfair rows fit (invalid trl, diverged axolotl, departing llamafactory): "none fits"."""
    row = _budget_rows(report.read_text())["8"]
    assert row["fastest row"] == "⚠ " + pareto.NONE_FITS
    assert all(v == "—" for k, v in row.items() if k not in ("budget (GiB)", "fastest row"))


def test_unfair_rows_are_left_out_with_why(report):
    sec = _section(report.read_text(), SECTION)
    assert ("Left out: trl (INVALID settings); axolotl (diverged: loss not finite); llamafactory (loss curve departs "
            "from hf); litgpt (no ok run).") in sec
    for unfair in ("trl", "axolotl", "llamafactory", "litgpt"):
        assert all(unfair not in r.values() for r in _budget_rows(report.read_text()).values()), unfair


def test_chart_is_written_and_shown(report):
    png = report.parent / pareto.CHART
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({pareto.CHART})" in _section(report.read_text(), SECTION)
    assert "data:image/png;base64," in report.with_name("report.html").read_text()


def test_fronts_per_tool_and_overall():
    pts = [Point("hf", "hf", 20.0, 1400), Point("tb", "tunebench", 14.0, 1500), Point("lean", "tunebench", 9.0, 1200),
           Point("fast", "tunebench", 30.0, 2000), Point("slow", "tunebench", 16.0, 1100),
           Point("uns", "unsloth", 11.0, 1300)]
    fronts = pareto.tool_fronts(pts)
    assert [p.row for p in fronts["tunebench"]] == ["lean", "tb", "fast"]  # "slow" is beaten by "tb" on both axes
    assert [p.row for p in fronts["hf"]] == ["hf"]
    assert [p.row for p in pareto.pareto_front(pts)] == ["lean", "uns", "tb", "fast"]
    assert pareto.fastest_within(pts, 8) is None
    assert pareto.fastest_within(pts, 12).row == "uns"


def test_a_peer_only_budget_and_a_missing_tunebench_row():
    pick = pareto.budget_picks([Point("uns", "unsloth", 11.0, 1300), Point("tb", "tunebench", 30.0, 2000)],
                               (12,))[0]
    assert (pick.fastest.row, pick.ours, pick.peer.row, pick.ratio) == ("uns", None, "uns", None)
    assert pareto.ratio_cell(pick) == "no tunebench row fits"


def test_cpu_sweep_gets_neither(tmp_path):
    runs = [make_run("hf", 0, device="cpu"), make_run("tunebench", 0, device="cpu", tokens_per_s=1500)]
    md = write_report(make_sweep(tmp_path / "results" / "cpu-20260101-000000", runs), tmp_path / "rep")
    assert f"## {SECTION}" not in md.read_text()
    assert not (md.parent / pareto.CHART).exists()


def test_gpu_sweep_without_a_fair_row_says_so(tmp_path):
    runs = [make_run("hf", 0, status="oom", reason="CUDA out of memory"),
            make_run("tunebench", 0, invalid_reasons=[INVALID], effective={"gradient_checkpointing": False})]
    md = write_report(make_sweep(tmp_path / "results" / "gpu-20260101-000000", runs), tmp_path / "rep")
    rows = _budget_rows(md.read_text())
    assert all(r["fastest row"] == "⚠ none fits" for r in rows.values())
    assert "(Pareto view: no qualifying row with an NVML peak to plot)" in _section(md.read_text(), SECTION)
    assert not (md.parent / pareto.CHART).exists()
