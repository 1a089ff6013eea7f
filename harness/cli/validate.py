"""``python -m harness validate FILE...``: check scenario files, run nothing.

Every file is checked and reported, good or bad: `file:line: key: reason` for each problem, notes (rows cut at
seq_len, say) for a file that can run. A nightly suite file (a mapping with ``scenarios:``) is checked as a suite,
and each scenario it names as a scenario. Exit codes: 0 all valid, 2 any invalid.

Example::

    python -m harness validate scenarios/*.yaml scenarios/suites/*.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.spec import yamlsafe
from harness.spec.scenario import Scenario, ScenarioError, load_scenario
from harness.spec.suite import SuiteError, load_suite

EXIT_BAD_INPUT = 2


def load_or_report(path: str) -> Scenario | None:
    """The validated scenario at ``path``, or None after printing why it is not one (to stderr)."""
    try:
        return load_scenario(path)
    except ScenarioError as e:
        print(e, file=sys.stderr)
    except Exception as e:  # a bug in validation: name the file and go on, never a traceback
        print(f"{path}: internal error while validating: {type(e).__name__}: {e}", file=sys.stderr)
    return None


def is_suite(path: str) -> bool:
    """The file reads as a YAML mapping with a ``scenarios`` key (a suite); anything else is checked as a scenario."""
    try:
        raw, _ = yamlsafe.load(yamlsafe.read_text(Path(path)))
    except (OSError, yamlsafe.YamlError):
        return False
    return isinstance(raw, dict) and "scenarios" in raw and "model" not in raw


def check_suite(path: str) -> int:
    """Validate a suite file and the scenarios it names; returns how many of those files are bad."""
    try:
        suite = load_suite(path)
    except SuiteError as e:
        print(e, file=sys.stderr)
        return 1
    scenarios = [load_or_report(str(p)) for p in suite.scenario_paths()]
    bad = sum(sc is None for sc in scenarios)
    if not bad and (unknown := suite.framework_problems([f for sc in scenarios if sc for f in sc.framework_names()])):
        print("\n".join(unknown), file=sys.stderr)
        return 1
    if not bad:
        print(f"{path}: ok (suite {suite.name}: {', '.join(sc.name for sc in scenarios if sc)})")
    return bad


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m harness validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    bad = 0
    for f in args.files:
        if is_suite(f):
            bad += check_suite(f)
            continue
        sc = load_or_report(f)
        if sc is None:
            bad += 1
            continue
        print(f"{f}: ok ({sc.name}: {sc.model.preset or sc.model.weights}, {sc.method.kind}, "
              f"frameworks {', '.join(sc.framework_names())})")
        for note in sc.notes:
            print(f"  {note}")
    return EXIT_BAD_INPUT if bad else 0
