"""The frontier's time limit (``--time-limit-s``): no probe starts that would end past it, the probes going on
finish and are stored, the table so far is written, and the same command goes on from there."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.running import frontier, frontier_grid, runner
from harness.running.frontier_grid import Clock, TimeUp
from harness.spec.scenario import load_scenario
from tests.harness.test_frontier import _frontier, _scenario
from tests.harness.test_frontier_measure_steps import _long_scenario, _run

REPO = Path(__file__).resolve().parents[2]


def test_a_probe_starts_only_where_its_rows_probes_of_that_kind_say_it_ends_in_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = Clock(limit_s=80, scale=4.0, t0=100.0)
    clock.check("a", alone=False, value=8)  # nothing to go by: it starts while time is left
    clock.saw("a", False, 10.0, 4096, trained=False)  # out of memory: loading the model, no steps
    clock.saw("a", False, 25.0, 2048, trained=True)
    clock.saw("a", False, None, 1024)  # a probe that never ran (unavailable) says nothing
    now[0] = 130.0  # 50 s left
    clock.check("a", alone=False, value=2048)  # 25 s expected
    with pytest.raises(TimeUp, match="about 70 s, 50 s of the time limit"):
        clock.check("a", alone=True, value=2048)  # measured alone: the fixed 10 s + 4 x the 15 s of steps
    clock.check("b", alone=True, value=2048)  # another row, nothing known
    clock.saw("a", True, 40.0, 2048, trained=True)
    clock.check("a", alone=True, value=2048)  # its own measurement's time now
    now[0] = 190.0
    with pytest.raises(TimeUp):
        clock.check("b", alone=False, value=8)  # out of time: nothing starts
    Clock(limit_s=None, t0=0.0).check("a", alone=True)  # no limit
    first = Clock(limit_s=60, t0=100.0)
    first.saw("a", True, 500.0, 8, trained=True)
    first.check("a", alone=True, value=8)  # longer than the whole limit: as an invocation's first probe it starts
    with pytest.raises(TimeUp):
        first.check("a", alone=True, value=8)


def test_a_probe_at_a_larger_value_is_expected_to_take_its_steps_longer(monkeypatch):
    """The line through the two largest values that trained, in the step's work, extended to the next value; a
    probe that ran out of memory counts at its own time, one that trained at a larger value with its steps scaled
    down to this value's work."""
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    clock = Clock(limit_s=1000, t0=0.0, work=lambda v: float(v))
    clock.saw("a", False, 30.0, 8, trained=True)
    clock.saw("a", False, 40.0, 2048, trained=True)
    assert clock.expected("a", False, 16384) == pytest.approx(40 + 10 * (16384 - 2048) / (2048 - 8))
    assert clock.expected("a", False, 1024) == pytest.approx(35)  # 2,048's 10 s of steps, at half the work
    clock.saw("a", False, 300.0, 65536, trained=False)  # out of memory late, in a step
    assert clock.expected("a", False, 16384) == pytest.approx(300)
    assert clock.expected("a", True, 16384) == pytest.approx(300)  # no measurement alone yet: scale 1 here


def test_a_measurement_below_the_rows_longest_probe_is_not_expected_at_that_probes_time(monkeypatch):
    """tunebench-planned on the H100's 8B LoRA frontier: its search probes (3 steps, side by side) ran out of memory
    in 40.6 s, trained at 51,200 tokens in 65.6 s and at 131,072 in 189.2 s. Its measurement alone at 51,200 (5 steps)
    was expected at 288 s, the longest probe's steps times 5/3, and the call stopped with 274 s left; it took 94 s."""
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    work = frontier_grid.step_work(load_scenario(REPO / "scenarios" / "llama8b_lora_frontier.yaml"), "seq_len")
    clock = Clock(limit_s=1000, t0=0.0, scale=5 / 3, work=work)
    clock.saw("p", False, 40.6, 109568, trained=False)
    clock.saw("p", False, 65.6, 51200, trained=True)
    clock.saw("p", False, 189.2, 131072, trained=True)
    expected = clock.expected("p", True, 51200)
    scaled = 40.6 + (189.2 - 40.6) * 5 / 3 * work(51200) / work(131072)
    assert expected == pytest.approx(max(scaled, 40.6 + 25.0 * 5 / 3))
    assert 80 < expected < 110  # within the 25 s a call keeps beyond its time limit of the 94 s it took
    assert clock.expected("p", True, 131072) == pytest.approx(40.6 + 148.6 * 5 / 3)  # at its own value: unscaled


def test_a_probe_at_a_few_tokens_is_not_scaled_to_thousands(monkeypatch, tmp_path):
    """The probes of hf + Liger on the 8B LoRA frontier (H100): out of memory in loading at 8 tokens in 17 s, trained
    at 8 tokens in 34 s. Scaled by a step's FLOPs, those 17 s made its next probe ~37,000 s and the row never ran
    again. One probe that trained is not scaled; two make a line, whose slope is never below 0."""
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    work = frontier_grid.step_work(load_scenario(_scenario(tmp_path)), "seq_len")
    clock = Clock(limit_s=1000, t0=0.0, work=work)
    clock.saw("a", False, 17.4, 8, trained=False)
    clock.saw("a", False, 34.2, 8, trained=True)
    assert clock.expected("a", False, 13312) == pytest.approx(34.2)
    clock.saw("a", False, 41.8, 2048, trained=True)
    line = 41.8 + 7.6 * (work(13312) - work(2048)) / (work(2048) - work(8))
    assert clock.expected("a", False, 13312) == pytest.approx(line)
    assert 41.8 < line < 1000
    clock.saw("a", False, 31.0, 9216, trained=True)  # faster than at 2,048: noise, not a negative slope
    assert clock.expected("a", False, 13312) == pytest.approx(41.8)


def test_no_probe_is_expected_to_run_its_steps_faster_than_the_floor(monkeypatch, tmp_path):
    """The floor: a probe's steps at no more than 60 % of the GPU's datasheet peak (the best row here runs ~54 %),
    after the fixed part, also where a row has no probe to go by or one probe that trained at a few tokens."""
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    work = frontier_grid.step_work(load_scenario(_scenario(tmp_path)), "seq_len")
    floor = frontier_grid.fastest_steps(work, 3, "NVIDIA H100 80GB HBM3")
    assert floor(4096) == pytest.approx(3 * work(4096) / (0.6 * 989.4e12)) and floor(4096) > floor(2048) > 0
    assert frontier_grid.fastest_steps(work, 3, None)(4096) == 0  # no GPU: no floor
    assert frontier_grid.fastest_steps(work, 3, "a card the table lacks")(4096) == 0
    assert frontier_grid.fastest_steps(float, 3, "NVIDIA H100 80GB HBM3")(4096) == 0  # no model config
    clock = Clock(limit_s=1000, t0=0.0, scale=2.0, work=work, floor=lambda v: v / 100)
    assert clock.expected("a", False, 8000) == pytest.approx(80)  # nothing to go by: the floor
    assert clock.expected("a", True, 8000) == pytest.approx(160)  # a measurement: its steps, twice the search's
    clock.saw("a", False, 17.4, 8, trained=False)
    clock.saw("a", False, 34.2, 8, trained=True)
    assert clock.expected("a", False, 8000) == pytest.approx(17.4 + 80)
    assert clock.expected("a", False, 800) == pytest.approx(34.2)  # the probe's own time is the longer


def test_a_line_through_two_short_probes_extends_no_slower_than_the_slowest_rate(monkeypatch):
    """Axolotl's probes on the 8B LoRA frontier (H100, 24 GiB, side by side): trained at 8 tokens in 51.8 s and at
    2,048 in 62.1 s. Their line made the next probe (66,560 tokens) ~928 s, past any call, and the row never ran
    again. The line extends at no slower than 10 % of the peak: the 3 steps' floor times 6."""
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    work = frontier_grid.step_work(load_scenario(REPO / "scenarios" / "llama8b_lora_frontier.yaml"), "seq_len")
    floor = frontier_grid.fastest_steps(work, 3, "NVIDIA H100 80GB HBM3")
    clock = Clock(limit_s=1000, t0=0.0, scale=5 / 3, work=work, floor=floor)
    clock.saw("a", False, 25.4, 8, trained=False)
    clock.saw("a", False, 51.8, 8, trained=True)
    clock.saw("a", False, 62.1, 2048, trained=True)
    unbounded = 62.1 + 10.3 * (work(66560) - work(2048)) / (work(2048) - work(8))
    steepest = floor(66560) / work(66560) * 6  # seconds per unit of a step's work at 10 % of the peak
    line = 62.1 + steepest * (work(66560) - work(2048))
    assert unbounded > 900 and line < 250
    assert clock.expected("a", False, 66560) == pytest.approx(line)
    # a measurement of the row, from the search probes' line: the scenario's steps, 5/3 of the search's
    assert clock.expected("a", True, 66560) == pytest.approx(62.1 + steepest * (work(66560) * 5 / 3 - work(2048)))
    # its own measurements alone: their steps are 5/3 of the floor's, and so is the ceiling
    clock.saw("a", True, 80.0, 8, trained=True)
    clock.saw("a", True, 95.0, 2048, trained=True)
    assert clock.expected("a", True, 66560) == pytest.approx(95.0 + 5 / 3 * steepest * (work(66560) - work(2048)))
    # a line under the ceiling is kept as it is: 3 steps at 16,384 tokens took 5 s more than at 8,192 (~24 %)
    clock.saw("b", False, 60.0, 8192, trained=True)
    clock.saw("b", False, 65.0, 16384, trained=True)
    kept = 65.0 + 5 * (work(32768) - work(16384)) / (work(16384) - work(8192))
    assert kept < 65.0 + steepest * (work(32768) - work(16384))
    assert clock.expected("b", False, 32768) == pytest.approx(kept)


def test_a_measurement_is_expected_to_take_its_own_steps(tmp_path, env, monkeypatch):
    """``--jobs 2 --measure-steps 3`` on a 6-step scenario: the search probes run the scenario's 6 steps and a
    measurement 3, so a measurement is expected at half a search probe's steps."""
    made: list[Clock] = []

    def clock(*a, **k) -> Clock:  # noqa: ANN002, ANN003
        made.append(c := Clock(*a, **k))
        return c

    monkeypatch.setattr(frontier, "Clock", clock)
    assert _run(_long_scenario(tmp_path), tmp_path, "--jobs", "2", "--measure-steps", "3", "--time-limit-s",
                "600") == 0
    assert [c.scale for c in made] == [0.5]


def test_a_steps_work_grows_faster_than_seq_len_and_in_proportion_to_micro_batch(tmp_path):
    sc = load_scenario(_scenario(tmp_path))
    by_len, by_batch = frontier_grid.step_work(sc, "seq_len"), frontier_grid.step_work(sc, "micro_batch")
    assert by_len(4096) > 2 * by_len(2048) > 0  # attention: quadratic in the row's length
    assert by_batch(4) == pytest.approx(2 * by_batch(2))
    unreadable = sc.model_copy(update={"model": sc.model.model_copy(update={"preset": None,
                                                                             "weights": str(tmp_path / "none")})})
    assert frontier_grid.step_work(unreadable, "seq_len")(100) == 100.0  # no config: proportional to the value


def test_a_row_out_of_time_lets_the_probes_going_on_finish_and_be_stored():
    """Side by side: row b's probe is refused by the clock while row a's runs; a's probe finishes (its run is not
    stopped as an interrupt would stop it), then the frontier stops with TimeUp."""
    finished = threading.Event()

    def probe(k, budget, i, phase):  # noqa: ANN001, ANN202
        if k == "b":
            time.sleep(0.2)  # a's probe is going on
            raise TimeUp("b's next probe would end past the limit")
        time.sleep(1.0)
        assert not runner.STOP.is_set()
        finished.set()
        return {"ran": True, "outcome": frontier.FITS, "status": "ok", "reason": None, "need_gib": 1.0}

    def search() -> SimpleNamespace:
        todo = [(1.0, 0)]
        return SimpleNamespace(next_probe=lambda upto: todo.pop() if todo else None,
                               state=SimpleNamespace(record=lambda *a: None))

    with pytest.raises(TimeUp):
        frontier._search_together({"a": search(), "b": search()}, frontier.Probing(jobs=2), probe, 1.0, ran=True)
    assert finished.is_set() and not runner.STOP.is_set()


def test_a_row_out_of_time_stops_while_the_others_probes_that_fit_go_on():
    """Row b's next probe would outlast the limit; row a's three probes still fit and all run (one at a time, as
    they finish), then the search stops with TimeUp. A measurement out of time likewise lets the next row's run."""
    ran: list[tuple[str, int]] = []

    def probe(k, budget, i, phase):  # noqa: ANN001, ANN202
        if k == "b":
            raise TimeUp("b's next probe would end past the limit")
        ran.append((k, i))
        return {"ran": True, "outcome": frontier.FITS, "status": "ok", "reason": None, "need_gib": 1.0}

    def search(n: int) -> SimpleNamespace:
        todo = [(1.0, i) for i in reversed(range(n))]
        return SimpleNamespace(next_probe=lambda upto: todo.pop() if todo else None,
                               state=SimpleNamespace(record=lambda *a: None))

    with pytest.raises(TimeUp, match="b's next probe"):
        frontier._search_together({"b": search(3), "a": search(3)}, frontier.Probing(jobs=1), probe, 1.0, ran=True)
    assert ran == [("a", 0), ("a", 1), ("a", 2)]

    ran.clear()
    found = {"b": SimpleNamespace(found={1.0: 4}), "a": SimpleNamespace(found={1.0: 2})}
    with pytest.raises(TimeUp):
        frontier._measure_budgets([1.0], found, {"a": "x", "b": "y"}, {"a": True, "b": True}, {"a": set(), "b": set()},
                                 probe)
    assert ran == [("a", 2)]  # b's measurement (the longest answer, first) was out of time; a's ran


def test_a_measurement_out_of_time_under_one_budget_lets_a_later_budgets_that_fits_run():
    """--search-first measures every budget after the searches: the long answer under 8 GiB that would outlast the
    limit does not keep a short one under 24 GiB (another row's) from being measured before the TimeUp."""
    ran: list[tuple[str, float]] = []

    def probe(k, budget, i, phase):  # noqa: ANN001, ANN202
        if (k, budget) == ("planned", 8.0):
            raise TimeUp("planned's next probe would end past the limit")
        ran.append((k, budget))
        return {"ran": True, "outcome": frontier.FITS, "status": "ok", "reason": None, "need_gib": 1.0}

    found = {"planned": SimpleNamespace(found={8.0: 50, 24.0: 128}), "peer": SimpleNamespace(found={24.0: 4})}
    with pytest.raises(TimeUp, match="planned's next probe"):
        frontier._measure_budgets([8.0, 24.0], found, {"planned": "x", "peer": "y"},
                                  {"planned": False, "peer": True}, {"planned": set(), "peer": set()}, probe)
    assert ran == [("planned", 24.0), ("peer", 24.0)]


def test_a_frontier_out_of_time_writes_its_table_and_the_same_command_goes_on(tmp_path, env, capsys):
    path = _scenario(tmp_path)
    assert _frontier(path, tmp_path, "--time-limit-s", "3") == 0  # the first probe starts (~6 s), then time is up
    out, err = capsys.readouterr()
    assert "time limit:" in err and "rerun the same command to go on" in err and "table so far" in out
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    assert len(list(folder.glob("*/runs/*.json"))) == 1 and (folder / "frontier.md").is_file()
    assert _frontier(path, tmp_path) == 0
    assert "5 probes (4 run now)" in capsys.readouterr().out
