"""The report of a stored sweep (the command is ``python -m harness report``, harness.cli.report).

Reads only what a sweep stored (``runs/*.json``, ``scenario.yaml``, ``environment.json``, ``sweep.json``, through
:func:`harness.storing.sweep.load_sweep`) and writes into the output directory:

- ``report.md``   Markdown, charts referenced as PNG files beside it;
- ``report.html`` self-contained: inline CSS, charts embedded as ``data:image/png;base64`` URIs, no external asset;
- ``*.png``       the charts (harness.reporting.charts).

Contents: scenario summary and the command to reproduce; one row per framework aggregated over its ok repeats
(harness.analysis.aggregate: tokens/s median with the spread over repeats and over steps, speed-up against
``measure.baseline``, peak memory three ways, MFU, energy per token and average power where a GPU measured them,
final loss, repeats, validity); the fastest and the leanest framework among the fair measurements
(harness.reporting.ranking), and each tool's own fastest and leanest row where a tool ran several
(harness.reporting.tool_best); the published claims this scenario can test, claimed against measured
(harness.reporting.claims); on a GPU, the fastest row within each memory budget and the speed-memory Pareto view
(harness.reporting.pareto); on several GPUs, the scaling against the one-GPU runs (harness.reporting.scaling); every
failed, diverged, unavailable, OOM, timed-out or invalid run with its reason;
GPU telemetry (clocks, power, temperature, throttling, energy) where recorded; the MFU convention; charts;
effective settings against the scenario; quality (when runs carry an evaluation) and loss parity; the
environment; how to read it; failures and caveats.

A value that does not apply (GPU memory on a CPU, MFU without a peak) renders as "—", never as 0. A stored file
that cannot be read is left out and named at the top and in the caveats; a sweep with no finished run still gets
a report that says so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness.analysis.aggregate import is_empty
from harness.reporting import charts, claims, handloop, objective, pareto, quality, scaling, tables, timeline, tool_best
from harness.reporting.caveats import caveats
from harness.reporting.document import Cell, Doc, fmt
from harness.reporting.ranking import rank, ranking_text
from harness.storing.results import atomic_write_text
from harness.storing.sweep import Sweep, load_sweep

# the convention sentence of harness/measuring/flops.py, stated in every report
MFU_CONVENTION = ("Model FLOPs per trained token: frozen-base LoRA/QLoRA/DoRA = 4·N, full fine-tuning = 6·N "
                  "(N = parameters in the decoder's linear layers plus the LM head; the embedding lookup is not "
                  "counted), plus causal attention 6·L·s·d_attn per token; recomputation from gradient "
                  "checkpointing is NOT counted (that would be hardware FLOPs utilisation). "
                  "MFU = achieved model FLOP/s / peak dense bf16 FLOP/s.")
COMPARISON_HEADER = ["framework", "status", "repeats ok", "tokens/s (median)", "repeats min–max", "steps p10–p90",
                     "speed-up vs {base}", "peak VRAM NVML (GiB)", "NVML vs {base}", "device total (GiB)",
                     "torch alloc / reserved (GiB)", "MFU", "final loss", "valid"]
ENERGY_HEADER = ["J/token", "avg power (W)"]  # after MFU, where a GPU run measured energy
HOW_TO_READ_ENERGY = ("J/token and avg power: GPU energy from NVML's total-energy counter over the measured steps, "
                      "per non-padding token and per second; a throttled GPU (thermal or hardware slowdown, power "
                      "brake, a power limit below the GPU's default) is flagged in the status and the caveats: its "
                      "tokens/s understate the framework. The software power cap, which a loaded H100/H200 reaches "
                      "in nearly every run, is listed under GPU telemetry and not flagged.")
HOW_TO_READ = [
    "tokens/s counts non-padding input tokens, counted by the harness from each batch (never a tool's own "
    "figure), over the measured optimizer steps; warmup steps are left out.",
    "A framework's figures are over its ok repeats: the median, with the fastest and slowest repeat dropped first "
    "when there are 5 or more (as MLPerf does; `python -m harness compare` uses the same figures).",
    "'repeats min–max' is the spread of the per-run tokens/s over those repeats; 'steps p10–p90' is the spread "
    "of per-step tokens/s pooled over ok repeats. Differences smaller than these spreads are noise.",
    "Speed-up is median tokens/s over the baseline `{base}`'s median tokens/s.",
    "Peak memory, three ways: NVML per-process (what the GPU gave the worker, sampled), NVML device total "
    "(everything on the GPU), and torch's allocated / reserved peaks (the caching allocator's view); each "
    "run's peak, then the median over repeats like every figure.",
    "A run is invalid when the settings it really ran with differ from the scenario (see Effective settings); "
    "an invalid run's speed is not a fair comparison.",
    "— means the value does not apply or was not measured (e.g. GPU memory on a CPU), never zero.",
]


def default_out_dir(results_dir: Path) -> Path:
    """``reports/<run-id>`` beside ``results/`` when the sweep lives in a ``results`` folder, else ``<dir>/report``."""
    p = Path(results_dir)
    if p.resolve().parent.name == "results":
        return p.resolve().parent.parent / "reports" / p.resolve().name
    return p / "report"


def _comparison(doc: Doc, sweep: Sweep, summary, parity_df) -> None:
    base = sweep.baseline
    doc.h(1, "Comparison")
    if base not in summary.index or is_empty(summary.at[base, "tps_median"]):
        doc.p(f"Baseline `{base}` has no ok run: speed-ups are not shown.", "warn")
    energy = tables.has_energy(summary)
    header = [h.format(base=base) for h in COMPARISON_HEADER]
    if energy:
        header[header.index("MFU") + 1:header.index("MFU") + 1] = ENERGY_HEADER
    rows = tables.comparison_rows(summary, base, energy)
    marks = tool_best.mark_column(sweep, summary, parity_df)  # None when every tool ran a single row
    if marks is not None:
        header.append("best of tool")
        rows = [row + [mark] for row, mark in zip(rows, marks, strict=True)]
    doc.table(header, rows)
    if not summary.empty:
        doc.p(ranking_text(rank(sweep, summary, parity_df)))
    peak = next((r.metrics.peak_tflops for r in sweep.runs if r.metrics.peak_tflops), None)
    src = next((r.metrics.peak_tflops_source for r in sweep.runs if r.metrics.peak_tflops_source), None)
    doc.p(f"**MFU convention.** {MFU_CONVENTION} Peak used: {fmt(peak, 1)} TFLOP/s" + (f" ({src})." if src else "."))
    tool_best.add_section(doc, sweep, summary, parity_df)
    doc.h(2, "All runs")
    doc.table(["framework", "repeat", "status", "valid", "tokens/s", "step s (median)", "NVML GiB", "reserved GiB",
               "host RSS GiB", "final loss", "wall s", "reason / invalid"], tables.run_rows(sweep))
    telemetry = tables.telemetry_rows(sweep)
    if telemetry:
        doc.h(2, "GPU telemetry")
        doc.table(tables.TELEMETRY_HEADER, telemetry)
    fails = tables.failure_rows(sweep)
    if fails:
        doc.h(2, "Failed, retried and invalid runs")
        doc.table(["framework", "repeat", "status", "reason", "log"], fails)


def _charts(doc: Doc, sweep: Sweep, summary, out_dir: Path) -> None:
    doc.h(1, "Charts")
    made = [(charts.chart_throughput(summary, sweep.baseline, out_dir / "throughput.png"),
             "Throughput: median tokens/s per framework, error bars show the spread"),
            (charts.chart_memory(summary, out_dir / "memory.png"), "Peak memory, measured three ways"),
            (charts.chart_loss(sweep, out_dir / "loss.png"), "Training loss per optimizer step"),
            (charts.chart_tps_vs_memory(summary, out_dir / "tps_vs_memory.png"), "Throughput against peak memory")]
    for path, alt in made:
        if path is not None:
            doc.image(path, alt)
        else:
            doc.p(f"({alt}: no data to plot)")


def _settings(doc: Doc, sweep: Sweep) -> None:
    doc.h(1, "Effective settings")
    doc.p("What each framework actually ran with (read back from the live model and trainer, repeat 0), against "
          "what the scenario asks for. Cells marked ≠ differ and make the run invalid; 'not read' means the "
          "adapter could not read that setting back.")
    eff = tables.effective_table(sweep)
    if eff:
        doc.table(*eff)
    else:
        doc.p("No run recorded effective settings.", "warn")
    doc.h(1, "How each framework was run")
    doc.p("Each tool runs through its own entry point from a native config the adapter generated (stored with the "
          "run, rerunnable with the tool alone); the notes say where a tool was fed differently or behaves "
          "differently from the scenario's letter, and why.")
    doc.table(["framework", "native config", "rerun with the tool alone", "notes"], tables.how_run_rows(sweep))


def _quality(doc: Doc, sweep: Sweep, summary, out_dir: Path, eval_errors: list[str]) -> None:
    doc.h(1, "Quality")
    table = quality.quality_frame(sweep)
    if not table.empty:
        doc.p("Accuracy of the trained output (median over repeats whose evaluation succeeded).")
        doc.table(["framework"] + list(table.columns),
                  [[str(fw)] + [fmt(v, 4) for v in row] for fw, row in table.iterrows()])
        p = charts.chart_accuracy_vs_tps(table, summary, out_dir / "accuracy_vs_tps.png")
        if p:
            doc.image(p, "Accuracy against throughput")
    else:
        doc.p("No successful evaluation.", "bad")
    if spread := quality.seed_spread_rows(sweep):
        doc.p(f"Seed to seed: each repeat trained its own seeds (measure.seed_per_repeat: a random init and "
              f"training seed of its own). A framework trains the same model as `{sweep.baseline}` as far as its "
              f"results can show when its mean lies within `{sweep.baseline}`'s range over its seeds; 'better' is "
              f"outside that range on the good side.")
        doc.table(*spread)
    ttt = quality.time_to_target(sweep)
    if ttt:
        doc.p("Time to target" + quality.target_text(sweep) + ": "
              + ", ".join(f"{fw} {fmt(v, 0) + ' s' if v is not None else 'not reached'}" for fw, v in ttt.items())
              + ".")
        p = charts.chart_time_to_target(ttt, out_dir / "time_to_target.png")
        if p:
            doc.image(p, "Time to target (lower is better)")
    for e in eval_errors:
        doc.p(e, "bad")


def _parity(doc: Doc, sweep: Sweep, parity_df) -> None:
    doc.h(2, "Loss parity")
    if parity_df.empty:
        doc.p(f"No loss curve to compare against `{sweep.baseline}`.")
        return
    doc.p(f"Per-step training loss of each framework against `{sweep.baseline}` (harness.analysis.parity): "
          "'transient' means the curves agreed through the first quarter of the steps, parted for a while "
          "(typically at a loss spike, where rounding differences are amplified) and agree again over the last "
          "tenth; 'within seed spread' means the curves parted for good but, averaged over a short window, never "
          f"lay further apart than `{sweep.baseline}`'s own curves for different seeds (plus the tolerance): "
          "training from random weights in bf16 is chaotic, and that is how far two correct runs part; "
          "'DEPARTS' means they did not come back, or were apart from the start.")
    doc.table(*quality.parity_rows(parity_df))


def _environment(doc: Doc, sweep: Sweep, foreign: list[str]) -> None:
    doc.h(1, "Environment")
    doc.table(["", "value"], tables.environment_rows(sweep))
    if foreign:
        doc.ul([Cell(f"foreign GPU process — {f}", "warn") for f in foreign])
    else:
        doc.p("No foreign GPU process was found" + (" (no GPU)." if not sweep.environment.gpu_name else "."))
    doc.p("Per framework (each runs in its own environment; versions from the worker):")
    doc.table(["framework", "framework version", "env", *tables.FRAMEWORK_LIBRARIES], tables.framework_env_rows(sweep))
    libs = sweep.environment.libraries
    if libs:
        doc.p("Runner environment libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v) + ".")


def build_report(sweep: Sweep, out_dir: Path) -> Doc:
    """Assemble the report's content (charts are written into ``out_dir`` as it goes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sc = sweep.scenario
    summary = tables.summary_frame(sweep)
    doc = Doc(f"tunebench report: {sweep.name}")
    doc.p(f"Results: `{sweep.path}` — {len(sweep.runs)} stored runs"
          + (f" of {len(sweep.planned)} planned" if sweep.planned else "") + ".")
    if sc.get("description"):
        doc.p(str(sc["description"]))
    if sweep.unreadable:
        names = dict.fromkeys(f"`{u.path.name}`" for u in sweep.unreadable)
        doc.p(f"Stored files that could not be read, in whole or in part, are left out: {', '.join(names)} — see "
              "'Failures and caveats'.", "bad")
    if not sweep.runs:
        doc.p("No run is stored: the sweep stopped before any run finished" + (
            f" ({len(sweep.planned)} planned)" if sweep.planned else "") + ". There is nothing to compare.", "bad")
    elif not any(r.ok for r in sweep.runs):
        statuses = ", ".join(f"{n} {st}" for st, n in Counter(r.status for r in sweep.runs).items())
        doc.p(f"No run finished ok ({statuses}): there are no figures to compare; the reasons are below.", "bad")
    n_bad = sum(1 for r in sweep.runs if not r.ok or not r.valid)
    if n_bad:
        doc.p(f"{n_bad} run(s) failed or are invalid — see the table and 'Failures and caveats'.", "bad")
    foreign = tables.foreign_processes(sweep)
    if foreign:
        doc.p(f"Foreign processes were found on the GPU ({len(foreign)}): measurements may be disturbed.", "warn")

    doc.h(1, "Scenario")
    doc.table(["setting", "value"], tables.scenario_rows(sweep))
    doc.p("Reproduce with:")
    source = sweep.source_in_repo or "<scenario.yaml>"
    doc.code(f"python -m harness run {source}\npython -m harness report {sweep.path}")
    parity_df = quality.parity_frame(sweep)
    _comparison(doc, sweep, summary, parity_df)
    claims.add_section(doc, sweep, summary, parity_df)
    pareto.add_section(doc, sweep, summary, parity_df, out_dir)
    scaling.add_section(doc, sweep)  # a multi-GPU sweep against the one-GPU sweeps stored beside it
    _charts(doc, sweep, summary, out_dir)
    _settings(doc, sweep)
    eval_errors = quality.eval_errors(sweep)
    if quality.evaluated_runs(sweep):
        _quality(doc, sweep, summary, out_dir, eval_errors)
    _parity(doc, sweep, parity_df)
    objective.add_section(doc, sweep, out_dir)  # a preference / RL objective's rewards and sampling; none for sft
    handloop.add_section(doc, sweep)
    timeline.add_section(doc, sweep)
    _environment(doc, sweep, foreign)
    doc.h(1, "How to read this")
    doc.ul([item.format(base=sweep.baseline) for item in HOW_TO_READ]
           + ([HOW_TO_READ_ENERGY] if tables.has_energy(summary) else []))
    doc.h(1, "Failures and caveats")
    doc.ul(caveats(sweep, summary, foreign, parity_df, eval_errors))
    return doc


def write_report(results_dir: Path, out_dir: Path) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG charts of a stored sweep.

    Args:
        results_dir: the sweep's results directory (``results/<run-id>``).
        out_dir: where the report goes (created if needed).

    Returns:
        Path of ``report.md``.

    Raises:
        NotAResultsDir: ``results_dir`` is not a sweep's results directory.
    """
    return write_sweep_report(load_sweep(Path(results_dir)), out_dir)


def write_sweep_report(sweep: Sweep, out_dir: Path) -> Path:
    """:func:`write_report` of a sweep already loaded (the command loads it first to warn about unreadable files).

    Returns:
        Path of ``report.md``.
    """
    out_dir = Path(out_dir)
    doc = build_report(sweep, out_dir)
    md = out_dir / "report.md"
    atomic_write_text(md, doc.to_markdown())
    atomic_write_text(out_dir / "report.html", doc.to_html())
    return md
