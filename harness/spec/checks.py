"""Checks of a validated scenario against what it names: frameworks, eval tasks, checkpoint, data, overrides.

The schema (:mod:`harness.spec.scenario`) checks each value by itself; these checks look across the scenario and
outside it, so that a run never starts only to fail on something knowable now: a baseline that is no framework
of the scenario, an eval task that exists nowhere (found otherwise only after all the training), a checkpoint
directory without weights, synthetic data too large to build, an override that points a tool outside its run's
directory, a data file that cannot train (:mod:`harness.spec.datacheck`).

Each check returns :class:`Problem` tuples (the scenario turns them into ``file:line: key: reason``) and notes
(facts worth printing with a valid scenario, e.g. how many data rows are cut at ``seq_len``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from adapters_for_tools import registry
from harness.common.names import unknown
from harness.inputs.data import passes_for_steps, repeat_note, resolve_path, samples_needed
from harness.inputs.tasks.local import LOCAL_TASK_DIR, local_task_names
from harness.spec import objective
from harness.spec.datacheck import check_jsonl
from harness.spec.yamlsafe import short_repr

# Synthetic samples are generated in memory and written as JSONL before any framework starts, at ~0.3 us per
# character on a CI core: 2^28 characters (~80 s, 256 MiB of text) is 1,000 times the largest shipped scenario's.
MAX_SYNTHETIC_TOKENS = 1 << 28
DEFAULT_BASELINE = "hf"  # MeasureSpec's default: may be absent from the frameworks (the report then shows no speed-up)
MAX_CONFIG_BYTES = 16 << 20  # a checkpoint's config.json is a few KB; a bigger one is not a config
# what transformers' from_pretrained loads weights from
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class Problem(NamedTuple):
    """One problem: ``loc`` finds the line; ``shown`` (default ``loc``) is the key path printed."""

    loc: tuple
    reason: str
    shown: tuple | None = None


@dataclass
class Findings:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check(sc: Any, source: str, deep: bool = True) -> Findings:
    """Every check of this module on a schema-valid scenario.

    Args:
        sc: the :class:`harness.spec.scenario.Scenario`.
        source: the scenario file (relative data paths resolve against it).
        deep: also open what the scenario names outside itself: the data file, a local checkpoint, the eval
            task registry. Off for a stored scenario rebuilt inside a worker: its sweep checked them at the start.

    Returns:
        The problems (empty for a scenario that can run) and notes.
    """
    out = Findings()
    out.problems += baseline_problems(sc, written_default_counts=deep)
    out.problems += synthetic_problems(sc)
    out.problems += [Problem(loc, reason) for loc, reason in objective.problems(sc)]
    for fw in sc.frameworks:
        if fw.name in registry.names() and (why := registry.info(fw.name).family_unsupported(sc)):
            out.notes.append(f"{fw.key}: {why}: its row will be stored as unavailable, the others run")
    for i, fw in enumerate(sc.frameworks):
        for sub, reason in override_problems(fw.overrides):
            out.problems.append(Problem(("frameworks", i, "overrides", *sub), reason,
                                        ("frameworks", fw.key, "overrides", *sub)))
    if not deep:
        return out
    out.problems += eval_task_problems(sc.eval.tasks, out.notes)
    if sc.model.weights != "random" and (why := checkpoint_problem(sc.model.weights)):
        out.problems.append(Problem(("model", "weights"), why))
    found_objective, objective_notes = objective.file_problems(sc, source)  # the rows of dpo, orpo, kto, grpo
    out.problems += [Problem(loc, reason) for loc, reason in found_objective]
    out.notes += objective_notes
    if sc.data.source == "jsonl" and sc.data.path and sc.objective.is_sft:
        path = resolve_path(sc.data.path, source)
        if path.exists():  # a missing file is reported by the scenario's own checks
            found = check_jsonl(path, sc.data.path, sc.data.format, sc.data.seq_len, prompt_loss=sc.data.prompt_loss,
                                num_samples=sc.data.num_samples, exact_tokens=sc.model.weights == "random")
            out.problems += [Problem(("data", "path"), p) for p in found.problems]
            out.notes += found.notes
            if not found.problems and (passes := passes_for_steps(sc, found.rows_kept, found.tokens_kept)) > 1:
                out.notes.append(repeat_note(sc.data.path, found.rows_kept, passes))
    return out


def baseline_problems(sc: Any, written_default_counts: bool = True) -> list[Problem]:
    """``measure.baseline`` must name one of the scenario's framework rows.

    The default (``hf``, not written in the file) may be absent: the report then shows no speed-ups and says so.
    Written out in a user's file, it must name a row, ``hf`` included; a stored, resolved scenario has every
    default written out, so there (``written_default_counts=False``) ``hf`` is always accepted.
    """
    names = sc.framework_names()
    base = sc.measure.baseline
    explicit = "baseline" in sc.measure.model_fields_set and written_default_counts
    if base in names or (base == DEFAULT_BASELINE and not explicit):
        return []
    return [Problem(("measure", "baseline"), unknown("baseline framework", base, names)
                    .replace("(available:", "(the scenario's frameworks:"))]


def strategy_problems(sc: Any) -> list[tuple[tuple, str]]:
    """``hardware.gpus`` and ``hardware.strategy`` together: several GPUs need a strategy, a strategy several GPUs.

    On device ``cpu``, ``gpus`` counts processes (gloo backend): the multi-process path without a GPU, which the
    CPU tests run. Which strategies each framework has is its adapter's declaration (``AdapterInfo.strategies``).

    Returns:
        ``(location, reason)`` pairs.
    """
    hw = sc.hardware
    if hw.strategy is None and hw.gpus > 1:
        return [(("hardware", "gpus"), f"{hw.gpus} GPUs need hardware.strategy (ddp, fsdp or zero3): how the "
                                       "frameworks spread one run over them")]
    if hw.strategy is not None and hw.gpus == 1:
        return [(("hardware", "strategy"), f"{hw.strategy} spreads a run over several GPUs: give hardware.gpus > 1, "
                                           "or leave strategy out for a one-GPU run")]
    if hw.strategy == "zero3" and hw.device == "cpu":
        return [(("hardware", "strategy"), "zero3 (DeepSpeed ZeRO-3) needs device cuda")]
    return []


def synthetic_problems(sc: Any) -> list[Problem]:
    """Synthetic data beyond :data:`MAX_SYNTHETIC_TOKENS` (the runner builds it in memory before anything runs)."""
    if sc.data.source != "synthetic":
        return []
    # an upper bound on harness.inputs.data.synthetic_examples' count: packing uniform lengths makes 4x the samples
    n = max(sc.data.num_samples or 0, samples_needed(sc) * (4 if sc.data.packing else 1))
    if n * sc.data.seq_len <= MAX_SYNTHETIC_TOKENS:
        return []
    loc = ("data", "num_samples") if (sc.data.num_samples or 0) >= samples_needed(sc) else ("train", "steps")
    return [Problem(loc, f"{n:,} synthetic samples of up to {sc.data.seq_len:,} tokens ({n * sc.data.seq_len:.2e} "
                         f"tokens) are more than the runner can build in memory before the run "
                         f"(at most {MAX_SYNTHETIC_TOKENS:.2e}): fewer steps, a smaller micro_batch or num_samples")]


def override_problems(value: Any, loc: tuple = ()) -> list[tuple[tuple, str]]:
    """Override values every tool can take: JSON (text keys, finite numbers), and no path leaving the run's directory.

    A tool runs with its run's directory as working directory and writes its output (checkpoints, logs, caches)
    there; an absolute path or one with ``..`` would make it read or write elsewhere (another run's directory, the
    results store, the user's files).

    Returns:
        ``(location under overrides, reason)`` pairs.
    """
    out: list[tuple[tuple, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                out.append((loc + (str(k),), f"override keys are text, not {type(k).__name__} {short_repr(k)}"))
                continue
            out += override_problems(v, loc + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += override_problems(v, loc + (i,))
    elif isinstance(value, float) and not math.isfinite(value):
        out.append((loc, f"{value} is not a finite number"))
    elif isinstance(value, str) and (why := _escapes(value)):
        out.append((loc, f"{short_repr(value)} {why}: tools read and write only inside their run's directory "
                         "(give a relative path without '..')"))
    return out


def _escapes(s: str) -> str | None:
    """Why ``s``, read as a path, leaves the directory it is relative to; None when it stays inside (or is no path)."""
    p = s.strip().replace("\\", "/")
    if p.startswith(("/", "~")) or re.match(r"^[A-Za-z]:/", p) or re.match(r"^file:", p, re.IGNORECASE):
        return "is an absolute path"
    if ".." in PurePosixPath(p).parts:
        return "climbs out with '..'"
    return None


def eval_task_problems(tasks: list[str], notes: list[str]) -> list[Problem]:
    """Each ``eval.tasks`` entry must be a local task (``scenarios/tasks/``) or one lm-eval knows here."""
    local = local_task_names()
    missing = [(i, t) for i, t in enumerate(tasks) if t not in local]
    if not missing:
        return []
    known = _lm_eval_task_names()
    if known is None:
        notes.append(f"eval.tasks {[t for _, t in missing]}: not local tasks ({LOCAL_TASK_DIR.name}/) and lm-eval is "
                     "not importable here: they are resolved when the evaluator starts")
        return []
    return [Problem(("eval", "tasks", i), unknown("eval task", t, sorted(local)) + "; lm-eval knows none of that name")
            for i, t in missing if t not in known]


def _lm_eval_task_names() -> set[str] | None:
    """Every task, group and tag lm-eval knows in this interpreter (~7 s: it indexes ~14,000 YAMLs), or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    from lm_eval.tasks import TaskManager  # heavy optional dependency: only when a task is not a local one

    return set(TaskManager(verbosity="ERROR").all_tasks)


def checkpoint_problem(weights: str) -> str | None:
    """Why a local ``model.weights`` path is no loadable checkpoint, or None (also for a hub id).

    A local path (starting with ``/``, ``.`` or ``~``, or existing) must be a directory with a ``config.json``
    object and weight files transformers loads (``*.safetensors``, ``pytorch_model*.bin``), every shard an
    index names included. Relative paths resolve against the working directory, as the runner resolves them.
    """
    p, shown = Path(weights), short_repr(weights, 200)
    if not (weights.startswith(("/", ".", "~")) or p.exists()):
        return None  # a hub id, resolved by the tools from their cache
    if not p.exists():
        return f"checkpoint path {shown} does not exist"
    if not p.is_dir():
        return f"{shown} is not a directory: a checkpoint is a directory with config.json and weights"
    cfg = p / "config.json"
    if not cfg.is_file():
        return f"checkpoint {shown} has no config.json"
    try:
        if cfg.stat().st_size > MAX_CONFIG_BYTES or not isinstance(json.loads(cfg.read_bytes()), dict):
            return f"{shown}/config.json is not a JSON object"
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding
        return f"{shown}/config.json cannot be read: {e}"
    if not any(f.is_file() for pattern in WEIGHT_PATTERNS for f in p.glob(pattern)):
        return f"checkpoint {shown} has no weight files ({', '.join(WEIGHT_PATTERNS)})"
    for index in sorted(p.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_bytes()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            return f"{index.name} of {shown} cannot be read: {e}"
        absent = sorted(str(s) for s in shards if not (p / str(s)).is_file())
        if absent:
            return f"{index.name} of {shown} names shards that are missing: {absent[:3]}"
    return None
