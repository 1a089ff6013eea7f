"""``python -m harness advise --budget GIB``: what to use on a card of that size, from every stored GPU result.

Per scenario and GPU under the results root: the newest sweep's fastest row whose NVML peak fits the budget (with
its settings, the fastest peer row and tunebench's ratio to it) and the newest memory frontier's longest context (or
micro-batch) within the budget (:mod:`harness.reporting.advice`). Reads stored runs only and prints Markdown; writes
nothing. Exit codes: 0 answered, 1 no stored GPU sweep or frontier matches, 2 bad input.

Examples::

    python -m harness advise --budget 24
    python -m harness advise --budget 16 --gpu H100 --scenario llama8b_qlora
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness.common.paths import REPO_ROOT

EXIT_OK, EXIT_NONE, EXIT_BAD_INPUT = 0, 1, 2


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a budget is a positive number of GiB")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness advise --help``)."""
    ap = argparse.ArgumentParser(prog="python -m harness advise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=_budget, required=True, help="the memory budget in GiB (the card's, or less)")
    ap.add_argument("--scenario", nargs="+", metavar="TEXT",
                    help="only scenarios whose name contains one of these texts")
    ap.add_argument("--gpu", nargs="+", metavar="TEXT", help="only GPUs whose name contains one of these (H100, H200)")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="results root (default: results/)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.results.is_dir():
        print(f"error: {args.results}: no such results folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    from harness.reporting.advice import advice_doc  # heavy (pandas): after the input is checked

    doc, answers = advice_doc(args.results, args.budget, args.scenario, args.gpu)
    if not answers:
        print(f"no stored GPU sweep or memory frontier under {args.results} matches", file=sys.stderr)
        return EXIT_NONE
    print(doc.to_markdown())
    return EXIT_OK
