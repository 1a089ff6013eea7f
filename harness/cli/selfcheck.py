"""``python -m harness selfcheck SCENARIO``: the harness's figures against plain hand-written loops.

Runs the scenario's training in a plain loop per framework (:mod:`harness.measuring.handloop`: hf + PEFT with each
HF Trainer setting spelled out, the tunebench trainer library called directly, Unsloth's model), each in a fresh
process in its framework's environment, as the runner runs workers. With ``--against results/<sweep>`` it puts
each loop beside the sweep's stored figure for that framework (the report's median over ok repeats), the difference
in percent and the settings that differ (:mod:`harness.analysis.handloop`), and stores the whole check in the
sweep as ``selfcheck.json`` (a later check: ``selfcheck-2.json``, ...; never overwritten). The sweep's report
shows it under "Harness vs hand loop". Run it on the machine that ran the sweep, with nothing else on the GPU
(it takes the machine lock a sweep takes).

``--side-by-side N`` also runs the harness's own worker for each framework row (``python -m harness run SCENARIO
--only ROW --repeats 1`` into a private temporary results folder) beside each loop on this machine, N rounds in
alternating order, and stores each round's run JSON in the check: a stored sweep made on another lease of a shared
machine differs from a loop run today by as much as that machine's host and clocks moved, which the pairs remove.
With pairs, the side-by-side comparison is the check's verdict.

An interrupted check resumes: each finished measurement (a pair, both sides of one round and framework, or a loop)
is kept at once in a work file beside where the check is stored (``selfcheck-partial-<key>.json`` in the sweep, or
``OUT.partial-<key>.json`` beside ``--out``; the key: scenario, frameworks, rounds, steps, knobs and code version),
and the same command run again measures only what is missing. A pair is the unit, so its two sides always ran back
to back. The finished check is written once and the work file removed.

Exit codes: 0 every compared framework agrees within 3 % (or nothing to compare), 1 a framework differs by more,
or a loop failed, 2 bad input (scenario, framework name, results directory, knob), 3 another sweep holds the
machine, 130 interrupted (finished measurements kept; rerun the same command to resume).

Examples::

    python -m harness selfcheck scenarios/smoke_gpu.yaml --against results/smoke_gpu-20261201-231555
    python -m harness selfcheck scenarios/llama8b_lora.yaml --frameworks hf --against results/<run-id> --out hf.json
    python -m harness selfcheck scenarios/smoke_gpu.yaml --frameworks hf --set attention_mask=false   # bisect
    python -m harness selfcheck scenarios/llama8b_qlora.yaml --against results/<run-id> --side-by-side 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_for_tools import registry
from harness.analysis.handloop import (
    AGREE_PCT,
    PARTIAL_PREFIX,
    cause,
    compare,
    compare_side_by_side,
    next_selfcheck_path,
)
from harness.cli.guard import EXIT_INTERRUPTED, output_dir_problems
from harness.common.names import unknown
from harness.measuring.environment import git_info
from harness.measuring.handloop import FRAMEWORKS
from harness.measuring.handloop.knobs import parse_knobs
from harness.running import envs
from harness.running.envs import worker_environment
from harness.running.locks import Busy, machine_lock
from harness.running.runner import machine_lock_dir
from harness.spec.scenario import ScenarioError, load_scenario
from harness.storing.results import atomic_write_text, read_json, write_json_once
from harness.storing.sweep import NotAResultsDir, load_sweep

EXIT_OK, EXIT_DIFFERS, EXIT_BAD_INPUT, EXIT_BUSY = 0, 1, 2, 3
SELFCHECK_VERSION = 1
INTERRUPTED_CODES = (EXIT_INTERRUPTED, -signal.SIGINT)  # a child stopped by the Ctrl-C that stops the check


class Progress:
    """The measurements a check has finished, by unit (``"round 0 hf"``, ``"loop hf"``), kept in a work file as each
    finishes so that an interrupted check resumes where it stopped.

    The file is named by a digest of ``key`` (what makes two checks the same check), holds the key itself, and is
    replaced atomically as it grows: a crash leaves the previous version whole. Without a path nothing is kept.
    """

    def __init__(self, path: Path | None, key: dict[str, Any]) -> None:
        self.path, self.key, self.done = path, key, {}
        stored = read_json(path) if path is not None and path.is_file() else None
        if isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("done"), dict):
            self.done = stored["done"]

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        """The work file's name part for ``key``: 12 hex digits of its canonical JSON's SHA-256."""
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def get(self, unit: str) -> Any:
        """The stored measurement of ``unit``, or None when it has not run."""
        return self.done.get(unit)

    def put(self, unit: str, value: Any) -> None:
        """Keep ``unit``'s measurement (in the work file at once, when there is one)."""
        self.done[unit] = value
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"key": self.key, "done": self.done}, indent=1, default=str))

    def finish(self) -> None:
        """The check is stored whole: the work file goes."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def work_file(args: argparse.Namespace, sc, wanted: list[str], sweep) -> tuple[Path | None, dict[str, Any]]:  # noqa: ANN001
    """Where an unfinished check keeps its measurements (in the sweep; else beside ``--out``; else nowhere) and the
    key that names it."""
    key = {"scenario_hash": sc.content_hash(), "frameworks": wanted, "side_by_side": args.side_by_side,
           "steps": args.steps, "knobs": list(args.set), "git_sha": git_info()["git_sha"]}
    name = Progress.digest(key)
    if sweep is not None:
        return sweep.path / f"{PARTIAL_PREFIX}{name}.json", key
    if args.out:
        return args.out.with_name(f"{args.out.name}.partial-{name}.json"), key
    return None, key


def _stopped(proc: subprocess.CompletedProcess) -> None:
    """A child that stopped for the Ctrl-C that stops the check is no measurement: stop the check too."""
    if proc.returncode in INTERRUPTED_CODES:
        raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness selfcheck --help``)."""
    ap = argparse.ArgumentParser(prog="python -m harness selfcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", help="the scenario file the sweep ran")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help=f"comma-separated hand loops to run (default: {','.join(FRAMEWORKS)})")
    ap.add_argument("--against", type=Path, help="a stored sweep (results/<run-id>) to compare with and store in")
    ap.add_argument("--out", type=Path, help="also write the check's JSON here")
    ap.add_argument("--steps", type=int, help="optimizer steps per loop (default: the scenario's)")
    ap.add_argument("--side-by-side", type=int, default=0, metavar="N",
                    help="N rounds of (the harness's own run of each framework row, its hand loop) on this machine, "
                         "in alternating order (default 0: loops only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an hf loop knob, to bisect a difference (repeatable; harness.measuring.handloop."
                         "knobs.HfKnobs)")
    return ap


def run_loop(framework: str, scenario: Path, sc, steps: int | None, knobs: list[str]) -> dict[str, Any]:  # noqa: ANN001
    """One hand loop in a fresh process in its framework's environment; its result dict (``status`` ok,
    unavailable or error)."""
    info = registry.info(framework)
    why = envs.unavailable(info, sc.hardware.device)
    if why:
        return {"framework": framework, "status": "unavailable", "reason": why}
    env = envs.resolve(info.env)
    with tempfile.TemporaryDirectory(prefix=f"selfcheck-{framework}-") as work:
        out = Path(work) / "loop.json"
        cmd = [env.python, "-m", "harness.measuring.handloop", framework, str(Path(scenario).resolve()),
               "--out", str(out)] + (["--steps", str(steps)] if steps else [])
        cmd += [a for k in (knobs if framework == "hf" else []) for a in ("--set", k)]
        try:
            # the loop's own cwd: Unsloth writes its compiled cache into the working directory
            proc = subprocess.run(cmd, cwd=work, env=worker_environment(env), capture_output=True, text=True,
                                  timeout=sc.measure.timeout_s)
        except subprocess.TimeoutExpired:
            return {"framework": framework, "status": "error",
                    "reason": f"no result within {sc.measure.timeout_s:g} s (measure.timeout_s; killed)"}
        _stopped(proc)
        res = read_json(out)
    if res is None:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"framework": framework, "status": "error", "reason": f"the loop wrote no result: {last[0][:500]}"}
    return res


def run_harness(framework: str, scenario: Path, sc) -> dict[str, Any]:  # noqa: ANN001
    """The harness's own run of row ``framework`` (``python -m harness run --only ROW --repeats 1``) in a private
    temporary results folder: its stored run JSON, or ``status`` error with why it stored none.

    The check holds the machine lock already: the run takes a lock of its own in the temporary folder
    (``TUNEBENCH_LOCK_DIR``), so it neither waits for the check nor runs beside anything else.
    """
    with tempfile.TemporaryDirectory(prefix=f"selfcheck-harness-{framework}-") as tmp:
        env = dict(os.environ, TUNEBENCH_LOCK_DIR=str(Path(tmp) / "lock"))
        cmd = [sys.executable, "-m", "harness", "run", str(Path(scenario).resolve()), "--only", framework,
               "--repeats", "1", "--new", "--results", str(Path(tmp) / "results"), "--reports",
               str(Path(tmp) / "reports"), "--no-report", "--quiet"]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=sc.measure.timeout_s + 600)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"harness run: no result within {sc.measure.timeout_s + 600:g} s"}
        _stopped(proc)
        found = sorted(Path(tmp, "results").glob(f"*/runs/{framework}-r0.json"))
        run = read_json(found[0]) if found else None
    if run is None:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"status": "error", "reason": f"harness run stored no result: {last[0][:500]}"}
    return run


def side_by_side(wanted: list[str], scenario: Path, sc, rounds: int,  # noqa: ANN001
                 progress: Progress) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """``rounds`` rounds of each framework's harness run and hand loop (both at the scenario's settings), the harness
    first in even rounds and the loop first in odd ones; the pairs (each with the full run JSON and when it
    finished) and their comparison, by framework. Pairs ``progress`` holds are not run again."""
    pairs: dict[str, list[dict[str, Any]]] = {fw: [] for fw in wanted}
    for r in range(rounds):
        order = ("harness_run", "loop") if r % 2 == 0 else ("loop", "harness_run")
        for fw in wanted:
            unit = f"round {r} {fw}"
            if progress.get(unit) is None:
                side = {"harness_run": lambda fw=fw: run_harness(fw, scenario, sc),
                        "loop": lambda fw=fw: run_loop(fw, scenario, sc, None, [])}
                got = {name: side[name]() for name in order}
                progress.put(unit, {"round": r, "first": order[0].removesuffix("_run")} | got
                             | {"finished": datetime.now(UTC).isoformat()})
            pairs[fw].append(progress.get(unit))
    return pairs, {fw: compare_side_by_side(fw, ps) for fw, ps in pairs.items()}


def measure(args: argparse.Namespace, sc, wanted: list[str],  # noqa: ANN001
            progress: Progress) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The check's measurements under the machine lock: the loops, and the pairs with their comparison."""
    if args.side_by_side:
        pairs, paired = side_by_side(wanted, Path(args.scenario), sc, args.side_by_side, progress)
        return {fw: ps[0]["loop"] for fw, ps in pairs.items()}, pairs, paired
    for fw in wanted:
        if progress.get(f"loop {fw}") is None:
            progress.put(f"loop {fw}", run_loop(fw, Path(args.scenario), sc, args.steps, args.set))
    return {fw: progress.get(f"loop {fw}") for fw in wanted}, {}, {}


def _pair_line(fw: str, entry: dict[str, Any]) -> str:
    """One framework's side-by-side outcome on one line."""
    if entry.get("status") != "compared":
        return f"{fw} side by side: {entry.get('status')}: {entry.get('reason')}"
    h, lo, diff = entry["harness_tokens_per_s"], entry["loop_tokens_per_s"], entry["difference_pct"]
    spread = "/".join("—" if x is None else f"{x:.1f} %" for x in (entry["harness_spread_pct"],
                                                                    entry["loop_spread_pct"]))
    return (f"{fw} side by side ({entry['rounds']} rounds): harness {h:,.0f} tokens/s, hand loop {lo:,.0f} tokens/s, "
            f"{diff:+.1f} % -> {entry['verdict']} (spread harness/loop {spread})")


def _line(fw: str, entry: dict[str, Any]) -> str:
    """One framework's outcome on one line."""
    if entry.get("status") != "compared":
        return f"{fw}: {entry.get('status')}: {entry.get('reason')}"
    h, lo, diff = entry["harness"]["tokens_per_s"], entry["loop"]["tokens_per_s"], entry["difference_pct"]
    if diff is None:
        return f"{fw}: no tokens/s to compare (harness {h}, hand loop {lo})"
    text = f"{fw}: harness {h:,.0f} tokens/s, hand loop {lo:,.0f} tokens/s, {diff:+.1f} % -> {entry['verdict']}"
    return text + ("" if entry["verdict"] == "agrees" else f" ({cause(entry)})")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    wanted = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    try:
        sc = load_scenario(args.scenario)
        bad = [f for f in wanted if f not in FRAMEWORKS]
        if bad or not wanted:
            raise ValueError(unknown("hand loop", bad[0] if bad else "", FRAMEWORKS))
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps {args.steps}: at least 1")
        if args.side_by_side < 0:
            raise ValueError(f"--side-by-side {args.side_by_side}: a number of rounds, 0 or more")
        if args.side_by_side and (args.steps or args.set):
            raise ValueError("--side-by-side runs the harness at the scenario's settings: the loops too (no --steps, "
                             "no --set)")
        missing = [fw for fw in wanted if fw not in sc.framework_names()] if args.side_by_side else []
        if missing:
            raise ValueError(f"--side-by-side: the scenario has no row {missing[0]!r} for the harness to run "
                             f"(its rows: {', '.join(sc.framework_names())})")
        parse_knobs(args.set)
        if args.out is not None and (args.out.is_dir() or output_dir_problems(out=args.out.parent)):
            raise ValueError(f"--out {args.out}: not a file that can be written")
        sweep = load_sweep(args.against) if args.against else None
    except (ScenarioError, ValueError, NotAResultsDir, OSError) as e:
        print(f"selfcheck: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for u in sweep.unreadable if sweep is not None else []:
        print(f"warning: skipped {u}", file=sys.stderr)
    progress = Progress(*work_file(args, sc, wanted, sweep))
    units = len(wanted) * (args.side_by_side or 1)
    if progress.done:
        print(f"selfcheck: resuming {progress.path} ({len(progress.done)} of {units} measurements done)")
    try:
        with machine_lock(machine_lock_dir(), Path(f"selfcheck {args.scenario}")):
            loops, pairs, paired = measure(args, sc, wanted, progress)
    except Busy as e:
        print(f"selfcheck: another sweep is running on this machine ({e}): a check now would measure its load",
              file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt:
        kept = f"kept in {progress.path}" if progress.path else "not kept (no --against, no --out)"
        print(f"\nselfcheck interrupted: {len(progress.done)} of {units} measurements finished, {kept}; rerun the "
              "same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"selfcheck: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    check: dict[str, Any] = {"selfcheck_version": SELFCHECK_VERSION, "scenario": sc.name,
                             "scenario_source": str(args.scenario), "created": datetime.now(UTC).isoformat(),
                             "agree_within_pct": AGREE_PCT, "knobs": list(args.set), "loops": loops}
    if pairs:
        check |= {"side_by_side_rounds": args.side_by_side, "pairs": pairs, "side_by_side": paired}
    if sweep is not None:
        check |= {"sweep": sweep.path.name, "frameworks": compare(sweep, loops)}
    try:
        if sweep is not None:
            stored = next_selfcheck_path(sweep.path)
            write_json_once(stored, check)
            print(f"selfcheck: {stored}")
        if args.out:
            atomic_write_text(args.out, json.dumps(check, indent=1, default=str))
        progress.finish()
    except OSError as e:
        print(f"selfcheck: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    entries = check.get("frameworks") or {fw: {"status": loop.get("status"), "reason": loop.get("reason")}
                                          for fw, loop in loops.items() if loop.get("status") != "ok"}
    for fw, entry in entries.items():
        print(_line(fw, entry))
    for fw, entry in paired.items():
        print(_pair_line(fw, entry))
    if sweep is None:
        for fw, loop in loops.items():
            if loop.get("status") == "ok":
                print(f"{fw}: hand loop {loop['tokens_per_s']:,.0f} tokens/s, step {loop['step_s_median']:.4f} s "
                      "(median)")
    failed = any(loop.get("status") == "error" for loop in loops.values())
    # with pairs, the side-by-side comparison is the verdict (the stored sweep may come from another lease)
    verdicts = paired if paired else (check.get("frameworks") or {})
    differs = any(e.get("verdict") == "differs" or e.get("status") == "no pair ran" for e in verdicts.values())
    return EXIT_DIFFERS if failed or differs else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
