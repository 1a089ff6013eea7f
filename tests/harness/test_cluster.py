"""The cluster path: a suite's runs as submitit jobs (local executor here, Slurm's submission script checked)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from harness.cli import cluster_options, nightly
from harness.cli import run as run_cli
from harness.running import cluster
from harness.spec.cluster import ClusterSettings
from harness.spec.suite import SuiteError, load_suite
from harness.storing import history, results

SCENARIO = """\
version: 1
name: clu
model: {preset: tiny-llama, dtype: float32}
method: {kind: lora, lora_r: 4}
data: {seq_len: 32}
train: {micro_batch: 2, steps: 4, warmup_steps: 1}
hardware: {device: cpu}
measure: {timeout_s: 120, baseline: d-ok}
frameworks:
  - {name: dummy, label: d-ok}
  - {name: dummy, label: d-slow, overrides: {sleep_s: 1}}
"""

SUITE = """\
version: 1
name: clusuite
scenarios: [clu.yaml]
min_nights: 1
reference_nights: 3
gate: {tokens_per_s: 0.5}
cluster:
  executor: local
  max_parallel: 2
  gpus_per_job: 0
"""


def _kill_job_of(work: Path, key: str, done: dict) -> None:
    """Once ``key``'s worker trains, SIGKILL the job process that started it (its worker dies with it): a node
    lost, a job killed by the scheduler."""
    deadline = time.time() + 120
    while time.time() < deadline and "pid" not in done:
        if list(work.glob(f"*/{key}/progress.json")):
            for proc in Path("/proc").iterdir():
                try:
                    cmd = (proc / "cmdline").read_bytes()
                    if b"harness.running.worker" in cmd and f"{key}/spec.json".encode() in cmd:
                        ppid = int(next(ln.split()[1] for ln in (proc / "status").read_text().splitlines()
                                        if ln.startswith("PPid:")))
                        os.kill(ppid, signal.SIGKILL)
                        done["pid"] = ppid
                        return
                except (OSError, ValueError, StopIteration):
                    continue
        time.sleep(0.1)


@pytest.mark.slow  # two sweeps through submitit: five jobs, three workers importing torch
def test_suite_through_local_executor_then_retry_the_killed_job(env):
    (env / "clu.yaml").write_text(SCENARIO)
    (env / "suite.yaml").write_text(SUITE)
    res_root, reports, db = env / "results", env / "reports", env / "h.duckdb"
    killed: dict = {}
    killer = threading.Thread(target=_kill_job_of, args=(env / "work", "d-slow-r0", killed), daemon=True)
    killer.start()
    code = nightly.main([str(env / "suite.yaml"), "--results", str(res_root), "--reports", str(reports),
                         "--db", str(db), "--quiet"])
    killer.join(timeout=5)
    assert code == 3  # the first night: no history to judge against
    assert "pid" in killed, "the d-slow job was never seen training"
    (sweep,) = res_root.glob("clu-*")
    ok, dead = (results.read_json(sweep / "runs" / f"{k}.json") for k in ("d-ok-r0", "d-slow-r0"))
    assert ok["status"] == "ok" and ok["valid"] and ok["cluster_job"]["job_id"]
    assert dead["status"] == "crashed" and dead["reason"].startswith("cluster job ") and "killed" in dead["reason"]
    assert (sweep / "logs" / "d-slow-r0.log").exists() and (sweep / "runs.csv").exists()
    assert (reports / sweep.name / "report.md").exists()
    assert (reports / "nightly-clusuite" / "verdict.md").exists()
    assert {(r["framework"], r["status"]) for r in history.query(db)} == {("d-ok", "ok"), ("d-slow", "crashed")}
    # the same sweep again, the killed run only: it runs again, the dead job's row kept as an earlier attempt
    before = (sweep / "runs" / "d-ok-r0.json").stat().st_mtime_ns
    assert run_cli.main([str(env / "clu.yaml"), "--results", str(res_root), "--no-report", "--quiet",
                         "--retry-failed", "--cluster", "local", "--gpus-per-job", "0"]) == 0
    again = results.read_json(sweep / "runs" / "d-slow-r0.json")
    assert again["status"] == "ok" and again["previous_attempts"][0]["status"] == "crashed"
    assert (sweep / "runs" / "d-ok-r0.json").stat().st_mtime_ns == before  # stored runs are never redone
    jobs = json.loads((env / "work" / sweep.name / "jobs.json").read_text())
    assert set(jobs) == {"prepare", "d-ok-r0", "d-slow-r0"} and jobs["d-slow-r0"] == again["cluster_job"]["job_id"]
    history.append(db, sweep)
    assert {(r["framework"], r["status"]) for r in history.query(db)} == {("d-ok", "ok"), ("d-slow", "ok")}


def test_a_job_of_an_earlier_runner_is_waited_for_not_submitted_again(tmp_path):
    settings = ClusterSettings(executor="local", gpus_per_job=0)
    job = cluster.make_executor(settings, tmp_path, time_limit_min=2).submit(time.sleep, 60)
    deadline = time.time() + 30
    while not cluster._pid_alive(int(job.job_id)) and time.time() < deadline:
        time.sleep(0.1)  # the controller process has started (exec'd)
    launcher = cluster.ClusterLauncher(settings)
    adopted = launcher._adopt(tmp_path, job.job_id)  # what a new runner finds in jobs.json
    assert adopted is not None and not adopted.done()
    adopted.cancel()  # Ctrl-C of the new runner: the adopted job goes too
    deadline = time.time() + 20
    while not adopted.done() and time.time() < deadline:
        time.sleep(0.2)
    assert adopted.done() and launcher._adopt(tmp_path, job.job_id) is None


def test_slurm_submission_carries_the_settings(tmp_path, monkeypatch):
    """Slurm's own commands faked on PATH: the sbatch script submitit writes for our settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = nightly.build_parser().parse_args(["s.yaml", "--cluster", "slurm", "--partition", "gpu",
                                              "--time-limit-min", "70", "--mem-gib", "1.5",
                                              "--slurm-param", "account=ml-bench", "--slurm-param", "requeue"])
    base = ClusterSettings(executor="local", cpus_per_job=16, setup=["module load cuda/12.4"])
    launcher = cluster_options.launcher_from(args, base)
    assert launcher is not None and not launcher.measures_here  # slurm jobs run elsewhere: no machine lock
    ex = cluster.make_executor(launcher.settings, tmp_path / "jobs", launcher.settings.job_time_limit_min(600))
    job = ex.submit(time.sleep, 0)
    assert job.job_id == "4242"
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=70", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --exclusive", "#SBATCH --account=ml-bench",
                 "#SBATCH --requeue", "#SBATCH --mem=1536M", "module load cuda/12.4", "export PYTHONPATH="):
        assert line in script, (line, script)


def _args(*argv: str) -> argparse.Namespace:
    return run_cli.build_parser().parse_args(["x.yaml", *argv])


def test_cluster_options_merge_and_refuse():
    assert cluster_options.launcher_from(_args()) is None
    got = cluster_options.launcher_from(_args("--cluster", "local"))
    assert got.measures_here and got.settings.parallel() == 1  # local jobs share this machine: one at a time
    base = ClusterSettings(executor="local", max_parallel=3)
    assert cluster_options.launcher_from(_args("--no-cluster"), base) is None
    assert cluster_options.launcher_from(_args("--gpus-per-job", "2"), base).settings.gpus_per_job == 2
    assert base.job_time_limit_min(600) == 20 and ClusterSettings(executor="local", time_limit_min=5) \
        .job_time_limit_min(600) == 5
    with pytest.raises(cluster_options.ClusterOptionsError, match="--partition: needs --cluster"):
        cluster_options.launcher_from(_args("--partition", "gpu"))
    with pytest.raises(cluster_options.ClusterOptionsError, match="--gpus-per-job / cluster.gpus_per_job"):
        cluster_options.launcher_from(_args("--cluster", "local", "--gpus-per-job", "-1"))
    with pytest.raises(cluster_options.ClusterOptionsError, match="set it as cluster.partition"):
        cluster_options.launcher_from(_args("--cluster", "local", "--slurm-param", "partition=x"))


def test_run_with_a_bad_cluster_option_exits_2(tmp_path, capsys):
    (tmp_path / "clu.yaml").write_text(SCENARIO)
    assert run_cli.main([str(tmp_path / "clu.yaml"), "--results", str(tmp_path / "r"), "--time-limit-min", "5"]) == 2
    assert "--time-limit-min: needs --cluster" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything ran


@pytest.mark.parametrize("section, line, message", [
    ("cluster:\n  executor: lsf\n", 8, "cluster.executor: Input should be 'local' or 'slurm'"),
    ("cluster:\n  executor: slurm\n  partiton: gpu\n", 9, "cluster.partiton: unknown key; did you mean 'partition'?"),
    ("cluster:\n  executor: slurm\n  gpus_per_job: -1\n", 9, "cluster.gpus_per_job: Input should be greater"),
    ("cluster:\n  executor: slurm\n  slurm_params: {time: 10}\n", 9, "set it as cluster.time_limit_min"),
])
def test_bad_cluster_section_names_file_line_and_key(tmp_path, capsys, section: str, line: int, message: str):
    (tmp_path / "clu.yaml").write_text(SCENARIO)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.split("cluster:")[0] + section)
    with pytest.raises(SuiteError) as e:
        load_suite(suite)
    assert any(p.startswith(f"{suite}:{line}: ") and message in p for p in e.value.problems), e.value.problems
    assert nightly.main([str(suite), "--results", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_plain_commands_import_no_submitit_nor_duckdb():
    """The GPU box's Python has neither: `run`, `frontier`, `selfcheck`, `report` and `validate` load them only when
    a cluster or the history is asked for."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from harness.cli import frontier, report, run, selfcheck, validate\n"
            "print(sorted(m for m in ('submitit', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
