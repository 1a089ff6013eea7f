"""``python -m harness matrix``: which framework trains which model family, measured.

Each family's tiny test model goes through every framework x method for a few steps (harness.running.matrix):
every cell is an ordinary stored run under ``results/support-matrix-<device>-<time>/``, and the report (ok, the
tool's own error, or why a framework cannot run it; loss falling; the library versions) is written to
``reports/<that folder's name>/report.md`` and ``report.html``, with ``matrix.csv`` beside the results. Rerunning
the same command resumes: finished cells are kept, only missing ones run (``--retry-failed`` redoes error, crashed,
timeout and unavailable cells, ``--retry-invalid`` invalid ones). Exit codes: 0 done (failed cells are cells, not
errors), 2 bad input, 3 another sweep holds the machine, 130 interrupted.

Examples::

    python -m harness matrix --device cuda                         # every family x framework x method on the GPU
    python -m harness matrix --device cpu --frameworks hf,trl --methods lora,full   # what runs on a CPU (CI)
    python -m harness matrix --families gemma2,phi3 --frameworks hf,unsloth --methods qlora
    python -m harness matrix --device cuda --only unsloth --time-limit-s 480   # fill it a framework at a time
    python -m harness matrix --device cuda --jobs 8                 # eight rows at once: support, not speed
    python -m harness matrix --report-from results/support-matrix-cuda-20261202-101500   # the report again
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness.analysis.matrix import write_matrix_table
from harness.cli.guard import EXIT_BAD_INPUT, failure_text, guarded, output_dir_problems
from harness.common.paths import REPO_ROOT
from harness.inputs.models import FAMILIES
from harness.reporting.matrix import write_matrix_report
from harness.running.matrix import METHODS, MatrixError, default_frameworks, open_matrix, plan_matrix, run_matrix

MAX_JOBS = 256  # rows at once: beyond this the tiny models' runs only wait for the CPU


def _names(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: names separated by commas, e.g. lora,full")
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness matrix --help``)."""
    p = argparse.ArgumentParser(prog="python -m harness matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=_names, help=f"model families, comma-separated (default: all: "
                                                   f"{','.join(FAMILIES)})")
    p.add_argument("--frameworks", type=_names, help="frameworks, comma-separated (default: every adapter but the "
                                                     "dummy test double)")
    p.add_argument("--methods", type=_names, default=list(METHODS), help="methods, comma-separated (default: "
                                                                         f"{','.join(METHODS)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where every cell trains (default: cuda)")
    p.add_argument("--results", default=str(REPO_ROOT / "results"), help="results root (default: results/)")
    p.add_argument("--reports", default=str(REPO_ROOT / "reports"), help="reports root (default: reports/)")
    p.add_argument("--new", action="store_true", help="start a new matrix folder even if one of this plan exists")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo cells stored as error/crashed/timeout/unavailable (the failed attempt is kept)")
    p.add_argument("--retry-invalid", action="store_true",
                   help="redo cells stored as invalid, e.g. after a fix of the check that judged them (the attempt "
                        "is kept)")
    p.add_argument("--only", type=_names, metavar="FRAMEWORKS",
                   help="run the cells of these frameworks now (comma-separated); the matrix stays the one of "
                        "--frameworks, so later invocations with other --only values fill the same folder")
    p.add_argument("--time-limit-s", type=float, metavar="S",
                   help="start no further scenario after S seconds; rerun the same command to go on")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N rows (scenarios) at once on this machine (default 1): for a matrix of tiny models, "
                        "whose cells ask whether a tool trains a family, not how fast; the runs are then marked as "
                        "measured under contention")
    p.add_argument("--report-from", metavar="FOLDER",
                   help="run nothing: write the report of this matrix folder again from its stored runs")
    p.add_argument("--quiet", action="store_true")
    return p


def _write_outputs(folder: Path, reports: Path) -> None:
    csv_path = write_matrix_table(folder)
    md = write_matrix_report(folder, reports / folder.name)
    print(f"results: {folder} ({csv_path.name})\nreport:  {md}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if bad_dirs := output_dir_problems(results=None if args.report_from else args.results, reports=args.reports):
        print("\n".join(f"matrix: {b}" for b in bad_dirs), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.report_from:
        folder = Path(args.report_from)
        try:
            _write_outputs(folder, Path(args.reports))
        except MatrixError as e:
            print(e, file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as e:  # the report cannot be written, a stored matrix of a shape nothing here foresaw
            print(f"matrix: {failure_text(e, f'{folder}: cannot report on what it stores', args.reports)}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    if not 1 <= args.jobs <= MAX_JOBS:
        print(f"matrix: --jobs {args.jobs}: between 1 and {MAX_JOBS}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.time_limit_s is not None and not (math.isfinite(args.time_limit_s) and args.time_limit_s > 0):
        print(f"matrix: --time-limit-s {args.time_limit_s}: a number of seconds > 0", file=sys.stderr)
        return EXIT_BAD_INPUT
    frameworks = args.frameworks or default_frameworks()
    try:
        plan = plan_matrix(args.families, frameworks, args.methods, args.device)
        if unknown := [f for f in args.only or [] if f not in frameworks]:
            raise MatrixError(f"--only {unknown}: not among the matrix's frameworks {frameworks}")
    except MatrixError as e:
        print(f"matrix: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def show(name: str, statuses: dict[str, str]) -> None:
        if not args.quiet:
            print(f"{name}: " + ", ".join(f"{fw} {st}" for fw, st in statuses.items()))

    def body() -> int:
        folder = open_matrix(plan, Path(args.results), new=args.new)
        started = run_matrix(folder, retry_failed=args.retry_failed, quiet=args.quiet, only=args.only,
                             time_limit_s=args.time_limit_s, on_row=show, jobs=args.jobs,
                             retry_invalid=args.retry_invalid)
        print(f"{len(plan.cells)} cells, {len(plan.scenarios)} scenarios ({started} runs now)")
        _write_outputs(folder, Path(args.reports))
        return 0

    return guarded("matrix", "cells", body)
