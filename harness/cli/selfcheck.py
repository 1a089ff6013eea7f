"""``python -m harness selfcheck SCENARIO``: the harness's figures against plain hand-written loops.

Runs the scenario's training in a plain loop per framework (:mod:`harness.measuring.handloop`: hf + PEFT with each
HF Trainer setting spelled out, the tunebench trainer library called directly, Unsloth's model), each in a fresh
process in its framework's environment, as the runner runs workers. With ``--against results/<sweep>`` it puts
each loop beside the sweep's stored figure for that framework (the report's median over ok repeats), the difference
in percent and the settings that differ (:mod:`harness.analysis.handloop`), and stores the whole check in the
sweep as ``selfcheck.json`` (a later check: ``selfcheck-2.json``, ...; never overwritten). The sweep's report
shows it under "Harness vs hand loop". Run it on the machine that ran the sweep, with nothing else on the GPU
(it takes the machine lock a sweep takes).

Exit codes: 0 every compared framework agrees within 3 % (or nothing to compare), 1 a framework differs by more,
or a loop failed, 2 bad input (scenario, framework name, results directory, knob), 3 another sweep holds the
machine.

Examples::

    python -m harness selfcheck scenarios/smoke_gpu.yaml --against results/smoke_gpu-20261201-231555
    python -m harness selfcheck scenarios/llama8b_lora.yaml --frameworks hf --against results/<run-id> --out hf.json
    python -m harness selfcheck scenarios/smoke_gpu.yaml --frameworks hf --set attention_mask=false   # bisect
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_for_tools import registry
from harness.analysis.handloop import AGREE_PCT, cause, compare, next_selfcheck_path
from harness.common.names import unknown
from harness.measuring.handloop import FRAMEWORKS
from harness.measuring.handloop.knobs import parse_knobs
from harness.running import envs
from harness.running.locks import Busy, machine_lock
from harness.running.runner import machine_lock_dir, worker_environment
from harness.spec.scenario import ScenarioError, load_scenario
from harness.storing.results import atomic_write_text, read_json, write_json_once
from harness.storing.sweep import NotAResultsDir, load_sweep

EXIT_OK, EXIT_DIFFERS, EXIT_BAD_INPUT, EXIT_BUSY = 0, 1, 2, 3
SELFCHECK_VERSION = 1


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
        res = read_json(out)
    if res is None:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"framework": framework, "status": "error", "reason": f"the loop wrote no result: {last[0][:500]}"}
    return res


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
        parse_knobs(args.set)
        sweep = load_sweep(args.against) if args.against else None
    except (ScenarioError, ValueError, NotAResultsDir, OSError) as e:
        print(f"selfcheck: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with machine_lock(machine_lock_dir(), Path(f"selfcheck {args.scenario}")):
            loops = {fw: run_loop(fw, Path(args.scenario), sc, args.steps, args.set) for fw in wanted}
    except Busy as e:
        print(f"selfcheck: another sweep is running on this machine ({e}): a check now would measure its load",
              file=sys.stderr)
        return EXIT_BUSY
    check: dict[str, Any] = {"selfcheck_version": SELFCHECK_VERSION, "scenario": sc.name,
                             "scenario_source": str(args.scenario), "created": datetime.now(UTC).isoformat(),
                             "agree_within_pct": AGREE_PCT, "knobs": list(args.set), "loops": loops}
    if sweep is not None:
        check |= {"sweep": sweep.path.name, "frameworks": compare(sweep, loops)}
    try:
        if sweep is not None:
            stored = next_selfcheck_path(sweep.path)
            write_json_once(stored, check)
            print(f"selfcheck: {stored}")
        if args.out:
            atomic_write_text(args.out, json.dumps(check, indent=1, default=str))
    except OSError as e:
        print(f"selfcheck: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    entries = check.get("frameworks") or {fw: {"status": loop.get("status"), "reason": loop.get("reason")}
                                          for fw, loop in loops.items() if loop.get("status") != "ok"}
    for fw, entry in entries.items():
        print(_line(fw, entry))
    if sweep is None:
        for fw, loop in loops.items():
            if loop.get("status") == "ok":
                print(f"{fw}: hand loop {loop['tokens_per_s']:,.0f} tokens/s, step {loop['step_s_median']:.4f} s "
                      "(median)")
    failed = any(loop.get("status") == "error" for loop in loops.values())
    differs = any(e.get("verdict") == "differs" for e in (check.get("frameworks") or {}).values())
    return EXIT_DIFFERS if failed or differs else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
