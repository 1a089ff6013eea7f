"""``python -m harness frontier SCENARIO --vary seq_len|micro_batch --budgets 8,12,...``: the memory frontier.

For each framework row and memory budget (GiB, applied to every run as ``hardware.memory_budget_gib``), the
largest seq_len (or micro-batch) that trains the scenario's steps without running out of memory, found by a
search of the grid guided by each row's measured memory curve (harness.running.frontier), and tokens/s there.
Each probe is an ordinary stored run under ``results/<scenario>-frontier-<time>/``: rerunning the same command
resumes (finished probes are not redone), ``--retry-failed`` redoes probes stored as
error/crashed/timeout/unavailable. A probe that fails otherwise than by memory stops its row, not the frontier.
``--jobs N`` runs N rows' search probes side by side (their budgets within the GPU's memory) and ``--probe-steps K``
shortens them: both only answer "does it fit", so each cell's largest value is then run once more alone with the
scenario's steps (or ``--measure-steps M``), the figure its cell reports (a budget's cells before the next budget's
search; ``--search-first``: every budget's search, then the cells). The table is written as ``frontier.csv`` and
``frontier.md`` in that folder, also when the frontier stops early: at an interrupt, or at ``--time-limit-s S``, after
which no probe starts that would end past S seconds (a machine lent for a limited time: the probes going on finish,
and the same command goes on). ``--redo-older ROW ...`` searches rows again whose probes other code made (a fix in
that tool), the others' cells kept; their old probes stay under ``runs/attempts/``. ``--seed-from FOLDER`` probes
each row's answer in another frontier (another machine's) first, then the step past it: a cell that holds here closes
in two probes (with ``--jobs``/``--probe-steps``, the seed's run alone is also the cell's measurement). Exit codes:
0 done or out of time (failed probes are cells, not errors), 2 bad input, 3 another sweep holds the machine,
130 interrupted.

Examples::

    python -m harness frontier scenarios/llama8b_qlora_frontier.yaml --vary seq_len --budgets 8,12,16,24,40,80
    python -m harness frontier scenarios/llama8b_lora_frontier.yaml --vary micro_batch --budgets 24,80 --max 32
    python -m harness frontier scenarios/llama8b_qlora_frontier.yaml --vary seq_len --budgets 24 --only hf unsloth
    python -m harness frontier scenarios/llama8b_qlora_frontier.yaml --vary seq_len --budgets 8,12,16,24,40,80 \
        --jobs 4 --probe-steps 3          # search probes side by side and short; each answer then measured alone
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness.analysis.frontier import frontier_cells, write_frontier_table
from harness.cli.guard import EXIT_BAD_INPUT, guarded, output_dir_problems
from harness.cli.validate import load_or_report
from harness.common.paths import REPO_ROOT
from harness.measuring.environment import gpu_info
from harness.reporting.frontier import write_frontier_report
from harness.running import evaluator
from harness.running.frontier import (
    VARIES,
    FrontierError,
    Probing,
    TimeUp,
    find_frontier,
    make_grid,
    probe_scenario,
    read_plan,
    run_frontier,
)
from harness.spec.scenario import MAX_MEMORY_BUDGET_GIB, ScenarioError
from harness.storing.sweep import StoredFileError

CAPACITY_MARGIN_GIB = 4.0  # GPU memory left outside the side-by-side probes' budgets (CUDA contexts, NVML's view)
MAX_BUDGETS = 64  # budgets of one frontier: each is a search of every row (the published frontiers use six)
MAX_JOBS = 256  # rows searched at once: far beyond any GPU's memory for probes side by side


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m harness frontier --help``)."""
    p = argparse.ArgumentParser(prog="python -m harness frontier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario")
    p.add_argument("--vary", required=True, choices=VARIES, help="the setting to push as far as each budget allows")
    p.add_argument("--budgets", required=True, type=_budgets, help="memory budgets in GiB, comma-separated: 8,12,24")
    p.add_argument("--max", type=int, dest="hi",
                   help="upper bound of the search (default: the model's max_position_embeddings for seq_len, "
                        "64 for micro_batch)")
    p.add_argument("--step", type=int, help="grid spacing of the values tried (default: 256 for seq_len, 1 for "
                                            "micro_batch); the smallest valid value and --max are tried too")
    p.add_argument("--only", nargs="+", metavar="FRAMEWORK", help="these framework rows only")
    p.add_argument("--results", default=str(REPO_ROOT / "results"), help="results root (default: results/)")
    p.add_argument("--reports", default=None,
                   help="reports root: the report goes to <reports>/<the frontier folder's name>/ (default: reports/ "
                        "beside the results root)")
    p.add_argument("--new", action="store_true", help="start a new frontier folder even if one can be resumed")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo probes stored as error/crashed/timeout/unavailable (the failed attempt is kept)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="search probes of N rows at once, their budgets within the GPU's memory (default 1); "
                        "each answer is then measured alone")
    p.add_argument("--probe-steps", type=int, metavar="K",
                   help="search probes run K optimizer steps (at least 2) instead of the scenario's (when fewer); "
                        "each answer is then measured alone with the scenario's steps")
    p.add_argument("--measure-steps", type=int, metavar="M",
                   help="with --jobs or --probe-steps: each answer measured alone with M optimizer steps instead of "
                        "the scenario's (when fewer; at least its warmup steps and two timed), for cells whose whole "
                        "run outlasts the time a machine is lent for; the table marks such cells")
    p.add_argument("--search-first", action="store_true",
                   help="with --jobs or --probe-steps: every budget's search before any answer is measured alone "
                        "(the longest value at every budget first, on a machine lent for little time; the same "
                        "command measures them after)")
    p.add_argument("--redo-older", nargs="+", metavar="FRAMEWORK",
                   help="search these rows again where their probes were made by other code than this checkout's "
                        "(a fix of that tool): those probes are set aside, kept under each probe's runs/attempts/; "
                        "rerunning at the same commit sets nothing more aside")
    p.add_argument("--seed-from", metavar="FOLDER",
                   help="another frontier folder of the same --vary (e.g. another machine's): each row's closed "
                        "answer there is probed first at that budget here, then the step past it (two probes where "
                        "it holds here; a bisection of the narrowed bracket where not); every answer is this "
                        "machine's own probes")
    p.add_argument("--time-limit-s", type=_seconds, metavar="S",
                   help="start no probe that would end past S seconds (its expected time: the row's probes of that "
                        "kind so far, their steps scaled to the value; the first one always starts); the probes going "
                        "on finish; rerun the same command to go on")
    p.add_argument("--quiet", action="store_true")
    return p


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and s > 0):
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: a number of seconds > 0")
    return s


def _budgets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: GiB numbers separated by commas, e.g. 8,12,24") from None
    if not out or any(not 0 < b <= MAX_MEMORY_BUDGET_GIB for b in out):
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: each budget must be > 0 and <= {MAX_MEMORY_BUDGET_GIB} GiB")
    if len(set(out)) > MAX_BUDGETS:
        raise argparse.ArgumentTypeError(f"{len(set(out))} budgets: at most {MAX_BUDGETS} (each is a search of "
                                         "every row)")
    return sorted(set(out))


def _seeds(folder: str, vary: str, rows: list[str]) -> dict[str, dict[float, int]] | str:
    """``--seed-from``: per row of this scenario, the budgets where ``folder``'s frontier closed (its largest fitting
    value known, the next out of memory or the grid's top) and that value; or why the folder cannot seed this one."""
    try:
        if (theirs := read_plan(Path(folder))["grid"]["vary"]) != vary:
            return f"a frontier of {theirs}, not of {vary}"
        cells = frontier_cells(Path(folder))
    except (FrontierError, StoredFileError, OSError) as e:
        return str(e)
    out: dict[str, dict[float, int]] = {}
    for c in cells:
        if c.framework in rows and c.state == "found" and c.value is not None:
            out.setdefault(c.framework, {})[c.budget_gib] = c.value
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    sc = load_or_report(args.scenario)
    if sc is None:
        return EXIT_BAD_INPUT
    for flag, names in (("--only", args.only), ("--redo-older", args.redo_older)):
        if names and (unknown := [n for n in names if n not in sc.framework_names()]):
            print(f"{args.scenario}: {flag} {unknown}: not among the scenario's frameworks {sc.framework_names()}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    if not 1 <= args.jobs <= MAX_JOBS or (args.probe_steps is not None and args.probe_steps < 2):
        print(f"{args.scenario}: --jobs must be between 1 and {MAX_JOBS} and --probe-steps at least 2",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    reports_dir = Path(args.reports) if args.reports else Path(args.results).resolve().parent / "reports"
    if bad_dirs := output_dir_problems(results=args.results, reports=reports_dir):
        print("\n".join(f"{args.scenario}: {b}" for b in bad_dirs), file=sys.stderr)
        return EXIT_BAD_INPUT
    short = args.probe_steps if args.probe_steps is not None and args.probe_steps < sc.train.steps else None
    measure = args.measure_steps if args.measure_steps is not None and args.measure_steps < sc.train.steps else None
    if args.measure_steps is not None and (args.jobs <= 1 and short is None or
                                           measure is not None and measure < sc.train.warmup_steps + 2):
        print(f"{args.scenario}: --measure-steps {args.measure_steps}: needs --jobs above 1 or --probe-steps (it "
              f"shortens the measurement that follows a search) and at least the scenario's warmup_steps "
              f"({sc.train.warmup_steps}) + 2 steps, so that two are timed", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.search_first and args.jobs <= 1 and short is None:
        print(f"{args.scenario}: --search-first: needs --jobs above 1 or --probe-steps (without them each search "
              "probe is its cell's measurement)", file=sys.stderr)
        return EXIT_BAD_INPUT
    capacity = gpu_info()["gpu_memory_gib"] if sc.hardware.device == "cuda" else None
    probing = Probing(jobs=args.jobs, steps=short, capacity_gib=capacity and capacity - CAPACITY_MARGIN_GIB,
                      measure_steps=measure, search_first=args.search_first)
    try:
        grid = make_grid(sc, args.vary, args.hi, args.step)
        # a budget on a cpu, shortened probes with too few steps, a value beyond the schema's bounds: refused before
        # any run, at both ends of the grid and of the budgets
        for budget, value in ((args.budgets[0], grid.lo), (args.budgets[-1], grid.hi)):
            probe_scenario(sc, budget, args.vary, value, steps=short)
    except (FrontierError, ScenarioError) as e:
        print(f"{args.scenario}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    seeds = _seeds(args.seed_from, args.vary, sc.framework_names()) if args.seed_from else {}
    if isinstance(seeds, str):
        print(f"{args.scenario}: --seed-from {args.seed_from}: {seeds}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if seeds and not args.quiet:
        print(f"frontier: {sum(map(len, seeds.values()))} cells seeded from {args.seed_from}")
    if sc.hardware.device == "cuda" and capacity is None:  # every probe would be stored as unavailable
        print(f"{args.scenario}: hardware.device is cuda and this machine has no GPU that NVML sees: a frontier "
              "searches GPU memory budgets (run it on the GPU machine)", file=sys.stderr)
        return EXIT_BAD_INPUT

    def show(p: dict) -> None:
        if not args.quiet:
            how = "ran" if p["ran"] else "stored"
            print(f"{p['phase']}: {p['framework']} @ {p['budget_gib']:g} GiB, {args.vary} {p['value']}: "
                  f"{p['outcome']} ({p['status']}, {how})")

    def body() -> int:
        evaluator.check(sc)  # each probe is evaluated as a run is: a missing lm-eval stops it before the first
        table = "table:  "
        try:
            folder, log = run_frontier(sc, grid, args.budgets, Path(args.results), only=args.only, new=args.new,
                                       retry_failed=args.retry_failed, quiet=args.quiet, on_probe=show,
                                       probing=probing, time_limit_s=args.time_limit_s,
                                       redo_older=args.redo_older, seeds=seeds)
            print(f"{log.distinct} probes ({log.ran} run now)")
        except TimeUp as e:  # a stop, not a failure: the table and report so far, as at the end; rerun to go on
            print(f"time limit: {e}; finished probes are stored; rerun the same command to go on", file=sys.stderr)
            folder, table = find_frontier(sc, grid, Path(args.results)), "table so far:"
        except KeyboardInterrupt:  # the table as the stored probes stand (open cells marked), then the interruption
            if (stopped := find_frontier(sc, grid, Path(args.results))) is not None:
                print(f"table so far: {write_frontier_table(stopped)[1]}", file=sys.stderr)
            raise
        if folder is not None:  # (a time limit comes after the folder is open)
            csv_path, md_path = write_frontier_table(folder)
            report = write_frontier_report(folder, reports_dir / folder.name)
            print(f"results: {folder}\n{table} {md_path} ({csv_path.name})\nreport:  {report}")
        return 0

    return guarded(args.scenario, "probes", body)
