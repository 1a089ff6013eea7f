"""The runs of a sweep as cluster jobs, through submitit: Slurm, or submitit's local executor.

One job per run, and before them one job that builds the sweep's inputs (checkpoint and dataset) on a node, as the
runner builds them before its first run. Each job does on its node exactly what the local runner does in its loop
(:func:`harness.running.runner.attempt_run`: the framework's availability checked there, the same worker command
in the same environment with the same timeout) and stores its row itself, atomically, in the sweep's ``runs/``
(:func:`harness.running.runner.store_run`). The runner here submits, waits, and stores a row for every job that
died without one (status ``crashed``, or ``timeout`` when the scheduler's time limit ended it; the job's own error
as the reason), so ``resume`` and ``--retry-failed`` work on a cluster sweep as on a local one.

What the nodes must share with this machine: the results folder, the work area (``TUNEBENCH_WORK``, where the
inputs and submitit's job files live), the cache (``TUNEBENCH_CACHE``) and the toolkit environments
(``TUNEBENCH_ENVS``); the jobs are handed these paths as resolved here. The engine is submitit's; this module only
keeps at most ``max_parallel`` jobs submitted at once.

Interrupting the runner (Ctrl-C) cancels its jobs. A runner killed outright leaves them to the scheduler: they
still store their rows, and the next run of the same sweep waits for those still running (``jobs.json`` in the
sweep's work area) instead of submitting them twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from adapters_for_tools import registry
from harness.common.paths import REPO_ROOT
from harness.inputs.models import cache_root
from harness.running import envs, runner
from harness.running.display import Display
from harness.spec.cluster import ClusterSettings
from harness.storing import results

PREPARE = "prepare"  # the key of the job that builds the inputs, beside the run keys in jobs.json
ROW_WAIT_S = 60.0  # a job that returned cleanly stored its row first; a shared filesystem may show it late
_SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


@dataclass
class JobSpec:
    """What one job needs (pickled by submitit into its folder)."""

    sc: Any  # the Scenario, exactly as the runner holds it (repeats and --only applied)
    sweep_dir: str
    run_root: str
    env: dict[str, str]  # set in the job before anything else: the same cache, work area and environments
    runs: list[tuple[str, int]]  # (framework key, repeat): one for a run job; every run to do for the prepare job
    prepared: dict[int, dict]  # inputs per checkpoint seed, as the prepare job built them
    contention: str | None = None  # local executor only: what else measures this machine


def job_environment() -> dict[str, str]:
    """The variables a job sets first: every ``TUNEBENCH_*`` of this process, and the folders resolved to the
    paths this runner uses (a node whose login environment differs finds the same ones)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("TUNEBENCH_")}
    env |= {"TUNEBENCH_WORK": str(runner.work_root().resolve()), "TUNEBENCH_CACHE": str(cache_root().resolve()),
            "TUNEBENCH_ENVS": str(envs.envs_root().resolve())}
    return env


def _framework(sc, key: str):
    """The scenario's framework row ``key``."""
    return next(fw for fw in sc.frameworks if fw.key == key)


def _encode(prepared: dict) -> dict[int, dict]:
    """Inputs per seed in a form that pickles (a failure as ``{"failed": [status, reason]}``)."""
    return {s: p if isinstance(p, dict) else {"failed": [p.status, p.reason]} for s, p in prepared.items()}


def _decode(prepared: dict[int, dict]) -> dict:
    return {s: runner.PrepareFailed(*p["failed"]) if "failed" in p else p for s, p in prepared.items()}


def prepare_job(spec: JobSpec) -> dict[str, dict]:
    """On a node: why each framework that cannot run there cannot (by run key), and the inputs of the others'
    runs, built as the local runner builds them (:func:`runner.inputs_for`)."""
    os.environ.update(spec.env)
    prepared: dict = {}
    unavailable = {}
    for key, r in spec.runs:
        if why := envs.unavailable(registry.info(_framework(spec.sc, key).name), spec.sc.hardware.device):
            unavailable[results.run_key(key, r)] = why
        else:
            runner.inputs_for(spec.sc, Path(spec.run_root), r, prepared)
    return {"unavailable": unavailable, "prepared": _encode(prepared)}


def run_job(spec: JobSpec) -> str:
    """On a node: one run, as the local runner does it, stored in the sweep's runs/; returns its status."""
    os.environ.update(spec.env)
    (key, r), sweep_dir = spec.runs[0], Path(spec.sweep_dir)
    fw = _framework(spec.sc, key)
    run_key = results.run_key(fw.key, r)
    if (stored := results.read_json(sweep_dir / "runs" / f"{run_key}.json")) is not None:
        return str(stored.get("status"))  # stored by an earlier job of this run: never redone
    res = runner.attempt_run(spec.sc, sweep_dir, Path(spec.run_root), fw, r, _decode(spec.prepared), None)
    res["cluster_job"] = {"job_id": submitit.JobEnvironment().job_id, "host": socket.gethostname()}
    runner.store_run(sweep_dir, Path(spec.run_root), run_key, res, spec.contention)
    return res["status"]


def make_executor(settings: ClusterSettings, folder: Path, time_limit_min: int) -> submitit.Executor:
    """The submitit executor for ``settings`` (its job files in ``folder``, on a filesystem the nodes share)."""
    python = settings.python or sys.executable
    if settings.executor == "local":
        # the repository importable through `env`, not a setup line: setup lines put a shell between submitit and
        # the job, and the shell would swallow the job's cancel signal
        path = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        ex = submitit.LocalExecutor(folder=folder, python=shlex.join(["env", f"PYTHONPATH={path}", python]))
        ex.update_parameters(timeout_min=time_limit_min, gpus_per_node=settings.gpus_per_job,
                             **({"setup": settings.setup} if settings.setup else {}))
        return ex
    setup = [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *settings.setup]  # harness importable
    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python))
    params: dict[str, Any] = {"time": time_limit_min, "gpus_per_node": settings.gpus_per_job, "setup": setup,
                              "additional_parameters": dict(settings.slurm_params)}
    mem = None if settings.mem_gib is None else (f"{settings.mem_gib:.0f}G" if settings.mem_gib.is_integer()
                                                 else f"{math.ceil(settings.mem_gib * 1024)}M")  # sbatch: integer
    for name, value in (("partition", settings.partition), ("cpus_per_task", settings.cpus_per_job),
                        ("mem", mem), ("exclusive", settings.exclusive or None)):
        if value is not None:
            params[name] = value
    ex.update_parameters(**params)
    return ex


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live submitit controller (a local job of an earlier runner)."""
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class _Tracked:
    key: str  # run key, or PREPARE
    job: submitit.Job
    adopted_pid: int | None = None  # a local job of an earlier runner: followed through its controller's pid

    def done(self) -> bool:
        return not _pid_alive(self.adopted_pid) if self.adopted_pid else self.job.done()

    def cancel(self) -> None:
        try:
            if self.adopted_pid:
                os.kill(self.adopted_pid, signal.SIGINT)
            else:
                self.job.cancel(check=False)
        except OSError as e:  # scancel missing, or the job just ended: say so, the other jobs still get cancelled
            print(f"could not cancel job {self.job.job_id} ({self.key}): {e}")


def _job_error(job: submitit.Job, err: BaseException | None) -> tuple[str, str]:
    """Status and one-line reason of a job that ended without storing its row (``err``: the job's own error;
    None when it left neither a result nor an error: its process was killed)."""
    state = str(job.state)
    lines = [ln.strip() for ln in str(err or "").splitlines() if ln.strip() and not ln.startswith("---")]
    raised = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Interrupt", "Exit"))]
    why = (raised or lines or ["killed without a result or an error (time limit, node failure, host out of "
                               "memory, or cancelled)"])[-1]
    status = "timeout" if "TIMEOUT" in state.upper() else "crashed"
    return status, f"cluster job {job.job_id} ended without storing a result ({state}): {why}"[:500]


class ClusterLauncher:
    """Runs the sweep's remaining runs as submitit jobs (a :class:`harness.running.runner.Launcher`)."""

    def __init__(self, settings: ClusterSettings, poll_s: float | None = None):
        self.settings = settings
        self.measures_here = settings.executor == "local"  # jobs on this machine: the machine lock applies
        self.poll_s = poll_s if poll_s is not None else (0.5 if settings.executor == "local" else 10.0)

    def __call__(self, sc, sweep_dir: Path, run_root: Path, todo: list, display: Display,
                 contention: str | None) -> None:
        """Submit the prepare job, then one job per run of ``todo``; return when every run has its row."""
        if not todo:
            return
        work_s = max((fw.timeout_s or sc.measure.timeout_s) for fw, _ in todo)
        work_s += sc.measure.timeout_s if sc.eval.tasks else 0  # the evaluation after a run has its own timeout
        folder = run_root / "submitit"
        ex = make_executor(self.settings, folder, self.settings.job_time_limit_min(work_s))
        jobs_file = run_root / "jobs.json"
        recorded = results.read_json(jobs_file) or {}
        spec = JobSpec(sc=sc, sweep_dir=str(sweep_dir), run_root=str(run_root), env=job_environment(),
                       runs=[(fw.key, r) for fw, r in todo], prepared={}, contention=contention)

        def submit(key: str, fn: Callable[[JobSpec], Any], job_spec: JobSpec) -> _Tracked:
            if (earlier := self._adopt(folder, recorded.get(key))) is not None:
                display.console.print(f"{key}: waiting for job {earlier.job.job_id} of an earlier runner")
                earlier.key = key
                return earlier
            job = ex.submit(fn, job_spec)
            recorded[key] = job.job_id
            results.atomic_write_text(jobs_file, json.dumps(recorded, indent=1))
            display.console.print(f"{key}: submitted as {self.settings.executor} job {job.job_id}")
            return _Tracked(key, job)

        active: list[_Tracked] = []
        try:
            prep = submit(PREPARE, prepare_job, spec)
            active = [prep]
            self._wait(prep)
            active = []
            waiting = self._store_unrunnable(prep, sc, sweep_dir, run_root, todo, display, contention)
            if waiting:
                spec.prepared = prep.job.result()["prepared"]
            while waiting or active:
                while waiting and len(active) < (self.settings.parallel() or len(waiting) + len(active)):
                    fw, r = waiting.pop(0)
                    active.append(submit(results.run_key(fw.key, r), run_job,
                                         dataclasses.replace(spec, runs=[(fw.key, r)])))
                for t in [t for t in active if t.done()]:
                    active.remove(t)
                    self._finish(t, sc, sweep_dir, run_root, todo, display)
                if active:
                    time.sleep(self.poll_s)
        except BaseException:
            for t in active:  # Ctrl-C, or the runner failing: leave no job behind
                t.cancel()
            raise

    def _store_unrunnable(self, prep: _Tracked, sc, sweep_dir: Path, run_root: Path, todo: list,
                          display: Display, contention: str | None) -> list:
        """Store here the rows of runs no job needs to start for: a framework the nodes cannot run, inputs that
        could not be built (or a prepare job that died). Returns the runs left to submit."""
        try:
            out = prep.job.result()
            unavailable, prepared = out["unavailable"], _decode(out["prepared"])
        except (UncompletedJobError, FailedJobError) as e:
            status, reason = _job_error(prep.job, e)
            unavailable, prepared = {}, {sc.for_repeat(r).model.seed: runner.PrepareFailed(
                status, f"preparing the checkpoint and data: {reason}") for _, r in todo}
        waiting = []
        for fw, r in todo:
            key = results.run_key(fw.key, r)
            failed = prepared.get(sc.for_repeat(r).model.seed)
            if key in unavailable:
                row = {"status": "unavailable", "reason": unavailable[key]}
            elif isinstance(failed, runner.PrepareFailed):
                row = {"status": failed.status, "reason": failed.reason}
            else:
                waiting.append((fw, r))
                continue
            row = runner.run_header(sc, sweep_dir, {}, fw, r) | row | {"valid": False, "invalid_reasons": []}
            runner.store_run(sweep_dir, run_root, key, row, contention)
            results.write_table(sweep_dir)
            display.end_run(key, row)
        return waiting

    def _wait(self, t: _Tracked) -> None:
        while not t.done():
            time.sleep(self.poll_s)

    def _adopt(self, folder: Path, job_id: str | None) -> _Tracked | None:
        """The job an earlier runner submitted for this key, if it is still pending or running."""
        if job_id is None:
            return None
        if self.settings.executor == "local":
            return _Tracked("", submitit.LocalJob(folder, job_id), int(job_id)) if _pid_alive(int(job_id)) else None
        job = submitit.SlurmJob(folder, job_id)
        return _Tracked("", job) if job.get_info().get("State", "").split(" ")[0] in _SLURM_ACTIVE else None

    def _finish(self, t: _Tracked, sc, sweep_dir: Path, run_root: Path, todo: list, display: Display) -> None:
        """Show the row the job stored, or store one for a job that died without it."""
        path = sweep_dir / "runs" / f"{t.key}.json"
        row, err = results.read_json(path), None
        if row is None:
            # a local job's files are on this disk: no result file means none will come (killed), no need to wait
            killed_here = isinstance(t.job, submitit.LocalJob) and not t.job.paths.result_pickle.exists()
            err = None if killed_here else t.job.exception()  # waits a little for a result file written late
            if err is None and not killed_here:  # the job returned: its row was stored first, maybe seen late here
                deadline = time.time() + ROW_WAIT_S
                while (row := results.read_json(path)) is None and time.time() < deadline:
                    time.sleep(1.0)
                err = RuntimeError("the job returned but its row never appeared in runs/")
        if row is None:
            fw, r = next((fw, r) for fw, r in todo if results.run_key(fw.key, r) == t.key)
            status, reason = _job_error(t.job, err)
            log = f"job {t.job.job_id}: {t.job.paths.stdout}\n{t.job.stdout() or ''}\n{t.job.stderr() or ''}"
            if (worker_log := run_root / t.key / "worker.log").is_file():  # what the run printed before it died
                log += f"\n--- {worker_log}\n{worker_log.read_text(errors='replace')[-runner.LOG_KEEP_BYTES // 2:]}"
            results.atomic_write_text(sweep_dir / "logs" / f"{t.key}.log", log[-runner.LOG_KEEP_BYTES:])
            row = runner.run_header(sc, sweep_dir, {}, fw, r) | {
                "status": status, "reason": reason, "valid": False, "invalid_reasons": [],
                "log": f"logs/{t.key}.log", "cluster_job": {"job_id": t.job.job_id}}
            runner.store_run(sweep_dir, run_root, t.key, row)
        results.write_table(sweep_dir)
        display.end_run(t.key, row)
