"""``python -m harness history``: list, filter and export the history database, or rebuild it from the JSON files.

The database (``<results>/.cache/history.duckdb``) is derived data: the stored run files are the source of truth
and ``history rebuild`` recreates it from every ``<results>/*/runs/*.json``. Exit codes: 0 done, 2 bad input.

Examples::

    python -m harness history rebuild
    python -m harness history --scenario tiny_cpu --framework hf --since 2026-11-01
    python -m harness history --csv history.csv --parquet history.parquet
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import duckdb

from harness.common.paths import REPO_ROOT
from harness.storing import history

EXIT_OK, EXIT_BAD_INPUT = 0, 2
_SHOWN = ("created", "sweep_id", "scenario", "framework", "repeat", "status", "valid", "tokens_per_s",
          "peak_vram_nvml_gib", "final_loss", "git_sha")


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness history --help``)."""
    ap = argparse.ArgumentParser(prog="python -m harness history", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=("list", "rebuild"), default="list",
                    help="list (default): print the rows; rebuild: recreate the database from the run files")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="results root (default: results/)")
    ap.add_argument("--db", type=Path, default=None, help="database file (default: <results>/.cache/history.duckdb)")
    ap.add_argument("--scenario", help="only this scenario")
    ap.add_argument("--framework", help="only this framework")
    ap.add_argument("--since", help="only sweeps created on or after this date (YYYY-MM-DD)")
    ap.add_argument("--csv", type=Path, help="export the selected rows to this CSV file")
    ap.add_argument("--parquet", type=Path, help="export the selected rows to this Parquet file")
    return ap


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    db = args.db or history.default_db(args.results)
    if args.since is not None:
        try:
            datetime.fromisoformat(args.since)
        except ValueError:
            print(f"error: --since {args.since[:60]!r}: a date (YYYY-MM-DD) or a timestamp (YYYY-MM-DD HH:MM:SS)",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    if why := history.db_problem(db):
        print(f"error: --db {db}: {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.action == "rebuild":
            if not args.results.is_dir():
                print(f"error: {args.results}: no such results directory", file=sys.stderr)
                return EXIT_BAD_INPUT
            n, skipped = history.rebuild(db, args.results)
            for s in skipped:
                print(f"warning: skipped {s}", file=sys.stderr)
            print(f"history: {n} runs from {args.results} -> {db}")
            return EXIT_OK
        filters = {"scenario": args.scenario, "framework": args.framework, "since": args.since}
        rows = history.query(db, **filters)
        print("  ".join(_SHOWN))
        for r in rows:
            print("  ".join(_fmt(r[c]) for c in _SHOWN))
        print(f"{len(rows)} runs ({db})")
        for fmt, out in (("csv", args.csv), ("parquet", args.parquet)):
            if out is not None:
                print(f"{fmt}: {history.export(db, out, fmt, **filters)}")
    except duckdb.Error as e:  # a --since that is not a date, a database file that is not DuckDB's
        print(f"error: {db}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: {e.filename or db}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
