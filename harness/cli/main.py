"""Command line: ``python -m harness <command> ...``; each command is a module of its own in harness/cli/.

Examples::

    python -m harness run scenarios/tiny_cpu.yaml            # run every framework, write results + report
    python -m harness run scenarios/llama8b_lora.yaml --only hf --new
    python -m harness validate scenarios/*.yaml               # check scenario files, run nothing
    python -m harness list                                    # adapters (and why unavailable), scenarios
    python -m harness report results/<run-id>                 # tables + charts again from stored results
    python -m harness compare results/<old> results/<new>     # regression gate: exit 1 on regression
    python -m harness calibrate                               # measure the GPU's bf16 matmul peak
    python -m harness env list|check|create|pack|install ...  # per-framework environments
    python -m harness selfcheck SCENARIO --against results/<run-id>  # harness vs hand-written loops
    python -m harness frontier SCENARIO --vary seq_len --budgets 8,16,24  # longest context per memory budget
    python -m harness matrix --device cpu --frameworks hf,trl        # which framework trains which family
    python -m harness nightly scenarios/suites/nightly_cpu.yaml  # nightly gate against the recent past
    python -m harness history rebuild | --scenario S --csv F    # the run history database
    python -m harness advise --budget 24 --gpu H100              # fastest and longest within 24 GiB, stored runs

``python -m harness <command> --help`` shows a command's options and exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (its module in harness/cli/, imported only when that command runs, so that one command's
# dependencies, e.g. DuckDB for history and nightly, are not needed by the others; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "run a scenario through its frameworks"),
    "validate": ("validate", "check scenario files without running"),
    "list": ("listing", "adapters (and why any is unavailable) and shipped scenarios"),
    "report": ("report", "write report.md/report.html/charts from stored results"),
    "compare": ("compare", "regression verdict between two result sets"),
    "calibrate": ("calibrate", "measure the GPU's bf16 dense matmul peak (TFLOP/s)"),
    "env": ("env", "per-framework environments: list, check, create, pack, install"),
    "selfcheck": ("selfcheck", "the harness's figures against plain hand-written training loops"),
    "frontier": ("frontier", "per framework and memory budget, the longest seq_len / biggest micro-batch"),
    "nightly": ("nightly", "run a suite, add it to the history, gate tonight against the recent nights"),
    "history": ("history", "list/filter/export the run history database, or rebuild it from the run files"),
    "matrix": ("matrix", "each model family's tiny model through every framework x method: ok or the tool's error"),
    "advise": ("advise", "what to use within a memory budget, from every stored GPU sweep and frontier"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command name; the command's own module parses the rest."""
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's module; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage (or --help) and exits 2 for an unknown command
        return 2
    return importlib.import_module(f"harness.cli.{COMMANDS[argv[0]][0]}").main(argv[1:])
