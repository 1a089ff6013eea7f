"""``frontier --measure-steps M``: each answer measured alone with M steps instead of the scenario's, marked in the
table and the report, found again by the same command, and refused where it would time fewer than two steps."""

from __future__ import annotations

import json

import pytest

from harness.cli import frontier as frontier_cli
from harness.running.frontier import probing_flags
from tests.harness.test_frontier import SCENARIO, SIM, _table


def _long_scenario(tmp_path):  # noqa: ANN001, ANN202
    p = tmp_path / "fr.yaml"
    text = SCENARIO.format(frameworks=SIM, lengths="fixed").replace("steps: 2, warmup_steps: 1",
                                                                   "steps: 6, warmup_steps: 1")
    assert "steps: 6" in text
    p.write_text(text)
    return p


def _run(path, tmp_path, *extra: str) -> int:  # noqa: ANN001
    return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5", "--max", "4",
                              "--results", str(tmp_path / "results"), "--quiet", *extra])


@pytest.mark.parametrize(("extra", "why"), [(["--measure-steps", "3"], "needs --jobs above 1 or --probe-steps"),
                                            (["--jobs", "2", "--measure-steps", "2"], "warmup_steps (1) + 2")])
def test_measure_steps_without_a_search_to_follow_or_with_fewer_than_two_timed_is_refused(tmp_path, env, capsys,
                                                                                         extra, why):
    assert _run(_long_scenario(tmp_path), tmp_path, *extra) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_measurements_with_fewer_steps_are_the_cells_figures_and_a_rerun_finds_them(tmp_path, env, capsys):
    path = _long_scenario(tmp_path)
    assert _run(path, tmp_path, "--jobs", "2", "--measure-steps", "3") == 0
    t = _table(tmp_path)
    cell = t.loc[("d-sim", 0.5)]
    assert cell["value"] == 2 and cell["state"] == "found" and bool(cell["measured"]) and cell["tokens_per_s"] > 0
    assert cell["measured_steps"] == 3
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    alone = [d for d in folder.glob("fr.d-sim.*") if ".shared" not in d.name]
    assert alone and all(json.loads((d / "runs" / "d-sim-r0.json").read_text())["metrics"]["tokens_per_s"]
                         for d in alone)
    assert all("steps: 3" in (d / "scenario.yaml").read_text() for d in alone)
    assert "2 (" in (folder / "frontier.md").read_text() and ", 3 steps)" in (folder / "frontier.md").read_text()
    report = (tmp_path / "reports" / folder.name / "report.md").read_text()
    assert "--jobs 2 --measure-steps 3\n" in report and "with fewer steps than the scenario" in report
    capsys.readouterr()
    assert _run(path, tmp_path, "--jobs", "2", "--measure-steps", "3") == 0
    assert "(0 run now)" in capsys.readouterr().out
    # without the flag, the scenario's own steps: the cell is measured again, and that run is its figure
    assert _run(path, tmp_path, "--jobs", "2") == 0
    cell = _table(tmp_path).loc[("d-sim", 0.5)]
    assert bool(cell["measured"]) and (cell["measured_steps"] != cell["measured_steps"])  # NaN: the scenario's


def test_the_command_that_finds_the_probes_again():
    assert probing_flags({3}, ["measured under contention: 4 search probes at a time"], frozenset({5})) == \
        " --jobs 4 --probe-steps 3 --measure-steps 5"
    assert probing_flags(set(), [], frozenset({6})) == " --probe-steps 6"  # alone and short: the search itself
    assert probing_flags(set(), [], frozenset()) == ""


def test_search_first_searches_every_budget_before_any_cell_is_measured(tmp_path, env, capsys):
    """``--search-first``: the longest value at every budget before any measurement alone (a machine lent for
    little time gives the frontier's answers first); the cells are then measured as without it."""
    from tests.harness.test_frontier import _scenario

    assert frontier_cli.main([str(_scenario(tmp_path)), "--vary", "micro_batch", "--budgets", "0.5,1", "--max", "4",
                              "--results", str(tmp_path / "results"), "--jobs", "2", "--search-first"]) == 0
    phases = [ln.split(":")[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith(("search:",
                                                                                                "measure:"))]
    assert "search" in phases and "measure" in phases
    assert phases.index("measure") > max(i for i, p in enumerate(phases) if p == "search")
    t = _table(tmp_path)
    for budget, value in ((0.5, 2), (1.0, 4)):
        cell = t.loc[("d-sim", budget)]
        assert cell["value"] == value and cell["state"] == "found" and bool(cell["measured"])


def test_search_first_without_a_search_to_put_first_is_refused(tmp_path, env, capsys):
    assert _run(_long_scenario(tmp_path), tmp_path, "--search-first") == 2
    assert "--search-first: needs --jobs above 1 or --probe-steps" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
