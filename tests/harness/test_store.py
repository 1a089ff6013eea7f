"""The results store: the typed result (schema 2), the v1 migration on every committed result, writing, loading."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import make_run, make_sweep  # noqa: E402

from harness.analysis import runs_table  # noqa: E402
from harness.measuring.telemetry import throttle_flags
from harness.storing import results  # noqa: E402
from harness.storing.migrate import ResultSchemaError, migrate  # noqa: E402
from harness.storing.schema import RESULT_SCHEMA_VERSION, STATUSES, RunResult  # noqa: E402
from harness.storing.sweep import NotAResultsDir, load_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMITTED = sorted(REPO.glob("results/*/runs/*.json")) + sorted(REPO.glob("results/*/runs/attempts/*.json"))
COMMITTED_SWEEPS = sorted({p.parents[1] if p.parent.name == "runs" else p.parents[2] for p in COMMITTED})


def test_there_are_committed_results_to_check():
    assert COMMITTED and COMMITTED_SWEEPS


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_every_committed_result_loads_as_version_2(path):
    raw = json.loads(path.read_text())
    run = results.read_result(path)
    assert run.schema_version == RESULT_SCHEMA_VERSION and raw.get("schema_version", 1) <= RESULT_SCHEMA_VERSION
    # the schema names every key the committed results hold: nothing lands in the open sections' extras
    assert not run.model_extra and not run.metrics.model_extra, (run.model_extra, run.metrics.model_extra)
    assert run.environment is None or not run.environment.model_extra
    assert run.eval is None or not run.eval.model_extra
    assert all(not s.model_extra for s in run.steps)
    assert run.status in STATUSES and run.adapter
    # nothing measured is lost or changed on the way
    derived = throttle_flags(run.metrics.throttle_reasons_seen or [])  # judged from the recorded reasons
    for k, v in (raw.get("metrics") or {}).items():
        if k in derived and run.metrics.throttle_reasons_seen is not None:
            assert getattr(run.metrics, k) == derived[k], k
            continue
        assert getattr(run.metrics, k) == v or (isinstance(v, float) and math.isnan(v)), k
    assert [s.model_dump(exclude_unset=True) for s in run.steps] == raw.get("steps", [])
    assert (run.eval.model_dump(exclude_unset=True) if run.eval else None) == raw.get("eval")
    assert run.effective == raw["effective"] and run.expected == raw["expected"]
    # and the stored form of the migrated result reads back as the same result
    assert RunResult.model_validate(json.loads(json.dumps(run.to_dict(), default=str))) == run


@pytest.mark.parametrize("sweep_dir", COMMITTED_SWEEPS, ids=lambda p: p.name)
def test_committed_runs_csv_rows_are_reproduced(sweep_dir):
    """The table rebuilt from the migrated results holds the committed runs.csv's values, column for column."""
    csv = sweep_dir / "runs.csv"
    if not csv.exists():
        pytest.skip("no runs.csv committed")
    old = pd.read_csv(csv).set_index(["framework", "repeat"])
    new = runs_table.runs_frame(load_sweep(sweep_dir))
    new = pd.read_csv(pd.io.common.StringIO(new.to_csv(index=False))).set_index(["framework", "repeat"])
    assert set(old.index) == set(new.index)
    cols = [c for c in old.columns if c in new.columns]
    # a column the committed table lacks is one these runs did not record (GPU telemetry, energy): empty here
    absent = set(results.ROW_COLUMNS) - {"framework", "repeat", "settings_hash"} - set(cols)
    assert absent <= set(results.ROW_COLUMNS[results.ROW_COLUMNS.index("energy_j"):]), absent
    assert new[sorted(absent)].isna().all().all(), new[sorted(absent)].dropna(how="all", axis=1)
    pd.testing.assert_frame_equal(old.loc[new.index, cols], new[cols], check_dtype=False)


def test_version_1_is_migrated():
    v1 = {"schema_version": 1, "scenario": "s", "framework": "hf", "repeat": 0, "status": "timeout",
          "reason": "no result within 60 s (killed)", "valid": False, "invalid_reasons": [], "metrics": None}
    run = results.parse_result(v1)
    assert run.adapter == "hf"  # before framework labels, the framework was the adapter's name
    assert run.metrics.tokens_per_s is None and run.steps == [] and run.eval is None and run.settings_hash is None
    assert migrate(v1)["schema_version"] == 2 and v1["schema_version"] == 1  # the input is left alone
    assert results.parse_result({k: v for k, v in v1.items() if k != "schema_version"}).adapter == "hf"


def test_bad_results_are_refused_with_the_key():
    good = make_run("hf", 0)
    with pytest.raises(ResultSchemaError, match="newer than this harness"):
        results.parse_result(good | {"schema_version": RESULT_SCHEMA_VERSION + 1})
    with pytest.raises(ResultSchemaError, match=r"x\.json: not a run result: repeat"):
        results.parse_result(good | {"repeat": "first"}, "x.json")
    with pytest.raises(ResultSchemaError, match="metrics.tokens_per_s"):
        results.parse_result(good | {"metrics": good["metrics"] | {"tokens_per_s": "fast"}})


def test_write_result_stores_every_key_once(tmp_path):
    p = tmp_path / "runs" / "hf-r0.json"
    raw = make_run("hf", 0) | {"new_field_from_a_writer": 1}
    run = results.write_result(p, raw)
    stored = json.loads(p.read_text())
    assert stored["schema_version"] == RESULT_SCHEMA_VERSION
    assert set(RunResult.model_fields) <= set(stored)  # every key present, null where it does not apply
    assert stored["new_field_from_a_writer"] == 1  # a field the schema does not name yet is kept, not dropped
    assert stored["metrics"]["tokens_per_s"] == raw["metrics"]["tokens_per_s"]
    assert results.read_result(p) == run
    with pytest.raises(FileExistsError):
        results.write_result(p, raw)


def test_load_results_in_plan_order_without_attempts(tmp_path):
    runs = [make_run(fw, r) for r in range(2) for fw in ("hf", "tunebench")]
    d = make_sweep(tmp_path / "sw", runs)
    (d / "runs" / "attempts").mkdir()
    (d / "runs" / "attempts" / "hf-r0.1.json").write_text(json.dumps(make_run("hf", 0, status="error")))
    assert [r.key for r in results.load_results(d)] == ["hf-r0", "tunebench-r0", "hf-r1", "tunebench-r1"]
    assert [r["framework"] for r in results.load_runs(d)] == ["hf", "tunebench", "hf", "tunebench"]


def test_load_sweep_rejects_what_is_not_a_sweep(tmp_path):
    with pytest.raises(NotAResultsDir, match="not a results directory"):
        load_sweep(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotAResultsDir, match="not a results directory"):
        load_sweep(tmp_path / "plain")


BAD_RUN_FILES = {
    "trl-r0.json": (b'{"scenario": "synthetic-tiny", "framework": "trl", "rep', "not valid JSON (truncated?)"),
    "big-r0.json": (b'{"repeat": ' + b"9" * 5000 + b"}", "not a readable JSON value: Exceeds the limit"),
    "version-r0.json": (b'{"schema_version": [2]}', "version-r0.json: not a run result: schema_version [2]"),
    "unsloth-r0.json": (b"[1, 2, 3]", "not a run result: a JSON list, not an object"),
    "axolotl-r0.json": (bytes(range(128, 256)) * 4, "not a text file"),
    "litgpt-r0.json": (b"", "empty"),
    "other-r0.json": (b'{"framework": "other"}', "not a run result: scenario"),
    "deep-r0.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


def test_unreadable_run_files_are_skipped_and_named(tmp_path):
    """One bad file never hides the rest of the sweep: it is left out with its path and why."""
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0), make_run("tunebench", 0)])
    for name, (data, _) in BAD_RUN_FILES.items():
        (d / "runs" / name).write_bytes(data)
    sweep = load_sweep(d)
    assert [r.key for r in sweep.runs] == ["hf-r0", "tunebench-r0"]
    why = {u.path.name: u.why for u in sweep.unreadable}
    assert set(why) == set(BAD_RUN_FILES)
    for name, (_, expected) in BAD_RUN_FILES.items():
        assert str(d / "runs" / name) in why[name] and expected in why[name], why[name]
    assert [u.path.name for u in sweep.unreadable_runs("trl")] == ["trl-r0.json"]
    with pytest.raises(ResultSchemaError, match="axolotl-r0.json: not a text file"):  # the strict loader refuses
        results.load_results(d)
    # runs.csv is rebuilt from the readable runs
    assert list(pd.read_csv(results.write_table(d)).framework) == ["hf", "tunebench"]


def test_unusable_sweep_files_are_named_not_fatal(tmp_path):
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0)])
    (d / "scenario.yaml").write_text(": : not yaml [")
    (d / "environment.json").write_text('{"gpu_count": "many"}')
    (d / "sweep.json").write_text('{"planned": 5}')
    sweep = load_sweep(d)
    assert [r.key for r in sweep.runs] == ["hf-r0"] and sweep.scenario == {} and sweep.planned == []
    why = {u.path.name: u.why for u in sweep.unreadable}
    assert "cannot be read as a scenario" in why["scenario.yaml"]
    assert "not an environment record: gpu_count" in why["environment.json"]
    assert "'planned' is not a list" in why["sweep.json"]
    (d / "sweep.json").write_text("[]")
    assert "not a sweep plan (a list, not a mapping)" in str(load_sweep(d).unreadable[-1])
    (d / "sweep.json").unlink()  # a sweep without its plan still loads, without a word
    assert not [u for u in load_sweep(d).unreadable if u.path.name == "sweep.json"]


def test_stored_files_are_world_readable(tmp_path):
    """Results and reports are read by others (a web server publishing reports): 0644 under umask 022, not 0600."""
    old = os.umask(0o022)
    try:
        d = make_sweep(tmp_path / "sw", [make_run("hf", 0)])
        for f in [d / "runs" / "hf-r0.json", d / "runs.csv"]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o077)  # a stricter umask is respected
        results.atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_runs_csv_has_the_telemetry_columns(tmp_path):
    run = make_run("hf", 0)
    reading = {"sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "power_w": 512.5, "power_limit_w": 700.0,
               "temperature_c": 61, "throttle_reasons": ["sw_power_cap"]}
    run["metrics"] |= {"energy_j": 1234.5, "joules_per_token": 0.0123, "avg_power_w": 498.0, "throttled": True,
                       "throttle_reasons_seen": ["gpu_idle", "sw_power_cap"],
                       "telemetry": {"start": reading, "peak_power": reading | {"power_w": 690.0}, "end": None}}
    d = make_sweep(tmp_path / "sw", [run, make_run("tunebench", 0, device="cpu")])
    df = pd.read_csv(d / "runs.csv").set_index("framework")
    hf = df.loc["hf"]
    assert (hf.energy_j, hf.joules_per_token, hf.avg_power_w) == (1234.5, 0.0123, 498.0)
    assert hf.throttle_reasons_seen == "gpu_idle; sw_power_cap"
    assert not hf.throttled and hf.power_capped  # the power cap alone: recorded, not throttling
    assert hf.telemetry_start_sm_clock_mhz == 1980 and hf.telemetry_peak_power_power_w == 690.0
    assert math.isnan(hf.telemetry_end_power_w)
    assert df.loc["tunebench", ["energy_j", "throttled", "telemetry_start_power_w"]].isna().all()


def test_runs_table_adds_parity_after_the_stored_columns(tmp_path):
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0), make_run("tunebench", 0, loss0=3.0)])
    plain = pd.read_csv(results.write_table(d))
    assert list(plain.columns) == results.ROW_COLUMNS
    full = pd.read_csv(runs_table.write_table(d))
    assert list(full.columns) == results.ROW_COLUMNS + runs_table.PARITY_COLUMNS
    assert dict(zip(full.framework, full.parity_status, strict=True)) == {"hf": "ok", "tunebench": "departs"}


def test_a_fifo_or_device_in_place_of_a_stored_file_is_named_not_read(tmp_path):
    """A FIFO would block a reader forever (a device never end): only regular files are read back."""
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0), make_run("tunebench", 0)])
    for name in ("runs/tunebench-r0.json", "scenario.yaml", "environment.json"):
        (d / name).unlink()
        os.mkfifo(d / name)
    done: list = []
    reader = threading.Thread(target=lambda: done.append(load_sweep(d)), daemon=True)
    reader.start()
    reader.join(30)
    assert done, "load_sweep blocked on a FIFO"
    why = {u.path.name: u.why for u in done[0].unreadable}
    assert [r.key for r in done[0].runs] == ["hf-r0"]
    assert "not a regular file" in why["tunebench-r0.json"] and "not a regular file" in why["scenario.yaml"]
    assert results.read_json(d / "environment.json") is None
    with pytest.raises(OSError, match="not a regular file"):
        results.read_stored_bytes(Path("/dev/zero"))


@pytest.mark.parametrize(("scenario", "plan", "expected"), [
    # an alias bomb: 9^9 strings for whatever walks it (hashing, the settings diff of a resumed sweep)
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join(
        [f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)), None, "scenario.yaml: cannot be read as a scenario: "
                                                                   "line 1: anchors and aliases"),
    ("name: [1]\nmeasure: {baseline: {a: 1}}\n", None, "scenario.yaml: 'name' is not text: ignored"),
    ("name: t\nmeasure: {baseline: [hf]}\n", None, "scenario.yaml: 'measure.baseline' is not text: ignored"),
    ("name: t\nframeworks: [{name: [hf]}, {label: {a: 1}}]\n", None, "'frameworks' is not a list of rows"),
    (None, {"planned": ["hf-r0"], "scenario_source": [1], "created": 5}, "sweep.json: scenario_source, created not "
                                                                        "text: ignored"),
])
def test_stored_files_of_the_wrong_shape_are_named_and_left_out(tmp_path, scenario, plan, expected):
    """What a report or compare reads as a name must be text; a stored YAML is read as boundedly as a scenario."""
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0)])
    if scenario is not None:
        (d / "scenario.yaml").write_text(scenario)
    if plan is not None:
        (d / "sweep.json").write_text(json.dumps(plan))
    sweep = load_sweep(d)
    assert any(expected in u.why for u in sweep.unreadable), [u.why for u in sweep.unreadable]
    assert isinstance(sweep.name, str) and isinstance(sweep.baseline, str)
    assert all(isinstance(f, str) for f in sweep.framework_order()) and isinstance(sweep.source or "", str)


def test_runs_that_is_no_folder_is_named(tmp_path):
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0)])
    for p in (d / "runs").iterdir():
        p.unlink()
    (d / "runs").rmdir()
    (d / "runs").write_text("x")
    sweep = load_sweep(d)  # still a sweep: its plan is there
    assert sweep.runs == [] and "runs: not a folder" in str(sweep.unreadable[0])
