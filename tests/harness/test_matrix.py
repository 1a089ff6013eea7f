"""The support matrix: its plan (what runs, what is unsupported and why), cell outcomes, resume, the report."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from adapters_for_tools import registry
from harness.analysis import matrix as analysis
from harness.cli import matrix as cli
from harness.inputs import models
from harness.running import envs
from harness.running import matrix as planning
from harness.spec.scenario import load_scenario
from harness.storing.schema import RunResult, Step


def _cell(plan: planning.MatrixPlan, model: str, method: str, framework: str) -> planning.PlannedCell:
    return next(c for c in plan.cells if (c.model, c.method, c.framework) == (model, method, framework))


def test_plan_says_why_a_framework_cannot_run_a_cell():
    plan = planning.plan_matrix(["llama", "falcon"], ["hf", "tunebench", "unsloth"], ["lora", "qlora", "full"], "cpu")
    assert plan.models == ["tiny-llama", "tiny-llama2", "tiny-falcon"]
    assert len(plan.cells) == 3 * 3 * 3
    # the trainer's declared families
    assert "model family 'falcon' not supported" in _cell(plan, "tiny-falcon", "lora", "tunebench").unsupported
    assert _cell(plan, "tiny-llama", "lora", "tunebench").unsupported is None
    # a CUDA-only tool on a CPU
    assert "device 'cpu' not supported" in _cell(plan, "tiny-llama", "full", "unsloth").unsupported
    # validation refuses QLoRA on a CPU for everyone: no scenario at all
    for fw in ("hf", "tunebench"):
        assert "qlora needs bitsandbytes" in _cell(plan, "tiny-llama", "qlora", fw).unsupported
    assert "matrix.tiny-llama.qlora" not in plan.scenarios
    sc = plan.scenarios["matrix.tiny-falcon.lora"]
    assert sc["frameworks"] == ["hf"] and sc["measure"]["baseline"] == "hf"
    assert _cell(plan, "tiny-falcon", "lora", "hf").scenario == "matrix.tiny-falcon.lora"


def test_every_cell_scenario_of_the_gpu_matrix_validates():
    plan = planning.plan_matrix(None, planning.default_frameworks(), list(planning.METHODS), "cuda")
    assert "dummy" not in plan.frameworks
    assert len(plan.scenarios) == len(models.tiny_presets()) * len(planning.METHODS)
    for c in plan.cells:  # hf, TRL, Unsloth, Axolotl and LLaMA-Factory declare every family
        if c.framework in ("hf", "trl", "unsloth", "axolotl", "llamafactory"):
            assert c.unsupported is None, c
        elif c.unsupported is None:
            assert c.family in registry.info(c.framework).families
    families = {c.family for c in plan.cells}
    assert families == set(models.FAMILIES) and len(families) >= 9


def test_unknown_names_are_refused():
    assert [p.name for p in planning.select_models(["falcon"])] == ["tiny-falcon"]
    with pytest.raises(planning.MatrixError, match="did you mean 'falcon'"):
        planning.select_models(["falcn"])
    with pytest.raises(planning.MatrixError, match="did you mean 'trl'"):
        planning.check_choices(["trll"], ["lora"])
    with pytest.raises(planning.MatrixError, match="did you mean 'lora'"):
        planning.check_choices(["hf"], ["loraa"])


def test_cli_refuses_bad_input(capsys):
    assert cli.main(["--families", "nope", "--device", "cpu"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert cli.main(["--report-from", "/nonexistent/folder"]) == 2


@pytest.mark.parametrize(("option", "said"), [
    (["--time-limit-s", "nan"], "--time-limit-s nan: a number of seconds > 0"),
    (["--time-limit-s", "-5"], "--time-limit-s -5.0: a number of seconds > 0"),
    (["--jobs", "1000000000"], "--jobs 1000000000: between 1 and 256"),
    (["--results", "/dev/null/x"], "--results /dev/null/x: cannot write there: /dev/null is not a directory"),
])
def test_cli_refuses_bad_options_before_any_cell(tmp_path, capsys, option, said):
    args = ["--device", "cpu", "--frameworks", "dummy", "--families", "llama", "--methods", "lora",
            "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), "--quiet"]
    assert cli.main(args + option) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("change", "said"), [
    ({"cells": [1, 2]}, "cells[0], cells[1]"),
    ({"cells": [{"model": 5, "family": [], "method": "lora", "framework": "hf", "scenario": 1}]}, "cells[0]"),
    ({"models": "tiny-falcon"}, "models"),
    ({"device": None}, "device"),
])
def test_report_from_a_damaged_plan_exits_2_naming_it(tmp_path, capsys, change, said):
    plan = planning.plan_matrix(["falcon"], ["hf"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, tmp_path / "results")
    meta = json.loads((folder / planning.PLAN_FILE).read_text())
    (folder / planning.PLAN_FILE).write_text(json.dumps(meta | change))
    assert cli.main(["--report-from", str(folder), "--reports", str(tmp_path / "reports")]) == 2
    assert f"{folder / planning.PLAN_FILE}: not a support matrix plan ({said}:" in capsys.readouterr().err
    assert planning.find_matrix(plan, tmp_path / "results") is None  # never filled in: a new folder starts
    (folder / planning.NOT_RUN_FILE).write_text('{"matrix.tiny-falcon.lora": "not a mapping", "x": {"hf": 5}}')
    assert planning.read_not_run(folder) == {"x": {}}


def test_loss_falling_compares_halves():
    assert analysis.loss_falling([5.8, 5.9, 5.7, 5.6, 5.5, 5.6]) is True
    assert analysis.loss_falling([5.0, 5.1, 5.2, 5.3]) is False
    assert analysis.loss_falling([5.0, 4.0, 3.0]) is None  # too few steps to say


def _run(status: str = "ok", valid: bool = True, losses: tuple[float, ...] = (5.8, 5.7, 5.6, 5.5), **kw) -> RunResult:
    return RunResult(scenario="s", framework="hf", repeat=0, status=status, valid=valid, framework_version="1.0",
                     steps=[Step(step=i + 1, loss=v) for i, v in enumerate(losses)], **kw)


@pytest.mark.parametrize(("run", "outcome", "detail"), [
    (_run(), "ok", None),
    (_run(valid=False, invalid_reasons=["lora_r: ran with 4, scenario says 8"]), "invalid", "lora_r: ran with 4"),
    (_run(losses=(5.0, 5.1, 5.2, 5.3)), "loss not falling", "loss 5 -> 5.3"),
    (_run(status="error", reason="ValueError: Target modules {'q_proj'} not found"), "error", "Target modules"),
    (_run(status="oom", reason="CUDA out of memory"), "oom", "out of memory"),
    (None, "not run", "environment 'unsloth' not created"),
])
def test_cell_outcomes(run, outcome, detail):
    planned = {"model": "tiny-phi3", "family": "phi3", "method": "lora", "framework": "hf", "scenario": "s"}
    cell = analysis.cell_of(planned, run, "s-1/runs/hf-r0.json" if run else None,
                            "unavailable: environment 'unsloth' not created")
    assert cell.outcome == outcome
    assert (cell.detail is None) if detail is None else (detail in cell.detail)
    if run is not None:
        assert (cell.loss_first, cell.loss_last) == (run.steps[0].loss, run.steps[-1].loss)
        assert cell.framework_version == "1.0"


def test_unsupported_cell_keeps_its_reason():
    planned = {"model": "tiny-falcon", "family": "falcon", "method": "full", "framework": "tunebench",
               "scenario": None, "unsupported": "model family 'falcon' not supported (supports [...])"}
    cell = analysis.cell_of(planned, None, None, None)
    assert (cell.outcome, cell.detail) == ("unsupported", planned["unsupported"])


def test_report_from_stored_runs_alone(tmp_path):
    """The report reads the folder only: a stored run, a cell that did not run (and why), an unsupported method."""
    plan = planning.plan_matrix(["falcon"], ["hf", "trl"], ["lora", "qlora"], "cpu")
    folder = planning.open_matrix(plan, tmp_path / "results")
    assert planning.open_matrix(plan, tmp_path / "results") == folder  # the same plan: the same folder
    run = _run().model_copy(update={"scenario": "matrix.tiny-falcon.lora", "framework_version": "5.17.0"})
    runs = folder / "matrix.tiny-falcon.lora-20260101-000000" / "runs"
    runs.mkdir(parents=True)
    (runs / "hf-r0.json").write_text(json.dumps(run.to_dict(), default=str))
    (folder / planning.NOT_RUN_FILE).write_text(json.dumps(
        {"matrix.tiny-falcon.lora": {"trl": "unavailable: environment 'trl' not created"}}))
    md_path = cli_report(folder, tmp_path / "reports")
    md = md_path.read_text()
    assert "| Falcon | tiny-falcon | ok; loss 5.80→5.50 (falling) | not run: unavailable: environment 'trl'" in md
    assert "Every cell unsupported: method.kind: qlora needs bitsandbytes 4-bit kernels on a GPU" in md
    assert "| hf | 1 | 1 |" in md  # summary: one ok, one unsupported
    assert (md_path.parent / "report.html").exists()


def test_each_cell_is_compared_with_the_baselines_loss_curve(tmp_path):
    """Every framework's cell beside the baseline's (the plan's first framework) on the same model and method: its
    largest per-step loss difference, and whether the curve stays within the parity tolerance; the summary counts
    the cells that do."""
    plan = planning.plan_matrix(["falcon"], ["hf", "trl", "dummy"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, tmp_path / "results")
    runs = folder / "matrix.tiny-falcon.lora-20260101-000000" / "runs"
    runs.mkdir(parents=True)
    for fw, losses in (("hf", (5.8, 5.7, 5.6, 5.5)), ("trl", (5.8, 5.7, 5.6, 5.502)), ("dummy", (5.8, 5.7, 5.0, 4.5))):
        run = _run(losses=losses).model_copy(update={"scenario": "matrix.tiny-falcon.lora", "framework": fw})
        (runs / f"{fw}-r0.json").write_text(json.dumps(run.to_dict(), default=str))
    by = {c.framework: c for c in analysis.read_matrix(folder)[1]}
    assert (by["hf"].parity, by["hf"].parity_max_abs_diff) == ("ok", 0.0)
    assert by["trl"].parity_ok and by["trl"].parity_max_abs_diff == pytest.approx(0.002)
    assert by["dummy"].parity == "departs" and by["dummy"].parity_ok is False
    md = cli_report(folder, tmp_path / "reports").read_text()
    assert "| hf | 1 | — |" in md and "| trl | 1 | 1 |" in md and "| dummy | 1 | 0 |" in md
    assert "ok; loss 5.80→5.50 (falling); vs hf: max \\|Δloss\\| 0.002 |" in md
    assert "vs hf: departs, max \\|Δloss\\| 1 |" in md
    assert "| ok; loss 5.80→5.50 (falling) |" in md  # the baseline's own cell: no comparison with itself


def test_a_matrix_fills_one_framework_at_a_time(env):
    plan = planning.plan_matrix(["falcon"], ["hf", "dummy"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, env / "results")
    assert planning.run_matrix(folder, quiet=True, time_limit_s=0) == 0  # out of time before the first scenario
    assert planning.run_matrix(folder, quiet=True, only=["dummy"]) == 1
    _, cells = analysis.read_matrix(folder)
    assert {c.framework: c.outcome for c in cells} == {"hf": "not run", "dummy": "ok"}
    assert planning.run_matrix(folder, quiet=True, only=["dummy"]) == 0  # stored: not again


def test_a_matrix_of_another_gpu_is_not_filled_in_here(env, monkeypatch, capsys):
    """A matrix folder whose rows ran on another kind of GPU is refused as a whole, before any cell runs (exit 2 from
    the command, both machines named): a cell of this machine would otherwise join a table of that one."""
    from harness.measuring import environment
    from harness.running import runner

    plan = planning.plan_matrix(["falcon"], ["dummy"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, env / "results")
    sweep = folder / "matrix.tiny-falcon.lora-20260101-000000"
    sweep.mkdir()
    (sweep / "environment.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}))
    real = environment.capture
    monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": "NVIDIA H200", "gpu_count": 1})
    why = "its runs were measured on NVIDIA H100 80GB HBM3 x1, this machine is NVIDIA H200 x1"
    with pytest.raises(runner.OtherMachine, match=why):
        planning.run_matrix(folder, quiet=True)
    args = ["--device", "cpu", "--families", "falcon", "--frameworks", "dummy", "--methods", "lora",
            "--results", str(env / "results"), "--reports", str(env / "reports"), "--quiet"]
    assert cli.main(args) == 2 and why in capsys.readouterr().err
    assert not (sweep / "runs").exists() and not (folder / "matrix.csv").exists()


def test_rows_at_once_share_the_machine_and_say_so(env):
    """``jobs=2``: two rows train at the same time; their runs say they shared the machine (timings not comparable),
    which the matrix's outcome does not count against the tool, and the report says it."""
    plan = planning.plan_matrix(["falcon", "gpt_neox"], ["dummy"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, env / "results")
    assert planning.run_matrix(folder, quiet=True, jobs=2) == 2
    _, cells = analysis.read_matrix(folder)
    assert [c.outcome for c in cells] == ["ok", "ok"] and all(c.shared_machine for c in cells)
    runs = [RunResult.model_validate_json((folder / c.run).read_text()) for c in cells]
    assert all(not r.valid and r.invalid_reasons[0].startswith("measured under contention") for r in runs)
    assert max(r.started_at for r in runs) < min(r.finished_at for r in runs)  # the two rows overlapped
    md = cli_report(folder, env / "reports").read_text()
    assert "2 of the runs shared the machine with other rows of the matrix (`--jobs`)" in md
    assert cli.main(["--jobs", "0", "--device", "cpu"]) == 2


def test_invalid_cells_are_redone_on_request_and_the_attempt_kept(env):
    """``retry_invalid``: a cell stored as invalid for what it trained (a check since fixed) runs again, its
    attempt under runs/attempts/; cells invalid only for sharing the machine are support the matrix has, not redone."""
    plan = planning.plan_matrix(["falcon", "gpt_neox"], ["dummy"], ["lora"], "cpu")
    folder = planning.open_matrix(plan, env / "results")
    assert planning.run_matrix(folder, quiet=True, jobs=2) == 2
    assert planning.run_matrix(folder, quiet=True, retry_invalid=True) == 0  # contention alone: valid support
    _, cells = analysis.read_matrix(folder)
    path = folder / cells[0].run
    row = json.loads(path.read_text())
    row["invalid_reasons"].append("not honoured: switch x: asked for 1, the live run has 0")
    path.write_text(json.dumps(row))
    assert [c.outcome for c in analysis.read_matrix(folder)[1]] == ["invalid", "ok"]
    assert planning.run_matrix(folder, quiet=True) == 0  # stored: not redone unless asked
    assert planning.run_matrix(folder, quiet=True, retry_invalid=True) == 1
    assert [c.outcome for c in analysis.read_matrix(folder)[1]] == ["ok", "ok"]
    redone = json.loads(path.read_text())
    assert redone["previous_attempts"] == [{"file": "runs/attempts/dummy-r0.1.json", "status": "ok",
                                            "reason": None}]
    assert json.loads((path.parent / "attempts" / "dummy-r0.1.json").read_text()) == row


def cli_report(folder, reports):  # noqa: ANN001, ANN201
    assert cli.main(["--report-from", str(folder), "--reports", str(reports)]) == 0
    return reports / folder.name / "report.md"


@pytest.mark.slow
def test_cpu_matrix_runs_resumes_and_reports(env, capsys):
    """Qwen2 and Phi-3 (fused projections) through hf, TRL (where its environment exists) and tunebench, LoRA /
    QLoRA / full, on the CPU."""
    results, reports = env / "results", env / "reports"
    args = ["--device", "cpu", "--families", "qwen2,phi3", "--frameworks", "hf,trl,tunebench",
            "--methods", "lora,qlora,full", "--results", str(results), "--reports", str(reports), "--quiet"]
    trl_missing = envs.unavailable(registry.info("trl"), "cpu")
    assert cli.main(args) == 0
    folders = list(results.glob("support-matrix-cpu-*"))
    assert len(folders) == 1
    folder = folders[0]
    _, cells = analysis.read_matrix(folder)
    by = {(c.model, c.method, c.framework): c for c in cells}
    for model in ("tiny-qwen2", "tiny-phi3"):
        for method in ("lora", "full"):
            for fw in ("hf", "trl"):
                c = by[(model, method, fw)]
                if fw == "trl" and trl_missing:
                    assert c.outcome == "not run" and "not created" in c.detail
                    continue
                assert c.outcome == "ok", c
                assert c.loss_falling and c.loss_last < c.loss_first
                assert c.framework_version
            assert by[(model, "qlora", "hf")].outcome == "unsupported"
    assert by[("tiny-qwen2", "lora", "tunebench")].outcome == "ok"
    assert by[("tiny-phi3", "full", "tunebench")].outcome == "ok"
    # every cell that ran is an ordinary stored run, its scenario rerunnable from the folder
    sc = load_scenario(folder / "scenarios" / "matrix.tiny-phi3.lora.yaml")
    assert sc.method.resolved_targets() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    stored = json.loads((folder / by[("tiny-phi3", "lora", "hf")].run).read_text())
    assert stored["effective"]["target_modules"] == sorted(sc.method.resolved_targets()) and stored["valid"]
    rows = list(csv.DictReader((folder / "matrix.csv").open()))
    assert len(rows) == len(cells) == 2 * 3 * 3
    md = (reports / folder.name / "report.md").read_text()
    assert "# Support matrix: cpu" in md
    assert "unsupported: method.kind: qlora needs bitsandbytes 4-bit kernels on a GPU" in md
    assert "loss 5." in md and "(falling)" in md and "## Measured on" in md and "5.17.0" in md  # transformers
    assert (reports / folder.name / "report.html").read_text().startswith("<!DOCTYPE html>")
    # the same command again: the same folder, nothing runs
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "(0 runs now)" in capsys.readouterr().out
    assert list(results.glob("support-matrix-cpu-*")) == [folder]
    # the report again from the stored runs alone: the same text
    (reports / folder.name / "report.md").unlink()
    assert cli.main(["--report-from", str(folder), "--reports", str(reports)]) == 0
    assert (reports / folder.name / "report.md").read_text() == md
    # a cell rerun from other code: the report names each commit with its number of cells
    env_of = stored["environment"]
    code = env_of["git_sha"][:7] + ("+dirty" if env_of["git_dirty"] else "")
    assert analysis.versions(folder, cells)["hf"]["code"] == code
    path = folder / by[("tiny-phi3", "lora", "hf")].run
    results_json = json.loads(path.read_text())
    results_json["environment"] |= {"git_sha": "0123456789abcdef", "git_dirty": False}
    path.write_text(json.dumps(results_json))
    assert analysis.versions(folder, cells)["hf"]["code"] == f"{code} (3) / 0123456 (1)"  # lora, full x 2 models


@pytest.mark.slow
def test_cpu_matrix_of_every_family(env):
    """Every family's tiny models through hf and TRL (where its environment exists) with LoRA, on the CPU: the
    family-specific part (what all-linear adapts, read back from the live model) for every tool that runs there."""
    results = env / "results"
    args = ["--device", "cpu", "--frameworks", "hf,trl", "--methods", "lora", "--results", str(results),
            "--reports", str(env / "reports"), "--quiet"]
    assert cli.main(args) == 0
    (folder,) = results.glob("support-matrix-cpu-*")
    _, cells = analysis.read_matrix(folder)
    assert {c.family for c in cells} == set(models.FAMILIES)
    trl_missing = envs.unavailable(registry.info("trl"), "cpu")
    bad = [(c.model, c.method, c.framework, c.outcome, c.detail) for c in cells
           if c.outcome != "ok" and not (c.framework == "trl" and trl_missing)]
    assert not bad
    scenario = yaml.safe_load((folder / "scenarios" / "matrix.tiny-gemma2.lora.yaml").read_text())
    assert scenario["data"]["seq_len"] > models.get_preset("tiny-gemma2").config["sliding_window"]
