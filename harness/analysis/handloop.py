"""Harness against hand loop: a stored sweep's figure for a framework beside the same training in a plain
hand-written loop (:mod:`harness.measuring.handloop`), the difference, and the settings in which the two differ.

The harness's figure is the one the report prints (:func:`harness.analysis.aggregate.summarise`: the median over
the framework's ok repeats). The difference is ``(harness - loop) / loop`` of tokens/s, in percent: positive when
the harness measured more tokens/s than the loop. Within :data:`AGREE_PCT` the two **agree**; beyond it the
settings that differ are the stated cause, and where none differs that is said too (the cause is then in what
neither side records, or in the harness itself).

Settings compared: every key both sides have, from the stored run's ``effective`` settings and identity
(checkpoint, dataset digest, steps, warmup, GPU, library versions, overrides, settings hash) and the loop's
read-back (:mod:`harness.measuring.handloop.common`). Keys only the loop records (attention implementation,
input-grad hook, whether an attention mask was fed, ...) are kept beside, as "not recorded by the harness".

Side by side (``selfcheck --side-by-side N``): the stored sweep may come from another lease of the machine, whose
host and GPU clocks differ from the loop's (a launch-bound step moves with the host), so the check can also run the
harness's own worker for each framework row beside each loop on the same machine, N rounds in alternating order
(harness first in even rounds, the loop first in odd ones: a drift of the machine during the check falls on both).
:func:`compare_side_by_side` puts the medians of the two sides beside each other with each side's spread; that
comparison, not the one with the stored sweep, is the check's verdict when it exists.

The check is stored in the sweep as ``selfcheck.json`` (a later one as ``selfcheck-2.json``, ...; never
overwritten: :func:`next_selfcheck_path`).
"""

from __future__ import annotations

import math
import re
import statistics
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from harness.analysis.aggregate import number, summarise
from harness.measuring.telemetry import SLOWING
from harness.storing.migrate import ResultSchemaError
from harness.storing.results import parse_result
from harness.storing.schema import RunResult
from harness.storing.sweep import Sweep

AGREE_PCT = 3.0  # |harness - loop| / loop of tokens/s within this: the harness's figure is the loop's
SELFCHECK_NAME = re.compile(r"^selfcheck(?:-(\d+))?\.json$")
VARIANT_WINDOW = timedelta(minutes=20)  # checks this close to the one before: one lease (loop_variants)
PARTIAL_PREFIX = "selfcheck-partial-"  # an unfinished check's work file in the sweep (harness.cli.selfcheck.Progress)
HARNESS_FIGURES = ("tokens_per_s", "step_s_median", "peak_alloc_gib", "peak_reserved_gib")
# what a loop records about itself that is no setting of a run (how it timed, its own knobs, descriptions)
NOT_COMPARED = frozenset({"timing", "data_order", "hand_loop_knobs", "trainer", "unsloth_calls", "dataset_rows",
                          "data_format", "loss_normalisation", "trainer_checkpointing_kwargs"})


def selfcheck_paths(sweep_dir: Path) -> list[Path]:
    """The stored checks of a sweep, oldest first (``selfcheck.json``, ``selfcheck-2.json``, ...)."""
    found = []
    for p in Path(sweep_dir).iterdir() if Path(sweep_dir).is_dir() else []:
        m = SELFCHECK_NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1) or 1), p))
    return [p for _, p in sorted(found)]


def next_selfcheck_path(sweep_dir: Path) -> Path:
    """Where the next check of a sweep is stored: ``selfcheck.json``, then ``selfcheck-2.json``, ..."""
    taken = [int(SELFCHECK_NAME.match(p.name).group(1) or 1) for p in selfcheck_paths(sweep_dir)]
    n = max(taken, default=0) + 1
    return Path(sweep_dir) / ("selfcheck.json" if n == 1 else f"selfcheck-{n}.json")


def verdict(difference_pct: float | None, within_pct: float = AGREE_PCT) -> str | None:
    """``"agrees"`` within ``within_pct`` percent, else ``"differs"``; None without a difference."""
    if difference_pct is None:
        return None
    return "agrees" if abs(difference_pct) <= within_pct else "differs"


def difference_pct(harness: float | None, loop: float | None) -> float | None:
    """``100 * (harness - loop) / loop``; None when either is missing or the loop's is 0."""
    h, lo = number(harness), number(loop)
    if h is None or lo is None or lo == 0:
        return None
    return 100.0 * (h - lo) / lo


def harness_settings(run: RunResult) -> dict[str, Any]:
    """A stored run's settings in the loop's keys: its effective settings and what identifies what it ran."""
    env = run.environment
    identity = {"checkpoint": run.checkpoint, "dataset_sha256_16": run.dataset_sha256_16, "device": run.device,
                "steps": number(getattr(run.metrics, "steps_total", None)),
                "warmup_steps": number(getattr(run.metrics, "warmup_steps", None)),
                "overrides": dict(run.overrides), "settings_hash": run.settings_hash}
    if env is not None:
        identity |= {"gpu_name": env.gpu_name} | {f"{name}_version": v for name, v in env.libraries.items()}
    # an identity field the run did not record is left out; an effective setting read back as None is a value
    return dict(run.effective) | {k: v for k, v in identity.items() if v is not None}


def loop_settings(loop: dict[str, Any]) -> dict[str, Any]:
    """A loop result's settings, with the steps it ran and its identity in the run's keys."""
    identity = {"steps": loop.get("steps"), "warmup_steps": loop.get("warmup_steps"), "overrides": {},
                "settings_hash": loop.get("settings_hash")}
    settings = {k: v for k, v in (loop.get("settings") or {}).items() if k not in NOT_COMPARED}
    return settings | {k: v for k, v in identity.items() if v is not None}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def settings_differ(harness: dict[str, Any], loop: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings both sides recorded with different values: ``{"key", "harness", "loop"}`` each, by key."""
    return [{"key": k, "harness": harness[k], "loop": loop[k]} for k in sorted(set(harness) & set(loop))
            if not _same(harness[k], loop[k])]


def _representative(runs: list[RunResult]) -> RunResult | None:
    """The run whose settings stand for the framework: the first ok run, repeat 0 where it is ok."""
    ok = sorted((r for r in runs if r.ok), key=lambda r: r.repeat)
    return ok[0] if ok else None


def compare_framework(sweep: Sweep, framework: str, loop: dict[str, Any],
                      within_pct: float = AGREE_PCT) -> dict[str, Any]:
    """One framework's stored figure against its hand loop's.

    Args:
        sweep: the stored sweep.
        framework: the framework row (the loop's adapter name: the closed-division row).
        loop: the loop's result (:func:`harness.measuring.handloop.__main__.run_loop`).
        within_pct: the agreement band.

    Returns:
        ``status`` (compared | loop unavailable | loop failed | no harness run) with ``reason``; when compared,
        ``harness`` and ``loop`` figures, ``difference_pct`` (tokens/s), ``step_time_difference_pct``,
        ``verdict``, ``settings_differ`` and ``not_recorded_by_harness``.
    """
    out: dict[str, Any] = {"framework": framework}
    if loop.get("status") != "ok":
        status = "loop unavailable" if loop.get("status") == "unavailable" else "loop failed"
        return out | {"status": status, "reason": loop.get("reason")}
    runs = sweep.runs_of(framework)
    run = _representative(runs)
    if run is None:
        why = (f"no ok run of {framework} in the sweep ({len(runs)} stored)" if runs
               else f"{framework} has no stored run in the sweep")
        return out | {"status": "no harness run", "reason": why}
    summary = summarise(framework, runs)
    harness = {m: summary.median(m) for m in HARNESS_FIGURES} | {
        "repeats_ok": len(summary.ok_runs), "runs": [r.key for r in summary.ok_runs], "valid": summary.valid,
        "invalid_reasons": summary.invalid_reasons}
    mine = {m: loop.get(m) for m in (*HARNESS_FIGURES, "steps", "warmup_steps", "final_loss")}
    h_set, l_set = harness_settings(run), loop_settings(loop)
    diff = difference_pct(harness["tokens_per_s"], mine["tokens_per_s"])
    return out | {
        "status": "compared", "reason": None, "harness": harness, "loop": mine, "difference_pct": diff,
        "step_time_difference_pct": difference_pct(harness["step_s_median"], mine["step_s_median"]),
        "verdict": verdict(diff, within_pct), "settings_from_run": run.key,
        "settings_differ": settings_differ(h_set, l_set),
        "not_recorded_by_harness": {k: v for k, v in sorted(l_set.items()) if k not in h_set}}


def compare(sweep: Sweep, loops: dict[str, dict[str, Any]], within_pct: float = AGREE_PCT) -> dict[str, Any]:
    """Every framework's stored figure against its hand loop (:func:`compare_framework`), keyed by framework."""
    return {fw: compare_framework(sweep, fw, loop, within_pct) for fw, loop in loops.items()}


def cause(entry: dict[str, Any]) -> str:
    """The stated cause of a compared framework's difference: the settings that differ, or that none does."""
    diffs = entry.get("settings_differ") or []
    if diffs:
        return "; ".join(f"{d['key']}: harness {d['harness']!r}, loop {d['loop']!r}" for d in diffs)
    unrecorded = ", ".join(sorted(entry.get("not_recorded_by_harness") or {}))
    return ("no recorded setting differs" + (f" (not recorded by the harness: {unrecorded})" if unrecorded else ""))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread_pct(values: list[float]) -> float | None:
    """(max - min) / median in percent; None below two values."""
    mid = _median(values) if len(values) >= 2 else None
    return 100.0 * (max(values) - min(values)) / mid if mid else None


def harness_figures(run: dict[str, Any] | None) -> dict[str, Any]:
    """A harness run's (a stored run JSON's, or run_harness's error) status, the figures the loop also measures and
    the NVML sampler's busy share."""
    if not isinstance(run, dict):
        return {"status": "error", "reason": "the harness run stored no result"}
    metrics = run.get("metrics") or {}
    return {"status": run.get("status", "error"), "reason": run.get("reason"), "valid": run.get("valid"),
            "invalid_reasons": run.get("invalid_reasons") or []} | {
        m: number(metrics.get(m)) for m in (*HARNESS_FIGURES, "nvml_sampler_busy_pct")}


def machine_notes(side: str, rnd: Any, figures: dict[str, Any]) -> list[str]:
    """What the machine did during one side of a pair that can move its figure: another process on the GPU, or
    a slowed (throttled) GPU. ``figures``: a harness run's metrics or a loop's result (both carry
    ``foreign_gpu_processes`` and ``throttle_reasons_seen``)."""
    notes = []
    foreign = figures.get("foreign_gpu_processes") or []
    if foreign:
        procs = ", ".join(f"pid {f.get('pid')} {number(f.get('max_gib')) or 0:.1f} GiB" for f in foreign)
        notes.append(f"round {rnd} {side}: another process on the GPU ({procs})")
    slowed = sorted(set(figures.get("throttle_reasons_seen") or []) & SLOWING)
    if slowed:
        notes.append(f"round {rnd} {side}: the GPU slowed ({', '.join(slowed)})")
    return notes


def compare_side_by_side(framework: str, pairs: list[dict[str, Any]],
                         within_pct: float = AGREE_PCT) -> dict[str, Any]:
    """One framework's harness runs against its loops, run in alternating pairs on one machine.

    Args:
        framework: the framework row.
        pairs: ``{"round", "first", "harness_run", "loop"}`` each: the round, which side ran first, the harness's
            stored run JSON (or None) and the loop's result.
        within_pct: the agreement band.

    Returns:
        ``status`` (compared | no pair ran | ...) with ``reason``; when compared: ``rounds``, the medians
        ``harness_tokens_per_s`` / ``loop_tokens_per_s`` (and step times), ``difference_pct``, ``verdict``, each
        round's ``pair_differences_pct``, each side's ``harness_spread_pct`` / ``loop_spread_pct`` (max - min over
        median, percent), ``harness_sampler_busy_pct`` (the NVML sampling's busy share in the harness runs,
        median: an upper bound on what the harness's own sampling could take), ``settings_differ`` between the
        first ok harness run and its loop, and ``machine`` (:func:`machine_notes` of every side of every pair).
    """
    out: dict[str, Any] = {"framework": framework}
    ok = []
    problems = []
    for p in pairs:
        h, lo = harness_figures(p.get("harness_run")), p.get("loop") or {}
        if h["status"] == "ok" and lo.get("status") == "ok" and h.get("tokens_per_s") and lo.get("tokens_per_s"):
            ok.append((p, h, lo))
        else:
            why = h["reason"] if h["status"] != "ok" else lo.get("reason")
            problems.append(f"round {p.get('round')}: harness {h['status']}, loop {lo.get('status')}"
                            + (f" ({' '.join(str(why).split())[:300]})" if why else ""))
    if not ok:
        return out | {"status": "no pair ran", "reason": "; ".join(problems) or "no round ran"}
    h_tps = [h["tokens_per_s"] for _, h, _ in ok]
    l_tps = [lo["tokens_per_s"] for _, _, lo in ok]
    h_med, l_med = _median(h_tps), _median(l_tps)
    diff = difference_pct(h_med, l_med)
    first_p, _, first_loop = ok[0]
    try:
        differ = settings_differ(harness_settings(parse_result(first_p["harness_run"])), loop_settings(first_loop))
    except ResultSchemaError as e:
        differ, problems = [], [*problems, f"the harness run cannot be read back: {e}"]
    return out | {
        "status": "compared", "reason": "; ".join(problems) or None, "rounds": len(ok),
        "order": [p.get("first") for p, _, _ in ok],
        "harness_tokens_per_s": h_med, "loop_tokens_per_s": l_med,
        "harness_step_s_median": _median([h["step_s_median"] for _, h, _ in ok if h.get("step_s_median")]),
        "loop_step_s_median": _median([lo["step_s_median"] for _, _, lo in ok if lo.get("step_s_median")]),
        "difference_pct": diff, "verdict": verdict(diff, within_pct),
        "pair_differences_pct": [difference_pct(h["tokens_per_s"], lo["tokens_per_s"]) for _, h, lo in ok],
        "harness_spread_pct": _spread_pct(h_tps), "loop_spread_pct": _spread_pct(l_tps),
        "harness_valid": all(h.get("valid") is not False for _, h, _ in ok),
        "harness_sampler_busy_pct": _median([h["nvml_sampler_busy_pct"] for _, h, _ in ok
                                             if h["nvml_sampler_busy_pct"] is not None]),
        "settings_differ": differ,
        "machine": [n for p, _, lo in ok for n in
                    machine_notes("harness", p.get("round"), (p.get("harness_run") or {}).get("metrics") or {})
                    + machine_notes("loop", p.get("round"), lo)]}


def _created(check: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(check.get("created")))
    except ValueError:
        return None


def loop_variants(checks: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The hand loop's variants measured on one lease, each beside the default loop of the same lease.

    A bisection runs the same loop with knobs changed (``selfcheck --set KEY=VALUE``), each a check of its own;
    tokens/s of checks made on different leases of a shared machine do not compare, so only checks made within
    :data:`VARIANT_WINDOW` of the one before them are put together (a group), and a group needs a check without
    knobs: the loop the variants are measured against. The side-by-side harness runs of a group's checks come in
    as the variant "harness (side by side)".

    Args:
        checks: ``(name, check)`` of the sweep's stored checks, oldest first.

    Returns:
        One row per framework, group and variant: ``group`` (the group's check names), ``framework``,
        ``variant`` (the knobs, ``"defaults"`` or ``"harness (side by side)"``), ``check``, ``tokens_per_s``,
        ``step_s_median`` and ``vs_defaults_pct`` (against the group's default loop); only groups with a variant.
    """
    timed = sorted(((t, n, c) for n, c in checks if (t := _created(c)) is not None), key=lambda x: x[0])
    groups: list[list[tuple[str, dict[str, Any]]]] = []
    last: datetime | None = None
    for t, name, check in timed:
        if last is None or t - last > VARIANT_WINDOW:
            groups.append([])
        groups[-1].append((name, check))
        last = t
    out: list[dict[str, Any]] = []
    for group in groups:
        label = ", ".join(n for n, _ in group)
        found: dict[str, list[dict[str, Any]]] = {}
        for name, check in group:
            knobs = [str(k) for k in check.get("knobs") or []]
            for fw, loop in (check.get("loops") or {}).items():
                if isinstance(loop, dict) and loop.get("status") == "ok":
                    found.setdefault(fw, []).append({
                        "variant": ", ".join(knobs) or "defaults", "check": name,
                        "tokens_per_s": number(loop.get("tokens_per_s")),
                        "step_s_median": number(loop.get("step_s_median"))})
            for fw, entry in (check.get("side_by_side") or {}).items():
                if isinstance(entry, dict) and entry.get("status") == "compared" and not knobs:
                    found.setdefault(fw, []).append({
                        "variant": "harness (side by side)", "check": name,
                        "tokens_per_s": number(entry.get("harness_tokens_per_s")),
                        "step_s_median": number(entry.get("harness_step_s_median"))})
        for fw, rows in found.items():
            base = next((r["tokens_per_s"] for r in rows if r["variant"] == "defaults"), None)
            if base is None or not any(r["variant"] not in ("defaults", "harness (side by side)") for r in rows):
                continue
            out += [{"group": label, "framework": fw} | r | {"vs_defaults_pct": difference_pct(r["tokens_per_s"], base)}
                    for r in rows]
    return out
