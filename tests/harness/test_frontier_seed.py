"""``frontier --seed-from FOLDER``: another frontier's answers (another machine's) are probed first, then the step past
them; a cell where the answer holds closes in two probes, one where it does not is still searched to its own answer.
Every answer is this frontier's own probes."""

from __future__ import annotations

import json

import pytest

from harness.analysis.frontier import frontier_cells
from harness.cli import frontier as frontier_cli
from harness.measuring import environment
from harness.running import frontier
from harness.spec.scenario import parse_scenario
from tests.harness.test_frontier import SIM, _run, _scenario

LIMIT = {8.0: 13, 12.0: 29, 16.0: 44, 24.0: 61}  # the largest micro-batch that fits under each budget


def _probes(tmp_path, monkeypatch, seeds, probing=None):  # noqa: ANN001, ANN202
    """The frontier's probes over LIMIT; the fake stores each probe, so a second ask of the same one is found stored
    (not run)."""
    tmp_path.mkdir(exist_ok=True)
    sc = parse_scenario(_scenario(tmp_path, SIM).read_text())
    grid = frontier.make_grid(sc, "micro_batch", hi=64)
    stored: set[tuple] = set()

    def fake_probe(sc, k, budget, vary, v, folder, retry, quiet, steps, shared, check):  # noqa: ANN001, ANN202
        run = _run("ok" if v <= LIMIT[budget] else "oom")  # memory grows with the value, not linearly (no line)
        run.metrics.peak_vram_nvml_gib = run.metrics.peak_alloc_gib = run.metrics.peak_reserved_gib = v ** 0.5
        ran = (key := (k, budget, v, steps, shared)) not in stored
        stored.add(key)
        return run, ran

    monkeypatch.setattr(frontier, "run_probe", fake_probe)
    return frontier.run_frontier(sc, grid, list(LIMIT), tmp_path / "results", seeds=seeds, probing=probing)[1].probes


def _search(tmp_path, monkeypatch, seeds):  # noqa: ANN001, ANN202
    probes = _probes(tmp_path, monkeypatch, seeds)
    return {b: [p["value"] for p in probes if p["budget_gib"] == b] for b in LIMIT}


def test_a_right_seed_closes_each_cell_in_two_probes(tmp_path, monkeypatch):
    unseeded = _search(tmp_path / "a", monkeypatch, None)
    seeded = _search(tmp_path / "b", monkeypatch, {"d-sim": dict(LIMIT)})
    assert seeded == {b: [v, v + 1] for b, v in LIMIT.items()}
    assert sum(map(len, unseeded.values())) > sum(map(len, seeded.values()))


@pytest.mark.parametrize("off", [-7, 5])  # the other machine found less, or more, than fits here
def test_a_wrong_seed_still_finds_this_machines_answer(tmp_path, monkeypatch, off):
    seeded = _search(tmp_path, monkeypatch, {"d-sim": {b: v + off for b, v in LIMIT.items()}})
    for b, want in LIMIT.items():
        assert seeded[b][0] == min(want + off, 64)  # a seed past the grid: its top
        assert max(v for v in seeded[b] if v <= want) == want and want + 1 in seeded[b], (b, seeded[b])


def _cheap_search(tmp_path, monkeypatch, seeds):  # noqa: ANN001, ANN202
    """The search side by side and shortened (``--jobs 2 --probe-steps 1``), each answer then measured alone."""
    return _probes(tmp_path, monkeypatch, seeds, frontier.Probing(jobs=2, steps=1))


def test_with_a_cheaper_search_a_seed_is_measured_first_and_a_right_one_costs_two_runs_a_cell(tmp_path,
                                                                                            monkeypatch):
    """A seed's run alone is both the cell's measurement and the search's probe at it; the search then probes
    the step past it, and the measurement afterwards finds the seed's run stored: two runs a cell, not three."""
    probes = _cheap_search(tmp_path / "b", monkeypatch, {"d-sim": dict(LIMIT)})
    made = [(p["phase"], p["budget_gib"], p["value"]) for p in probes if p["ran"]]
    assert made == [("measure", b, v) for b, v in LIMIT.items()] + [("search", b, v + 1) for b, v in LIMIT.items()]
    unseeded = [p for p in _cheap_search(tmp_path / "a", monkeypatch, None) if p["ran"]]
    assert len(unseeded) > len(made)
    for b, v in LIMIT.items():  # the unseeded frontier measured the same answers
        assert ("measure", b, v) in [(p["phase"], p["budget_gib"], p["value"]) for p in unseeded]


@pytest.mark.parametrize("off", [-7, 5])
def test_with_a_cheaper_search_a_wrong_seed_still_finds_and_measures_this_machines_answer(tmp_path, monkeypatch,
                                                                                         off):
    probes = _cheap_search(tmp_path, monkeypatch, {"d-sim": {b: v + off for b, v in LIMIT.items()}})
    for b, want in LIMIT.items():
        here = [p for p in probes if p["budget_gib"] == b]
        assert here[0]["phase"] == "measure" and here[0]["value"] == min(want + off, 64)  # the seed first
        assert max(p["value"] for p in here if p["outcome"] == frontier.FITS) == want
        assert any(p["phase"] == "measure" and p["value"] == want and p["outcome"] == frontier.FITS for p in here)
        assert all(p["value"] <= want for p in here if p["outcome"] == frontier.FITS)


def test_the_command_seeds_from_another_machines_folder_and_refuses_what_is_not_one(tmp_path, env, monkeypatch,
                                                                                      capsys):
    path = _scenario(tmp_path, SIM)
    real = environment.capture

    def on(gpu: str) -> None:
        monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": gpu, "gpu_count": 1})

    def run(*extra: str) -> int:
        return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5", "--max", "3",
                                  "--results", str(tmp_path / "results"), *extra])

    on("NVIDIA H100")
    assert run("--quiet") == 0
    (h100,) = (tmp_path / "results").glob("fr-frontier-*")
    (theirs,) = [c for c in frontier_cells(h100) if c.state == "found"]

    on("NVIDIA H200")
    capsys.readouterr()
    assert run("--new", "--seed-from", str(h100)) == 0
    out = capsys.readouterr().out
    assert f"frontier: 1 cells seeded from {h100}" in out
    (h200,) = [f for f in (tmp_path / "results").glob("fr-frontier-*") if f != h100]
    probes = [line for line in out.splitlines() if line.startswith("search: ")]
    assert probes[0].startswith(f"search: d-sim @ 0.5 GiB, micro_batch {theirs.value}:"), probes
    (ours,) = [c for c in frontier_cells(h200) if c.state == "found"]
    assert (ours.value, ours.next_oom_value) == (theirs.value, theirs.next_oom_value)
    assert all(json.loads(p.read_text())["gpu_name"] == "NVIDIA H200" for p in h200.glob("*/environment.json"))

    for bad, why in ((tmp_path, "not a frontier folder"), (h100 / "frontier.json", "not a frontier folder")):
        capsys.readouterr()
        assert run("--quiet", "--seed-from", str(bad)) == 2
        assert why in capsys.readouterr().err
    plan = json.loads((h100 / "frontier.json").read_text())
    (h100 / "frontier.json").write_text(json.dumps(plan | {"grid": plan["grid"] | {"vary": "seq_len"}}))
    assert run("--quiet", "--seed-from", str(h100)) == 2
    assert "a frontier of seq_len, not of micro_batch" in capsys.readouterr().err
