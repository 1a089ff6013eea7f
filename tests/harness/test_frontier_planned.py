"""The memory frontier's search for a row that plans itself to the budget (tunebench's ``plan: auto``, here the
dummy's ``sim_plan``): bisected rather than led by a memory line, and its tool's own prediction probed first. No
process runs: a stand-in answers each probe."""

from __future__ import annotations

import math

import pytest

from harness.running import frontier
from harness.spec.scenario import parse_scenario
from tests.harness.test_frontier import _run, _scenario


def test_a_row_that_plans_to_its_budget_is_bisected_not_led_by_its_memory_line(tmp_path, monkeypatch):
    """A row that plans itself to each budget (tunebench's ``plan: auto``, here the dummy's ``sim_plan``) fills the
    budget whatever the value, so what its probes needed draws no line to the next value: each budget bisects the
    bracket left by the one below, within a bisection's probes, without a second point or a step back."""
    plan = "  - {name: dummy, label: d-sim, overrides: {sim_plan: true}}"  # the baseline's label, planning
    sc = parse_scenario(_scenario(tmp_path, plan).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    limit = {8.0: 13, 12.0: 29, 16.0: 44, 24.0: 61}

    def fake_probe(sc, k, budget, vary, v, *rest):
        run = _run("ok" if v <= limit[budget] else "oom")
        run.metrics.peak_vram_nvml_gib = run.metrics.peak_alloc_gib = 0.9 * budget + 0.001 * v
        run.metrics.peak_reserved_gib = 0.9 * budget + 0.001 * v
        return run, True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, list(limit), tmp_path / "results")
    below = 0
    for budget, want in limit.items():
        mine = [p["value"] for p in log.probes if p["budget_gib"] == budget]
        assert max(v for v in mine if v <= want) == want
        bracket = 64 - below  # the values above the budget below's answer
        assert len(mine) <= math.ceil(math.log2(bracket + 1)) + (2 if budget == 8.0 else 1), (budget, mine)
        below = want
    assert not [p for p in log.probes if p["budget_gib"] == 8.0 and p["value"] == 1 + frontier.SECOND_POINT]


@pytest.mark.parametrize("predicted", [None, 0.0125, 0.02])  # the row's own model right, too generous, too tight
def test_a_planning_row_probes_its_tools_prediction_first(tmp_path, monkeypatch, predicted):
    """A row that plans itself predicts its own answer (tunebench's planner, here the dummy's simulated need): each
    budget probes that value, then the step past it; a right prediction closes the budget in two probes, a wrong one
    leaves a bisection of a narrower bracket, and every answer is the probes', never the prediction's."""
    rate = 1 / 64  # GiB per token: a micro-batch of 16 tokens per row needs 0.25 GiB
    extra = f", sim_predicted_gib_per_token: {predicted}" if predicted else ""
    row = f"  - {{name: dummy, label: d-sim, overrides: {{sim_plan: true, sim_gib_per_token: {rate}{extra}}}}}"
    sc = parse_scenario(_scenario(tmp_path, row).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    budgets = [1.0, 2.0, 4.0, 8.0]

    def fake_probe(sc, k, budget, vary, v, *rest):
        return _run("ok" if rate * v * 16 <= budget else "oom"), True

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    _, log = frontier.run_frontier(sc, grid, budgets, tmp_path / "results")
    for budget in budgets:
        mine = [p["value"] for p in log.probes if p["budget_gib"] == budget]
        want = int(budget / (rate * 16))
        assert max(p["value"] for p in log.probes if p["budget_gib"] == budget and p["outcome"] == frontier.FITS) \
            == want
        if predicted is None:
            assert mine == [want, want + 1], (budget, mine)
        else:
            assert mine[0] == int(budget / (predicted * 16)) and len(mine) <= 2 + math.ceil(math.log2(64)), mine


def test_a_prediction_that_fails_leaves_the_search_to_bisect(tmp_path, monkeypatch, capsys):
    sc = parse_scenario(_scenario(tmp_path, "  - {name: dummy, label: d-sim, overrides: {sim_plan: true, "
                                            "sim_gib_per_token: 0.015625}}").read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)

    def broken(sc, overrides):
        raise RuntimeError("no model here")

    monkeypatch.setattr(frontier.registry.load_adapter("dummy"), "predicts_fit", broken)
    assert frontier._hints(sc, "d-sim", grid, [1.0], quiet=False) == {}
    assert "d-sim: no prediction (RuntimeError: no model here); its search bisects" in capsys.readouterr().err
    assert frontier.predicted_indices(sc, "d-sim", {}, grid, [1.0, 0.1], lambda s, o: s.hardware.memory_budget_gib >= 1
                                      and s.train.micro_batch <= 4) == ({1.0: 3}, None)  # 0.1 GiB: nothing fits


def test_a_tool_whose_adapter_does_not_load_here_is_bisected(tmp_path, monkeypatch, capsys):
    """The prediction comes from the tool's adapter module, loaded in the frontier's own process: where that import
    fails (the tool's packages live only in its worker's environment) the row is bisected, and the frontier says why."""
    sc = parse_scenario(_scenario(tmp_path, "  - {name: dummy, label: d-sim, overrides: {sim_plan: true, "
                                            "sim_gib_per_token: 0.015625}}").read_text())

    def missing(name):
        raise ImportError(f"No module named 'toolkit_of_{name}'")

    monkeypatch.setattr(frontier.registry, "load_adapter", missing)
    assert frontier._hints(sc, "d-sim", frontier.make_grid(sc, "micro_batch", hi=64), [1.0], quiet=False) == {}
    assert "d-sim: no prediction here (ImportError: No module named 'toolkit_of_dummy')" in capsys.readouterr().err
