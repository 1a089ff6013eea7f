"""Command line: ``python -m harness <command> ...``.

Examples::

    python -m harness run scenarios/tiny_cpu.yaml            # run every framework, write results + report
    python -m harness run scenarios/llama8b_lora.yaml --only hf --new
    python -m harness validate scenarios/*.yaml               # check scenario files, run nothing
    python -m harness list                                    # adapters (and why unavailable), scenarios
    python -m harness report results/<run-id>                 # tables + charts again from stored results
    python -m harness compare results/<old> results/<new>     # regression gate: exit 1 on regression
    python -m harness calibrate                               # measure the GPU's bf16 matmul peak
    python -m harness env list|check|create|pack|install ...  # per-framework environments
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.common.paths import REPO_ROOT

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the sweep, or the machine, is being measured by another runner


def _cmd_run(args) -> int:
    from harness.analysis import runs_table
    from harness.reporting.report import write_report
    from harness.running.locks import Busy
    from harness.running.runner import run_sweep
    from harness.spec.scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug in validation: name the file and exit 2 rather than print a traceback
        print(f"{args.scenario}: internal error while validating: {type(e).__name__}: {e}", file=sys.stderr)
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
    if args.repeats:
        sc.measure.repeats = args.repeats
    try:
        out = run_sweep(sc, Path(args.results), new=args.new, quiet=args.quiet, only=args.only,
                        resume_only=args.resume, retry_failed=args.retry_failed,
                        allow_contention=args.allow_contention)
        runs_table.write_table(out)  # the runs table again, now with the parity columns
        print(f"results: {out}")
        if not args.no_report:
            report_dir = Path(args.reports) / out.name
            write_report(out, report_dir)
            print(f"report:  {report_dir / 'report.md'}")
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are stored; rerun the same command to resume", file=sys.stderr)
        return 130
    except Busy as e:
        print(f"{args.scenario}: {e}", file=sys.stderr)
        return EXIT_BUSY
    except OSError as e:  # a read-only results/reports folder or cache, a full disk
        print(f"{args.scenario}: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _cmd_validate(args) -> int:
    from harness.spec.scenario import ScenarioError, load_scenario

    bad = 0
    for f in args.files:
        try:
            sc = load_scenario(f)
        except ScenarioError as e:
            print(e, file=sys.stderr)
            bad += 1
            continue
        except Exception as e:  # a bug in validation: report it for this file and go on with the others
            print(f"{f}: internal error while validating: {type(e).__name__}: {e}", file=sys.stderr)
            bad += 1
            continue
        print(f"{f}: ok ({sc.name}: {sc.model.preset or sc.model.weights}, {sc.method.kind}, "
              f"frameworks {', '.join(sc.framework_names())})")
        for note in sc.notes:
            print(f"  {note}")
    return EXIT_BAD_INPUT if bad else 0


def _cmd_list(args) -> int:
    from adapters_for_tools import registry
    from harness.running import envs
    from harness.spec.scenario import ScenarioError, load_scenario

    print("frameworks:")
    for name in registry.names():
        info = registry.info(name)
        why = envs.unavailable(info)
        cuda_note = "" if why else ("" if "cpu" in info.devices else " (CUDA only)")
        state = f"unavailable: {why}" if why else "available" + cuda_note
        print(f"  {name:13s} {state}")
        print(f"  {'':13s} {info.description}; methods {', '.join(sorted(info.methods))}; env {info.env}")
    print("scenarios:")
    for p in sorted((REPO_ROOT / "scenarios").glob("*.yaml")):
        try:
            sc = load_scenario(p)
            print(f"  {p.relative_to(REPO_ROOT)}: {sc.model.preset or sc.model.weights} {sc.method.kind} "
                  f"on {sc.hardware.device}, frameworks {', '.join(sc.framework_names())}")
        except ScenarioError as e:
            print(f"  {p.relative_to(REPO_ROOT)}: INVALID: {e.problems[0]}")
    return 0


def _cmd_report(args) -> int:
    from harness.cli import report as report_cli

    return report_cli.main([args.results_dir] + (["--out", args.out] if args.out else []))


def _cmd_compare(args, rest: list[str]) -> int:
    from harness.cli import compare as compare_cli

    return compare_cli.main(rest)


def _cmd_calibrate(args) -> int:
    from harness.measuring import calibrate

    return calibrate.main(args)


def _cmd_env(args, rest: list[str]) -> int:
    from harness.cli import env as env_cli

    return env_cli.main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario through its frameworks",
                       description="Run every (framework x repeat) of a scenario, each in its own process; "
                                   "resume an interrupted sweep of the same scenario. Example: "
                                   "python -m harness run scenarios/tiny_cpu.yaml")
    r.add_argument("scenario")
    r.add_argument("--results", default=str(REPO_ROOT / "results"), help="results root (default: results/)")
    r.add_argument("--reports", default=str(REPO_ROOT / "reports"), help="reports root (default: reports/)")
    r.add_argument("--new", action="store_true", help="start a new sweep even if an interrupted one exists")
    r.add_argument("--resume", action="store_true",
                   help="only fill in the newest sweep of this scenario (never start a new one); "
                        "for filling one sweep over several invocations with --only/--repeats")
    r.add_argument("--only", nargs="+", metavar="FRAMEWORK", help="run only these of the scenario's frameworks")
    r.add_argument("--repeats", type=int, help="override measure.repeats")
    r.add_argument("--allow-contention", action="store_true",
                   help="run even while another sweep runs on this machine (exit 3 otherwise); every row of this "
                        "sweep is then marked invalid: measured under contention")
    r.add_argument("--retry-failed", action="store_true",
                   help="in the newest sweep of this scenario, do runs stored as error/crashed/timeout again "
                        "(for failures of the machine, e.g. a full disk); the failed attempt is kept in "
                        "runs/attempts/ and listed in the new row")
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--quiet", action="store_true")
    v = sub.add_parser("validate", help="check scenario files without running",
                       description="Example: python -m harness validate scenarios/*.yaml")
    v.add_argument("files", nargs="+")
    sub.add_parser("list", help="adapters (and why any is unavailable) and shipped scenarios")
    rp = sub.add_parser("report", help="write report.md/report.html/charts from stored results",
                        description="Example: python -m harness report results/tiny_cpu-20261123-120000")
    rp.add_argument("results_dir")
    rp.add_argument("--out")
    sub.add_parser("compare", help="regression verdict between two result sets (exit 1 on regression)",
                   add_help=False)
    c = sub.add_parser("calibrate", help="measure the GPU's bf16 dense matmul peak (TFLOP/s)")
    c.add_argument("--size", type=int, default=8192)
    c.add_argument("--out", help="write the measurement as JSON here")
    sub.add_parser("env", help="per-framework environments: list, check, create, pack, install", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("compare", "env"):  # these parse their own arguments
        return {"compare": _cmd_compare, "env": _cmd_env}[argv[0]](None, argv[1:])
    args = build_parser().parse_args(argv)
    return {"run": _cmd_run, "validate": _cmd_validate, "list": _cmd_list, "report": _cmd_report,
            "calibrate": _cmd_calibrate}[args.cmd](args)
