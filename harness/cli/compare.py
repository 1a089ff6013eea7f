"""``python -m harness compare BASELINE CANDIDATE``: the regression gate between two stored sweeps.

The rules (what is compared, thresholds, settings that differ) are in :mod:`harness.analysis.compare`, the noise
model in :mod:`harness.analysis.noise`. Exit codes:

- 0: no regression, every compared row decided;
- 1: something regressed;
- 2: bad input (not a results directory, no readable run stored, no scenario in common, a negative threshold,
  anything unexpected while reading a sweep, or settings that differ under ``--require-same-settings``);
- 3: inconclusive: no regression found, but the data cannot decide some row (a noise band wider than the
  threshold, too few measured steps, a metric measured on one side only) or nothing was compared.

A stored file that cannot be read is left out with a warning line on stderr naming it; the rest is compared.

Examples::

    python -m harness compare results/nightly-20261122-020000 results/nightly-20261123-020000
    python -m harness compare OLD NEW --tokens-drop 0.03 --memory-rise 0.02 --json compare.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from harness.analysis.compare import (
    NOT_COMPARABLE,
    VERDICT_INCONCLUSIVE,
    VERDICT_REGRESSED,
    compare,
    load_pair,
    overall_verdict,
    render,
)
from harness.analysis.noise import describe
from harness.cli.guard import failure_text
from harness.storing.sweep import NotAResultsDir

EXIT_OK, EXIT_REGRESSED, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE = 0, 1, 2, 3
EXIT_CODES = {VERDICT_REGRESSED: EXIT_REGRESSED, VERDICT_INCONCLUSIVE: EXIT_INCONCLUSIVE}


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness compare --help``)."""
    ap = argparse.ArgumentParser(
        prog="python -m harness compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Regression gate between two stored sweeps.",
        epilog="exit codes:\n"
               "  0  no regression (every compared row decided)\n"
               "  1  regression\n"
               "  2  bad input (not a results directory, no readable run, no scenario in common, a bad option,\n"
               "     an unexpected error reading a sweep; settings differ under --require-same-settings)\n"
               "  3  inconclusive: no regression found, but the noise band of some row is wider than its\n"
               "     threshold, a run measured too few steps, a metric was measured on one side only, or no\n"
               "     framework had ok runs on both sides (more repeats make the band narrower)\n\n"
               "examples:\n"
               "  python -m harness compare results/nightly-20261122-020000 results/nightly-20261123-020000\n"
               "  python -m harness compare OLD NEW --tokens-drop 0.03 --memory-rise 0.02 --json compare.json")
    ap.add_argument("baseline", type=Path, help="results directory of the reference sweep")
    ap.add_argument("candidate", type=Path, help="results directory of the sweep under test")
    ap.add_argument("--tokens-drop", type=float, default=0.05, help="relative tokens/s drop tolerated (0.05 = 5%%)")
    ap.add_argument("--memory-rise", type=float, default=0.05, help="relative peak-memory rise tolerated")
    ap.add_argument("--loss-rise", type=float, default=None,
                    help="relative final-loss rise tolerated (default: final loss is information only)")
    ap.add_argument("--noise-k", type=float, default=2.0,
                    help="noise band = k standard uncertainties of the change (default 2, about 95%%)")
    ap.add_argument("--require-same-settings", action="store_true",
                    help="exit 2 when a scenario's settings (hash) differ between the two sweeps")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the verdict as JSON here")
    return ap


def _run(args) -> int:
    baseline, candidate = load_pair(args.baseline, args.candidate)
    for sweep in (baseline, candidate):
        for u in sweep.unreadable:
            print(f"warning: skipped {u}", file=sys.stderr)
    df, regressed = compare(baseline, candidate, args.tokens_drop, args.memory_rise, args.loss_rise, args.noise_k)
    verdict = overall_verdict(df)
    print(render(df, args.baseline, args.candidate, args.noise_k), end="")
    comparable = bool(df["comparable"].all()) if not df.empty else True
    if args.json:
        payload = {"baseline": str(args.baseline), "candidate": str(args.candidate), "verdict": verdict,
                   "regressed": regressed, "comparable": comparable,
                   "thresholds": {"tokens_drop": args.tokens_drop, "memory_rise": args.memory_rise,
                                  "loss_rise": args.loss_rise, "noise_k": args.noise_k},
                   "noise_model": describe(args.noise_k),
                   "skipped": [str(u) for sw in (baseline, candidate) for u in sw.unreadable],
                   "rows": json.loads(df.to_json(orient="records"))}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    if args.require_same_settings and not comparable:
        print(f"error: {NOT_COMPARABLE} (--require-same-settings)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_CODES.get(verdict, EXIT_OK)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 regression, 2 bad input, 3 inconclusive)."""
    args = build_parser().parse_args(argv)
    for name in ("tokens_drop", "memory_rise", "loss_rise", "noise_k"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            print(f"error: --{name.replace('_', '-')} must be a finite number >= 0, got {v}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        return _run(args)
    except NotAResultsDir as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # the --json file cannot be written, a sweep file vanished or has an unforeseen shape
        what = f"comparing {args.baseline} with {args.candidate} failed on what they store"
        print(f"error: {failure_text(e, what, args.candidate)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
