"""``python -m harness run SCENARIO``: every (framework x repeat) of a scenario, each in its own process.

An interrupted sweep of the same scenario resumes: finished runs are kept, only missing ones run.
Exit codes: 0 done (failed runs are rows, not errors), 2 bad input or an unwritable folder, 3 the sweep or the
machine is being measured by another runner, 130 interrupted.

Examples::

    python -m harness run scenarios/tiny_cpu.yaml
    python -m harness run scenarios/llama8b_lora.yaml --only hf tunebench --repeats 3
    python -m harness run scenarios/llama8b_lora.yaml --retry-failed
    python -m harness run scenarios/llama8b_lora_ddp.yaml --gpus 4   # the 2-GPU scenario on 4 GPUs
    python -m harness run scenarios/llama8b_lora.yaml --cluster slurm --partition gpu   # each run a Slurm job
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.analysis import runs_table
from harness.cli import cluster_options
from harness.cli.guard import EXIT_BAD_INPUT, guarded, output_dir_problems
from harness.cli.validate import load_or_report
from harness.common.paths import REPO_ROOT
from harness.reporting.report import write_report
from harness.running.derive import derive
from harness.running.runner import run_sweep
from harness.spec.scenario import Scenario, ScenarioError


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness run --help``)."""
    r = argparse.ArgumentParser(prog="python -m harness run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("scenario")
    r.add_argument("--results", default=str(REPO_ROOT / "results"), help="results root (default: results/)")
    r.add_argument("--reports", default=str(REPO_ROOT / "reports"), help="reports root (default: reports/)")
    r.add_argument("--new", action="store_true", help="start a new sweep even if an interrupted one exists")
    r.add_argument("--resume", action="store_true",
                   help="only fill in the newest sweep of this scenario (never start a new one); "
                        "for filling one sweep over several invocations with --only/--repeats")
    r.add_argument("--only", nargs="+", metavar="FRAMEWORK", help="run only these of the scenario's frameworks")
    r.add_argument("--repeats", type=int, help="override measure.repeats")
    r.add_argument("--memory-budget-gib", type=float, metavar="GIB",
                   help="set hardware.memory_budget_gib: every run capped to this much GPU memory")
    r.add_argument("--gpus", type=int, metavar="N",
                   help="set hardware.gpus: N GPUs with the scenario's strategy, or 1 for the same settings on one "
                        "GPU (the reference of the report's scaling table)")
    r.add_argument("--allow-contention", action="store_true",
                   help="run even while another sweep runs on this machine (exit 3 otherwise); every row of this "
                        "sweep is then marked invalid: measured under contention")
    r.add_argument("--retry-failed", action="store_true",
                   help="in the newest sweep of this scenario, do runs stored as error/crashed/timeout/unavailable, or "
                        "whose evaluation ended in an error, again (for failures of the machine, e.g. a full "
                        "disk or a missing lm-eval); the failed attempt is kept in "
                        "runs/attempts/ and listed in the new row")
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--quiet", action="store_true")
    cluster_options.add_arguments(r)
    return r


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.new and (args.resume or args.retry_failed):  # a new sweep has nothing to fill in or retry
        print(f"{args.scenario}: --new starts a new sweep; --resume and --retry-failed work on the newest one: give "
              "one or the other", file=sys.stderr)
        return EXIT_BAD_INPUT
    sc = load_or_report(args.scenario)
    if sc is None:
        return EXIT_BAD_INPUT
    if bad_dirs := output_dir_problems(results=args.results, reports=None if args.no_report else args.reports):
        print("\n".join(f"{args.scenario}: {b}" for b in bad_dirs), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.memory_budget_gib is not None:
        try:
            sc = derive(sc, hardware={"memory_budget_gib": args.memory_budget_gib})
        except ScenarioError as e:
            print(f"--memory-budget-gib: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.gpus is not None:
        try:  # one GPU drops the strategy: a one-GPU run of the same settings
            sc = derive(sc, hardware={"gpus": args.gpus} | ({"strategy": None} if args.gpus == 1 else {}))
        except ScenarioError as e:
            print(f"--gpus: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if not args.quiet:
        for note in sc.notes:
            print(f"{args.scenario}: {note}")
    if args.only:
        unknown = [n for n in args.only if n not in sc.framework_names()]
        if unknown:
            print(f"{args.scenario}: --only {unknown}: not among the scenario's frameworks "
                  f"{sc.framework_names()}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.repeats is not None:
        if not 1 <= args.repeats <= 1000:
            print(f"{args.scenario}: --repeats {args.repeats}: must be between 1 and 1000", file=sys.stderr)
            return EXIT_BAD_INPUT
        sc.measure.repeats = args.repeats
    try:
        launcher = cluster_options.launcher_from(args)
    except cluster_options.ClusterOptionsError as e:
        print(f"{args.scenario}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def body() -> int:
        run_and_report(sc, Path(args.results), None if args.no_report else Path(args.reports), new=args.new,
                       quiet=args.quiet, only=args.only, resume_only=args.resume, retry_failed=args.retry_failed,
                       allow_contention=args.allow_contention, launcher=launcher)
        return 0

    return guarded(args.scenario, "runs", body)


def run_and_report(sc: Scenario, results: Path, reports: Path | None, **sweep_options: Any) -> Path:
    """Run (or resume) the sweep of ``sc``, then its runs table with parity columns and, unless ``reports`` is
    None, its report; returns the sweep's results directory. ``sweep_options``: those of ``run_sweep``."""
    out = run_sweep(sc, results, **sweep_options)
    runs_table.write_table(out)  # the runner's table again, now with the parity columns
    print(f"results: {out}")
    if reports is not None:
        write_report(out, reports / out.name)
        print(f"report:  {reports / out.name / 'report.md'}")
    return out
