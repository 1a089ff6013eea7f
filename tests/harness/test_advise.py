"""``python -m harness advise``: per scenario and GPU, the newest sweep's fastest row and the newest frontier's
longest row within one memory budget (synthetic stored results)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import environment_dict, make_run, make_sweep, scenario_dict  # noqa: E402

from harness.cli import advise as advise_cli  # noqa: E402
from harness.reporting import advice  # noqa: E402

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def _run(label: str, tool: str, tps: float, gib: float, scenario: str = "sc", **kw) -> dict:
    run = make_run(tool, 0, tokens_per_s=tps, vram_gib=gib, jitter=0.0, scenario=scenario, **kw)
    return run | {"framework": label, "log": f"logs/{label}-r0.log"}


def _sweep(root: Path, name: str, runs: list[dict], gpu: str | None = H100, created: str = "20260101-000000") -> Path:
    d = make_sweep(root / f"{name}-{created}", runs, environment=environment_dict("cuda" if gpu else "cpu")
                   | ({"gpu_name": gpu} if gpu else {}), device="cuda" if gpu else "cpu")
    plan = json.loads((d / "sweep.json").read_text())
    (d / "sweep.json").write_text(json.dumps(plan | {"created": created}))
    return d


def _frontier(root: Path, name: str, probes: list[tuple[str, str, float, int, str]], budgets: list[float],
              gpu: str = H100, created: str = "20260102-000000") -> Path:
    """A frontier folder over seq_len 256, 1024, 2048, 3072, 4096 whose probes are ``(row, tool, budget, value,
    status)``."""
    folder = root / f"{name}-frontier-{created}"
    folder.mkdir(parents=True)
    rows = list(dict.fromkeys((p[0], p[1]) for p in probes))
    sc = scenario_dict(name=name, frameworks=[r for r, _ in rows])
    (folder / "scenario.yaml").write_text(yaml.safe_dump(sc, sort_keys=False))
    (folder / "frontier.json").write_text(json.dumps({
        "scenario": name, "scenario_hash": "0" * 12, "created": created, "budgets": budgets,
        "grid": {"vary": "seq_len", "lo": 256, "hi": 4096, "step": 1024}, "rows": dict(rows)}))
    for i, (row, tool, budget, value, status) in enumerate(probes):
        psc = scenario_dict(name=f"{name}.{row}.{budget:g}gib.seq_len{value}", frameworks=[row])
        psc["hardware"]["memory_budget_gib"] = budget
        psc["data"]["seq_len"] = value
        run = _run(row, tool, 1000.0 + value, budget - 1, scenario=psc["name"], status=status)
        run["adapter"] = tool
        make_sweep(folder / f"{psc['name']}-2026010{i % 9}-000000", [run], scenario=psc,
                   environment=environment_dict() | {"gpu_name": gpu})
    return folder


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    # an older sweep of "sc" on the H100, where tunebench was slow: the newer one answers
    _sweep(root, "sc", [_run("hf", "hf", 900, 20.0), _run("tunebench", "tunebench", 950, 14.0)],
           created="20260101-000000")
    _sweep(root, "sc", [_run("hf", "hf", 1000, 20.0), _run("unsloth", "unsloth", 1300, 11.0),
                        _run("tunebench", "tunebench", 2000, 30.0), _run("tunebench-lean", "tunebench", 1690, 9.0)],
           created="20260105-000000")
    _sweep(root, "sc", [_run("hf", "hf", 1100, 20.0), _run("tunebench", "tunebench", 2200, 15.0)], gpu=H200,
           created="20260102-000000")
    _sweep(root, "cpu_only", [_run("hf", "hf", 50, 0.0, device="cpu")], gpu=None)
    _frontier(root, "fr", [
        ("tunebench-long", "tunebench", 16, 3072, "ok"), ("tunebench-long", "tunebench", 16, 4096, "oom"),
        ("hf", "hf", 16, 1024, "ok"), ("hf", "hf", 16, 2048, "oom"),
        ("hf", "hf", 8, 256, "oom"), ("tunebench-long", "tunebench", 8, 1024, "ok"),
        ("tunebench-long", "tunebench", 8, 2048, "oom"), ("tunebench-planned", "tunebench", 12, 4096, "ok"),
        ("hf", "hf", 24, 2048, "ok")],
        budgets=[8, 12, 16, 24])
    return root


def test_the_newest_sweep_of_each_scenario_and_gpu_answers_with_its_fastest_row_that_fits(results):
    answers = {(a.sweep.name, a.gpu): a for a in advice.sweep_answers(results, 12.0)}
    assert set(answers) == {("sc", H100), ("sc", H200)}  # the CPU sweep has no memory to fit
    a = answers[("sc", H100)]
    assert a.sweep.path.name == "sc-20260105-000000"
    assert (a.pick.fastest.row, a.pick.ours.row, a.pick.peer.row) == ("tunebench-lean", "tunebench-lean", "unsloth")
    assert a.pick.ratio == pytest.approx(1690 / 1300)
    assert answers[("sc", H200)].pick.fastest is None  # its rows need 15 and 20 GiB
    wide = {a.gpu: a for a in advice.sweep_answers(results, 40.0, gpus=["h100"])}
    assert list(wide) == [H100] and wide[H100].pick.fastest.row == "tunebench"
    assert wide[H100].pick.ratio == pytest.approx(2000 / 1300)


def test_a_frontier_answers_with_each_sides_longest_value_under_any_budget_within_the_asked_one(results):
    (a,) = advice.frontier_answers(results, 20.0)
    assert (a.scenario, a.gpu) == ("fr", H100)
    # the planned row's 4,096 under 12 GiB beats the long row's 3,072 under 16: both fit a 20 GiB card
    assert (a.ours.framework, a.ours.value, a.ours.budget_gib) == ("tunebench-planned", 4096, 12.0)
    assert (a.peer.framework, a.peer.value, a.peer.budget_gib) == ("hf", 1024, 16.0)
    assert a.ratio == pytest.approx(4.0) and not a.open_search
    assert a.unprobed is None  # every row has a cell under 16 GiB (the planned row's 4,096 under 12 carries up)
    assert advice.frontier_answers(results, 14.0)[0].unprobed == (12.0, 2)  # 12 GiB: the planned row's alone
    (low,) = advice.frontier_answers(results, 10.0)
    assert (low.ours.framework, low.ours.value) == ("tunebench-long", 1024)
    assert low.peer is None and low.probed == (True, True)  # hf ran out of memory at the grid's first value
    (grid,) = advice.frontier_answers(results, 30.0)  # hf's 24 GiB search stopped at 2,048 fitting, nothing above
    assert grid.peer.value == 2048 and grid.peer.state == "incomplete" and grid.open_search
    (none,) = advice.frontier_answers(results, 6.0)
    assert none.probed == (False, False) and none.ours is None


def test_the_command_prints_both_tables_and_says_what_it_could_not_answer(results, capsys):
    assert advise_cli.main(["--budget", "10", "--results", str(results)]) == 0
    md = capsys.readouterr().out
    assert (f"| sc | NVIDIA H100 80GB HBM3 | `{results}/sc-20260105-000000` | 4 of 4 | tunebench-lean | tunebench "
            "| 1,690") in md
    assert f"| sc | NVIDIA H200 | `{results}/sc-20260102-000000` | 2 of 2 | ⚠ none fits |" in md
    assert "| fr | NVIDIA H100 80GB HBM3 | `" in md
    assert ("fr-frontier-20260102-000000` | tunebench-long | tunebench | 1,024 | 8 | 2,024 | no peer row trains "
            "| — | — | — (1 row not probed under 8 GiB) |") in md
    assert "cpu_only" not in md
    assert advise_cli.main(["--budget", "10", "--results", str(results), "--gpu", "A100"]) == 1
    assert "matches" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["0", "-4", "nan", "24GB"])
def test_a_budget_that_is_not_a_positive_number_is_bad_input(results, budget, capsys):
    with pytest.raises(SystemExit) as e:
        advise_cli.main(["--budget", budget, "--results", str(results)])
    assert e.value.code == 2 and "--budget" in capsys.readouterr().err


def test_a_missing_results_folder_is_bad_input(tmp_path, capsys):
    assert advise_cli.main(["--budget", "24", "--results", str(tmp_path / "nowhere")]) == 2
    assert "no such results folder" in capsys.readouterr().err
