"""The memory frontier: bisection to a known threshold, stored probes, resume, a failed probe stopping its row.

The end-to-end tests run the dummy adapter, whose simulated memory (``sim_gib_per_token``) runs out above a known
number of tokens per micro-batch; each probe is a real stored run (~6 s on 2 cores: prepare + worker), so the grids
are small. The bisection's own logic is checked without processes, through a stand-in for the probe runner.
"""

from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from harness.analysis import frontier as table
from harness.cli import frontier as frontier_cli
from harness.cli import guard
from harness.running import frontier, runner
from harness.spec.scenario import parse_scenario
from harness.storing.schema import RunResult

SCENARIO = """\
version: 1
name: fr
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: lora, lora_r: 4}}
data: {{seq_len: 16, lengths: {lengths}}}
train: {{micro_batch: 1, steps: 2, warmup_steps: 1}}
hardware: {{device: cpu}}
measure: {{timeout_s: 120, baseline: d-sim}}
frameworks:
{frameworks}
"""
# 1/64 GiB per token: 0.5 GiB holds 32 tokens per micro-batch (micro_batch 2 of seq_len 16), 1 GiB holds 64 (4)
SIM = "  - {name: dummy, label: d-sim, overrides: {sim_gib_per_token: 0.015625}}"
CRASH = "  - {name: dummy, label: d-crash, overrides: {sim_gib_per_token: 0.015625, crash: true}}"


def _scenario(tmp_path, frameworks: str = SIM, lengths: str = "fixed"):
    p = tmp_path / "fr.yaml"
    p.write_text(SCENARIO.format(frameworks=frameworks, lengths=lengths))
    return p


def _frontier(path, tmp_path, *extra: str) -> int:
    return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5,1", "--max", "4",
                              "--results", str(tmp_path / "results"), "--quiet", *extra])


def _table(tmp_path) -> pd.DataFrame:
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    return pd.read_csv(folder / "frontier.csv").set_index(["framework", "budget_gib"])


# ----------------------------------------------------------------------------------------------------------------
# grid, outcome, bisection logic (no processes)


def test_grid_holds_the_bounds_and_the_multiples_of_step():
    assert frontier.Grid("seq_len", 8, 512, 128).values() == [8, 128, 256, 384, 512]
    assert frontier.Grid("seq_len", 8, 300, 128).values() == [8, 128, 256, 300]
    assert frontier.Grid("micro_batch", 1, 4, 1).values() == [1, 2, 3, 4]


def test_grid_bounds_come_from_the_model_and_are_checked(tmp_path):
    sc = parse_scenario(_scenario(tmp_path).read_text())
    assert frontier.make_grid(sc, "seq_len").hi == 2048  # tiny-llama's max_position_embeddings
    assert frontier.make_grid(sc, "micro_batch").hi == frontier.MICRO_BATCH_MAX
    with pytest.raises(frontier.FrontierError, match="beyond the model's maximum"):
        frontier.make_grid(sc, "seq_len", hi=4096)
    with pytest.raises(frontier.FrontierError, match="one of seq_len, micro_batch"):
        frontier.make_grid(sc, "lora_r")
    uniform = parse_scenario(SCENARIO.format(frameworks=SIM, lengths="uniform"))
    with pytest.raises(frontier.FrontierError, match="exactly seq_len tokens"):
        frontier.make_grid(uniform, "seq_len")


def _run(status: str, invalid: list[str] | None = None) -> RunResult:
    return RunResult(scenario="fr", framework="d", repeat=0, status=status, invalid_reasons=invalid or [])


def test_outcome_reads_out_of_memory_and_over_budget_as_not_fitting():
    assert frontier.outcome(_run("ok")) == frontier.FITS
    assert frontier.outcome(_run("ok", ["lora_r: ran with 8, scenario says 4"])) == frontier.FITS
    assert frontier.outcome(_run("oom")) == frontier.NO_FIT
    over = "memory budget exceeded: NVML per-process peak 8.70 GiB > 8 GiB"
    assert frontier.outcome(_run("ok", [over])) == frontier.NO_FIT
    for status in ("error", "crashed", "timeout", "unavailable", "diverged"):
        assert frontier.outcome(_run(status)) == frontier.FAILED


def test_a_budget_whose_search_was_cut_short_keeps_what_fitted_under_a_smaller_one(monkeypatch):
    # 8 GiB closed at 2048; at 12 GiB only the top (131,072) was tried and did not fit: "at least 2048", not "none"
    probes = [table._Probe(8.0, 2048, _run("ok")), table._Probe(8.0, 3072, _run("oom")),
              table._Probe(12.0, 131072, _run("oom")), table._Probe(16.0, 2048, _run("oom"))]
    plan = {"grid": {"vary": "seq_len", "lo": 8, "hi": 131072, "step": 1024}, "budgets": [8, 12, 16]}
    monkeypatch.setattr(table, "read_probes", lambda folder: (plan, probes))
    monkeypatch.setattr(table, "_scenario_rows", lambda folder: {"d": "dummy"})
    cells = {c.budget_gib: c for c in table.frontier_cells(".")}
    assert (cells[8.0].state, cells[8.0].value, cells[8.0].next_oom_value) == ("found", 2048, 3072)
    assert (cells[12.0].state, cells[12.0].value, cells[12.0].measured) == ("incomplete", 2048, False)
    assert table.cell_text(cells[12.0]) == "≥ 2,048 (not measured)"
    # a probe at or below that value running out of memory here is this budget's own answer
    assert (cells[16.0].state, cells[16.0].value) == ("none fits", None)


def test_a_search_starts_from_every_probe_stored_under_its_budget_whatever_path_found_them():
    """A resumed search takes up what is stored, not the path that stored it: new answers elsewhere (a measurement
    alone, a budget below) may lead its line to other values, which would cost probes the stored ones answer."""
    values = list(range(1, 17))
    fits, oom = frontier.FITS, frontier.NO_FIT
    # index 8: a shortened probe fitted, the run alone did not (the run alone is the longer one): out of memory wins
    closed = frontier._RowSearch("d", [1.0], values, verify=False,
                                 known={1.0: [(9, oom, None), (8, fits, 0.9), (8, oom, None), (7, fits, 0.8)]})
    assert closed.next_probe() is None and closed.found == {1.0: 7}
    open_ = frontier._RowSearch("d", [1.0], values, known={1.0: [(3, fits, 0.3), (12, oom, None)]})
    assert 3 < open_.next_probe()[1] < 12
    # carried up from the budget below (index 7 fitted under 1 GiB) but out of memory under 2 GiB: searched below
    carried = frontier._RowSearch("d", [1.0, 2.0], values, verify=False,
                                  known={1.0: [(7, fits, 0.8), (8, oom, None)], 2.0: [(7, oom, None)]})
    budget, i = carried.next_probe()
    assert budget == 2.0 and i < 7


@pytest.mark.parametrize("thresholds", [(0, 5), (3, 3), (7, 40), (40, 64), (1, 2)])
def test_bisection_finds_each_threshold_in_logarithmic_probes(tmp_path, monkeypatch, thresholds):
    """A stand-in probe: micro_batch v fits under budget b iff v <= thresholds[b]; no process runs."""
    sc = parse_scenario(_scenario(tmp_path).read_text())
    grid = frontier.make_grid(sc, "micro_batch")
    limit = dict(zip((1.0, 2.0), thresholds, strict=True))

    def fake_probe(sc, k, budget, vary, value, *rest):
        return _run("ok" if value <= limit[budget] else "oom"), True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, [2.0, 1.0], tmp_path / "results")
    for budget, want in limit.items():
        mine = [p for p in log.probes if p["budget_gib"] == budget]
        found = max((p["value"] for p in mine if p["outcome"] == frontier.FITS), default=0)
        assert found == want
        assert len(mine) <= math.ceil(math.log2(len(grid.values()) + 1)) + 1, mine


def test_a_row_that_fits_nothing_closes_each_budget_in_one_probe(tmp_path, monkeypatch):
    """Nothing known to fit: the smallest value first. Weights alone over the budget (an 8B bf16 model under 8 GiB)
    cost one probe per budget, not a bisection of the grid; a row that fits there bisects from it."""
    sc = parse_scenario(_scenario(tmp_path).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    limit = {1.0: 0, 2.0: 0, 4.0: 37}

    def fake_probe(sc, k, budget, vary, value, *rest):
        return _run("ok" if value <= limit[budget] else "oom"), True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, list(limit), tmp_path / "results")
    by = {b: [(p["value"], p["outcome"]) for p in log.probes if p["budget_gib"] == b] for b in limit}
    assert by[1.0] == [(1, frontier.NO_FIT)] and by[2.0] == [(1, frontier.NO_FIT)]
    assert by[4.0][0] == (1, frontier.FITS) and max(v for v, o in by[4.0] if o == frontier.FITS) == 37
    assert len(by[4.0]) <= 1 + math.ceil(math.log2(64))


@pytest.mark.parametrize("base, per_value, curve, usable", [(6.0, 0.25, 0.0, 1.0), (5.0, 0.1, 0.0, 1.0),
                                                             (6.0, 0.2, 0.004, 1.0), (5.0, 0.1, 0.0, 0.9),
                                                             (6.0, 0.25, 0.0, 0.92)])
def test_the_memory_line_guides_the_search_to_each_budget_in_a_few_probes(tmp_path, monkeypatch, base, per_value,
                                                                          curve, usable):
    """A stand-in probe whose NVML peak is base + per_value x v (+ curve x v^2: memory not quite linear), fitting
    within ``usable`` of the budget (the rest the cap's overheads): each budget ends at the largest fitting value,
    and after the first budget each takes a few probes, not a bisection."""
    sc = parse_scenario(_scenario(tmp_path).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    budgets = [8.0, 12.0, 16.0, 24.0]

    def peak(v: int) -> float:
        return base + per_value * v + curve * v * v

    def fake_probe(sc, k, budget, vary, v, *rest):
        run = _run("ok" if peak(v) <= usable * budget else "oom")
        if run.status == "ok":
            run.metrics.peak_vram_nvml_gib = peak(v)
        return run, True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, budgets, tmp_path / "results")
    for budget in budgets:
        mine = [p for p in log.probes if p["budget_gib"] == budget]
        want = max((v for v in grid.values() if peak(v) <= usable * budget), default=0)
        assert max((p["value"] for p in mine if p["outcome"] == frontier.FITS), default=0) == want
        if budget > budgets[0]:
            assert len(mine) <= (4 if budget == budgets[1] else 3), mine  # a bisection of 64 values: ~6
    assert frontier.predicted_max([(2, 7.0), (4, 8.0)], 10.0) == pytest.approx(8.0)
    assert frontier.predicted_max([(4, 8.0)], 10.0) is None  # one point: no line
    assert frontier.predicted_max([(2, 8.0), (4, 8.0)], 10.0) is None  # flat: no prediction


# ----------------------------------------------------------------------------------------------------------------
# end to end with the dummy tool


def test_frontier_finds_the_threshold_and_a_crash_stops_only_its_row(tmp_path, env):
    path = _scenario(tmp_path, SIM + "\n" + CRASH)
    assert _frontier(path, tmp_path) == 0
    t = _table(tmp_path)
    assert t.loc[("d-sim", 0.5), "value"] == 2 and t.loc[("d-sim", 0.5), "next_oom_value"] == 3
    assert t.loc[("d-sim", 1.0), "value"] == 4
    assert (t.loc["d-sim", "state"] == "found").all() and (t.loc["d-sim", "tokens_per_s"] > 0).all()
    # nothing known to fit yet: the smallest value first, then the bisection (1, 2, 3); under 1 GiB from 2 up
    assert t.loc[("d-sim", 0.5), "probes"] == 3 and t.loc[("d-sim", 1.0), "probes"] == 2
    # the crashed probe stopped d-crash at its first value and under every larger budget; d-sim went on
    assert list(t.loc["d-crash", "state"]) == ["stopped", "stopped"]
    assert "micro_batch 1: crashed: worker exited with code 3" in t.loc[("d-crash", 0.5), "reason"]
    assert t.loc[("d-crash", 1.0), "reason"].startswith("under a smaller budget")
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    md = (folder / "frontier.md").read_text()
    assert "| d-sim | 2 (" in md and "| d-crash | stopped | stopped |" in md

    # --retry-failed redoes the crashed probe only, keeping the failed attempt
    assert _frontier(path, tmp_path, "--retry-failed") == 0
    attempts = list(folder.glob("*/runs/attempts/d-crash-r0.1.json"))
    assert len(attempts) == 1
    assert not list(folder.glob("*/runs/attempts/d-sim-*"))


def test_interrupted_frontier_resumes_without_redoing_finished_probes(tmp_path, env, monkeypatch, capsys):
    path = _scenario(tmp_path)
    real = runner.execute_run
    calls = []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C as the third probe starts
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute_run", interrupted_after_two)
    assert _frontier(path, tmp_path) == guard.EXIT_INTERRUPTED
    monkeypatch.setattr(runner, "execute_run", real)
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    done = {p: p.stat().st_mtime_ns for p in folder.glob("*/runs/*.json")}
    assert len(done) == 2
    # the table as the interruption left it: the open search marked, so a call's deadline still brings one back
    assert "table so far" in capsys.readouterr().err
    assert "≥" in (folder / "frontier.md").read_text()

    assert _frontier(path, tmp_path) == 0
    assert "5 probes (3 run now)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the finished probes were read, not run again
    t = _table(tmp_path)
    assert t.loc[("d-sim", 0.5), "value"] == 2 and t.loc[("d-sim", 1.0), "value"] == 4
    assert len(list(folder.glob("*/runs/*.json"))) == 5 and len(list(folder.glob("fr.*"))) == 5


def test_a_frontier_of_another_gpu_is_not_filled_in_here(tmp_path, env, monkeypatch, capsys):
    """Probes of two kinds of GPU would draw one frontier: a folder whose probes ran on another GPU is refused
    (exit 2, both named) before any probe runs."""
    from harness.measuring import environment

    path = _scenario(tmp_path)
    real = runner.execute_run
    monkeypatch.setattr(runner, "execute_run", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _frontier(path, tmp_path) == guard.EXIT_INTERRUPTED  # the folder and its first probe's sweep exist
    monkeypatch.setattr(runner, "execute_run", real)
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    (stored,) = folder.glob("*/environment.json")
    stored.write_text(json.dumps(json.loads(stored.read_text()) | {"gpu_name": "NVIDIA H100 80GB HBM3"}))
    real_capture = environment.capture
    monkeypatch.setattr(environment, "capture",
                        lambda **kw: real_capture(**kw) | {"gpu_name": "NVIDIA H200", "gpu_count": 1})
    capsys.readouterr()
    plan = (folder / "frontier.json").read_bytes()
    assert _frontier(path, tmp_path) == 2
    why = "its runs were measured on NVIDIA H100 80GB HBM3 x1, this machine is NVIDIA H200 x1"
    assert why in capsys.readouterr().err
    assert not list(folder.glob("*/runs/*.json")) and (folder / "frontier.json").read_bytes() == plan


def test_frontier_refuses_a_budget_a_row_cannot_honour(tmp_path, env, capsys):
    path = _scenario(tmp_path, "  - {name: dummy, label: d-sim}")
    assert _frontier(path, tmp_path) == 2
    assert "a memory budget needs device cuda (d-sim)" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_frontier_refuses_a_cuda_scenario_where_no_gpu_is_seen(tmp_path, env, capsys, monkeypatch):
    """Every probe would be stored as unavailable, in a folder the GPU machine would then resume."""
    path = tmp_path / "gpu.yaml"
    path.write_text(_scenario(tmp_path).read_text().replace("device: cpu", "device: cuda"))
    monkeypatch.setattr(frontier_cli, "gpu_info", lambda: {"gpu_memory_gib": None})
    assert _frontier(path, tmp_path) == 2
    assert "hardware.device is cuda and this machine has no GPU that NVML sees" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("extra", "said"), [
    (["--max", "100000"], "--max 100000: beyond the largest micro_batch a scenario takes (65536)"),
    (["--jobs", "1000000"], "--jobs must be between 1 and 256"),
    (["--reports", "/dev/null"], "--reports /dev/null: cannot write there: /dev/null is not a directory"),
])
def test_frontier_refuses_bad_options_before_its_first_probe(tmp_path, env, capsys, extra, said):
    assert _frontier(_scenario(tmp_path), tmp_path, *extra) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("budgets", [",".join(str(b) for b in range(1, 100)), "nan", "1e400", "x"])
def test_frontier_budgets_are_few_finite_numbers(tmp_path, capsys, budgets):
    with pytest.raises(SystemExit) as e:
        frontier_cli.main([str(_scenario(tmp_path)), "--vary", "micro_batch", "--budgets", budgets])
    assert e.value.code == 2 and "--budgets" in capsys.readouterr().err


def test_a_row_added_to_the_scenario_resumes_its_frontier_and_probes_the_new_row_only(tmp_path, env, capsys):
    """A peer's new row (its best documented setting, say) joins the frontier already measured: the other rows'
    probes stand (their own settings are the same), the new row is searched, both are in the table. A shared row
    whose settings changed is another frontier."""
    path = _scenario(tmp_path)
    assert _frontier(path, tmp_path) == 0
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    before = sorted(d.name for d in folder.glob("fr.d-sim.*"))
    assert before
    added = "  - {name: dummy, label: d-sim2, overrides: {sim_gib_per_token: 0.03125}}"
    path.write_text(SCENARIO.format(frameworks=f"{SIM}\n{added}", lengths="fixed"))
    capsys.readouterr()
    assert _frontier(path, tmp_path) == 0
    assert [d.name for d in (tmp_path / "results").glob("fr-frontier-*")] == [folder.name]
    assert sorted(d.name for d in folder.glob("fr.d-sim.*")) == before  # no probe of d-sim ran again
    assert list(folder.glob("fr.d-sim2.*"))
    t = _table(tmp_path)
    assert t.loc[("d-sim", 1.0), "value"] == 4 and t.loc[("d-sim2", 1.0), "value"] == 2
    changed = parse_scenario(SCENARIO.format(frameworks=SIM.replace("0.015625", "0.0078125"), lengths="fixed"))
    assert frontier.find_frontier(changed, frontier.make_grid(changed, "micro_batch", 4), tmp_path / "results") \
        is None


@pytest.mark.parametrize("plan", ['{"grid": {"vary": "lr", "lo": 1, "hi": 4, "step": 1}, "budgets": [1]}',
                                  '{"grid": {"vary": "micro_batch", "lo": 1, "hi": 4, "step": 0}}',
                                  '{"grid": {"vary": "micro_batch", "lo": 1, "hi": 4, "step": 1}, "budgets": "x"}',
                                  '{"grid": {"vary": "micro_batch", "lo": 1, "hi": 4, "step": 1}, "rows": ["d"]}',
                                  '{"budgets": [1]}', "[1]", "{"])
def test_a_damaged_frontier_plan_is_refused_by_name_and_never_resumed(tmp_path, capsys, plan):
    from harness.cli import report as report_cli

    sc = parse_scenario(_scenario(tmp_path).read_text())
    grid = frontier.make_grid(sc, "micro_batch", 4)
    folder = frontier.open_frontier(sc, grid, [1.0], tmp_path / "results")
    (folder / frontier.PLAN_FILE).write_text(plan)
    with pytest.raises(frontier.FrontierError, match="frontier.json: "):
        frontier.read_plan(folder)
    assert frontier.find_frontier(sc, grid, tmp_path / "results") is None  # a new folder starts beside it
    assert report_cli.main([str(folder), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder / frontier.PLAN_FILE}: " in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# search probes side by side and shortened; each answer measured alone


def test_the_line_goes_through_what_probes_needed_not_the_nvml_peak_a_cap_flattens(tmp_path, monkeypatch):
    """Under a cap the caching allocator fills it, so fitting probes peak near the budget by NVML whatever they
    needed; the line goes through torch's allocated peak plus what lies outside torch, and the larger budgets'
    searches aim near their answers instead of at the grid's top."""
    m = RunResult(scenario="fr", framework="d", repeat=0, status="ok").metrics
    assert frontier.need_gib(m) is None
    m.peak_vram_nvml_gib = 7.77
    assert frontier.need_gib(m) == 7.77  # no torch figures: NVML's
    m.peak_alloc_gib, m.peak_reserved_gib = 6.76, 7.03
    assert frontier.need_gib(m) == pytest.approx(6.76 + 0.74)

    sc = parse_scenario(_scenario(tmp_path).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    budgets = [8.0, 12.0, 16.0]

    def need(v: int) -> float:
        return 5.0 + 0.25 * v

    def fake_probe(sc, k, budget, vary, v, *rest):
        run = _run("ok" if need(v) <= budget else "oom")
        if run.status == "ok":  # the NVML peak: at the cap, whatever the probe needed
            run.metrics.peak_vram_nvml_gib, run.metrics.peak_reserved_gib = budget - 0.2, budget - 0.9
            run.metrics.peak_alloc_gib = need(v) - 0.7
        return run, True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, budgets, tmp_path / "results")
    for budget in budgets:
        mine = [p for p in log.probes if p["budget_gib"] == budget]
        want = max(v for v in grid.values() if need(v) <= budget)
        assert max(p["value"] for p in mine if p["outcome"] == frontier.FITS) == want
        if budget > budgets[0]:
            assert len(mine) <= 4 and max(p["value"] for p in mine) < 64, mine  # no probe at the top


def test_side_by_side_search_keeps_to_its_jobs_and_the_gpu_memory_then_measures_each_answer_alone(tmp_path,
                                                                                                  monkeypatch):
    """A stand-in probe that records how many probes run at once and their budgets: at most ``jobs`` and within the
    capacity, the first alone; every answer is then measured with the scenario's steps, one at a time, before the next
    budget's search begins, and a full run that does not fit where the short probe did moves the answer down a
    value."""
    rows = "\n".join(f"  - {{name: dummy, label: {k}}}" for k in ("d-sim", "b", "c", "d"))
    sc = parse_scenario(_scenario(tmp_path, rows).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=16)
    limit = {"d-sim": {1.0: 3, 2.0: 7}, "b": {1.0: 1, 2.0: 2}, "c": {1.0: 5, 2.0: 9}, "d": {1.0: 0, 2.0: 16}}
    full_run_needs_less = {("c", 2.0)}  # its full run at the short probes' answer runs out of memory
    lock, running, seen = threading.Lock(), [], []

    def fake_probe(sc, k, budget, vary, v, folder, retry_failed, quiet, steps, shared, before_run):
        phase = "search" if shared else "measure"
        with lock:
            running.append(budget)
            seen.append((phase, len(running), sum(running), steps, budget))
        time.sleep(0.05)
        fits = v <= limit[k][budget] - (phase == "measure" and (k, budget) in full_run_needs_less)
        with lock:
            running.remove(budget)
        return _run("ok" if fits else "oom"), True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    probing = frontier.Probing(jobs=3, steps=2, capacity_gib=4.5)
    _, log = frontier.run_frontier(sc, grid, [1.0, 2.0], tmp_path / "results", probing=probing)
    assert seen[0][1] == 1  # the first probe alone: it builds what the others share
    search = [s for s in seen if s[0] == "search"]
    assert 2 <= max(n for _, n, *_ in search) <= 3 and all(mem <= 4.5 for _, _, mem, *_ in search)
    assert all(steps == 2 for *_, steps, _ in search)
    measure = [s for s in seen if s[0] == "measure"]
    assert all(n == 1 and steps is None for _, n, _, steps, _ in measure)
    # a budget at a time: its search, then its measurements, then the next budget's search
    assert [(phase, budget) for phase, *_, budget in seen] == sorted(
        ((phase, budget) for phase, *_, budget in seen), key=lambda pb: (pb[1], pb[0] == "measure"))
    for k, per_budget in limit.items():
        for budget, want in per_budget.items():
            mine = [p for p in log.probes if p["framework"] == k and p["budget_gib"] == budget]
            answer = [p for p in mine if p["phase"] == "measure" and p["outcome"] == frontier.FITS]
            if want == 0:
                assert not answer and all(p["phase"] == "search" for p in mine)
            elif (k, budget) in full_run_needs_less:
                assert [p["value"] for p in mine if p["phase"] == "measure"] == [want, want - 1]
            else:
                assert [p["value"] for p in answer] == [want]


def test_a_resumed_side_by_side_search_runs_its_first_new_probe_alone(tmp_path, monkeypatch):
    """Probes found stored do not count: on a fresh machine the first probe that runs builds the shared checkpoint,
    so it runs alone even when the stored ones came first."""
    rows = "\n".join(f"  - {{name: dummy, label: {k}}}" for k in ("d-sim", "b", "c"))
    sc = parse_scenario(_scenario(tmp_path, rows).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=16)
    lock, running, seen = threading.Lock(), [], []

    def fake_probe(sc, k, budget, vary, v, folder, retry_failed, quiet, steps, shared, before_run):
        stored = budget == 1.0  # the first budget's probes all ran in an earlier invocation
        with lock:
            running.append(k)
            if not stored:
                seen.append(len(running))
        time.sleep(0 if stored else 0.05)
        with lock:
            running.remove(k)
        return _run("ok" if v <= 4 * budget else "oom"), not stored

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    frontier.run_frontier(sc, grid, [1.0, 2.0], tmp_path / "results", probing=frontier.Probing(jobs=3, steps=2))
    assert seen[0] == 1 and max(seen) > 1


def test_cheaper_search_takes_a_smaller_budgets_answer_without_probing_it_again(tmp_path, monkeypatch):
    """With each answer measured alone afterwards, a value carried up from a smaller budget gets no search probe:
    its measurement verifies it (at the grid's top no search probe runs at all under the larger budgets). A row that
    runs the same under every cap is measured once per value: under a larger budget with the same answer the smaller
    budget's run stands; a row that plans itself to the budget is measured under each."""
    rows = "\n".join(f"  - {{name: dummy, label: {k}{ov}}}" for k, ov in
                      (("d-sim", ""), ("same", ""), ("plans", ", overrides: {sim_plan: true}")))
    sc = parse_scenario(_scenario(tmp_path, rows).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=8)
    limit = {"d-sim": {1.0: 8, 2.0: 8, 4.0: 8}, "same": {1.0: 3, 2.0: 3, 4.0: 5},
             "plans": {1.0: 3, 2.0: 3, 4.0: 5}}
    measured = {"d-sim": {1.0: 8}, "same": {1.0: 3, 4.0: 5}, "plans": {1.0: 3, 2.0: 3, 4.0: 5}}

    def fake_probe(sc, k, budget, vary, v, *rest):
        return _run("ok" if v <= limit[k][budget] else "oom"), True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, [1.0, 2.0, 4.0], tmp_path / "results",
                                   probing=frontier.Probing(jobs=2, steps=2))
    for k, per_budget in limit.items():
        below = None
        for budget, want in per_budget.items():
            mine = [(p["phase"], p["value"], p["outcome"]) for p in log.probes
                    if p["framework"] == k and p["budget_gib"] == budget]
            expect = [("measure", want, frontier.FITS)] if budget in measured[k] else []
            assert [m for m in mine if m[0] == "measure"] == expect, (k, budget, mine)
            assert below is None or ("search", below, frontier.FITS) not in mine, (k, budget, mine)
            below = want
    assert not [p for p in log.probes if p["framework"] == "d-sim" and p["budget_gib"] > 1.0]
    # measured a budget at a time, rows in the scenario's order: an interrupted frontier has whole budgets measured
    measured_order = [(p["budget_gib"], p["framework"]) for p in log.probes if p["phase"] == "measure"]
    assert measured_order == [(1.0, "d-sim"), (1.0, "same"), (1.0, "plans"), (2.0, "plans"), (4.0, "same"),
                              (4.0, "plans")]


def test_a_budgets_measurements_start_with_each_tools_longest_answer():
    """The cells that compare tools (each tool's longest) are measured first, longest first; then the other rows in
    the scenario's order. A row that runs the same under every cap skips a value measured under a smaller budget."""
    searches = {k: SimpleNamespace(found={2.0: i}) for k, i in
                (("a", 3), ("a-long", 6), ("b", 5), ("c", 2), ("b-short", 1), ("d", 4))}
    tools = {"a": "x", "a-long": "x", "b": "y", "c": "z", "b-short": "y", "d": "w"}
    fitted = {k: set() for k in searches} | {"d": {4}}
    order = []

    def probe(k, budget, i, phase):
        order.append((k, budget, i, phase))
        return {"outcome": frontier.FITS}

    frontier._measure_budgets([2.0], searches, tools, {k: k != "a" for k in searches}, fitted, probe)
    assert order == [("a-long", 2.0, 6, "measure"), ("b", 2.0, 5, "measure"), ("c", 2.0, 2, "measure"),
                     ("a", 2.0, 3, "measure"), ("b-short", 2.0, 1, "measure")]
    assert fitted["a-long"] == {6} and fitted["d"] == {4}


def test_follows_budget_is_what_the_adapter_declares():
    assert frontier.follows_budget("tunebench", {"plan": "auto"}) and frontier.follows_budget("tunebench", {"plan": 12})
    assert not frontier.follows_budget("tunebench", {"recompute_layers": 1})
    assert not frontier.follows_budget("hf", {"liger": True}) and not frontier.follows_budget("unsloth", {})
    assert frontier.follows_budget("dummy", {"sim_plan": True})
    assert not frontier.follows_budget("dummy", {"sim_plan": False})
    assert frontier.follows_budget("no-such-tool", {}) and frontier.follows_budget(None, {})


def test_frontier_with_jobs_marks_its_search_probes_shared_and_measures_every_cell_alone(tmp_path, env, capsys):
    # d-small fits the grid's top (micro-batch 4) under both budgets: its 1 GiB cell is its 0.5 GiB run; d-plan, the
    # same row planning itself to the budget, is run under each
    rows = [SIM, "  - {name: dummy, label: d-half, overrides: {sim_gib_per_token: 0.03125}}",
            "  - {name: dummy, label: d-small, overrides: {sim_gib_per_token: 0.0078125}}",
            "  - {name: dummy, label: d-plan, overrides: {sim_gib_per_token: 0.0078125, sim_plan: true}}"]
    path = _scenario(tmp_path, "\n".join(rows))
    assert _frontier(path, tmp_path, "--jobs", "2") == 0
    t = _table(tmp_path)
    assert t.loc[("d-sim", 0.5), "value"] == 2 and t.loc[("d-sim", 1.0), "value"] == 4
    assert t.loc[("d-half", 0.5), "value"] == 1 and t.loc[("d-half", 1.0), "value"] == 2
    assert (t["value"].loc[["d-small", "d-plan"]] == 4).all() and (t["state"] == "found").all()
    assert t["measured"].all() and (t["tokens_per_s"] > 0).all() and t["valid"].all()
    assert t.loc[("d-small", 1.0), "measured_at_gib"] == 0.5 and t.loc[("d-plan", 1.0), "measured_at_gib"] == 1.0
    assert t.loc[("d-small", 1.0), "tokens_per_s"] == t.loc[("d-small", 0.5), "tokens_per_s"]
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    assert not list(folder.glob("fr.d-small.1gib.*")) and len(list(folder.glob("fr.d-plan.1gib.*"))) == 1
    assert "run under 0.5 GiB)" in (folder / "frontier.md").read_text()
    shared = [r for r in folder.glob("*.shared-*/runs/*.json")]
    assert shared and all("measured under contention" in r.read_text() for r in shared)
    # the report's command is the one that finds these probes again
    report = (tmp_path / "reports" / folder.name / "report.md").read_text()
    assert "--budgets 0.5,1 --step 1 --max 4 --jobs 2\n" in report
    # a rerun finds every probe stored: nothing runs again
    capsys.readouterr()
    assert _frontier(path, tmp_path, "--jobs", "2") == 0
    assert "(0 run now)" in capsys.readouterr().out


def test_a_missing_evaluator_stops_the_frontier_before_its_first_probe(tmp_path, monkeypatch, capsys):
    from harness.running import evaluator

    path = _scenario(tmp_path)
    path.write_text(path.read_text() + "eval: {tasks: [tb_add_gen]}\n")
    monkeypatch.setitem(evaluator.MODULES, "eval", ("tunebench_no_such_module",))
    assert _frontier(path, tmp_path) == guard.EXIT_BAD_INPUT
    assert "needs tunebench_no_such_module" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
