"""``python -m harness report RESULTS_DIR [--out DIR]``: tables, charts and a report from a stored sweep.

What the report holds is in :mod:`harness.reporting.report`; on a frontier folder, the frontier's report
(:mod:`harness.reporting.frontier`), and its ``frontier.csv`` / ``frontier.md`` rebuilt from the stored probes. Exit
codes: 0 written, 2 not a results directory (or anything unexpected while reading it, or the output cannot be
written). A stored file that cannot be read is
left out with a warning line on stderr naming it, and a caveat in the report; the rest of the sweep reports.

Examples::

    python -m harness report results/llama8b_qlora-20261123-101500          # -> reports/llama8b_qlora-2026...
    python -m harness report results/llama8b_qlora-20261123-101500 --out /tmp/rep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.analysis.frontier import write_frontier_table
from harness.cli.guard import failure_text
from harness.reporting.frontier import write_frontier_report
from harness.reporting.report import default_out_dir, write_sweep_report
from harness.running.frontier import PLAN_FILE, FrontierError
from harness.storing.sweep import NotAResultsDir, load_sweep

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness report --help``)."""
    ap = argparse.ArgumentParser(
        prog="python -m harness report", description="Tables, charts and a report from a stored sweep.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 written; 2 not a results directory, unexpected content, or the output cannot be "
               "written\n\nexamples:\n  python -m harness report results/tiny_cpu-20261123-101500\n"
               "  python -m harness report results/tiny_cpu-20261123-101500 --out /tmp/report")
    ap.add_argument("results_dir", type=Path, help="a sweep's results directory (results/<run-id>)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: reports/<run-id> beside results/, else RESULTS_DIR/report)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        out = args.out or default_out_dir(args.results_dir)
        if (Path(args.results_dir) / PLAN_FILE).is_file():  # a frontier folder: its own report
            # and its table again from the stored probes (a frontier stopped before its end wrote none since)
            write_frontier_table(Path(args.results_dir))
            md = write_frontier_report(Path(args.results_dir), out)
            print(f"report: {md}\n        {md.with_name('report.html')}")
            return EXIT_OK
        sweep = load_sweep(args.results_dir)
        for u in sweep.unreadable:
            print(f"warning: skipped {u}", file=sys.stderr)
        md = write_sweep_report(sweep, out)
    except (NotAResultsDir, FrontierError) as e:  # FrontierError: a frontier.json of another shape
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # an output folder that cannot be written, a stored sweep of a shape nothing foresaw
        print(f"error: {failure_text(e, f'{args.results_dir}: cannot report on what it stores', args.results_dir)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {md}\n        {md.with_name('report.html')}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
