"""Scenario files: YAML -> typed, validated objects.

A scenario names a model, a fine-tuning method, data, training settings, the hardware and the frameworks to
run. Everything is checked before anything runs: unknown keys, wrong types and impossible combinations raise
:class:`ScenarioError`, whose message reads ``file:line: key: reason`` (the CLI exits with code 2).

Example::

    from harness.spec.scenario import load_scenario
    sc = load_scenario("scenarios/tiny_cpu.yaml")
    sc.train.micro_batch, sc.method.kind
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from adapters_for_tools import registry
from harness.common.names import unknown
from harness.inputs import models
from harness.inputs.data import resolve_path
from harness.spec import checks, yamlsafe
from harness.spec.objective import ObjectiveSpec, WarmStartSpec
from harness.spec.problems import got_text, schema_problems
from harness.spec.yamlsafe import dotted, line_of

SCHEMA_VERSION = 1

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bounds on numbers: each far beyond any real run, small enough that a typo (an extra zero, a unit slip) is caught
# here rather than after hours of building data or training.
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers' set_seed seeds numpy too)
MAX_STEPS = 1_000_000  # optimizer steps; the longest shipped scenario runs 1,000
MAX_SEQ_LEN = 1 << 20  # tokens; 8x the longest context of any preset (131,072)
MAX_BATCH = 65536  # micro_batch, grad_accum, eval batch_size
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: no single run or evaluation of a benchmark takes longer
MAX_MEMORY_BUDGET_GIB = 4096  # GiB for one process; the largest GPUs hold under 300
MAX_NAME = 100  # scenario names and labels become file names (results/<name>-<time>/..., well under 255 bytes)
MAX_PROBLEMS = 30  # problems listed for one file: a hostile file may hold thousands
MAX_DESCRIPTION = 2000  # characters; a description is a line or two in reports (the longest shipped is ~150)


def _not_dots(name: str) -> str:
    """Refuse ``.``, ``..`` and other all-dot names: as a path part they mean this or the parent directory."""
    if not name.strip("."):
        raise ValueError(f"{name!r} cannot be a file name (it names the current or parent directory)")
    return name


# a scenario name or framework label: one file name of letters, digits and _ . - (+ in labels)
ScenarioName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$", max_length=MAX_NAME),
                         AfterValidator(_not_dots)]
FrameworkLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+-]+$", max_length=MAX_NAME),
                           AfterValidator(_not_dots)]


def _path_text(value: str) -> str:
    """Refuse what no file system takes (the OS would raise instead of answering "no such file")."""
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    if len(value.encode("utf-8", "surrogatepass")) > 4096:  # PATH_MAX on Linux
        raise ValueError("a path longer than 4096 bytes")
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in value.split("/")):  # NAME_MAX
        raise ValueError("a path part longer than 255 bytes")
    return value


PathText = Annotated[str, AfterValidator(_path_text)]  # a local path (or a hub id, which is a short path too)


def _no_repeats(names: list[str]) -> list[str]:
    """Refuse a name listed twice (a list of module names means a set; a repeat is a typo of another name)."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
    return names


class ScenarioError(Exception):
    """A scenario that cannot run; ``str()`` gives one ``file:line: key: reason`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    # allow_inf_nan: YAML's .inf and .nan are floats; no setting of a run means anything infinite or undefined.
    # strict: a value is taken as the type YAML read it as: '12' (quoted) is text, not a number, 12.0 is not a whole
    # number, 1 is not true, 'yes' (quoted) is not a boolean (an integer for a float is fine: lr: 1)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class ModelSpec(_Strict):
    preset: str | None = None  # architecture preset name (scenarios/presets/<name>.yaml)
    weights: PathText = "random"  # "random", or a local checkpoint path / hub id
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    seed: int = Field(0, ge=0, le=MAX_SEED)  # seed of the random weights
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # a short SFT of the checkpoint before any framework loads it (harness.spec.objective.WarmStartSpec); left out of
    # the resolved scenario when absent
    warm_start: WarmStartSpec | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _need_source(self) -> ModelSpec:
        if self.preset is None and self.weights == "random":
            raise ValueError("give `preset` (an architecture preset) for random weights, or a checkpoint in `weights`")
        return self


class QuantSpec(_Strict):
    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class MethodSpec(_Strict):
    kind: Literal["full", "lora", "qlora", "dora"]
    lora_r: int = Field(16, ge=1, le=4096)
    lora_alpha: float = Field(16, gt=0, le=65536)  # scale alpha/r: 16x the largest rank is already absurd
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Annotated[list[str], Field(min_length=1), AfterValidator(_no_repeats)] | Literal["all-linear"] = \
        "all-linear"
    quant: QuantSpec | None = None

    @model_validator(mode="after")
    def _quant_only_for_qlora(self) -> MethodSpec:
        if self.kind == "qlora" and self.quant is None:
            self.quant = QuantSpec()
        if self.kind != "qlora" and self.quant is not None:
            raise ValueError(f"`quant` applies to qlora only, not to {self.kind!r}")
        return self

    @property
    def is_peft(self) -> bool:
        return self.kind in ("lora", "qlora", "dora")

    # what "all-linear" stands for: the model family's linear modules, set by Scenario from its model
    _all_linear: tuple[str, ...] = PrivateAttr(default=LINEAR_MODULES)

    def resolved_targets(self) -> list[str]:
        return list(self._all_linear) if self.target_modules == "all-linear" else list(self.target_modules)


class DataSpec(_Strict):
    source: Literal["synthetic", "jsonl"] = "synthetic"
    path: PathText | None = None  # jsonl only
    format: Literal["alpaca", "messages", "sharegpt", "text"] | None = None  # jsonl only; guessed when absent
    seq_len: int = Field(ge=8, le=MAX_SEQ_LEN)
    # synthetic: every sample seq_len long, or uniform in [min_len, seq_len]
    lengths: Literal["fixed", "uniform"] = "fixed"
    min_len: int | None = Field(None, ge=2, le=MAX_SEQ_LEN)
    # default: exactly what the steps consume. Rows are held in memory: 10 million is far beyond any benchmark here
    num_samples: int | None = Field(None, ge=1, le=10_000_000)
    packing: bool = False  # concatenate samples into seq_len rows (attention kept within each sample where supported)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    prompt_loss: bool = False  # jsonl: train on prompt tokens too

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.source == "jsonl" and not self.path:
            raise ValueError("source jsonl needs `path`")
        if self.source == "synthetic" and self.path:
            raise ValueError("`path` is for source jsonl; synthetic data is generated")
        if self.min_len is not None and self.min_len > self.seq_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than seq_len ({self.seq_len})")
        return self


class TrainSpec(_Strict):
    micro_batch: int = Field(ge=1, le=MAX_BATCH)
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    steps: int = Field(ge=1, le=MAX_STEPS)  # optimizer steps
    warmup_steps: int = Field(2, ge=0)  # first optimizer steps left out of timing (not an LR warmup)
    lr: float = Field(2e-4, gt=0, le=10)  # fine-tuning LRs are ~1e-5..1e-2; above 10 every optimizer diverges
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0, le=10)  # decoupled: lr * weight_decay of each weight goes every step
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    gradient_checkpointing: bool = True
    seed: int = Field(42, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps}): "
                             "no step would be timed")
        return self


class HardwareSpec(_Strict):
    device: Literal["cuda", "cpu"] = "cuda"
    gpus: int = Field(1, ge=1, le=64)  # of one host (the largest boxes hold 8-16)
    # GiB this run's process may use on each GPU, applied before the tool loads (harness.measuring.memcap)
    memory_budget_gib: float | None = Field(None, gt=0, le=MAX_MEMORY_BUDGET_GIB)
    # how a run spreads over `gpus` processes of one host, each the framework's own (harness.running.launch); none:
    # one process on one GPU. Left out of the resolved scenario when none, so one-GPU scenarios keep their hashes
    strategy: Literal["ddp", "fsdp", "zero3"] | None = Field(None, exclude_if=lambda v: v is None)


class FrameworkSpec(_Strict):
    name: str  # adapter name (python -m harness list)
    label: FrameworkLabel | None = None  # to run one adapter twice, e.g. hf-eager
    overrides: dict[str, Any] = Field(default_factory=dict)  # tool-specific settings passed to the adapter
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)

    @property
    def key(self) -> str:
        """The framework's name in results and reports (its label, else the adapter name)."""
        return self.label or self.name


class MeasureSpec(_Strict):
    repeats: int = Field(1, ge=1, le=1000)
    memory_interval_ms: float = Field(10, gt=0, le=10_000)
    timeout_s: float = Field(1800, gt=0, le=MAX_TIMEOUT_S)  # per run
    baseline: str = Field("hf", max_length=MAX_NAME)  # framework every speed-up is measured against
    # override the GPU's bf16 dense peak used for MFU (an H200's is ~990 TFLOP/s)
    peak_tflops: float | None = Field(None, gt=0, le=100_000)
    # repeat r trains with train.seed + r and, for random weights, a checkpoint drawn with model.seed + r: the
    # repeats then measure the seed-to-seed spread of the result (what a quality comparison needs) instead of the
    # run-to-run noise of one seed (Scenario.for_repeat)
    # (left out of the resolved scenario when off, so a scenario without it hashes as it always did)
    seed_per_repeat: bool = Field(False, exclude_if=lambda v: not v)


class EvalSpec(_Strict):
    """Quality evaluation (lm-eval) of what each framework trained; empty by default."""

    tasks: list[str] = Field(default_factory=list)  # lm-eval task names (local ones: scenarios/tasks/)
    limit: int | None = Field(None, ge=1, le=10_000_000)  # documents per task (None: all)
    every_steps: int | None = Field(None, ge=1, le=MAX_STEPS)  # evaluate during training (time-to-target)
    target: dict[str, float] = Field(default_factory=dict)  # "<task>/<metric>" -> value for time-to-target
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    # loss parity against measure.baseline (harness.analysis.parity): None = the default for the training dtype;
    # a loss is a few nats, so a tolerance of 100 already accepts anything
    parity_atol: float | None = Field(None, ge=0, le=100)
    parity_rtol: float | None = Field(None, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if (self.every_steps or self.target) and not self.tasks:
            raise ValueError("every_steps and target need `tasks` to evaluate")
        for key in self.target:
            task, sep, metric = key.partition("/")
            if not sep or not metric or task not in self.tasks:
                raise ValueError(f"target {key!r} must be '<task>/<metric>' with <task> one of {self.tasks} "
                                 "(e.g. 'tb_mix_mc/acc')")
        return self


def _hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _run_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A resolved scenario dict without what is not a setting of a run: repeats and time limits."""
    d = dict(d)
    d["measure"] = {k: v for k, v in (d.get("measure") or {}).items() if k not in ("repeats", "timeout_s")}
    d["frameworks"] = [{k: v for k, v in f.items() if k != "timeout_s"} for f in d.get("frameworks") or []]
    return d


def row_settings(d: dict[str, Any], framework: str) -> dict[str, Any]:
    """What one framework's runs measured, from a resolved scenario dict (``Scenario.to_dict()`` or a sweep's
    stored ``scenario.yaml``): the shared settings and that framework's own entry (matched by label, else name);
    the description, the report's baseline and the other rows left out. Hashed into ``settings_hash``.

    Raises:
        KeyError: ``framework`` is not a row of the scenario.
    """
    d = _run_settings(d)
    d.pop("description", None)
    d["measure"].pop("baseline", None)
    names = [f.get("label") or f.get("name") for f in d["frameworks"]]
    d["frameworks"] = [f for f, n in zip(d["frameworks"], names, strict=True) if n == framework]
    if not d["frameworks"]:
        raise KeyError(f"{framework!r} is not a framework of scenario {d.get('name')!r}: {names}")
    return d


def settings_hash_of(d: dict[str, Any], framework: str) -> str:
    """:meth:`Scenario.settings_hash` of a resolved scenario dict (a stored ``scenario.yaml``).

    Raises:
        KeyError: ``framework`` is not a row of the scenario.
    """
    return _hash(row_settings(d, framework))


class Scenario(_Strict):
    version: int
    name: ScenarioName
    description: str = Field("", max_length=MAX_DESCRIPTION)
    model: ModelSpec
    method: MethodSpec
    # what the model is trained to do (harness.spec.objective); sft, the default, has no settings and is left out of
    # the resolved scenario, so an SFT scenario's hash is the same whether or not it writes the section
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, exclude_if=lambda o: o.kind == "sft")
    data: DataSpec
    train: TrainSpec
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    frameworks: list[FrameworkSpec]
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    # where it came from (not part of the YAML)
    source_path: str | None = Field(None, exclude=True)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _family_targets(self) -> Scenario:
        self.method._all_linear = models.all_linear_for(self.model.preset, self.model.weights)
        return self

    @property
    def notes(self) -> list[str]:
        """Facts found while validating that do not stop the run (e.g. data rows cut at seq_len)."""
        return self._notes

    def framework_names(self) -> list[str]:
        return [f.key for f in self.frameworks]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """Stable hash of the resolved settings: two runs with the same hash measured the same thing.

        How many repeats and how long to wait are not settings of a run, so they are left out: a sweep can be
        filled in several invocations (``--only``, ``--repeats``) and still be one sweep.
        """
        return _hash(_run_settings(self.to_dict()))

    def settings_hash(self, framework: str) -> str:
        """Hash of what one framework's runs measured: the shared settings and that framework's own entry.

        Unlike :meth:`content_hash` it stays the same when other framework rows are added, dropped or changed,
        the description is edited or the report's baseline is switched, so ``compare`` can tell which rows of two
        sweeps still measured the same thing after a scenario was edited.
        """
        return settings_hash_of(self.to_dict(), framework)

    def for_repeat(self, repeat: int) -> Scenario:
        """The scenario repeat ``repeat`` trains: itself, or with ``measure.seed_per_repeat`` its seeds moved by
        ``repeat`` (train.seed, and model.seed when the weights are drawn at random). Hashes and the sweep stay the
        scenario's own; only the worker and the checkpoint it loads see the moved seeds."""
        if not self.measure.seed_per_repeat or repeat == 0:
            return self
        model = self.model
        if model.weights == "random":
            model = model.model_copy(update={"seed": (model.seed + repeat) % (MAX_SEED + 1)})
        train = self.train.model_copy(update={"seed": (self.train.seed + repeat) % (MAX_SEED + 1)})
        return self.model_copy(update={"model": model, "train": train})

    @property
    def tokens_per_step_max(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.data.seq_len


# ----------------------------------------------------------------------------------------------------------------
# loading with line numbers (reading and parsing: harness.spec.yamlsafe)


# fields tunebench sets on a loaded scenario, never read from the file
INTERNAL_FIELDS = ("source_path",)


def _normalise_frameworks(raw: dict) -> None:
    """Accept `frameworks: [hf, {name: trl, overrides: {...}}]` as well as the long form."""
    fws = raw.get("frameworks")
    if isinstance(fws, list):
        raw["frameworks"] = [{"name": f} if isinstance(f, str) else f for f in fws]


def _yaml_error(e: yamlsafe.YamlError, source: str) -> ScenarioError:
    return ScenarioError(_capped([f"{source}:{line}: {dotted(loc)}: {reason}" for line, loc, reason in e.problems]))


def parse_scenario(text: str, source: str = "<string>", deep: bool = True) -> Scenario:
    """Parse and validate scenario YAML text.

    Args:
        text: the YAML document.
        source: file name used in error messages.
        deep: also open what the scenario names (data file, local checkpoint, eval tasks: harness.spec.checks);
            off for a stored scenario rebuilt in a worker, which its sweep checked when it started.

    Returns:
        The validated :class:`Scenario`; its :attr:`Scenario.notes` say what validation noticed.

    Raises:
        ScenarioError: with one ``source:line: key: reason`` line per problem.
    """
    try:
        raw, lines = yamlsafe.load(text)
    except yamlsafe.YamlError as e:
        raise _yaml_error(e, source) from None
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else got_text(raw)
        raise ScenarioError([f"{source}:1: <top>: a scenario is a YAML mapping (version, name, model, method, data, "
                             f"train, frameworks, ...), got {got}"])
    _normalise_frameworks(raw)
    problems: list[str] = []
    if "version" in raw and raw["version"] != SCHEMA_VERSION:
        problems.append(f"{source}:{line_of(lines, ('version',))}: version: unsupported schema version "
                        f"{yamlsafe.short_repr(raw['version'])}; this tunebench reads version {SCHEMA_VERSION}")
    problems += [f"{source}:{line_of(lines, (key,))}: {key}: unknown key (set by tunebench, not by a scenario file)"
                 for key in INTERNAL_FIELDS if key in raw]
    try:
        sc = Scenario.model_validate({k: v for k, v in raw.items() if k not in INTERNAL_FIELDS})
    except ValidationError as e:
        problems += schema_problems(e, raw, lines, source, Scenario,
                                    {"frameworks": "a framework name or a mapping (name, label, overrides, timeout_s)"})
        raise ScenarioError(_capped(problems)) from None
    if problems:
        raise ScenarioError(problems)
    problems += _cross_checks(sc, lines, source)
    found = checks.check(sc, source, deep=deep)
    problems += [f"{source}:{line_of(lines, p.loc)}: {dotted(p.shown or p.loc)}: {p.reason}"
                 for p in found.problems]
    if problems:
        raise ScenarioError(_capped(problems))
    sc.source_path = source
    sc._notes = found.notes
    return sc


def _capped(problems: list[str]) -> list[str]:
    """The first :data:`MAX_PROBLEMS` problems and how many more there are."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]


def _cross_checks(sc: Scenario, lines: dict, source: str) -> list[str]:
    """Rules that span sections: model limits, device, frameworks and their overrides."""
    out: list[str] = []

    def bad(loc: tuple, msg: str):
        out.append(f"{source}:{line_of(lines, loc)}: {dotted(loc)}: {msg}")

    if sc.model.preset is not None:
        try:
            preset = models.get_preset(sc.model.preset)
        except KeyError as e:
            bad(("model", "preset"), e.args[0])
            preset = None
        if preset is not None and sc.data.seq_len > preset.max_position_embeddings:
            bad(("data", "seq_len"), f"{sc.data.seq_len} is beyond the model's maximum "
                f"({preset.max_position_embeddings} for {preset.name})")
        if preset is not None and sc.method.target_modules != "all-linear":
            not_linear = [t for t in sc.method.target_modules if t not in preset.linear_modules]
            if not_linear:
                bad(("method", "target_modules"), f"{not_linear} are not linear modules of {preset.name} "
                    f"(it has {list(preset.linear_modules)})")
    elif (quantised := _prequantized(sc.model.weights)) and sc.method.kind != "qlora":
        bad(("method", "kind"), f"{sc.method.kind}: the checkpoint in model.weights is bitsandbytes-quantised "
            f"({quantised}); train it with method kind qlora")
    if sc.method.kind == "qlora" and sc.hardware.device == "cpu":
        bad(("method", "kind"), "qlora needs bitsandbytes 4-bit kernels on a GPU; use hardware.device: cuda, "
            "or method lora on cpu")
    if sc.hardware.device == "cpu" and sc.model.dtype == "float16":
        bad(("model", "dtype"), "float16 training on cpu is not supported; use float32 or bfloat16")
    for loc, reason in checks.strategy_problems(sc):
        bad(loc, reason)
    if sc.hardware.memory_budget_gib is not None and sc.hardware.device == "cpu":
        for fw in sc.frameworks:
            key = registry.info(fw.name).extra.get("simulated_memory") if fw.name in registry.names() else None
            if not (key and fw.overrides.get(key)):
                bad(("hardware", "memory_budget_gib"), f"a memory budget needs device cuda ({fw.key}): a cpu has no "
                    "per-process cap PyTorch honours (RLIMIT_AS bounds address space, not memory used)")
                break
    if sc.data.lengths == "uniform" and sc.data.source != "synthetic":
        bad(("data", "lengths"), "lengths applies to synthetic data; jsonl samples have their own lengths")
    if sc.data.source == "jsonl" and sc.data.path and not resolve_path(sc.data.path, source).exists():
        bad(("data", "path"), f"file {sc.data.path!r} not found (relative paths are relative to the scenario file)")
    seen = set()
    for i, fw in enumerate(sc.frameworks):
        if fw.key in seen:
            bad(("frameworks", i), f"framework {fw.key!r} listed twice (give one a `label`)")
        seen.add(fw.key)
        if fw.name not in registry.names():
            bad(("frameworks", i), unknown("framework", fw.name, registry.names()))
            continue
        info = registry.info(fw.name)
        why = info.cannot_run(sc)
        if why:
            bad(("frameworks", i), f"{fw.name} cannot run this scenario: {why}")
        # the row is named by its label (or adapter): easier to find in the file than frameworks[i]
        for loc, reason in info.check_overrides(fw.overrides, sc):
            out.append(f"{source}:{line_of(lines, ('frameworks', i, 'overrides', *loc))}: "
                       f"{dotted(('frameworks', fw.key, 'overrides', *loc))}: {reason}")
    if not sc.frameworks:
        bad(("frameworks",), "name at least one framework")
    return out


def _prequantized(weights: str) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` if a local checkpoint's config.json says its weights are bitsandbytes-quantised."""
    if not (Path(weights) / "config.json").is_file():
        return None
    try:
        q = models.load_config_dict(weights).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):  # AttributeError: config.json holds no JSON object
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        return None
    return "8-bit" if q.get("load_in_8bit") or q.get("_load_in_8bit") else "4-bit"


def data_path(sc: Scenario) -> Path:
    """Absolute path of a jsonl data file (relative paths resolve against the scenario file, then the cwd)."""
    return resolve_path(sc.data.path, sc.source_path)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises :class:`ScenarioError`."""
    path = Path(path)
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise ScenarioError([f"{path}:0: <file>: {getattr(e, 'strerror', None) or e}"]) from None
    if not exists:
        raise ScenarioError([f"{path}:0: <file>: no such file"])
    try:
        text = yamlsafe.read_text(path)
    except yamlsafe.YamlError as e:
        raise _yaml_error(e, str(path)) from None
    sc = parse_scenario(text, str(path))
    sc.source_path = str(path.resolve())  # workers run elsewhere: relative data paths must still resolve
    return sc


def scenario_from_dict(d: dict, source: str = "<resolved>") -> Scenario:
    """Rebuild a scenario from its resolved dict (as stored in results); what it names outside itself is not
    opened again (``deep=False``)."""
    return parse_scenario(yaml.safe_dump(d, sort_keys=False), source, deep=False)
