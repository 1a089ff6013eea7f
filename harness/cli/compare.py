"""``python -m harness compare BASELINE CANDIDATE``: the regression gate between two stored sweeps.

The rules (what is compared, thresholds, noise band, settings that differ) are in
:mod:`harness.analysis.compare`. Exit codes: 0 no regression, 1 something regressed, 2 bad input (not a results
directory, no run stored, no scenario in common, a negative threshold, or settings that differ under
``--require-same-settings``).

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

from harness.analysis.compare import NOT_COMPARABLE, compare, render
from harness.storing.sweep import NotAResultsDir

EXIT_OK, EXIT_REGRESSED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness compare --help``)."""
    ap = argparse.ArgumentParser(
        prog="python -m harness compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Regression gate between two stored sweeps (exit 1 on a regression, 2 on bad input).",
        epilog="examples:\n"
               "  python -m harness compare results/nightly-20261122-020000 results/nightly-20261123-020000\n"
               "  python -m harness compare OLD NEW --tokens-drop 0.03 --memory-rise 0.02 --json compare.json")
    ap.add_argument("baseline", type=Path, help="results directory of the reference sweep")
    ap.add_argument("candidate", type=Path, help="results directory of the sweep under test")
    ap.add_argument("--tokens-drop", type=float, default=0.05, help="relative tokens/s drop tolerated (0.05 = 5%%)")
    ap.add_argument("--memory-rise", type=float, default=0.05, help="relative peak-memory rise tolerated")
    ap.add_argument("--loss-rise", type=float, default=None,
                    help="relative final-loss rise tolerated (default: final loss is information only)")
    ap.add_argument("--noise-k", type=float, default=2.0, help="noise band = k x spread seen in repeats (default 2)")
    ap.add_argument("--require-same-settings", action="store_true",
                    help="exit 2 when a scenario's settings (hash) differ between the two sweeps")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the verdict as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 regression, 2 bad input)."""
    args = build_parser().parse_args(argv)
    for name in ("tokens_drop", "memory_rise", "loss_rise", "noise_k"):
        v = getattr(args, name)
        if v is not None and (v < 0 or math.isnan(v)):
            print(f"error: --{name.replace('_', '-')} must be >= 0, got {v}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        df, regressed = compare(args.baseline, args.candidate, args.tokens_drop, args.memory_rise, args.loss_rise,
                                args.noise_k)
    except NotAResultsDir as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render(df, regressed, args.baseline, args.candidate), end="")
    comparable = bool(df["comparable"].all()) if not df.empty else True
    if args.json:
        payload = {"baseline": str(args.baseline), "candidate": str(args.candidate), "regressed": regressed,
                   "comparable": comparable,
                   "thresholds": {"tokens_drop": args.tokens_drop, "memory_rise": args.memory_rise,
                                  "loss_rise": args.loss_rise, "noise_k": args.noise_k},
                   "rows": json.loads(df.to_json(orient="records"))}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    if args.require_same_settings and not comparable:
        print(f"error: {NOT_COMPARABLE} (--require-same-settings)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_REGRESSED if regressed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
