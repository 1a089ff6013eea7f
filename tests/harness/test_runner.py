"""The runner: isolated runs, failures as rows, append-only results, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.running.runner import classify_crash, find_resumable, run_sweep
from harness.spec.scenario import parse_scenario
from harness.storing import results

REPO = Path(__file__).resolve().parents[2]

BASE = """\
version: 1
name: {name}
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: lora, lora_r: 4}}
data: {{seq_len: 32}}
train: {{micro_batch: 2, steps: {steps}, warmup_steps: 1}}
hardware: {{device: {device}}}
measure: {{timeout_s: {timeout}, baseline: {baseline}}}
frameworks:
{frameworks}
"""


def _sc(tmp_path, frameworks: str, name="t", steps=3, device="cpu", baseline="d-ok", timeout=120):
    p = tmp_path / f"{name}.yaml"
    p.write_text(BASE.format(name=name, steps=steps, device=device, frameworks=frameworks, baseline=baseline,
                             timeout=timeout))
    return p, parse_scenario(p.read_text(), str(p))


def test_failures_become_rows_and_sweep_goes_on(env):
    _, sc = _sc(env, """\
  - {name: dummy, label: d-crash, overrides: {crash: true}}
  - {name: dummy, label: d-raise, overrides: {raise: "tool said no"}}
  - {name: dummy, label: d-oom, overrides: {oom: true}}
  - {name: dummy, label: d-slow, overrides: {sleep_s: 30}, timeout_s: 8}
  - {name: dummy, label: d-ok}
""")
    d = run_sweep(sc, env / "results", quiet=True)
    rows = {r["framework"]: r for r in results.load_runs(d)}
    assert rows["d-crash"]["status"] == "crashed" and "exited with code 3" in rows["d-crash"]["reason"]
    assert rows["d-raise"]["status"] == "error" and rows["d-raise"]["reason"] == "RuntimeError: tool said no"
    assert rows["d-oom"]["status"] == "oom" and "out of memory" in rows["d-oom"]["reason"]
    assert rows["d-slow"]["status"] == "timeout"
    assert rows["d-ok"]["status"] == "ok" and rows["d-ok"]["valid"], rows["d-ok"].get("invalid_reasons")
    assert rows["d-ok"]["metrics"]["tokens_per_s"] > 0
    assert (d / "logs" / "d-raise-r0.log").exists()
    df = pd.read_csv(d / "runs.csv")
    assert list(df.columns[: len(results.ROW_COLUMNS)]) == results.ROW_COLUMNS
    assert set(df["status"]) == {"crashed", "error", "oom", "timeout", "ok"}
    assert df.loc[df.framework == "d-ok", "peak_vram_nvml_gib"].isna().all()  # CPU: empty, not zero
    # every row carries its own settings hash (compare's per-framework comparability): differs between rows
    assert df.set_index("framework").settings_hash.to_dict() == {k: sc.settings_hash(k) for k in rows}
    assert df.settings_hash.nunique() == len(rows) and df.scenario_hash.nunique() == 1


def test_cuda_scenario_on_cpu_is_an_unavailable_row(env):
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None and _has_gpu():
        pytest.skip("this machine has a GPU")
    _, sc = _sc(env, "  - {name: dummy, label: d-ok}", device="cuda")
    d = run_sweep(sc, env / "results", quiet=True)
    (row,) = results.load_runs(d)
    assert row["status"] == "unavailable" and row["reason"].startswith("needs CUDA")


def _has_gpu() -> bool:
    from harness.running.envs import has_cuda

    return has_cuda()


def test_results_are_never_overwritten(tmp_path):
    p = tmp_path / "x.json"
    results.write_json_once(p, {"a": 1})
    with pytest.raises(FileExistsError):
        results.write_json_once(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}


def test_kill_9_mid_sweep_then_resume(env):
    path, sc = _sc(env, """\
  - {name: dummy, label: d-first}
  - {name: dummy, label: d-second, overrides: {sleep_s: 2}}
""", name="killme", steps=4, baseline="d-first")
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--results", str(env / "results"), "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    sweep = None
    while time.time() < deadline:
        found = list((env / "results").glob("killme-*/runs/d-first-r0.json"))
        if found:
            sweep = found[0].parent.parent
            # wait until the second run's worker is training, then kill the runner hard
            prog = list((env / "work").glob("killme-*/d-second-r0/progress.json"))
            if prog:
                break
        time.sleep(0.2)
    assert sweep is not None, proc.stdout.read().decode() if proc.poll() is not None else "sweep never started"
    worker_spec = next((env / "work").glob("killme-*/d-second-r0/spec.json"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sweep / "runs" / "d-first-r0.json"
    before = first.read_text(), first.stat().st_mtime_ns
    assert not (sweep / "runs" / "d-second-r0.json").exists()  # nothing half-written
    time.sleep(1.0)
    assert not _process_running(str(worker_spec)), "the worker must die with its runner"
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "1 of 2 runs to do" in r.stderr
    assert (first.read_text(), first.stat().st_mtime_ns) == before  # finished run untouched
    second = json.loads((sweep / "runs" / "d-second-r0.json").read_text())
    assert second["status"] == "ok"
    assert len(pd.read_csv(sweep / "runs.csv")) == 2
    # a complete sweep is not resumed: the next `run` starts a new one
    assert find_resumable(sc, env / "results") is None


def _process_running(needle: str) -> bool:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes().decode(errors="replace"):
                    return True
            except OSError:
                continue
    return False


def test_classify_crash():
    assert classify_crash(1, "...\ntorch.OutOfMemoryError: CUDA out of memory. Tried")[0] == "oom"
    assert classify_crash(-9, "")[0] == "crashed" and "SIGKILL" in classify_crash(-9, "")[1]
    assert "signal 11" in classify_crash(-11, "")[1]


def test_worker_does_not_inherit_the_triton_interpreter(monkeypatch):
    from harness.running import envs
    from harness.running.envs import worker_environment

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("TUNEBENCH_TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" not in worker_environment(envs.resolve("base"))
    monkeypatch.setenv("TUNEBENCH_TRITON_INTERPRET", "1")
    assert worker_environment(envs.resolve("base"))["TRITON_INTERPRET"] == "1"


def test_second_runner_is_refused_and_sigint_stops_cleanly(env):
    path, _ = _sc(env, """\
  - {name: dummy, label: d-first}
  - {name: dummy, label: d-second, overrides: {sleep_s: 30}}
""", name="twice", steps=4, baseline="d-first")
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--results", str(env / "results"), "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((env / "work").glob("twice-*/d-second-r0/progress.json")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 3, second.stderr
    assert "is held by process" in second.stderr and "Traceback" not in second.stderr
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: finished runs are stored" in err and "Traceback" not in err
    sweep = next((env / "results").glob("twice-*"))
    assert sorted(p.name for p in (sweep / "runs").glob("*.json")) == ["d-first-r0.json"]  # nothing half-written


def test_seed_per_repeat_moves_seeds_and_checkpoint_but_not_the_hash(env):
    p, sc = _sc(env, "  - {name: dummy, label: d-ok}\n", name="seeds")
    text = p.read_text().replace("measure: {", "measure: {seed_per_repeat: true, repeats: 2, ")
    seeded = parse_scenario(text, str(p))
    assert seeded.content_hash() != sc.content_hash()  # a different measurement: repeats are seeds now
    assert parse_scenario(p.read_text().replace("measure: {", "measure: {seed_per_repeat: false, "),
                          str(p)).content_hash() == sc.content_hash()  # the default hashes as if absent
    assert seeded.for_repeat(0) is seeded
    r1 = seeded.for_repeat(1)
    assert (r1.train.seed, r1.model.seed) == (seeded.train.seed + 1, seeded.model.seed + 1)
    assert r1.content_hash() == seeded.for_repeat(1).content_hash() and r1.source_path == seeded.source_path
    d = run_sweep(seeded, env / "results", quiet=True)
    rows = sorted(results.load_runs(d), key=lambda r: r["repeat"])
    assert [r["seeds"] for r in rows] == [{"train": 42, "model": 0}, {"train": 43, "model": 1}]
    assert rows[0]["checkpoint"] != rows[1]["checkpoint"]  # each repeat trained its own random init
    assert {r["scenario_hash"] for r in rows} == {seeded.content_hash()}


def test_a_model_family_the_tool_lacks_is_a_row_saying_so(env):
    p, _ = _sc(env, "  - tunebench\n  - {name: dummy, label: d-ok}\n", name="family")
    sc = parse_scenario(p.read_text().replace("preset: tiny-llama", "preset: tiny-falcon"), str(p))
    assert any("tunebench: model family 'falcon' not supported" in n for n in sc.notes)  # validate says so
    d = run_sweep(sc, env / "results", quiet=True)
    rows = {r["framework"]: r for r in results.load_runs(d)}
    assert rows["tunebench"]["status"] == "unavailable" and "model family 'falcon'" in rows["tunebench"]["reason"]
    assert rows["d-ok"]["status"] == "ok"  # the other rows of the scenario still run


def test_what_a_worker_leaves_running_is_ended_and_said(env):
    """The worker exits without the interpreter's teardown once its result is stored; a helper process its tool
    left behind is ended by the runner before the next run, and the run says so."""
    _, sc = _sc(env, """\
  - {name: dummy, label: d-leaves, overrides: {leave_child_s: 120}}
  - {name: dummy, label: d-ok}
""")
    d = run_sweep(sc, env / "results", quiet=True)
    rows = {r["framework"]: r for r in results.load_runs(d)}
    leaves, ok = rows["d-leaves"], rows["d-ok"]
    assert leaves["status"] == "ok" and ok["status"] == "ok"
    pid = leaves["extra"]["left_child_pid"]
    deadline = time.time() + 10
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:  # SIGKILLed: gone once its parent reaps it
        if "zombie" in Path(f"/proc/{pid}/status").read_text(errors="replace").lower():
            break
        time.sleep(0.1)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text(errors="replace").lower()
    assert any("left processes running" in w for w in leaves["warnings"])
    assert not any("left processes running" in w for w in ok["warnings"] or [])
    assert ok["launched_at"] <= ok["started_at"] <= ok["finished_at"] <= ok["launched_at"] + ok["wall_s"]


def test_a_prepare_step_stopped_by_sigint_is_an_interruption_not_a_failed_row(tmp_path, monkeypatch):
    """A deadline's SIGINT reaches the prepare subprocess of a probe run in a thread (which Python's handler does not
    interrupt): its death by SIGINT (by its exit code, or a traceback ending in KeyboardInterrupt) stops the run
    instead of storing it as an error row; so does the main thread's interruption (runner.STOP)."""
    from harness.running import runner

    sc = parse_scenario(Path("scenarios/tiny_cpu.yaml").read_text(), "scenarios/tiny_cpu.yaml")
    for rc, err in ((-signal.SIGINT, ""), (130, ""), (1, "Traceback ...\n  File ...\nKeyboardInterrupt\n")):
        done = subprocess.CompletedProcess([], rc, stdout="", stderr=err)
        monkeypatch.setattr(runner.subprocess, "run", lambda *a, _d=done, **k: _d)
        with pytest.raises(KeyboardInterrupt):
            runner._prepare(sc, tmp_path, 60)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ValueError: bad data\n")
    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(runner.PrepareFailed, match="bad data"):
        runner._prepare(sc, tmp_path, 60)
    monkeypatch.setattr(runner.STOP, "is_set", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        runner._prepare(sc, tmp_path, 60)


def test_a_file_smaller_than_the_steps_is_read_whole_again_with_no_short_step(env):
    """5 rows, 3 steps of 3 x 3: the HF Trainer would close a step at each epoch's end with the micro-batches it has
    (a run marked invalid: grad_accum ran with 2); the rows are read 6 times over, in order, and every step is full.
    """
    rows = [{"instruction": f"say {i}", "output": "ok " * (i + 1)} for i in range(5)]
    (env / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p, _ = _sc(env, "  - hf\n", name="small_file", baseline="hf")
    text = p.read_text().replace("data: {seq_len: 32}", "data: {source: jsonl, path: d.jsonl, seq_len: 96}")
    sc = parse_scenario(text.replace("micro_batch: 2,", "micro_batch: 3, grad_accum: 3,"), str(p))
    assert any("reads them 6 times over" in n for n in sc.notes)  # validate says so
    d = run_sweep(sc, env / "results", quiet=True)
    (row,) = results.load_runs(d)
    assert row["status"] == "ok" and row["valid"], row.get("invalid_reasons")
    meta = json.loads(next((env / "work").rglob("dataset.meta.json")).read_text())
    assert (meta["rows"], meta["passes"]) == (30, 6)
