"""``python -m harness nightly SUITE.yaml``: run a suite, add it to the history, judge tonight against the past.

Each scenario of the suite runs as ``run`` would (an interrupted sweep resumes), with its results in results/
and its report in reports/; every run is appended to the history database; then every (scenario, framework,
metric) the suite gates is judged against the rolling median of the last N comparable nights, with a noise band
taken from those nights (:mod:`harness.analysis.trend`). ``verdict.md`` (for a CI job to post) and ``trend.html``
are written to ``reports/nightly-<suite>/``. Exit codes:

- 0: no regression;
- 1: a regression (the verdict names scenario, framework and metric);
- 2: bad input (the suite or a scenario file, a framework none of the scenarios has, an unwritable folder);
- 3: inconclusive: no history yet or fewer comparable nights than ``min_nights``, nothing judged, or the
  machine is being measured by another runner.

Examples::

    python -m harness nightly scenarios/suites/nightly_cpu.yaml
    python -m harness nightly SUITE.yaml --tonight results/tiny_cpu-20261203-020000   # judge stored sweeps only
    python -m harness nightly SUITE.yaml --cluster slurm --partition gpu   # each run a Slurm job (submitit)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb

from harness.analysis.trend import exit_code, judge
from harness.cli import cluster_options
from harness.cli.guard import EXIT_BAD_INPUT, guarded, output_dir_problems
from harness.cli.run import run_and_report
from harness.cli.validate import load_or_report
from harness.common.paths import REPO_ROOT
from harness.reporting.trend import verdict_markdown, write_trend
from harness.running import evaluator
from harness.running.cluster import ClusterLauncher
from harness.spec.suite import Suite, SuiteError, load_suite
from harness.spec.yamlsafe import line_of
from harness.storing import history
from harness.storing.sweep import NotAResultsDir


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness nightly --help``)."""
    ap = argparse.ArgumentParser(prog="python -m harness nightly", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", type=Path, help="suite YAML file (scenarios/suites/*.yaml)")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="results root (default: results/)")
    ap.add_argument("--reports", type=Path, default=REPO_ROOT / "reports", help="reports root (default: reports/)")
    ap.add_argument("--db", type=Path, default=None, help="history database (default: <results>/.cache/history.duckdb)")
    ap.add_argument("--tonight", type=Path, nargs="+", metavar="SWEEP_DIR",
                    help="judge these stored sweeps as tonight instead of running the suite")
    ap.add_argument("--quiet", action="store_true")
    cluster_options.add_arguments(ap)
    return ap


def _run_suite(suite: Suite, args, launcher: ClusterLauncher | None) -> list[Path] | int:
    """Run every scenario of the suite; the sweep directories, or an exit code when it cannot start."""
    scenarios = []
    for path in suite.scenario_paths():
        sc = load_or_report(str(path))
        if sc is None:
            return EXIT_BAD_INPUT
        only = [f for f in sc.framework_names() if f in suite.frameworks] if suite.frameworks else None
        if suite.frameworks and not only:
            print(f"{suite.source_path}:{line_of(suite._lines, ('frameworks',))}: frameworks: none of "
                  f"{suite.frameworks} is a row of {path} ({', '.join(sc.framework_names())})", file=sys.stderr)
            return EXIT_BAD_INPUT
        if suite.repeats is not None:
            sc.measure.repeats = suite.repeats
        scenarios.append((sc, only))
    if unknown := suite.framework_problems([f for sc, _ in scenarios for f in sc.framework_names()]):
        print("\n".join(unknown), file=sys.stderr)
        return EXIT_BAD_INPUT
    if launcher is None or launcher.measures_here:  # a missing evaluator stops the night before its first run
        for sc, _ in scenarios:
            evaluator.check(sc)
    return [run_and_report(sc, args.results, args.reports, quiet=args.quiet, only=only, launcher=launcher)
            for sc, only in scenarios]


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 regression, 2 bad input, 3 inconclusive)."""
    args = build_parser().parse_args(argv)
    try:
        suite = load_suite(args.suite)
    except SuiteError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        launcher = cluster_options.launcher_from(args, suite.cluster)
    except cluster_options.ClusterOptionsError as e:
        print(f"{args.suite}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    db = args.db or history.default_db(args.results)
    problems = output_dir_problems(results=None if args.tonight else args.results, reports=args.reports)
    if why := history.db_problem(db):
        problems.append(f"--db {db}: {why}")
    if problems:  # found before a night of runs, not after it
        print("\n".join(f"{args.suite}: {p}" for p in problems), file=sys.stderr)
        return EXIT_BAD_INPUT

    def body() -> int:
        sweeps = args.tonight if args.tonight else _run_suite(suite, args, launcher)
        if isinstance(sweeps, int):
            return sweeps
        for d in sweeps:
            history.append(db, d)
        rows = history.query(db)
        tonight = {Path(d).name for d in sweeps}
        judgements = judge(rows, tonight, suite.gate, suite.reference_nights, suite.min_nights, suite.noise_k)
        code = exit_code(judgements)
        out_dir = args.reports / f"nightly-{suite.name}"
        trend = out_dir / "trend.html"
        # the path as the caller gave it (relative to where the command ran), so a posted verdict names no host paths
        shown = trend.relative_to(Path.cwd()) if trend.is_relative_to(Path.cwd()) else trend
        md = verdict_markdown(suite.name, judgements, code, shown)
        scenarios = {r["scenario"] for r in rows if r["sweep_id"] in tonight}
        write_trend(out_dir, [r for r in rows if r["scenario"] in scenarios], suite.gate, suite.reference_nights,
                    suite.min_nights, suite.noise_k, f"Nightly {suite.name}", md)
        print(md, end="")
        print(f"verdict: {out_dir / 'verdict.md'}\ntrend:   {out_dir / 'trend.html'}")
        return code

    try:
        return guarded(str(args.suite), "runs", body)  # a busy machine: exit 3, as an inconclusive night
    except NotAResultsDir as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except duckdb.Error as e:  # the history database cannot be opened or written (held by another process, damaged)
        print(f"error: {db}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
