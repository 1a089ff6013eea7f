"""Where a run's wall time goes: phases from the stored timestamps, adding up to the wall time, and the report's
section; on a synthetic run with known figures and on a real run of the runner."""

from __future__ import annotations

import pytest
from fixtures_results import make_run, make_sweep

from harness.analysis import timeline
from harness.reporting.report import write_report
from harness.running.runner import run_sweep
from harness.spec.scenario import parse_scenario
from harness.storing.results import parse_result
from harness.storing.sweep import load_sweep


def _timed(run: dict, launched: float, started: float, first: float, last: float, finished: float,
           wall: float) -> dict:
    return run | {"launched_at": launched, "started_at": started, "first_step_at": first, "last_step_at": last,
                  "finished_at": finished, "wall_s": wall, "load_s": 4.0}


def test_phases_add_up_to_the_wall_time():
    raw = make_run("hf", steps=10, warmup=2, tokens_per_s=1000, jitter=0)
    steps = raw["steps"]
    warm = sum(s["step_s"] for s in steps if not s["measured"])
    timed = sum(s["step_s"] for s in steps if s["measured"])
    # launch at 100: started 103, first step 110, steps plus 0.5 s of gaps, 2 s of saving, 1 s of teardown
    last = 110 + warm + timed + 0.5
    run = parse_result(_timed(raw, 100.0, 103.0, 110.0, last, last + 2.0, last + 3.0 - 100.0))
    got = timeline.phases(run)
    assert got["start_up_s"] == pytest.approx(3.0) and got["to_first_step_s"] == pytest.approx(7.0)
    assert got["warmup_s"] == pytest.approx(warm) and got["timed_s"] == pytest.approx(timed)
    assert got["between_steps_s"] == pytest.approx(0.5) and got["after_last_step_s"] == pytest.approx(2.0)
    assert got["exit_s"] == pytest.approx(1.0)
    assert sum(got[k] for k in timeline.PHASES) == pytest.approx(got["wall_s"])
    assert got["timed_share"] == pytest.approx(timed / got["wall_s"]) and got["load_s"] == 4.0
    # a run stored before launched_at existed: its start-up and exit are unknown, the rest stands
    old = timeline.phases(parse_result(_timed(raw, None, 103.0, 110.0, last, last + 2.0, 20.0)))
    assert old["start_up_s"] is None and old["exit_s"] is None and old["to_first_step_s"] == pytest.approx(7.0)
    # a run that failed before its first step has no step phases
    failed = timeline.phases(parse_result(make_run("trl", status="error") | {"first_step_at": None}))
    assert failed["timed_s"] is None and failed["between_steps_s"] is None


def test_the_report_shows_each_rows_median_phases(tmp_path):
    runs = []
    for rep, (gap, save) in enumerate([(0.5, 2.0), (1.5, 4.0), (0.7, 3.0)]):
        raw = make_run("hf", rep, steps=10, warmup=2, tokens_per_s=1000, jitter=0)
        span = sum(s["step_s"] for s in raw["steps"]) + gap
        runs.append(_timed(raw, 100.0, 103.0, 110.0, 110 + span, 110 + span + save, 10 + span + save + 1))
    runs.append(make_run("tunebench"))  # no timestamps: a row of dashes but for what it stored
    sweep = make_sweep(tmp_path / "results" / "synthetic-tiny-20260101-000000", runs)
    rows = timeline.by_framework(load_sweep(sweep).runs)
    assert rows["hf"]["runs"] == 3 and rows["hf"]["between_steps_s"] == pytest.approx(0.7)
    assert rows["hf"]["after_last_step_s"] == pytest.approx(3.0)
    md = write_report(sweep, tmp_path / "rep").read_text()
    section = md.split("## Where the time went", 1)[1].split("\n## ", 1)[0]
    hf = next(line for line in section.splitlines() if line.startswith("| hf |"))
    assert "| 3 |" in hf and "| 7.0 (4.0) |" in hf and "| 0.7 | 3.0 | 1.0 |" in hf
    assert "All 4 stored runs:" in section


def test_a_real_run_stores_a_timeline_that_adds_up(env):
    text = """\
version: 1
name: timeline
model: {preset: tiny-llama, dtype: float32}
method: {kind: lora, lora_r: 4}
data: {seq_len: 32}
train: {micro_batch: 2, steps: 4, warmup_steps: 1}
hardware: {device: cpu}
measure: {timeout_s: 120, baseline: dummy}
frameworks: [dummy]
"""
    sc = parse_scenario(text, str(env / "timeline.yaml"))
    d = run_sweep(sc, env / "results", quiet=True)
    [run] = load_sweep(d).runs
    got = timeline.phases(run)
    assert all(got[k] is not None for k in timeline.PHASES), got
    assert all(got[k] >= -0.01 for k in timeline.PHASES), got  # clocks of one machine: no phase runs backwards
    assert sum(got[k] for k in timeline.PHASES) == pytest.approx(run.wall_s, abs=1e-6)
    assert 0 < got["timed_share"] < 1 and got["start_up_s"] > 0
