"""The adapter contract: what an adapter declares, what its ``run`` gets, and what it must hand back.

An adapter is a package ``adapters_for_tools/<name>/`` with two modules. ``dummy/`` is the template: copy it.

``__init__.py`` (light: no torch, no toolkit; validation and ``python -m harness list`` import it):

- ``INFO = AdapterInfo(...)``: the name, which methods, devices and model families it supports, the environment
  its worker runs in (``harness/running/environments.yaml``), the import names it needs there (``requires``) and
  the distribution whose version is the tool's version (``version_of``). From these the runner decides whether
  it can run on this machine now (``harness.running.envs.unavailable``: environment created, GPU visible).
- Its overrides as a typed model, a subclass of :class:`Overrides` (``extra="forbid"``, strict types, bounds),
  named in ``INFO.overrides``. ``validate`` checks every framework row's ``overrides:`` against it, so a typo
  stops with ``file:line: frameworks.<label>.overrides.<key>: ... did you mean ...?`` before anything runs.

``adapter.py`` (heavy: imported only inside the worker process, in the adapter's environment), ``run(ctx)``
with ``ctx`` a :class:`RunContext`. It must:

1. Turn ``ctx.scenario`` into the tool's own configuration and save it (``ctx.save_native_config``; store the
   command that reruns it with the tool alone in ``ctx.extra["rerun"]``, see :func:`rerun_command`). Read tool
   settings from ``ctx.options`` (the row's overrides, validated and typed, defaults filled). Report each scenario
   setting the tool cannot reproduce with ``ctx.cannot_honour(setting, why)``: the run is then marked invalid.
2. Load ``ctx.checkpoint`` (every framework loads the same files; set ``ctx.load_s``) and train on
   ``ctx.dataset_path`` (a JSONL, its ``.meta.json`` beside it) in file order, with ``ctx.scenario.train.seed``.
3. Drive ``ctx.meter`` at every optimizer step: ``step_begin()``, ``count_batch(batch)`` for every micro-batch
   (or ``meter.attach(model)`` to count from the model's forward), ``step_end(loss)``. HF-Trainer-based tools
   pass ``callbacks=ctx.trainer_callbacks()`` to the trainer and ``ctx.meter.attach`` the model it built.
4. Read back what actually ran, from the live model and optimizer at the first step, never from the scenario:
   ``ctx.set_effective(train_mode=..., gradient_checkpointing=..., dtype=..., quantization=..., lora_r=..., ...)``
   (``harness.measuring.effective.read_back_model`` / ``read_back_optimizer`` do it for transformers models).
   A row's speed switches (Liger-Kernel, a checkpoint mode) are read back the same way, and a switch that did not
   take effect marks the run invalid: ``adapters_for_tools/switches.py``.
5. Save the trained output (PEFT adapter or HF checkpoint) in ``ctx.output_dir``; with ``eval.every_steps`` also
   the intermediate ones (``ctx.save_intermediate``).

An adapter whose rows can plan themselves to the memory budget (``INFO.budget_overrides``) may also define, in
``adapter.py``, ``predicts_fit(scenario, overrides) -> bool | None``: whether the tool's own model predicts that a row
with these overrides fits the scenario's budget at its seq_len and batch, before anything runs (None: it cannot say).
A memory frontier, in its own process, probes that prediction first (``harness.running.frontier``); it must touch no
GPU.

An exception from ``run`` becomes the run's recorded error (an out-of-memory one: status ``oom``); the sweep goes
on. Keep adapters independent: no adapter imports another; what several share lives beside this module
(``prompt_completion.py``) or here (:func:`trainer_args`). A little duplication beats a deep class hierarchy.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.common.names import unknown
from harness.inputs.models import FAMILIES, FAMILY_OF_MODEL_TYPE, get_preset

INTERMEDIATE_DIRNAME = "intermediate"  # <work_dir>/intermediate/step-000050: outputs saved during training

ALL_METHODS = frozenset({"full", "lora", "qlora", "dora"})
ALL_FAMILIES = frozenset(FAMILIES)  # every model family with presets (harness.inputs.models.FAMILIES)

# scenario train.optimizer -> transformers TrainingArguments.optim (hf, TRL, Axolotl and LLaMA-Factory all take it)
HF_OPTIM = {"adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
            "sgd": "sgd"}


class Overrides(BaseModel):
    """Base of an adapter's typed overrides: unknown keys and wrong types are errors, never silently ignored.

    Strict: YAML ``1`` is no bool, ``"4"`` no int. Frozen: an adapter reads its overrides, it does not edit them.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


def override_names(model: type[Overrides]) -> list[str]:
    """The keys a row's ``overrides`` may hold for ``model`` (aliases where a field has one)."""
    return [f.alias or name for name, f in model.model_fields.items()]


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter declares (its package's ``INFO``)."""

    name: str
    description: str
    env: str = "base"  # environment the worker runs in (harness.running.envs); "base" = this interpreter
    methods: frozenset[str] = ALL_METHODS
    # training objectives it runs (scenario `objective.kind`, harness.spec.objective)
    objectives: frozenset[str] = frozenset({"sft"})
    objectives_note: str = ""  # why an objective is missing, said when a scenario asks for it
    families: frozenset[str] = ALL_FAMILIES
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    requires: tuple[str, ...] = ()  # import names that must be importable in the adapter's environment
    version_of: str | None = None  # distribution whose version is the tool's version
    notes: str = ""
    overrides: type[Overrides] = Overrides  # the typed model of a framework row's `overrides:`
    extra: dict[str, Any] = field(default_factory=dict)
    # hardware.strategy -> the methods the tool spreads over several GPUs with it (none: one GPU only)
    strategies: dict[str, frozenset[str]] = field(default_factory=dict)
    strategies_note: str = ""  # why a strategy is missing, said when a scenario asks for it
    # how its ranks start (harness.running.launch): "torchrun", or "accelerate" (accelerate launch, the tool's own)
    launcher: str = "torchrun"
    # settings of a scenario the tool cannot express although it runs the method and objective (a loss variant, a
    # reference handling): why, or None; checked at validation after the declarations above
    refuse: Callable[[Any], str | None] | None = None
    # a row's valid overrides against the scenario it runs (a knob the scenario's settings rule out): (location
    # under overrides, reason) pairs; checked at validation after the overrides' own types
    check_row: Callable[[Any, Overrides], list[tuple[tuple[str | int, ...], str]]] | None = None
    # overrides that make the tool choose its own settings from hardware.memory_budget_gib (tunebench's `plan`):
    # a row with one of them set runs differently under each budget; any other row runs the same under every cap
    budget_overrides: frozenset[str] = frozenset()

    def cannot_run(self, sc) -> str | None:  # noqa: ANN001
        """Why this adapter can never run the scenario (checked at validation: the scenario is refused), or None.

        A model family the adapter does not support is not among the reasons (:meth:`family_unsupported`): the
        other rows of a Gemma or Falcon scenario still run, and this one is stored saying why it did not."""
        if sc.method.kind not in self.methods:
            return f"method {sc.method.kind!r} not supported (supports {sorted(self.methods)})"
        objective = sc.objective.kind
        if objective not in self.objectives:
            return (f"objective {objective!r} not supported (supports {sorted(self.objectives)})"
                    + (f": {self.objectives_note}" if self.objectives_note else ""))
        strategy = sc.hardware.strategy
        if strategy is not None and sc.method.kind not in self.strategies.get(strategy, ()):
            if strategy not in self.strategies:
                has = f"has {sorted(self.strategies)}" if self.strategies else "runs on one GPU only"
                return f"strategy {strategy!r} not supported ({self.strategies_note or has})"
            return (f"strategy {strategy!r} with method {sc.method.kind!r} not supported (with {strategy}: "
                    f"{sorted(self.strategies[strategy])})")
        if sc.hardware.device not in self.devices:
            return f"device {sc.hardware.device!r} not supported (supports {sorted(self.devices)})"
        return self.refuse(sc) if self.refuse is not None else None

    def follows_budget(self, overrides: dict[str, Any]) -> bool:
        """Whether a row with these ``overrides`` chooses its settings from the scenario's memory budget (one of
        :attr:`budget_overrides` set), so that its run under one budget stands for no other."""
        return any(overrides.get(k) not in (None, False) for k in self.budget_overrides)

    def family_unsupported(self, sc) -> str | None:  # noqa: ANN001
        """Why this adapter does not train the scenario's model family, or None (the runner stores the row as
        unavailable with this reason)."""
        family = family_of(sc)
        if family and family not in self.families:
            return f"model family {family!r} not supported by {self.name} (supports {', '.join(sorted(self.families))})"
        return None

    def check_overrides(self, overrides: dict[str, Any], sc: Any = None) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems with a framework row's ``overrides`` under :attr:`overrides`, and (given the scenario ``sc``)
        against the scenario's settings (:attr:`check_row`).

        Returns:
            ``(location under overrides, reason)`` pairs, empty when valid; an unknown key's reason names the
            closest known key (``did you mean 'recompute_layers'?``).
        """
        try:
            typed = self.overrides.model_validate(overrides)
        except ValidationError as e:
            reasons: dict[tuple[str | int, ...], list[str]] = {}
            for err in e.errors():
                loc = _input_path(overrides, err["loc"])
                if err["type"] == "extra_forbidden" and len(loc) == 1:
                    msg = unknown(f"{self.name} override", str(loc[0]), override_names(self.overrides))
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                reasons.setdefault(loc, []).append(msg)
            # a union (bool | "unsloth") fails once per member: one reason, "... a valid boolean or 'unsloth'"
            return [(loc, msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:]))
                    for loc, msgs in reasons.items()]
        return self.check_row(sc, typed) if (sc is not None and self.check_row is not None) else []


def _input_path(value: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The part of a pydantic error location that names keys and indices of the input (pydantic adds the member
    of a union that failed, e.g. ``('use_gradient_checkpointing', 'bool')``, which is no key of the YAML)."""
    path: list[str | int] = []
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            break
        path.append(part)
    return tuple(path) or tuple(loc[:1])  # a field missing from the input: name it anyway


def family_of(sc) -> str | None:  # noqa: ANN001
    """The model family of a scenario's preset, or of a local checkpoint's ``config.json`` ``model_type`` (None: a
    hub id, an unreadable config, a preset that does not exist; a model type of no family is its own name)."""
    if sc.model.preset:
        try:
            return get_preset(sc.model.preset).family
        except KeyError:
            return None
    config = Path(sc.model.weights) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return FAMILY_OF_MODEL_TYPE.get(model_type, model_type) if isinstance(model_type, str) else None


def trainer_args(sc) -> dict[str, Any]:  # noqa: ANN001
    """The transformers ``TrainingArguments`` that carry the scenario's optimisation settings, under their own
    names: shared by every HF-Trainer-based tool that takes them as such (hf, TRL, Unsloth, LLaMA-Factory).
    No LR warmup (the scenario has none); ``max_grad_norm`` 0 = no clipping."""
    t = sc.train
    return {
        "per_device_train_batch_size": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "max_steps": t.steps,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": 0,
        "optim": HF_OPTIM[t.optimizer],
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm or 0.0,
    }


def rerun_command(module_args: str) -> str:
    """The shell command that reruns ``python -m <module_args>`` with the tool alone, in this worker's
    interpreter and package overlay (its ``PYTHONPATH``): what adapters store as ``extra["rerun"]``."""
    return f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} {sys.executable} -m {module_args}"


@dataclass
class RunContext:
    """What an adapter's ``run`` gets: the scenario, the files to use, the hook to drive, and where to put things.

    The worker (``harness.running.worker``) builds it; ``run`` fills in ``effective``, ``extra``, ``load_s``,
    ``native_config`` and ``unsupported``, which the worker stores with the run's measurements.
    """

    scenario: Any  # harness.spec.scenario.Scenario
    framework: str
    overrides: dict[str, Any]  # the row's `overrides:` as written (already validated against `options`' model)
    repeat: int
    checkpoint: str  # directory (or hub id) every framework loads
    dataset_path: Path  # the sweep's dataset (JSONL) and its .meta.json beside it
    work_dir: Path  # scratch for this run: native configs, logs
    output_dir: Path  # the trained output (PEFT adapter / HF checkpoint)
    device: str
    meter: Any  # harness.measuring.meter.StepMeter
    options: Overrides = field(default_factory=Overrides)  # the overrides typed by INFO.overrides, defaults filled
    # Makes the measuring TrainerCallback (see trainer_callbacks). The worker supplies it: the measuring layer
    # builds that callback, and this module sits below that layer (validation imports it).
    measure_callback: Callable[[], Any] | None = None
    effective: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    native_config: str | None = None  # path of the tool's own config, saved for rerunning with the tool alone
    unsupported: list[str] = field(default_factory=list)  # scenario settings the tool could not honour
    load_s: float | None = None

    @property
    def seed(self) -> int:
        return self.scenario.train.seed

    def set_effective(self, **settings: Any) -> None:
        """Record effective settings read back from the live model/trainer (merged over earlier calls)."""
        self.effective.update(settings)

    def save_native_config(self, name: str, text: str) -> Path:
        """Write the tool's own configuration into the work directory and remember it as the run's."""
        p = self.work_dir / name
        p.write_text(text)
        self.native_config = str(p)
        return p

    def cannot_honour(self, setting: str, why: str) -> None:
        """Report a scenario setting the tool cannot honour (it also marks the run invalid)."""
        self.unsupported.append(f"{setting}: {why}")

    # -- intermediate outputs for time-to-target (scenario ``eval.every_steps``) ------------------------------
    def intermediate_dir(self, step: int) -> Path | None:
        """The directory to save the model in after optimizer step ``step``, or None when no save is due.

        With ``eval.every_steps: N`` (and eval tasks) a save is due after every N-th optimizer step, except
        the last one (the final output in ``output_dir`` stands for it). ``harness.analysis.evaluate`` later
        evaluates every ``<work_dir>/intermediate/step-<step:06d>`` in step order to find the time to the target.

        Call it after ``meter.step_end()`` and before the next ``meter.step_begin()``, so that saving is not
        counted as step time::

            ctx.meter.step_end(loss)
            if (d := ctx.intermediate_dir(step + 1)) is not None:
                model.save_pretrained(d)       # PEFT adapter, or the full HF checkpoint

        :meth:`save_intermediate` does exactly this; HF-Trainer-based tools get it from
        :meth:`trainer_callbacks`.

        Args:
            step: optimizer steps completed (1-based).

        Returns:
            An existing, empty directory, or None.
        """
        ev = self.scenario.eval
        last = self.scenario.train.steps
        if not ev.every_steps or not ev.tasks or step <= 0 or step % ev.every_steps or step >= last:
            return None
        d = self.work_dir / INTERMEDIATE_DIRNAME / f"step-{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_intermediate(self, model: Any, step: int | None = None, save: Any = None) -> Path | None:
        """Save ``model`` (anything with ``save_pretrained``) if a save is due after ``step``.

        Args:
            model: the live model (a PEFT model saves only its adapter).
            step: optimizer steps completed; default: the steps the meter has recorded so far.
            save: ``save(directory)`` for models without ``save_pretrained`` (our trainer's).

        Returns:
            The directory written, or None when no save was due.
        """
        step = len(self.meter.steps) if step is None else step
        d = self.intermediate_dir(step)
        if d is None:
            return None
        t0 = time.perf_counter()
        save(d) if save is not None else model.save_pretrained(d)
        saves = self.extra.setdefault("intermediate_saves", [])
        saves.append({"step": step, "save_s": time.perf_counter() - t0, "dir": str(d)})
        return d

    def trainer_callbacks(self) -> list[Any]:
        """The callbacks an HF-Trainer-based tool gets, in this order: the measuring callback (it drives the meter
        at each optimizer step, and its first step reads the effective settings back from the live model and
        optimizer), then :meth:`intermediate_callback` (callbacks run in list order, so the step's clock has
        stopped before a save starts).

        Raises:
            RuntimeError: the context was not built by the worker (no ``measure_callback``).
        """
        if self.measure_callback is None:
            raise RuntimeError("RunContext.measure_callback is not set: the worker (harness.running.worker) "
                               "supplies it")
        return [self.measure_callback(), self.intermediate_callback()]

    def train_reading_packed_rows(self, trainer: Any) -> None:
        """``trainer.train()`` for an HF-Trainer-based tool; with ``data.packing``, the micro-batch is read back from
        the rows its data collator takes per micro-batch. A padding-free collator (TRL's, Unsloth's with packing)
        joins those packed rows into one row, which is all the measuring hook sees."""
        if not self.scenario.data.packing:
            trainer.train()
            return
        rows: list[int] = []
        collate = trainer.data_collator

        def counting(features: list[Any]) -> Any:
            rows.append(len(features))
            return collate(features)

        trainer.data_collator = counting
        trainer.train()
        if rows:
            self.set_effective(micro_batch=max(rows))

    def intermediate_callback(self) -> Any:
        """A transformers ``TrainerCallback`` that calls :meth:`save_intermediate` at each step end."""
        from transformers import TrainerCallback  # heavy, and absent where validation runs

        ctx = self

        class IntermediateSaveCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003, ANN202
                ctx.save_intermediate(model, state.global_step)

        return IntermediateSaveCallback()
