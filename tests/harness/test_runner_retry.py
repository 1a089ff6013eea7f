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
    moved = runner.set_aside_failed(tmp_path, ["hf-r0", "hf-r1", "tb-r0", "tb-r1", "missing-r0"])
    assert moved == ["tb-r0", "tb-r1"]  # an OOM is the framework's result: kept where it is
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
