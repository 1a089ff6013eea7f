"""Scaling over GPUs: a multi-GPU sweep against the same frameworks' one-GPU runs.

For each framework row of a sweep with ``hardware.strategy``, the table sets its median tokens/s on N GPUs (tokens
counted by the harness on every rank and summed, harness.running.ranks) against the median tokens/s of the same row
on one GPU:

- speed-up = tokens/s on N GPUs / tokens/s on one GPU;
- scaling efficiency = speed-up / N (1.0: N GPUs train N times as fast). The scenarios keep the per-device
  micro-batch, so the global batch grows with N (weak scaling), as teams scale data-parallel training.

The one-GPU run is a stored sweep whose resolved scenario is this one's but for ``hardware.gpus`` /
``hardware.strategy`` (and the name and description), compared row by row with the run settings of
:func:`harness.spec.scenario.row_settings` (:func:`reference_sweeps` finds them beside the sweep, newest first);
run it with ``python -m harness run <scenario> --gpus 1``. Memory: the NVML per-process peak of every GPU is shown,
the largest is the one compared (it is what each GPU must hold).

The section also lists the frameworks that cannot run the scenario's strategy, with their reason (Unsloth's
open-source version trains on one GPU only), from each adapter's declaration.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters_for_tools import registry
from harness.analysis.aggregate import is_empty, robust_median, summarise
from harness.reporting.document import EMPTY, Cell, Doc, fmt
from harness.spec.scenario import ScenarioError, row_settings, scenario_from_dict
from harness.storing.sweep import Sweep, load_sweep

HEADER = ["framework", "strategy", "GPUs", "tokens/s", "one-GPU tokens/s", "speed-up", "scaling efficiency",
          "NVML peak, largest GPU (GiB)", "NVML peak per GPU (GiB)", "one-GPU NVML peak (GiB)", "one-GPU sweep"]
INTRO = ("Tokens/s on N GPUs (every rank's tokens, rank 0's step clock after a barrier) against the same row's "
         "tokens/s on one GPU, each the median over ok repeats. Scaling efficiency = speed-up / N; the per-device "
         "micro-batch is the scenario's on every GPU, so N GPUs train N times the global batch (weak scaling). "
         "NVML peaks: every GPU's, the largest compared.")
NO_REFERENCE = ("no one-GPU sweep of these settings is stored beside this one: run the scenario with `--gpus 1` "
                "into the same results folder")
TEMPLATE_ADAPTER = "dummy"  # the adapter template and test double: no framework a team would choose
_VARYING = ("gpus", "strategy")  # the hardware keys a scaling series varies


@dataclass
class ScalingRow:
    """One framework row of a multi-GPU sweep against its one-GPU run."""

    framework: str
    strategy: str | None
    gpus: int
    tokens_per_s: float | None
    nvml_gib: float | None  # the largest GPU's (median over ok repeats)
    nvml_gib_per_gpu: list[float | None] = field(default_factory=list)
    valid: bool | None = None
    reference_sweep: str | None = None
    reference_tokens_per_s: float | None = None
    reference_nvml_gib: float | None = None

    @property
    def speedup(self) -> float | None:
        if is_empty(self.tokens_per_s) or not self.reference_tokens_per_s:
            return None
        return self.tokens_per_s / self.reference_tokens_per_s

    @property
    def efficiency(self) -> float | None:
        return None if self.speedup is None else self.speedup / self.gpus


def settings_key(scenario: dict[str, Any], framework: str) -> str | None:
    """What a scaling series keeps fixed for one framework row: its run settings without the GPU count, the
    strategy and the name (a YAML text, comparable between sweeps); None when the row is not in the scenario."""
    try:
        d = row_settings(copy.deepcopy(scenario), framework)
    except (KeyError, TypeError, AttributeError):
        return None
    d.pop("name", None)
    d["hardware"] = {k: v for k, v in (d.get("hardware") or {}).items() if k not in _VARYING}
    for row in d.get("frameworks") or []:  # only the row's own settings, not its label
        row.pop("label", None)
    return yaml.safe_dump(d, sort_keys=True)


def gpus_of(scenario: dict[str, Any]) -> tuple[int, str | None]:
    """``(processes, strategy)`` of a stored scenario: (1, None) for a one-GPU one."""
    hw = scenario.get("hardware") or {}
    strategy = hw.get("strategy")
    return (int(hw.get("gpus") or 1) if strategy else 1), strategy


def scaling_rows(sweeps: list[Sweep | Path]) -> list[ScalingRow]:
    """Every framework row of the multi-GPU sweeps among ``sweeps``, each against the newest one-GPU sweep among
    them with the same row settings (:func:`settings_key`); rows without one keep no reference."""
    loaded = [s if isinstance(s, Sweep) else load_sweep(Path(s)) for s in sweeps]
    references: dict[str, tuple[Sweep, str]] = {}
    for sw in sorted(loaded, key=lambda s: s.path.name, reverse=True):  # newest first (run ids end in the time)
        if gpus_of(sw.scenario)[0] != 1:
            continue
        for fw in sw.framework_order():
            key = settings_key(sw.scenario, fw)
            if key is not None and _ok_runs(sw, fw):
                references.setdefault(key, (sw, fw))
    out = []
    for sw in loaded:
        gpus, strategy = gpus_of(sw.scenario)
        if gpus == 1:
            continue
        for fw in sw.framework_order():
            row = _row(sw, fw, gpus, strategy)
            ref = references.get(settings_key(sw.scenario, fw) or "")
            if ref is not None:
                ref_sweep, ref_fw = ref
                s = summarise(ref_fw, ref_sweep.runs_of(ref_fw))
                row.reference_sweep = ref_sweep.path.name
                row.reference_tokens_per_s = s.median("tokens_per_s")
                row.reference_nvml_gib = s.median("peak_vram_nvml_gib")
            out.append(row)
    return out


def _ok_runs(sweep: Sweep, fw: str) -> list:
    return [r for r in sweep.runs_of(fw) if r.ok]


def _row(sweep: Sweep, fw: str, gpus: int, strategy: str | None) -> ScalingRow:
    s = summarise(fw, sweep.runs_of(fw))
    per_gpu = []
    for i in range(gpus):  # each GPU's peak, over the ok repeats as every figure
        values = []
        for r in s.ok_runs:
            peaks = r.metrics.peak_vram_nvml_gib_per_gpu or []
            if i < len(peaks) and peaks[i] is not None:
                values.append(peaks[i])
        per_gpu.append(robust_median(values))
    return ScalingRow(framework=fw, strategy=strategy, gpus=gpus, tokens_per_s=s.median("tokens_per_s"),
                      nvml_gib=s.median("peak_vram_nvml_gib"), nvml_gib_per_gpu=per_gpu, valid=s.valid)


def reference_sweeps(sweep: Sweep, results_root: Path | None = None) -> list[Sweep]:
    """The one-GPU sweeps stored beside ``sweep`` (in ``results_root``, default its folder) that hold a row with
    the settings of one of its rows; only their ``scenario.yaml`` is read until one matches."""
    root = Path(results_root) if results_root is not None else sweep.path.parent
    wanted = {settings_key(sweep.scenario, fw) for fw in sweep.framework_order()} - {None}
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d == sweep.path or not (d / "scenario.yaml").is_file():
            continue
        try:
            scenario = yaml.safe_load((d / "scenario.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(scenario, dict) or gpus_of(scenario)[0] != 1:
            continue
        rows = [f.get("label") or f.get("name") for f in scenario.get("frameworks") or [] if isinstance(f, dict)]
        if any(settings_key(scenario, fw) in wanted for fw in rows):
            out.append(load_sweep(d))
    return out


def cannot_run(sweep: Sweep) -> list[tuple[str, str]]:
    """``(adapter, why)`` for every framework that cannot run this sweep's strategy (none for a one-GPU sweep)."""
    if gpus_of(sweep.scenario)[0] == 1:
        return []
    try:
        sc = scenario_from_dict(sweep.scenario)
    except ScenarioError:
        return []
    ran = {r.adapter for r in sweep.runs} | {f.get("name") for f in sweep.scenario.get("frameworks") or []
                                             if isinstance(f, dict)}
    out = []
    for name in registry.names():
        if name in ran or name == TEMPLATE_ADAPTER:
            continue
        why = registry.info(name).cannot_run(sc)
        if why and "strategy" in why:
            out.append((name, why))
    return out


def add_section(doc: Doc, sweep: Sweep, results_root: Path | None = None) -> None:
    """The scaling section of a multi-GPU sweep's report (nothing for a one-GPU sweep)."""
    gpus, strategy = gpus_of(sweep.scenario)
    if gpus == 1:
        return
    doc.h(1, f"Scaling over {gpus} GPUs ({strategy})")
    doc.p(INTRO)
    rows = [r for r in scaling_rows([sweep, *reference_sweeps(sweep, results_root)]) if r.gpus == gpus]
    doc.table(HEADER, [_cells(r) for r in rows])
    if not any(r.reference_sweep for r in rows):
        doc.p(NO_REFERENCE, "warn")
    refused = cannot_run(sweep)
    if refused:
        doc.p("Frameworks that cannot run this strategy:")
        doc.ul([f"{name}: {why}" for name, why in refused])


def _cells(r: ScalingRow) -> list[str | Cell]:
    eff = r.efficiency
    mark = None if eff is None else ("good" if eff >= 0.9 else "warn" if eff >= 0.7 else "bad")
    per_gpu = ", ".join(fmt(v) for v in r.nvml_gib_per_gpu) if any(v is not None for v in r.nvml_gib_per_gpu) \
        else EMPTY
    return [r.framework if r.valid is not False else Cell(f"{r.framework} (invalid)", "warn"), r.strategy or EMPTY,
            str(r.gpus), fmt(r.tokens_per_s, 0, thousands=True), fmt(r.reference_tokens_per_s, 0, thousands=True),
            EMPTY if r.speedup is None else f"{r.speedup:.2f}x",
            EMPTY if eff is None else Cell(f"{eff:.0%}", mark), fmt(r.nvml_gib), per_gpu, fmt(r.reference_nvml_gib),
            r.reference_sweep or EMPTY]
