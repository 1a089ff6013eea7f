"""Faults: stale and live locks, two sweeps at once, unwritable folders, data that cannot be prepared,
runs that did not train."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_runner import _sc  # the runner tests' scenario template

from harness.common.dicts import changes
from harness.measuring.trained import check_training
from harness.running.locks import Busy, hold, sweep_lock
from harness.running.runner import resume_changes, run_sweep
from harness.spec.scenario import parse_scenario
from harness.storing import results

REPO = Path(__file__).resolve().parents[2]

def _write(tmp_path: Path, name: str = "f", timeout: int = 120) -> Path:
    return _sc(tmp_path, "  - {name: dummy}", name=name, baseline="dummy", timeout=timeout)[0]


def _steps(losses, loss_tokens=10):
    return [{"step": i + 1, "loss": v, "loss_tokens": loss_tokens} for i, v in enumerate(losses)]


def test_nan_or_inf_loss_is_diverged():
    status, why = check_training(_steps([2.0, math.nan, math.nan]))
    assert status == "diverged" and "step 2" in why[0]
    status, _ = check_training(_steps([2.0, 1.9, math.inf]))
    assert status == "diverged"


def test_flat_loss_and_no_loss_tokens_are_invalid():
    assert check_training(_steps([0.0, 0.0, 0.0, 0.0])) == (None, [
        "loss never moved: 0 at every one of 4 recorded steps"])
    status, why = check_training(_steps([2.0, 1.5, 1.2], loss_tokens=0))
    assert status is None and why and "no loss-bearing tokens" in why[0]
    assert check_training(_steps([2.0, 1.5, 1.2])) == (None, [])
    # GRPO whose groups never scored apart: every advantage 0, so the loss is 0 throughout; the reason says why
    flat = [{"step": i, "reward": 0.0, "reward_std": 0.0} for i in (1, 2, 3, 4)]
    (why,) = check_training(_steps([0.0] * 4), flat)[1]
    assert why.startswith("loss never moved") and "rewards [0.0], so every advantage was 0" in why
    assert "GRPO" not in check_training(_steps([0.0] * 4), flat[:3] + [flat[3] | {"reward_std": 0.5}])[1][0]


def test_stale_lock_of_a_dead_process_never_blocks(tmp_path):
    lock = tmp_path / "sweep.lock"
    # a holder that dies with kill -9 while holding the lock; its PID may be reused, the lock is still free
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from harness.running.locks import hold; "
            "from pathlib import Path\nwith hold(Path(sys.argv[2]), 'test'):\n print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match="held by process"):
        with hold(lock, "second"):
            pass
    proc.kill()
    proc.wait()
    with sweep_lock(tmp_path):  # taken over at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_second_sweep_on_the_machine_is_refused_or_marked(env, monkeypatch):
    from harness.running import runner

    p = _write(env)
    sc = parse_scenario(p.read_text(), str(p))
    monkeypatch.setenv("TUNEBENCH_LOCK_DIR", str(env / "locks"))
    with hold(env / "locks" / "machine.lock", "another sweep"):
        with pytest.raises(Busy, match="another sweep is running on this machine"):
            run_sweep(sc, env / "results", quiet=True)
        monkeypatch.setattr(runner, "execute_run", lambda sc, d, root, prep, fw, r, disp: runner.run_header(
            sc, d, prep, fw, r) | {"status": "ok", "valid": True, "invalid_reasons": []})
        d = run_sweep(sc, env / "results", quiet=True, new=True, allow_contention=True)
    row = results.load_runs(d)[0]
    assert row["valid"] is False and "measured under contention" in row["invalid_reasons"][0]


def test_prepare_failure_becomes_rows_and_a_table(env):
    (env / "cache").write_text("not a directory")  # the checkpoint cache cannot be created
    p = _write(env)
    sc = parse_scenario(p.read_text(), str(p))
    d = run_sweep(sc, env / "results", quiet=True)
    rows = results.load_runs(d)
    assert [r["status"] for r in rows] == ["error"]
    assert "preparing the checkpoint and data failed" in rows[0]["reason"]
    assert (d / "runs.csv").exists()


def test_changed_scenario_file_is_reported_before_resuming(env):
    p = _write(env, timeout=120)
    sc = parse_scenario(p.read_text(), str(p))
    d = env / "results" / "f-x"
    d.mkdir(parents=True)
    (d / "scenario.yaml").write_text(yaml.safe_dump(sc.to_dict()))
    (d / "sweep.json").write_text(json.dumps({"scenario_source": str(p)}))
    assert resume_changes(sc, d) == []
    sc2 = parse_scenario(_write(env, timeout=7).read_text(), str(p))
    assert resume_changes(sc2, d) == ["measure.timeout_s: 120.0 -> 7.0"]


def test_changes_lists_every_differing_key():
    assert changes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 2, "c": [1]}, "d": 0}) == [
        "a.b: 1 -> 2", "a.c.1: 2 -> <unset>", "d: <unset> -> 0"]


@pytest.mark.parametrize("kind", ["read-only", "not a folder"])
def test_unwritable_results_folder_is_a_clear_error(env, kind):
    p = _write(env)
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target = env / "results"
        target.mkdir()
        target.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:  # works for root too: a results root below a plain file
        (env / "file").write_text("")
        target = env / "file" / "results"
    try:
        out = subprocess.run([sys.executable, "-m", "harness", "run", str(p), "--results", str(target), "--quiet"],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=os.environ | {"TUNEBENCH_CACHE": str(env / "cache"), "TUNEBENCH_WORK": str(env / "w")})
    finally:
        if kind == "read-only":
            target.chmod(stat.S_IRWXU)
    assert out.returncode == 2, out.stderr
    assert "cannot write" in out.stderr and "Traceback" not in out.stderr


def test_a_sweep_measured_on_another_gpu_is_never_filled_in_here(env, monkeypatch, capsys):
    """Rows of two kinds of GPU in one sweep would be compared as if measured side by side: --resume and
    --retry-failed refuse it (exit 2, both machines named), and a plain run starts a new sweep instead."""
    from harness.cli.run import main
    from harness.measuring import environment
    from harness.running.runner import OtherMachine, create_sweep

    p = _write(env)
    sc = parse_scenario(p.read_text(), str(p))
    stale = create_sweep(sc, env / "results")  # nothing run yet: resumable
    stored = json.loads((stale / "environment.json").read_text())
    results.atomic_write_text(stale / "environment.json",
                              json.dumps(stored | {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}))
    assert environment.machine_kind(stored) is None  # this CPU machine: no GPU, so nothing to compare yet
    real = environment.capture
    monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": "NVIDIA H200", "gpu_count": 1})
    why = "its runs were measured on NVIDIA H100 80GB HBM3 x1, this machine is NVIDIA H200 x1"
    for flag in ("resume_only", "retry_failed"):
        with pytest.raises(OtherMachine, match=why):
            run_sweep(sc, env / "results", quiet=True, **{flag: True})
    assert main([str(p), "--resume", "--results", str(env / "results"), "--no-report", "--quiet"]) == 2
    assert why in capsys.readouterr().err
    assert not any((stale / "runs").iterdir())
    fresh = run_sweep(sc, env / "results", quiet=True)
    assert fresh != stale and f"not resuming {stale}: {why}" in capsys.readouterr().err
    assert [r.name for r in (fresh / "runs").iterdir()] == ["dummy-r0.json"] and not any((stale / "runs").iterdir())
