"""The support matrix: each family's tiny model through every framework x method, a few steps each, on one device.

``python -m harness matrix`` (harness.cli.matrix) runs it. For each tiny test model (a preset with ``tiny_of``:
:func:`harness.inputs.models.tiny_presets`) and method, one small scenario (:func:`cell_scenario`: the same short
training for every cell) is written into the matrix folder, ``results/support-matrix-<device>-<time>/scenarios/
<name>.yaml``, and run by the ordinary sweep runner into that folder. So every cell that runs is an ordinary stored
run (``<folder>/<name>-<time>/runs/<framework>-r0.json``), and rerunning the same command finds the folder by its
plan and runs only what is missing; ``retry_failed`` redoes cells stored as error, crashed, timeout or unavailable.

A framework that declares it cannot run a cell (:meth:`AdapterInfo.cannot_run`: its model families, methods and
devices) or whose cell validation refuses (QLoRA on a CPU) is not run: the plan records it as unsupported, with the
reason. A framework that could run a cell but not on this machine now (its environment not created, no GPU) is not
run either and has no stored row, so it runs once it becomes available; the report says why it is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from adapters_for_tools import registry
from harness.common.names import unknown
from harness.inputs.models import FAMILIES, Preset, tiny_presets
from harness.running import envs, runner
from harness.running.locks import machine_lock
from harness.spec.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from harness.storing import results
from harness.storing.schema import RunResult

PREFIX = "support-matrix"  # the matrix folder: results/support-matrix-<device>-<time>/
PLAN_FILE = "matrix.json"
NOT_RUN_FILE = "not_run.json"  # {scenario: {framework: why it did not run}}, from the latest invocation
SCENARIO_DIR = "scenarios"
METHODS = ("lora", "qlora", "full")
TEST_DOUBLES = ("dummy",)  # adapters that are no framework a team would choose: left out of the default matrix

# The training of every cell: enough optimizer steps for the loss of a random tiny model to fall (lr 2e-3 moves it
# within 8 steps for LoRA and full fine-tuning alike), short enough for a CPU. seq_len 64 is longer than the tiny
# Gemma models' 32-token sliding window, so their local-attention path runs too.
STEPS, WARMUP_STEPS, SEQ_LEN, MICRO_BATCH, LR = 8, 2, 64, 2, 2e-3
LORA_R, LORA_ALPHA = 8, 16
TIMEOUT_S = 900  # per run: the first run of a toolkit on a fresh machine compiles (Unsloth, Triton autotune)


class MatrixError(ValueError):
    """The matrix cannot be run as asked (an unknown family, framework or method); the message says why."""


@dataclass(frozen=True)
class PlannedCell:
    """One (model, method, framework): run by ``scenario``, or unsupported with a reason."""

    model: str  # the tiny preset
    family: str
    method: str
    framework: str
    scenario: str | None  # the generated scenario that runs it (None: unsupported)
    unsupported: str | None = None


@dataclass
class MatrixPlan:
    """What a matrix runs on one device: every cell, and the scenarios (as written) that run the supported ones."""

    device: str
    models: list[str]
    methods: list[str]
    frameworks: list[str]
    cells: list[PlannedCell] = field(default_factory=list)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> scenario YAML as a dict

    def key(self) -> str:
        """Identity of the plan: two invocations with the same key fill the same matrix folder."""
        blob = json.dumps({"device": self.device, "cells": [asdict(c) for c in self.cells],
                           "scenarios": self.scenarios}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_frameworks() -> list[str]:
    """Every registered framework except the test doubles."""
    return [n for n in registry.names() if n not in TEST_DOUBLES]


def select_models(families: list[str] | None) -> list[Preset]:
    """The tiny models of ``families`` (all families when None), in :data:`FAMILIES` order.

    Raises:
        MatrixError: an unknown family (with the closest known name).
    """
    for f in families or []:
        if f not in FAMILIES:
            raise MatrixError(unknown("family", f, FAMILIES))
    return [p for p in tiny_presets() if families is None or p.family in families]


def check_choices(frameworks: list[str], methods: list[str]) -> None:
    """Raises :class:`MatrixError` for an unknown framework or method."""
    for f in frameworks:
        if f not in registry.names():
            raise MatrixError(unknown("framework", f, registry.names()))
    for m in methods:
        if m not in METHODS:
            raise MatrixError(unknown("method", m, METHODS))


def scenario_name(preset: Preset, method: str) -> str:
    """The generated scenario's name: its sweeps are ``<name>-<time>`` in the matrix folder."""
    return f"matrix.{preset.name}.{method}"


def cell_scenario(preset: Preset, method: str, device: str, frameworks: list[str]) -> dict[str, Any]:
    """The scenario of one (model, method) row of the matrix on ``device``, run by ``frameworks``."""
    method_spec: dict[str, Any] = {"kind": method}
    if method != "full":
        method_spec |= {"lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": "all-linear"}
    return {
        "version": 1,
        "name": scenario_name(preset, method),
        "description": f"support matrix: {preset.title} ({preset.name}, tiny {preset.tiny_of}), {method}, "
                       f"{STEPS} steps on {device}",
        # float32 on a CPU (the CPU paths of the tools), bfloat16 on a GPU (what teams train in)
        "model": {"preset": preset.name, "weights": "random", "dtype": "float32" if device == "cpu" else "bfloat16",
                  "seed": 0},
        "method": method_spec,
        "data": {"source": "synthetic", "seq_len": SEQ_LEN, "lengths": "fixed"},
        "train": {"micro_batch": MICRO_BATCH, "grad_accum": 1, "steps": STEPS, "warmup_steps": WARMUP_STEPS, "lr": LR,
                  "optimizer": "adamw_torch", "gradient_checkpointing": True, "seed": 42},
        "hardware": {"device": device},
        "frameworks": list(frameworks),
        "measure": {"repeats": 1, "baseline": frameworks[0], "timeout_s": TIMEOUT_S},
    }


def _validation_reason(d: dict[str, Any], frameworks: list[str]) -> dict[str, str]:
    """Why validation refuses the scenario ``d`` for each of ``frameworks`` (only those it refuses)."""
    try:
        parse_scenario(yaml.safe_dump(d, sort_keys=False), d["name"])
        return {}
    except ScenarioError:
        pass
    out = {}
    for fw in frameworks:  # one framework at a time: which rows are refused, and why
        one = d | {"frameworks": [fw], "measure": d["measure"] | {"baseline": fw}}
        try:
            parse_scenario(yaml.safe_dump(one, sort_keys=False), d["name"])
        except ScenarioError as e:
            out[fw] = "; ".join(p.split(": ", 1)[-1] for p in e.problems)  # without the "<name>:<line>:" prefix
    return out


def plan_matrix(families: list[str] | None, frameworks: list[str], methods: list[str], device: str) -> MatrixPlan:
    """Every cell of the matrix, with the scenario that runs it or why the framework cannot.

    Raises:
        MatrixError: an unknown family, framework or method, or no model in ``families``.
    """
    check_choices(frameworks, methods)
    models = select_models(families)
    if not models:
        raise MatrixError(f"no tiny model of families {families}")
    plan = MatrixPlan(device=device, models=[p.name for p in models], methods=list(methods),
                      frameworks=list(frameworks))
    for preset in models:
        for method in methods:
            d = cell_scenario(preset, method, device, frameworks)
            typed = Scenario.model_validate(d | {"frameworks": [{"name": f} for f in frameworks]})
            why = {f: r for f in frameworks
                   if (r := registry.info(f).cannot_run(typed) or registry.info(f).family_unsupported(typed))}
            runnable = [f for f in frameworks if f not in why]
            if runnable:
                why |= _validation_reason(cell_scenario(preset, method, device, runnable), runnable)
                runnable = [f for f in runnable if f not in why]
            name = scenario_name(preset, method) if runnable else None
            if name:
                plan.scenarios[name] = cell_scenario(preset, method, device, runnable)
            plan.cells += [PlannedCell(preset.name, preset.family, method, f, name if f in runnable else None,
                                       why.get(f)) for f in frameworks]
    return plan


def find_matrix(plan: MatrixPlan, results_root: Path) -> Path | None:
    """The newest matrix folder of this exact plan, or None."""
    cands = []
    for d in Path(results_root).glob(f"{PREFIX}-{plan.device}-*"):
        try:
            stored = read_plan(d)
        except MatrixError:  # damaged or foreign: never filled in (a new folder is started beside it)
            continue
        if stored.get("key") == plan.key():
            cands.append((str(stored.get("created", "")), d))
    return max(cands)[1] if cands else None


def open_matrix(plan: MatrixPlan, results_root: Path, new: bool = False) -> Path:
    """The matrix folder to fill: the newest one of this plan, or a new one with the plan and scenarios written."""
    d = None if new else find_matrix(plan, results_root)
    if d is not None:
        return d
    results_root.mkdir(parents=True, exist_ok=True)
    while True:
        now = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        d = results_root / f"{PREFIX}-{plan.device}-{now}"
        try:
            d.mkdir()
            break
        except FileExistsError:  # two matrices started in the same second: the next second's name
            time.sleep(1.0)
    (d / SCENARIO_DIR).mkdir()
    for name, sc in plan.scenarios.items():
        head = (f"# {name}: one row of the support matrix, generated by `python -m harness matrix`; rerun it alone "
                f"with\n#   python -m harness run {d / SCENARIO_DIR / name}.yaml\n")
        results.atomic_write_text(d / SCENARIO_DIR / f"{name}.yaml", head + yaml.safe_dump(sc, sort_keys=False))
    meta = {"key": plan.key(), "created": now, "device": plan.device, "models": plan.models,
            "methods": plan.methods, "frameworks": plan.frameworks, "cells": [asdict(c) for c in plan.cells]}
    results.atomic_write_text(d / PLAN_FILE, json.dumps(meta, indent=1))
    return d


def read_plan(folder: Path) -> dict[str, Any]:
    """A matrix folder's stored plan (``matrix.json``), checked for the shape everything reading it relies on.

    Raises:
        MatrixError: the folder holds no readable plan, or one of another shape (a damaged or foreign file).
    """
    meta = results.read_json(Path(folder) / PLAN_FILE)
    if not meta or not isinstance(meta.get("cells"), list):
        raise MatrixError(f"{Path(folder) / PLAN_FILE}: cannot be read as a support matrix plan (damaged?)"
                          if (Path(folder) / PLAN_FILE).exists() else
                          f"{folder}: no {PLAN_FILE}: not a support matrix folder")
    wrong = [k for k in ("models", "methods", "frameworks") if not _texts(meta.get(k))]
    wrong += ["device"] if not isinstance(meta.get("device"), str) else []
    wrong += [f"cells[{i}]" for i, c in enumerate(meta["cells"]) if not _planned_cell(c)][:3]
    if wrong:
        raise MatrixError(f"{Path(folder) / PLAN_FILE}: not a support matrix plan ({', '.join(wrong)}: not of the "
                          "shape `python -m harness matrix` writes)")
    return meta


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _planned_cell(cell: Any) -> bool:
    """Whether a stored cell has :class:`PlannedCell`'s fields with their types."""
    return isinstance(cell, dict) and all(isinstance(cell.get(k), str) for k in ("model", "family", "method",
                                                                                 "framework")) \
        and all(cell.get(k) is None or isinstance(cell[k], str) for k in ("scenario", "unsupported"))


def read_not_run(folder: Path) -> dict[str, dict[str, str]]:
    """Why each planned framework of each scenario has no stored row (``not_run.json``); what is not of that shape
    (a damaged file) is left out: the reasons are written again by the next invocation."""
    stored = results.read_json(Path(folder) / NOT_RUN_FILE) or {}
    return {name: {fw: why for fw, why in rows.items() if isinstance(why, str)}
            for name, rows in stored.items() if isinstance(rows, dict)}


def stored_runs(sc: Scenario, folder: Path) -> dict[str, RunResult]:
    """The stored run of each framework of scenario ``sc`` in the matrix folder (its newest sweep)."""
    d = runner.newest_sweep(sc, folder)
    if d is None:
        return {}
    out = {}
    for fw in sc.framework_names():
        p = d / "runs" / f"{results.run_key(fw, 0)}.json"
        if p.exists():
            try:
                out[fw] = results.read_result(p)
            except results.ResultSchemaError:  # damaged: kept as it is (never run over), the report names it
                continue
    return out


def settings_reasons(invalid_reasons: list[str]) -> list[str]:
    """The invalid reasons that concern what was trained: those of a run that shared the machine (a matrix run
    several rows at a time, ``run_matrix(jobs=...)``) say its timings are not comparable, which the matrix, a
    record of support rather than speed, does not judge."""
    return [r for r in invalid_reasons if not r.startswith(runner.CONTENTION)]


def invalid_cell(status: str | None, invalid_reasons: list[str]) -> bool:
    """A stored run that trained (``status`` ok) but is invalid for what it trained (the matrix's "invalid" cell)."""
    return status == "ok" and bool(settings_reasons(invalid_reasons))


def _invalid_row(row: dict) -> bool:
    """:func:`invalid_cell` of a stored row's JSON (what the runner sets aside for a retry)."""
    return invalid_cell(row.get("status"), row.get("invalid_reasons") or [])


def run_matrix(folder: Path, retry_failed: bool = False, quiet: bool = False, only: list[str] | None = None,
               time_limit_s: float | None = None,
               on_row: Callable[[str, dict[str, str]], None] | None = None, jobs: int = 1,
               retry_invalid: bool = False) -> int:
    """Run every missing cell of the matrix in ``folder``; returns how many runs were started.

    Args:
        folder: a matrix folder (:func:`open_matrix`).
        retry_failed: redo cells stored as error, crashed, timeout or unavailable (the failed attempt is kept).
        retry_invalid: redo cells stored as invalid (:func:`invalid_cell`), e.g. after a fix of the check that
            judged them (the attempt is kept).
        quiet: no progress display from the sweep runner.
        only: run the cells of these frameworks only (the others stay as they are: a matrix can be filled one
            framework at a time).
        time_limit_s: start no further scenario after this many seconds (a machine lent for a limited time: the
            next invocation resumes where this one stopped; with ``jobs`` > 1 the rows already started finish).
        on_row: called after each scenario with its name and each framework's status (or why it did not run).
        jobs: how many rows (scenarios) run at once on this machine. The matrix asks whether a tool trains a
            model, not how fast: with ``jobs`` > 1 the machine is held for the whole matrix and every run it
            stores is marked as measured under contention (its timings are not comparable), which the matrix's
            outcome ignores (:func:`harness.analysis.matrix.cell_of`).

    Raises:
        harness.running.locks.Busy: another sweep holds the machine.
        harness.running.runner.OtherMachine: the folder's rows ran on another kind of GPU (model or count).
    """
    device = read_plan(folder)["device"]
    runner.refuse_other_machine(folder, "matrix")
    not_run = read_not_run(folder)
    t0 = time.monotonic()

    def todo_of(sc: Scenario) -> tuple[list[str], dict[str, str]]:
        """The frameworks of ``sc`` to run now, and why the others of the plan have no stored row."""
        stored = stored_runs(sc, folder)
        missing = dict(not_run.get(sc.name) or {})  # the frameworks not considered now keep their reason
        todo = []
        for fw in sc.frameworks:
            if only is not None and fw.key not in only:
                continue
            missing.pop(fw.key, None)
            have = stored.get(fw.key)
            redo = have is not None and (
                (retry_failed and have.status in runner.RETRYABLE)
                or (retry_invalid and invalid_cell(have.status, have.invalid_reasons)))
            if have is not None and not redo:
                continue
            if why := envs.unavailable(registry.info(fw.name), device):
                missing[fw.key] = f"unavailable: {why}"
            else:
                todo.append(fw.key)
        return todo, missing

    def finish(sc: Scenario, missing: dict[str, str]) -> None:
        stored = stored_runs(sc, folder)
        not_run[sc.name] = {k: v for k, v in missing.items() if k not in stored}
        # stored with the results, so that the report says why a cell is empty wherever it is regenerated
        results.atomic_write_text(folder / NOT_RUN_FILE, json.dumps(not_run, indent=1))
        if on_row:
            on_row(sc.name, {k: r.status for k, r in stored.items()} | not_run[sc.name])

    def rows() -> Iterator[tuple[Scenario, list[str], dict[str, str]]]:
        for path in sorted((folder / SCENARIO_DIR).glob("*.yaml")):
            if time_limit_s is not None and time.monotonic() - t0 >= time_limit_s:
                return
            sc = load_scenario(path)
            yield sc, *todo_of(sc)

    retry = {"retry_failed": retry_failed or retry_invalid, "retry_also": _invalid_row if retry_invalid else None}
    started = 0
    if jobs <= 1:
        for sc, todo, missing in rows():
            if todo:
                runner.run_sweep(sc, folder, quiet=quiet, only=todo, resume_only=True, **retry)
                started += len(todo)
            finish(sc, missing)
        return started
    what = f"support matrix {folder.name}, {jobs} rows at a time"
    with machine_lock(runner.machine_lock_dir(), folder, what), ThreadPoolExecutor(jobs) as pool, \
            runner.stop_runs_on_interrupt():
        running: dict[Future, tuple[Scenario, dict[str, str]]] = {}
        for sc, todo, missing in rows():
            if not todo:
                finish(sc, missing)
                continue
            while len(running) >= jobs:  # a free slot first, so that the time limit is checked at each start
                _collect(running, wait(running, return_when=FIRST_COMPLETED).done, finish)
            running[pool.submit(runner.run_sweep, sc, folder, quiet=True, only=todo, resume_only=True,
                                allow_contention=True, **retry)] = (sc, missing)
            started += len(todo)
        _collect(running, list(running), finish)
    return started


def _collect(running: dict[Future, tuple[Scenario, dict[str, str]]], done, finish) -> None:  # noqa: ANN001
    """Wait for the rows ``done`` (futures of ``running``), record each, and drop them from ``running``."""
    for fut in done:
        sc, missing = running.pop(fut)
        fut.result()  # a row's error (the machine taken, a broken folder) is the matrix's error
        finish(sc, missing)
