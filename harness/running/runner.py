"""The sweep runner: scenario -> (framework x repeat) runs, each in a fresh process, results stored safely.

- Every run is a subprocess (``python -m harness.running.worker``) in its framework's environment, with a timeout;
  it hands back JSON through a file written atomically. The runner itself never imports torch.
- A crash, OOM, timeout or unavailable framework becomes a recorded row with status and reason; the sweep
  goes on.
- Results are append-only: a run whose JSON exists is never redone or overwritten. Rerunning an interrupted
  sweep (Ctrl-C, kill -9) finds it by scenario hash and does only what is missing.
- Repeats are interleaved (r0 of every framework, then r1, ...) so slow drift of the machine spreads evenly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import yaml

from adapters_for_tools import registry
from harness.common.dicts import changes
from harness.common.paths import REPO_ROOT
from harness.inputs.models import cache_root
from harness.measuring import environment
from harness.running import envs, evaluator, launch
from harness.running.display import Display
from harness.running.envs import worker_environment
from harness.running.locks import Busy, machine_lock, sweep_lock
from harness.storing import results
from harness.storing.schema import STATUS_OK
from harness.storing.sweep import StoredFileError, read_stored_mapping

# the invalid reason of a run that shared the machine with another measuring sweep (or matrix row)
CONTENTION = "measured under contention"
LOG_KEEP_BYTES = 200_000  # tail of each worker log kept in results/ (the full log stays in the work dir)


def work_root() -> Path:
    return Path(os.environ.get("TUNEBENCH_WORK", REPO_ROOT / ".work"))


def _now_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def planned_keys(sc) -> list[tuple[str, int]]:
    return [(fw.key, r) for r in range(sc.measure.repeats) for fw in sc.frameworks]


def newest_sweep(sc, results_root: Path) -> Path | None:
    """The newest stored sweep of this exact scenario (same hash), complete or not."""
    h = sc.content_hash()
    cands = []
    for d in Path(results_root).glob(f"{sc.name}-*"):
        meta = results.read_json(d / "sweep.json")
        if meta and meta.get("scenario_hash") == h:
            cands.append((str(meta.get("created", "")), d))
    return max(cands)[1] if cands else None


class OtherMachine(RuntimeError):
    """The sweep to fill in was measured on another kind of GPU: rows from two machines would sit in one table and
    be compared as if measured side by side."""


def other_machine(sweep_dir: Path) -> str | None:
    """Why this machine may not add rows to the stored sweep (another GPU model or count than its
    ``environment.json`` records), or None (the same kind, or no GPU on either side)."""
    stored = environment.machine_kind(results.read_json(sweep_dir / "environment.json") or {})
    here = environment.machine_kind(environment.capture(with_torch=False))
    if stored is None or here is None or stored == here:
        return None
    return f"its runs were measured on {stored}, this machine is {here}"


def _refusal(folder: Path, why: str, what: str) -> OtherMachine:
    return OtherMachine(f"{folder} cannot be filled in here: {why}. Start a new {what} (--new) on this machine, or "
                        f"fill that one in on its own kind of machine")


def measured_elsewhere(folder: Path) -> str | None:
    """Why this machine may not add to a matrix's or a frontier's ``folder`` (:func:`other_machine` of its first
    sweep, as every sweep of one folder ran on one kind of machine), or None."""
    found = sorted(p.parent for p in Path(folder).glob("*/environment.json"))
    return other_machine(found[0]) if found else None


def refuse_other_machine(folder: Path, what: str) -> None:
    """Raise :class:`OtherMachine` where the runs of a matrix's or a frontier's ``folder`` (``what``) ran on another
    kind of GPU."""
    if why := measured_elsewhere(folder):
        raise _refusal(folder, why, what)


def find_resumable(sc, results_root: Path, wanted: list[str] | None = None) -> Path | None:
    """The newest sweep of this exact scenario (same hash) if it lacks any of the ``wanted`` run keys.

    ``wanted`` defaults to every (framework, repeat) of the scenario. A sweep that has them all is finished:
    the next ``run`` starts a new one (stored runs are never redone).
    """
    d = newest_sweep(sc, results_root)
    if d is None:
        return None
    wanted = wanted if wanted is not None else [results.run_key(f, r) for f, r in planned_keys(sc)]
    done = {p.stem for p in (d / "runs").glob("*.json")}
    return d if set(wanted) - done else None


def _extend_plan(d: Path, keys: list[str]) -> None:
    """Add ``keys`` to the sweep's planned runs (a ``planned`` that is not a list of names, a damaged plan, is
    replaced by the names it holds and ``keys``)."""
    plan_path = d / "sweep.json"
    meta = results.read_json(plan_path) or {}
    planned = meta.get("planned")
    names = [k for k in planned if isinstance(k, str)] if isinstance(planned, list) else []
    missing = [k for k in keys if k not in names]
    if missing or names != planned:
        meta["planned"] = names + missing
        results.atomic_write_text(plan_path, json.dumps(meta, indent=1))


def create_sweep(sc, results_root: Path, keys: list[str] | None = None) -> Path:
    results_root.mkdir(parents=True, exist_ok=True)
    while True:
        d = results_root / f"{sc.name}-{_now_id()}"
        try:
            d.mkdir()
            break
        except FileExistsError:
            time.sleep(1.0)
    (d / "runs").mkdir()
    (d / "logs").mkdir()
    results.atomic_write_text(d / "scenario.yaml", _scenario_yaml(sc))
    results.atomic_write_text(d / "environment.json", json.dumps(environment.capture(with_torch=False), indent=1))
    plan = {"scenario": sc.name, "scenario_hash": sc.content_hash(), "created": _now_id(),
            "scenario_source": sc.source_path,
            "planned": keys if keys is not None else [results.run_key(f, r) for f, r in planned_keys(sc)]}
    results.atomic_write_text(d / "sweep.json", json.dumps(plan, indent=1))
    return d


def _scenario_yaml(sc) -> str:
    head = f"# resolved scenario (every default filled in); source: {sc.source_path}\n"
    return head + yaml.safe_dump(sc.to_dict(), sort_keys=False)


def _set_pdeathsig() -> None:
    """Worker dies with the runner (kill -9 of the runner must not leave a training process behind)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class PrepareFailed(RuntimeError):
    """Building the checkpoint or the dataset failed: every run of the sweep gets a row saying so."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _prepare(sc, run_root: Path, timeout_s: float) -> dict:
    """Build the checkpoint and the tokenised dataset once per sweep, in a subprocess.

    Raises:
        PrepareFailed: with status "timeout" or "error" and a one-line reason naming what failed.
    """
    spec = {"scenario": sc.to_dict(), "scenario_source": sc.source_path, "data_dir": str(run_root / "data")}
    spec_path = run_root / "prepare.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_environment(envs.resolve("base"))
    try:
        proc = subprocess.run([sys.executable, "-m", "harness.running.prepare", str(spec_path)], env=env,
                              cwd=run_root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PrepareFailed("timeout", f"preparing the checkpoint and data took longer than the timeout "
                                       f"({timeout_s:g} s, measure.timeout_s)") from None
    for line in proc.stdout.splitlines():
        if line.startswith("TUNEBENCH_PREPARED "):
            return json.loads(line.split(" ", 1)[1])
    last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
    # Ctrl-C or a deadline's SIGINT to the group: not a failure. Python's own exit code says so unless the interrupt
    # ended it another way (exit code 1 with the traceback's last line, seen on a frontier's probe in a thread)
    if proc.returncode in (130, -signal.SIGINT) or last[0] == "KeyboardInterrupt" or STOP.is_set():
        raise KeyboardInterrupt
    raise PrepareFailed("error", f"preparing the checkpoint and data failed: {last[0][:500]}")


def _log_tail(p: Path, n: int = LOG_KEEP_BYTES) -> str:
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def classify_crash(returncode: int, log: str) -> tuple[str, str]:
    """Status and reason of a worker that died without writing its result."""
    low = log.lower()
    if "out of memory" in low or "outofmemoryerror" in low:
        line = next((ln for ln in reversed(log.splitlines()) if "out of memory" in ln.lower()), "out of memory")
        return "oom", line.strip()[:500]
    if returncode in (-9, 137):
        return "crashed", "worker killed by SIGKILL (host out of memory, or killed from outside)"
    if returncode < 0:
        return "crashed", f"worker died from signal {-returncode}"
    last = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return "crashed", f"worker exited with code {returncode} without a result: {last[0][:500]}"


def run_header(sc, sweep_dir: Path, prepared: dict, fw, repeat: int) -> dict:
    """The identity fields every stored run starts with, whatever became of it."""
    return {"run_id": sweep_dir.name, "scenario": sc.name, "scenario_hash": sc.content_hash(), "framework": fw.key,
            "settings_hash": sc.settings_hash(fw.key), "adapter": fw.name,
            "repeat": repeat, "overrides": fw.overrides, "schema_version": results.RESULT_SCHEMA_VERSION,
            "device": sc.hardware.device, "dataset_sha256_16": prepared.get("dataset_sha256_16"),
            "dataset": prepared.get("dataset_meta"), "checkpoint": prepared.get("checkpoint")}


def execute_run(sc, sweep_dir: Path, run_root: Path, prepared: dict, fw, repeat: int, display: Display | None) -> dict:
    """Run one (framework, repeat) in a fresh process and return its finished result dict."""
    key = results.run_key(fw.key, repeat)
    info = registry.info(fw.name)
    base = run_header(sc, sweep_dir, prepared, fw, repeat)
    work_dir = run_root / key
    if work_dir.exists():  # a previous attempt died mid-run: start that run over, cleanly
        import shutil

        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    trained = sc.for_repeat(repeat)  # the seeds this repeat trains with (measure.seed_per_repeat)
    base["seeds"] = {"train": trained.train.seed, "model": trained.model.seed}
    spec = {"scenario": trained.to_dict(), "scenario_source": sc.source_path, "framework": fw.name,
            "overrides": fw.overrides, "repeat": repeat, "checkpoint": prepared["checkpoint"],
            "dataset_path": prepared["dataset_path"], "work_dir": str(work_dir)}
    (work_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    env = envs.resolve(info.env)
    log_path = work_dir / "worker.log"
    timeout = fw.timeout_s or sc.measure.timeout_s
    t0 = time.time()
    if display:
        display.start_run(key, sc.train.steps)
    # one process, or one per GPU through the tool's own launcher (harness.running.launch), same rules either way
    command = launch.worker_command(env.python, work_dir / "spec.json", sc, info.launcher, work_dir)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=work_dir, env=launch.distributed_environment(sc, worker_environment(env)),
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
        timed_out = False
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if display:
                        prog = results.read_json(work_dir / "progress.json")
                        if prog:
                            display.update_run(prog)
                    if time.time() - t0 > timeout:
                        timed_out = True
                        _kill_group(proc)
                        break
                    if STOP.is_set():  # the main thread was interrupted while this run went on in a thread
                        raise KeyboardInterrupt("stopped: the runs beside it were interrupted") from None
        except BaseException:
            _kill_group(proc)
            raise
    wall = time.time() - t0
    left_behind = _end_leftovers(proc)
    log_text = _log_tail(log_path)
    results.atomic_write_text(sweep_dir / "logs" / f"{key}.log", log_text)
    res = results.read_json(work_dir / launch.RESULT_NAME) or launch.failed_rank_result(work_dir)
    if timed_out:
        res = {"status": "timeout", "reason": f"no result within {timeout:.0f} s (killed)", "valid": False,
               "invalid_reasons": [], "metrics": (res or {}).get("metrics")}
    elif res is None:
        status, reason = classify_crash(proc.returncode, log_text)
        res = {"status": status, "reason": reason, "valid": False, "invalid_reasons": []}
    res = base | res | {"launched_at": t0, "wall_s": wall, "exit_code": proc.returncode, "env": info.env,
                        "log": f"logs/{key}.log"}
    if left_behind:
        res["warnings"] = [*(res.get("warnings") or []), "the worker left processes running after it exited "
                           "(ended by the runner before the next run)"]
    if res["status"] == STATUS_OK and sc.eval.tasks:
        res["eval"] = evaluator.evaluate(sc, work_dir, res)
    if res["status"] == STATUS_OK and sc.objective.eval_pairs:  # reward accuracy on held-out pairs
        res["reward_eval"] = evaluator.evaluate(sc, work_dir, res, "harness.analysis.reward", "reward")
    return res


# Runs in threads (matrix and frontier with --jobs) do not see the main thread's Ctrl-C; this tells them. Set by
# :func:`stop_runs_on_interrupt`, read in each run's wait loop, which then stops its worker and raises.
STOP = threading.Event()


class StopStarting(Exception):  # noqa: N818 (a stop, not an error)
    """No further run starts (a time limit): the runs going on finish and are stored."""


@contextlib.contextmanager
def stop_runs_on_interrupt() -> Iterator[None]:
    """Around a body that runs sweeps in threads (inside the thread pool's ``with``, so that it acts before the pool
    waits for them): an interrupt or error of the body stops every run in progress within half a second, its worker
    killed and nothing stored for it, so that an interrupted call ends promptly. A :class:`StopStarting` stops
    nothing that runs."""
    STOP.clear()
    try:
        yield
    except StopStarting:
        raise
    except BaseException:
        STOP.set()
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _end_leftovers(proc: subprocess.Popen) -> bool:
    """End what the exited worker left running in its process group (a tool's helper processes) with SIGKILL, so
    nothing of one run holds the GPU or the host during the next; True when something was left."""
    try:
        os.killpg(proc.pid, 0)  # raises when the group has no process left
    except (ProcessLookupError, PermissionError):
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


# an OOM is a measurement of the framework, not retried; an unavailable row (its environment missing) is, once it exists
RETRYABLE = ("error", "crashed", "timeout", "unavailable")


def set_aside_failed(sweep_dir: Path, keys: list[str], also: Callable[[dict], bool] | None = None) -> list[str]:
    """Move the stored failed rows among ``keys`` (status in :data:`RETRYABLE`, an evaluation that ended in an
    error, or a row for which ``also`` says so) and their logs to ``runs/attempts/`` and ``logs/attempts/`` as
    ``<key>.<n>`` (never overwritten), so the runs are done again.

    For failures of the machine rather than of the framework (a full disk, a lost device), or of a check since
    fixed (``also``: the support matrix's invalid cells): the failed attempt stays on record and the new row lists
    it under ``previous_attempts``. Returns the keys set aside."""
    moved = []
    for key in keys:
        row = results.read_json(sweep_dir / "runs" / f"{key}.json")
        if row is None or not (row.get("status") in RETRYABLE or _evaluation_failed(row) or (also and also(row))):
            continue
        for sub, suffix in (("runs", ".json"), ("logs", ".log")):
            src = sweep_dir / sub / f"{key}{suffix}"
            if not src.exists():
                continue
            (sweep_dir / sub / "attempts").mkdir(exist_ok=True)
            n = 1
            while (sweep_dir / sub / "attempts" / f"{key}.{n}{suffix}").exists():
                n += 1
            os.replace(src, sweep_dir / sub / "attempts" / f"{key}.{n}{suffix}")
        moved.append(key)
    return moved


def _evaluation_failed(row: dict) -> bool:
    """Whether a stored run trained but its evaluation (lm-eval or reward accuracy) ended in an error."""
    return any(isinstance(part := row.get(name), dict) and part.get("status") == "error"
               for name in ("eval", "reward_eval"))


def previous_attempts(sweep_dir: Path, key: str) -> list[dict]:
    """``status``/``reason``/file of each set-aside attempt of ``key`` (see :func:`set_aside_failed`)."""
    out = []
    for p in sorted((sweep_dir / "runs" / "attempts").glob(f"{key}.*.json")):
        row = results.read_json(p) or {}
        out.append({"file": f"runs/attempts/{p.name}", "status": row.get("status"), "reason": row.get("reason")})
    return out


def prune_outputs(work_dir: Path, limit_bytes: int = 1 << 30) -> list[str]:
    """Delete files over ``limit_bytes`` from a finished run's scratch directory (merged full-model copies,
    e.g. LitGPT's ``final/lit_model.pth``, 16 GB at 8B): a sweep of several tools would fill a 64 GB disk.
    Adapters, configs and logs stay. ``TUNEBENCH_KEEP_OUTPUTS=1`` keeps everything. Returns what was deleted."""
    if os.environ.get("TUNEBENCH_KEEP_OUTPUTS") == "1" or not work_dir.is_dir():
        return []
    gone = []
    for p in work_dir.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size > limit_bytes:
            p.unlink()
            gone.append(str(p.relative_to(work_dir)))
    return gone


def machine_lock_dir() -> Path:
    """Where the one-measurement-per-machine lock lives: the cache, shared by every checkout of this user.

    ``TUNEBENCH_LOCK_DIR`` moves it (the test suite does, so that its own small sweeps neither wait for nor disturb
    a real sweep on the same machine). An unwritable cache falls back to the work area: the cache's failure is the
    prepare step's error (a row per run), not the lock's.
    """
    lock_dir = Path(os.environ.get("TUNEBENCH_LOCK_DIR") or cache_root())
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(lock_dir, os.W_OK)
    except OSError:
        writable = False
    return lock_dir if writable else work_root()


@contextlib.contextmanager
def _machine(sweep_dir: Path, allow_contention: bool):
    """Hold the machine lock for the sweep; yield None, or what this sweep contends with when allowed to."""
    try:
        with machine_lock(machine_lock_dir(), sweep_dir):
            yield None
    except Busy as e:
        if not allow_contention:
            raise Busy(f"another sweep is running on this machine ({e}); two sweeps at once measure each other's "
                       f"load. Wait for it, or pass --allow-contention to run anyway with every row marked "
                       f"invalid (measured under contention)") from None
        yield str(e)


def resume_changes(sc, sweep_dir: Path) -> list[str]:
    """What differs between the scenario that started a sweep (its stored scenario.yaml) and ``sc``."""
    try:
        stored = read_stored_mapping(sweep_dir / "scenario.yaml")
    except StoredFileError as e:
        return [f"its stored scenario.yaml cannot be read ({e})"]
    if not isinstance(stored, dict) or not isinstance(stored.get("measure", {}), dict):
        return ["its stored scenario.yaml is not a scenario"]
    now = sc.to_dict()
    for d in (stored, now):  # repeats extend a sweep by design (--repeats); they are not a change of scenario
        d.get("measure", {}).pop("repeats", None)
    diffs = changes(stored, now)
    if (src := results.read_json(sweep_dir / "sweep.json") or {}).get("scenario_source") != sc.source_path:
        diffs.append(f"source: {src.get('scenario_source')} -> {sc.source_path}")
    return diffs


def inputs_for(sc, run_root: Path, repeat: int, prepared_by_seed: dict[int, dict | PrepareFailed]
               ) -> dict | PrepareFailed:
    """The checkpoint and dataset repeat ``repeat`` trains on, built once per checkpoint seed (cached in
    ``prepared_by_seed``), or why building them failed."""
    trained = sc.for_repeat(repeat)
    prepared = prepared_by_seed.get(trained.model.seed)
    if prepared is None:
        try:
            prepared = _prepare(trained, run_root, sc.measure.timeout_s)
        except PrepareFailed as e:
            prepared = e
        prepared_by_seed[trained.model.seed] = prepared
    return prepared


def attempt_run(sc, sweep_dir: Path, run_root: Path, fw, repeat: int,
                prepared_by_seed: dict[int, dict | PrepareFailed], display: Display | None) -> dict:
    """One run's finished result dict: an unavailable framework, inputs that failed to build, or the worker's run.

    ``prepared_by_seed``: the inputs built so far (:func:`inputs_for`); the first runnable framework builds them.
    """
    info = registry.info(fw.name)
    if why := envs.unavailable(info, sc.hardware.device) or info.family_unsupported(sc):
        return run_header(sc, sweep_dir, {}, fw, repeat) | {
            "status": "unavailable", "reason": why, "valid": False, "invalid_reasons": []}
    prepared = inputs_for(sc, run_root, repeat, prepared_by_seed)
    if isinstance(prepared, PrepareFailed):
        return run_header(sc, sweep_dir, {}, fw, repeat) | {
            "status": prepared.status, "reason": prepared.reason, "valid": False, "invalid_reasons": []}
    return execute_run(sc, sweep_dir, run_root, prepared, fw, repeat, display)


def store_run(sweep_dir: Path, run_root: Path, key: str, res: dict, contention: str | None = None) -> None:
    """Store one finished run (atomically, never over a stored one) and prune its large scratch outputs.

    ``contention``: what else measured this machine at the same time; the row is then marked invalid.
    """
    if contention:
        res["valid"] = False
        res["invalid_reasons"] = [*res.get("invalid_reasons", []), f"{CONTENTION}: {contention}"]
    if earlier := previous_attempts(sweep_dir, key):
        res["previous_attempts"] = earlier
    results.write_result(sweep_dir / "runs" / f"{key}.json", res)
    prune_outputs(run_root / key)


class Launcher(Protocol):
    """Runs a sweep's remaining runs somewhere else than this process, one job each (:mod:`harness.running.cluster`).

    It stores a row for every run of ``todo`` (through :func:`attempt_run` and :func:`store_run` in the job, or a
    row for a job that died) and returns when all are stored. ``measures_here``: its jobs run on this machine, so
    the sweep takes the machine lock as a local sweep does.
    """

    measures_here: bool

    def __call__(self, sc, sweep_dir: Path, run_root: Path, todo: list, display: Display,
                 contention: str | None) -> None: ...


def run_sweep(sc, results_root: Path, new: bool = False, quiet: bool = False, only: list[str] | None = None,
              resume_only: bool = False, retry_failed: bool = False, allow_contention: bool = False,
              launcher: Launcher | None = None, retry_also: Callable[[dict], bool] | None = None) -> Path:
    """Run (or resume) the sweep of scenario ``sc``; returns the sweep's results directory.

    ``resume_only``: fill in the newest sweep of this scenario even when it is complete for the requested
    runs (then nothing runs); never start a new one. Scripts that fill one sweep over several invocations use
    it so that a repeated invocation cannot start a duplicate sweep. ``retry_failed``: runs of that sweep stored
    as error/crashed/timeout/unavailable (or, with ``retry_also``, rows it picks) are done again, the failed attempt
    kept (:func:`set_aside_failed`). ``launcher``: run
    them as cluster jobs instead of here (:mod:`harness.running.cluster`); a launcher whose jobs run on other
    machines takes no machine lock.
    """
    results_root = Path(results_root)
    measures_here = launcher is None or launcher.measures_here
    if measures_here:  # where the runs are measured, they are evaluated
        evaluator.check(sc)
    keys = [(fw, r) for r in range(sc.measure.repeats) for fw in sc.frameworks if not only or fw.key in only]
    key_names = [results.run_key(fw.key, r) for fw, r in keys]
    sweep_dir = None if new else find_resumable(sc, results_root, key_names)
    if sweep_dir is None and (resume_only or retry_failed):
        sweep_dir = newest_sweep(sc, results_root)
    if sweep_dir is not None and measures_here and (why := other_machine(sweep_dir)):
        if resume_only or retry_failed:
            raise _refusal(sweep_dir, why, "sweep")
        print(f"not resuming {sweep_dir}: {why}; a new sweep starts", file=sys.stderr)
        sweep_dir = None
    resumed = sweep_dir is not None
    if sweep_dir is None:
        sweep_dir = create_sweep(sc, results_root, key_names)
    else:
        _extend_plan(sweep_dir, key_names)
    for sub in ("runs", "logs"):  # a damaged sweep folder (a file where a folder belongs) fails now, not after a run
        (sweep_dir / sub).mkdir(exist_ok=True)
    if (sweep_dir / "runs.csv").is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder where the runs table belongs", str(sweep_dir / "runs.csv"))
    run_root = work_root() / sweep_dir.name
    run_root.mkdir(parents=True, exist_ok=True)
    machine = _machine(sweep_dir, allow_contention) if measures_here else contextlib.nullcontext()
    with sweep_lock(sweep_dir), machine as contention, Display(total=len(keys), quiet=quiet) as display:
        if resumed and (changed := resume_changes(sc, sweep_dir)):
            display.console.print(f"[yellow]resuming {sweep_dir}, started from a different scenario file: "
                                  f"{'; '.join(changed)}[/]", markup=True, highlight=False)
        if retry_failed and resumed:
            set_aside_failed(sweep_dir, key_names, retry_also)
        todo = [(fw, r) for fw, r in keys
                if not (sweep_dir / "runs" / f"{results.run_key(fw.key, r)}.json").exists()]
        display.progress.update(display.sweep, completed=len(keys) - len(todo))
        display.console.print(f"{'resuming' if resumed else 'sweep'} {sweep_dir} "
                              f"({len(todo)} of {len(keys)} runs to do)")
        if launcher is not None:
            launcher(sc, sweep_dir, run_root, todo, display, contention)
        else:
            prepared_by_seed: dict[int, dict | PrepareFailed] = {}
            for fw, r in todo:
                key = results.run_key(fw.key, r)
                res = attempt_run(sc, sweep_dir, run_root, fw, r, prepared_by_seed, display)
                store_run(sweep_dir, run_root, key, res, contention)
                results.write_table(sweep_dir)
                display.end_run(key, res)
    results.write_table(sweep_dir)
    return sweep_dir


def load_result(sweep_dir: Path, framework: str, repeat: int) -> dict | None:
    """One stored run of a sweep (the JSON of runs/<framework>-r<repeat>.json), or None if it is missing."""
    return results.read_json(Path(sweep_dir) / "runs" / f"{results.run_key(framework, repeat)}.json")
