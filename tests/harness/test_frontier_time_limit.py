"""The frontier's time limit (``--time-limit-s``): no probe starts that would end past it, the probes going on
finish and are stored, the table so far is written, and the same command goes on from there."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from harness.running import frontier, runner
from harness.running.frontier_grid import Clock, TimeUp
from tests.harness.test_frontier import _frontier, _scenario


def test_a_probe_starts_only_where_its_rows_longest_probe_of_that_kind_ends_in_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = Clock(limit_s=60, scale=4.0, t0=100.0)
    clock.check("a", alone=False)  # nothing to go by: it starts while time is left
    clock.saw("a", False, 10.0)
    clock.saw("a", False, 25.0)
    clock.saw("a", False, None)  # a probe that never ran (unavailable) says nothing
    now[0] = 130.0  # 30 s left
    clock.check("a", alone=False)  # 25 s expected
    with pytest.raises(TimeUp, match="about 100 s, 30 s of the time limit"):
        clock.check("a", alone=True)  # measured alone: 4 x its longest search probe
    clock.check("b", alone=True)  # another row, nothing known
    clock.saw("a", True, 20.0)
    clock.check("a", alone=True)  # its own measurement's time now
    now[0] = 160.0
    with pytest.raises(TimeUp):
        clock.check("b", alone=False)  # out of time: nothing starts
    Clock(limit_s=None, t0=0.0).check("a", alone=True)  # no limit
    first = Clock(limit_s=60, t0=100.0, walls={("a", True): 500.0})
    first.check("a", alone=True)  # longer than the whole limit: as an invocation's first probe it starts anyway
    with pytest.raises(TimeUp):
        first.check("a", alone=True)


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


def test_a_frontier_out_of_time_writes_its_table_and_the_same_command_goes_on(tmp_path, env, capsys):
    path = _scenario(tmp_path)
    assert _frontier(path, tmp_path, "--time-limit-s", "3") == 0  # the first probe starts (~6 s), then time is up
    out, err = capsys.readouterr()
    assert "time limit:" in err and "rerun the same command to go on" in err and "table so far" in out
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    assert len(list(folder.glob("*/runs/*.json"))) == 1 and (folder / "frontier.md").is_file()
    assert _frontier(path, tmp_path) == 0
    assert "5 probes (4 run now)" in capsys.readouterr().out
