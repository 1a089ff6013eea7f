"""Runs set aside for a retry (``run --retry-failed``, failed evaluations included), the evaluator looked up before a
sweep starts, and the pruning of large outputs after a run."""

from __future__ import annotations

import json

import pytest

from harness.running import runner


def _row(d, key, status):  # noqa: ANN001
    (d / "runs").mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    (d / "runs" / f"{key}.json").write_text(json.dumps({"status": status, "reason": f"{key} {status}"}))
    (d / "logs" / f"{key}.log").write_text(f"log of {key}")


def test_failed_rows_are_set_aside_and_listed(tmp_path):  # noqa: ANN001
    _row(tmp_path, "hf-r0", "ok")
    _row(tmp_path, "hf-r1", "oom")
    _row(tmp_path, "tb-r0", "error")
    _row(tmp_path, "tb-r1", "timeout")
    _row(tmp_path, "ax-r0", "unavailable")  # its environment was missing then
    moved = runner.set_aside_failed(tmp_path, ["hf-r0", "hf-r1", "tb-r0", "tb-r1", "ax-r0", "missing-r0"])
    assert moved == ["tb-r0", "tb-r1", "ax-r0"]  # an OOM is the framework's result: kept where it is
    assert (tmp_path / "runs" / "hf-r1.json").exists() and (tmp_path / "runs" / "hf-r0.json").exists()
    assert not (tmp_path / "runs" / "tb-r0.json").exists()
    assert (tmp_path / "logs" / "attempts" / "tb-r0.1.log").read_text() == "log of tb-r0"
    # a second failure of the same run is a second attempt, never written over the first
    _row(tmp_path, "tb-r0", "crashed")
    runner.set_aside_failed(tmp_path, ["tb-r0"])
    assert runner.previous_attempts(tmp_path, "tb-r0") == [
        {"file": "runs/attempts/tb-r0.1.json", "status": "error", "reason": "tb-r0 error"},
        {"file": "runs/attempts/tb-r0.2.json", "status": "crashed", "reason": "tb-r0 crashed"},
    ]
    assert runner.previous_attempts(tmp_path, "hf-r0") == []


def test_prune_outputs_keeps_small_files(tmp_path, monkeypatch):  # noqa: ANN001
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "lit_model.pth").write_bytes(b"x" * 2048)
    (tmp_path / "final" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    monkeypatch.setenv("TUNEBENCH_KEEP_OUTPUTS", "1")
    assert runner.prune_outputs(tmp_path, limit_bytes=1024) == []
    monkeypatch.delenv("TUNEBENCH_KEEP_OUTPUTS")
    assert runner.prune_outputs(tmp_path, limit_bytes=1024) == ["final/lit_model.pth"]
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_rows_whose_evaluation_failed_are_set_aside(tmp_path):  # noqa: ANN001
    _row(tmp_path, "hf-r0", "ok")
    _row(tmp_path, "tb-r0", "ok")
    _row(tmp_path, "tb-r1", "ok")
    for key, name in (("tb-r0", "eval"), ("tb-r1", "reward_eval")):
        p = tmp_path / "runs" / f"{key}.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | {name: {"status": "error", "error": "no lm_eval"}}))
    p = tmp_path / "runs" / "hf-r0.json"  # an evaluation that ran is the run's result, kept
    p.write_text(json.dumps(json.loads(p.read_text()) | {"eval": {"status": "ok", "metrics": {"t/acc": 0.5}}}))
    assert runner.set_aside_failed(tmp_path, ["hf-r0", "tb-r0", "tb-r1"]) == ["tb-r0", "tb-r1"]
    assert (tmp_path / "runs" / "attempts" / "tb-r1.1.json").exists()
    assert (tmp_path / "runs" / "hf-r0.json").exists()


def test_a_missing_evaluator_stops_the_sweep_before_anything_runs(env, monkeypatch, capsys):  # noqa: ANN001
    from test_runner import _sc

    from harness.cli.guard import EXIT_BAD_INPUT, guarded
    from harness.running import evaluator

    _, sc = _sc(env, "  - {name: dummy, label: d-ok}")
    evaluator.check(sc)  # no evaluation asked for: nothing to look up
    sc.eval.tasks = ["tb_add_gen"]
    evaluator.check(sc)  # lm-eval is installed with the package
    monkeypatch.setitem(evaluator.MODULES, "eval", ("lm_eval", "tunebench_no_such_module"))
    with pytest.raises(evaluator.EvaluatorMissing, match="needs tunebench_no_such_module, not found in the "):
        runner.run_sweep(sc, env / "results", quiet=True)
    assert not (env / "results").exists() and not (env / "work").exists()  # no sweep folder, no work area
    assert guarded("s.yaml", "runs", lambda: runner.run_sweep(sc, env / "results", quiet=True)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("s.yaml: the scenario's evaluation needs") and "env create lmeval" in err


@pytest.mark.parametrize("schema", ["EvalResult", "RewardEval"])
def test_an_evaluator_that_raises_writes_a_record_of_the_schemas_own_keys(tmp_path, schema):  # noqa: ANN001
    from harness.analysis.entry import spec_main
    from harness.storing import schema as schemas

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"work_dir": str(tmp_path)}))

    def evaluate(_spec: dict) -> dict:
        raise ModuleNotFoundError("No module named 'lm_eval'")

    assert spec_main([str(spec)], "m", "result.json", evaluate) == 1
    rec = getattr(schemas, schema).model_validate_json((tmp_path / "result.json").read_text())
    assert rec.status == "error" and "lm_eval" in rec.error and "ModuleNotFoundError" in rec.traceback
    assert not rec.model_extra  # every key it writes is one the stored result names


def test_an_evaluation_environment_that_does_not_start_is_missing_too(env, monkeypatch):  # noqa: ANN001
    from test_runner import _sc

    from harness.running import envs, evaluator

    _, sc = _sc(env, "  - {name: dummy, label: d-ok}")
    sc.eval.tasks = ["tb_add_gen"]
    monkeypatch.setattr(evaluator, "environment", lambda: envs.EnvSpec(name="lmeval", python=str(env / "no-python")))
    with pytest.raises(evaluator.EvaluatorMissing, match="needs lm_eval, not found in the 'lmeval' environment"):
        evaluator.check(sc)


# --- resuming a sweep whose stored files were damaged: the runner's own reads never stop it --------------------------


def _stored_sweep(tmp_path):  # noqa: ANN001, ANN202
    from test_runner import _sc

    _, sc = _sc(tmp_path, "  - {name: dummy, label: d-ok}")
    d = runner.create_sweep(sc, tmp_path / "results")
    return sc, d


@pytest.mark.parametrize("plan", [{"planned": "d-ok-r0"}, {}, {"planned": [1, "d-ok-r0"]}])
def test_a_damaged_plan_is_extended_not_a_crash(tmp_path, plan):  # noqa: ANN001
    sc, d = _stored_sweep(tmp_path)
    meta = json.loads((d / "sweep.json").read_text())
    (d / "sweep.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "planned"} | plan))
    runner._extend_plan(d, ["d-ok-r0", "d-ok-r1"])
    assert json.loads((d / "sweep.json").read_text())["planned"] == ["d-ok-r0", "d-ok-r1"]


def test_newest_sweep_among_plans_with_odd_creation_stamps(tmp_path):  # noqa: ANN001
    sc, d = _stored_sweep(tmp_path)
    other = d.with_name(d.name + "-x")
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps(json.loads((d / "sweep.json").read_text()) | {"created": 5}))
    assert runner.newest_sweep(sc, tmp_path / "results") in (d, other)


@pytest.mark.parametrize(("stored", "said"), [
    (b"- 1\n- 2\n", "is not a scenario"),
    (b"\xff\xfe\x00 not text", "cannot be read (line 1: not UTF-8"),
    (b"name: t\nmeasure: fast\n", "is not a scenario"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [" % (98 + i, 98 + i) + b", ".join([b"*%c" % (97 + i)] * 9) + b"]\n" for i in range(8)),
     "anchors and aliases"),
])
def test_resume_reads_a_damaged_stored_scenario_as_a_change_not_a_crash(tmp_path, stored, said):  # noqa: ANN001
    sc, d = _stored_sweep(tmp_path)
    (d / "scenario.yaml").write_bytes(stored)
    (changed,) = runner.resume_changes(sc, d)
    assert said in changed


def test_a_stored_evaluation_of_another_shape_is_no_failure(tmp_path):  # noqa: ANN001
    _row(tmp_path, "hf-r0", "ok")
    p = tmp_path / "runs" / "hf-r0.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | {"eval": "x", "reward_eval": [1]}))
    assert runner.set_aside_failed(tmp_path, ["hf-r0"]) == []


def test_a_lock_file_replaced_by_a_link_is_refused_not_followed(tmp_path):  # noqa: ANN001
    from harness.running.locks import sweep_lock

    target = tmp_path / "precious.txt"
    target.write_text("not the runner's")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.lock").symlink_to(target)
    with pytest.raises(OSError), sweep_lock(tmp_path / "sweep"):
        pass
    assert target.read_text() == "not the runner's"


def test_a_sweep_folder_with_a_file_for_runs_stops_before_a_run(env):  # noqa: ANN001
    sc, d = _stored_sweep(env)
    (d / "runs").rmdir()
    (d / "runs").write_text("x")
    with pytest.raises(FileExistsError):
        runner.run_sweep(sc, env / "results", quiet=True)
    assert not (runner.work_root() / d.name / "d-ok-r0").exists()  # no worker started
