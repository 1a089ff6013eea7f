"""The nightly gate, the history database and the trend report, on synthetic stored sweeps (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import duckdb
import pytest

from harness.cli import history as history_cli
from harness.cli import nightly
from harness.spec.suite import SuiteError, load_suite
from harness.storing import history
from tests.harness.fixtures_results import make_night

SUITE = """\
version: 1
name: synthetic
scenarios: [scenario.yaml]
reference_nights: 7
min_nights: 3
noise_k: 3.0
gate:
  tokens_per_s: 0.05
  peak_vram_nvml_gib: 0.05
"""




@pytest.fixture
def setup(tmp_path: Path):
    results = tmp_path / "results"
    nights = [make_night(results, day, tps) for day, tps in ((1, 1000.0), (2, 1010.0), (3, 990.0))]
    (tmp_path / "scenario.yaml").write_text("name: unused\n")  # --tonight judges stored sweeps: never opened
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    db = tmp_path / "h.duckdb"
    for d in nights:
        history.append(db, d)
    return tmp_path, results, suite, db


def _nightly(tmp: Path, results: Path, suite: Path, db: Path, tonight: Path) -> int:
    return nightly.main([str(suite), "--results", str(results), "--reports", str(tmp / "reports"), "--db", str(db),
                         "--tonight", str(tonight), "--quiet"])


def test_planted_drop_exits_1_naming_scenario_framework_metric(setup, capsys):
    tmp, results, suite, db = setup
    fourth = make_night(results, 4, 700.0, git_sha="b" * 40, transformers="5.18.0")  # a planted 30 % drop
    assert _nightly(tmp, results, suite, db, fourth) == 1
    md = (tmp / "reports" / "nightly-synthetic" / "verdict.md").read_text()
    assert "REGRESSION" in md
    assert re.search(r"synthetic-tiny / hf / tokens_per_s: REGRESSED: 70\d.* of 3 nights \(worse by \+30\.0%", md)
    assert "tunebench / tokens_per_s: REGRESSED" not in md  # its figure held
    page = (tmp / "reports" / "nightly-synthetic" / "trend.html").read_text()
    assert "transformers 5.17.0 -&gt; 5.18.0" in page and "git aaaaaaaa -&gt; bbbbbbbb" in page
    assert 'class="bad"' in page and "<svg" in page
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"<script|<link|src=|https?://", page)


def test_steady_fourth_night_exits_0(setup, capsys):
    tmp, results, suite, db = setup
    assert _nightly(tmp, results, suite, db, make_night(results, 4, 1005.0)) == 0
    assert "no regression" in capsys.readouterr().out


def test_too_few_nights_is_inconclusive(tmp_path: Path):
    results = tmp_path / "results"
    first, second = make_night(results, 1, 1000.0), make_night(results, 2, 600.0)
    (tmp_path / "scenario.yaml").write_text("name: unused\n")
    (tmp_path / "suite.yaml").write_text(SUITE)
    db = tmp_path / "h.duckdb"
    history.append(db, first)
    assert _nightly(tmp_path, results, tmp_path / "suite.yaml", db, second) == 3
    md = (tmp_path / "reports" / "nightly-synthetic" / "verdict.md").read_text()
    assert "1 comparable night(s)" in md and "3 needed" in md


def test_nights_on_another_dataset_file_are_left_out_of_the_reference(tmp_path: Path):
    """Three nights on one JSONL, then the file is edited: tonight's figure is not judged against nights that trained
    on other rows (inconclusive, saying why); nights that recorded no digest cannot disagree."""
    results = tmp_path / "results"
    nights = [make_night(results, day, 1000.0, dataset="d0d0d0d0d0d0d0d0") for day in (1, 2, 3)]
    (tmp_path / "scenario.yaml").write_text("name: unused\n")
    (tmp_path / "suite.yaml").write_text(SUITE)
    db = tmp_path / "h.duckdb"
    for d in nights:
        history.append(db, d)
    edited = make_night(results, 4, 600.0, dataset="e1e1e1e1e1e1e1e1")
    assert _nightly(tmp_path, results, tmp_path / "suite.yaml", db, edited) == 3
    md = (tmp_path / "reports" / "nightly-synthetic" / "verdict.md").read_text()
    assert "0 comparable night(s)" in md and "(3 earlier night(s) trained on other rows: another dataset file or " \
        "loss rule)" in md
    assert _nightly(tmp_path, results, tmp_path / "suite.yaml", db, make_night(results, 5, 600.0)) == 1


def test_nights_under_another_loss_rule_are_left_out_of_the_reference(tmp_path: Path):
    """Conversation rows from one unchanged file: nights stored before the loss rule was recorded (they may have
    trained other tokens) are not tonight's reference; nights under the same rule are."""
    results = tmp_path / "results"
    (tmp_path / "scenario.yaml").write_text("name: unused\n")
    (tmp_path / "suite.yaml").write_text(SUITE)
    db = tmp_path / "h.duckdb"
    for day in (1, 2, 3):
        history.append(db, make_night(results, day, 1000.0, dataset="d0d0d0d0d0d0d0d0"))
    assert {r["loss_rule"] for r in history.query(db)} == {None}
    ruled = make_night(results, 4, 600.0, dataset="d0d0d0d0d0d0d0d0", loss_rule=2)
    assert _nightly(tmp_path, results, tmp_path / "suite.yaml", db, ruled) == 3
    assert "(3 earlier night(s) trained on other rows" in (tmp_path / "reports" / "nightly-synthetic" /
                                                           "verdict.md").read_text()
    assert {r["loss_rule"] for r in history.query(db)} == {None, "2"}
    for day in (5, 6):
        history.append(db, make_night(results, day, 1000.0, dataset="d0d0d0d0d0d0d0d0", loss_rule=2))
    slower = make_night(results, 7, 600.0, dataset="d0d0d0d0d0d0d0d0", loss_rule=2)
    assert _nightly(tmp_path, results, tmp_path / "suite.yaml", db, slower) == 1  # judged against days 4-6: slower


def test_a_database_of_an_older_harness_gains_the_new_columns(tmp_path: Path):
    db = tmp_path / "old.duckdb"
    old = {c: t for c, t in history.COLUMNS.items() if c != "dataset_sha256_16"}
    with duckdb.connect(str(db)) as con:
        con.execute(f"CREATE TABLE runs ({', '.join(f'{c} {t}' for c, t in old.items())}, "
                    f"PRIMARY KEY ({', '.join(history.KEY)}))")
    history.append(db, make_night(tmp_path / "results", 1, 1000.0, dataset="d0d0d0d0d0d0d0d0"))
    assert {r["dataset_sha256_16"] for r in history.query(db)} == {"d0d0d0d0d0d0d0d0"}


def test_rebuild_reproduces_the_rows_and_exports(setup):
    tmp, results, suite, db = setup
    before = history.query(db)
    assert len(before) == 6 and {r["framework"] for r in before} == {"hf", "tunebench"}
    assert before[0]["git_sha"] == "a" * 40 and json.loads(before[0]["libraries"])["transformers"] == "5.17.0"
    rebuilt = tmp / "rebuilt.duckdb"
    assert history_cli.main(["rebuild", "--results", str(results), "--db", str(rebuilt)]) == 0
    assert history.query(rebuilt) == before
    out_csv, out_pq = tmp / "x.csv", tmp / "x.parquet"
    assert history_cli.main(["--db", str(rebuilt), "--framework", "hf", "--since", "2026-12-02",
                             "--csv", str(out_csv), "--parquet", str(out_pq)]) == 0
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["tokens_per_s"]) for r in rows] == pytest.approx([1010.0, 990.0], rel=0.02)
    assert list(rows[0]) == list(history.COLUMNS)
    with duckdb.connect() as con:
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [str(out_pq)]).fetchall() == [(2,)]


def test_bad_since_exits_2(setup, capsys):
    _, _, _, db = setup
    assert history_cli.main(["--db", str(db), "--since", "not-a-date"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("text, line, key", [
    (SUITE.replace("min_nights: 3", "min_nigths: 3"), 5, "min_nigths: unknown key; did you mean 'min_nights'"),
    (SUITE.replace("peak_vram_nvml_gib: 0.05", "peak_vram: 0.05"), 9,
     "gate.peak_vram: unknown metric; did you mean 'peak_vram_nvml_gib'"),
    (SUITE.replace("noise_k: 3.0", "noise_k: -1"), 6, "noise_k: Input should be greater than 0"),
    (SUITE.replace("scenarios: [scenario.yaml]", "scenarios: [missing.yaml]"), 3, "scenarios[0]: no such scenario"),
    # a scenario twice would run twice a night; an empty frameworks list would silently mean all of them
    (SUITE.replace("[scenario.yaml]", "[scenario.yaml, ./scenario.yaml]"), 3, "scenarios[1]: "),
    (SUITE + "frameworks: []\n", 10, "frameworks: List should have at least 1 item"),
    (SUITE + "frameworks: [hf, hf]\n", 10, "frameworks: 'hf' listed twice"),
    # a value of another type than the key takes: '3' in quotes is text; NaN is no number of nights
    (SUITE.replace("min_nights: 3", "min_nights: '3'"), 5, "min_nights: Input should be a valid integer, got the text"),
    (SUITE.replace("noise_k: 3.0", "noise_k: .nan"), 6, "noise_k: Input should be a finite number"),
    (SUITE + "source_path: /etc\n", 10, "source_path: unknown key"),
    (SUITE + "cluster: {executor: local, mem_gib: .inf}\n", 10, "cluster.mem_gib: Input should be a finite number"),
])
def test_bad_suite_exits_2_with_file_line_and_key(tmp_path: Path, capsys, text: str, line: int, key: str):
    (tmp_path / "scenario.yaml").write_text("name: unused\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(SuiteError):
        load_suite(suite)
    assert nightly.main([str(suite), "--results", str(tmp_path / "r"), "--tonight", str(tmp_path)]) == 2
    assert f"{suite}:{line}: {key}" in capsys.readouterr().err


def test_shipped_suite_is_valid():
    suite = load_suite(Path(__file__).resolve().parents[2] / "scenarios" / "suites" / "nightly_cpu.yaml")
    assert suite.name == "nightly_cpu" and all(p.is_file() for p in suite.scenario_paths())


def test_a_scenario_whose_evaluator_is_missing_stops_the_night_before_any_run(tmp_path: Path, monkeypatch, capsys):
    from test_runner import _sc

    from harness.running import evaluator

    first, _ = _sc(tmp_path, "  - {name: dummy}", name="first", baseline="dummy")
    second, _ = _sc(tmp_path, "  - {name: dummy}", name="second", baseline="dummy")
    second.write_text(second.read_text() + "eval: {tasks: [tb_add_gen]}\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace("scenarios: [scenario.yaml]", "scenarios: [first.yaml, second.yaml]"))
    monkeypatch.setitem(evaluator.MODULES, "eval", ("tunebench_no_such_module",))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    assert nightly.main([str(suite), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"),
                         "--db", str(tmp_path / "h.duckdb"), "--quiet"]) == 2
    assert "needs tunebench_no_such_module" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "h.duckdb").exists()  # the first did not run


def test_a_suite_framework_that_no_scenario_has_is_named_with_its_line(tmp_path: Path, capsys):
    from test_scenario import GOOD

    from harness.cli import validate

    (tmp_path / "scenario.yaml").write_text(GOOD.replace("frameworks: [hf]", "frameworks: [dummy, hf]"))
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE + "frameworks: [dummy, dumy]\n")  # a typo would silently leave that row out
    assert validate.main([str(suite)]) == 2
    assert f"{suite}:10: frameworks[1]: unknown framework row 'dumy'; did you mean 'dummy'?" in capsys.readouterr().err
    assert nightly.main([str(suite), "--results", str(tmp_path / "r"), "--reports", str(tmp_path / "rep"),
                         "--db", str(tmp_path / "h.duckdb")]) == 2
    assert "frameworks[1]: unknown framework row 'dumy'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize("kind", ["directory", "not duckdb", "below a file"])
def test_a_history_database_that_cannot_be_one_exits_2_before_anything(tmp_path: Path, capsys, kind: str):
    db = {"directory": tmp_path / "db", "not duckdb": tmp_path / "notes.txt",
          "below a file": tmp_path / "notes.txt" / "h.duckdb"}[kind]
    (tmp_path / "db").mkdir()
    (tmp_path / "notes.txt").write_text("someone's notes")
    (tmp_path / "scenario.yaml").write_text("name: unused\n")
    (tmp_path / "suite.yaml").write_text(SUITE)
    assert nightly.main([str(tmp_path / "suite.yaml"), "--results", str(tmp_path / "results"),
                         "--db", str(db), "--quiet"]) == 2
    assert f"--db {db}: " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    for args in (["--db", str(db)], ["rebuild", "--results", str(tmp_path), "--db", str(db)]):
        assert history_cli.main(args) == 2
        assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "someone's notes"  # rebuild deletes only a database of its own
