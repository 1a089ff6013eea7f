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

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ScenarioError(Exception):
    """A scenario that cannot run; ``str()`` gives one ``file:line: key: reason`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    preset: str | None = None  # architecture preset name (scenarios/presets/<name>.yaml)
    weights: str = "random"  # "random", or a local checkpoint path / hub id
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    seed: int = 0  # seed of the random weights
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

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
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
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

    def resolved_targets(self) -> list[str]:
        return list(LINEAR_MODULES) if self.target_modules == "all-linear" else list(self.target_modules)


class DataSpec(_Strict):
    source: Literal["synthetic", "jsonl"] = "synthetic"
    path: str | None = None  # jsonl only
    format: Literal["alpaca", "messages", "sharegpt", "text"] | None = None  # jsonl only; guessed when absent
    seq_len: int = Field(ge=8)
    # synthetic: every sample seq_len long, or uniform in [min_len, seq_len]
    lengths: Literal["fixed", "uniform"] = "fixed"
    min_len: int | None = Field(None, ge=2)
    num_samples: int | None = Field(None, ge=1)  # default: exactly what the steps consume
    packing: bool = False  # concatenate samples into seq_len rows (attention kept within each sample where supported)
    seed: int = 0
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
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(ge=1)  # optimizer steps
    warmup_steps: int = Field(2, ge=0)  # first optimizer steps left out of timing (not an LR warmup)
    lr: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps}): "
                             "no step would be timed")
        return self


class HardwareSpec(_Strict):
    device: Literal["cuda", "cpu"] = "cuda"
    gpus: int = Field(1, ge=1)


class FrameworkSpec(_Strict):
    name: str  # adapter name (python -m harness list)
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")  # to run one adapter twice, e.g. hf-eager
    overrides: dict[str, Any] = Field(default_factory=dict)  # tool-specific settings passed to the adapter
    timeout_s: float | None = Field(None, gt=0)

    @property
    def key(self) -> str:
        """The framework's name in results and reports (its label, else the adapter name)."""
        return self.label or self.name


class MeasureSpec(_Strict):
    repeats: int = Field(1, ge=1)
    memory_interval_ms: float = Field(10, gt=0, le=10_000)
    timeout_s: float = Field(1800, gt=0)  # per run
    baseline: str = "hf"  # framework every speed-up is measured against
    peak_tflops: float | None = Field(None, gt=0)  # override the GPU's bf16 dense peak used for MFU


class EvalSpec(_Strict):
    """Quality evaluation (lm-eval) of what each framework trained; empty by default."""

    tasks: list[str] = Field(default_factory=list)  # lm-eval task names (local ones: scenarios/tasks/)
    limit: int | None = Field(None, ge=1)  # documents per task (None: all)
    every_steps: int | None = Field(None, ge=1)  # evaluate during training (time-to-target)
    target: dict[str, float] = Field(default_factory=dict)  # "<task>/<metric>" -> value for time-to-target
    batch_size: int = Field(16, ge=1)
    # loss parity against measure.baseline (harness.analysis.parity): None = the default for the training dtype
    parity_atol: float | None = Field(None, ge=0)
    parity_rtol: float | None = Field(None, ge=0)

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


class Scenario(_Strict):
    version: int
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSpec
    method: MethodSpec
    data: DataSpec
    train: TrainSpec
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    frameworks: list[FrameworkSpec]
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    # where it came from (not part of the YAML)
    source_path: str | None = Field(None, exclude=True)

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
        return _hash(row_settings(self.to_dict(), framework))

    @property
    def tokens_per_step_max(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.data.seq_len


# ----------------------------------------------------------------------------------------------------------------
# loading with line numbers


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, keyed by its dotted path."""


def _compose_lines(text: str) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    node = yaml.compose(text, Loader=_LineLoader)

    def walk(n, path: tuple):
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
                lines[path + (key,)] = k.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return lines


def _line_for(lines: dict[tuple, int], loc: tuple) -> int:
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _normalise_frameworks(raw: dict) -> None:
    """Accept `frameworks: [hf, {name: trl, overrides: {...}}]` as well as the long form."""
    fws = raw.get("frameworks")
    if isinstance(fws, list):
        raw["frameworks"] = [{"name": f} if isinstance(f, str) else f for f in fws]


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate scenario YAML text.

    Args:
        text: the YAML document.
        source: file name used in error messages.

    Returns:
        The validated :class:`Scenario`.

    Raises:
        ScenarioError: with one ``source:line: key: reason`` line per problem.
    """
    try:
        raw = yaml.safe_load(text)
        lines = _compose_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ScenarioError([f"{source}:{line}: <yaml>: {getattr(e, 'problem', None) or e}"]) from None
    if not isinstance(raw, dict):
        raise ScenarioError([f"{source}:1: <top>: a scenario is a YAML mapping, got {type(raw).__name__}"])
    _normalise_frameworks(raw)
    problems: list[str] = []
    if "version" in raw and raw["version"] != SCHEMA_VERSION:
        problems.append(f"{source}:{_line_for(lines, ('version',))}: version: unsupported schema version "
                        f"{raw['version']!r}; this tunebench reads version {SCHEMA_VERSION}")
    try:
        sc = Scenario.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-after")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                parent = _fields_at(loc[:-1])
                hint = difflib.get_close_matches(str(loc[-1]), parent, n=1)
                msg = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
                if parent:
                    msg += f" (allowed: {', '.join(parent)})"
            problems.append(f"{source}:{_line_for(lines, loc)}: {_fmt_loc(loc)}: {msg}")
        raise ScenarioError(problems) from None
    if problems:
        raise ScenarioError(problems)
    problems += _cross_checks(sc, lines, source)
    if problems:
        raise ScenarioError(problems)
    sc.source_path = source
    return sc


def _fields_at(loc: tuple) -> list[str]:
    """Field names allowed at a location of the scenario tree (for 'did you mean')."""
    model: type[BaseModel] | None = Scenario
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return list(model.model_fields) if model else []


def _model_of(annotation) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _cross_checks(sc: Scenario, lines: dict, source: str) -> list[str]:
    """Rules that span sections: model limits, device, frameworks."""
    from adapters_for_tools import registry
    from harness.common.names import unknown
    from harness.inputs import models

    out: list[str] = []

    def bad(loc: tuple, msg: str):
        out.append(f"{source}:{_line_for(lines, loc)}: {_fmt_loc(loc)}: {msg}")

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
            unknown = [t for t in sc.method.target_modules if t not in preset.linear_modules]
            if unknown:
                bad(("method", "target_modules"), f"{unknown} are not linear modules of {preset.name} "
                    f"(it has {list(preset.linear_modules)})")
    elif sc.model.weights.startswith((".", "/")) and not Path(sc.model.weights).exists():
        bad(("model", "weights"), f"checkpoint path {sc.model.weights!r} does not exist")
    elif (quantised := _prequantized(sc.model.weights)) and sc.method.kind != "qlora":
        bad(("method", "kind"), f"{sc.method.kind}: the checkpoint in model.weights is bitsandbytes-quantised "
            f"({quantised}); train it with method kind qlora")
    if sc.method.kind == "qlora" and sc.hardware.device == "cpu":
        bad(("method", "kind"), "qlora needs bitsandbytes 4-bit kernels on a GPU; use hardware.device: cuda, "
            "or method lora on cpu")
    if sc.hardware.device == "cpu" and sc.model.dtype == "float16":
        bad(("model", "dtype"), "float16 training on cpu is not supported; use float32 or bfloat16")
    if sc.hardware.device == "cpu" and sc.hardware.gpus != 1:
        bad(("hardware", "gpus"), "gpus applies to device cuda only")
    if sc.data.lengths == "uniform" and sc.data.source != "synthetic":
        bad(("data", "lengths"), "lengths applies to synthetic data; jsonl samples have their own lengths")
    if sc.data.source == "jsonl" and sc.data.path and not _data_path(sc, source).exists():
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
    if not sc.frameworks:
        bad(("frameworks",), "name at least one framework")
    return out


def _prequantized(weights: str) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` if a local checkpoint's config.json says its weights are bitsandbytes-quantised."""
    from harness.inputs.models import load_config_dict

    if not (Path(weights) / "config.json").is_file():
        return None
    try:
        q = load_config_dict(weights).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if q.get("quant_method") != "bitsandbytes":
        return None
    return "8-bit" if q.get("load_in_8bit") or q.get("_load_in_8bit") else "4-bit"


def _data_path(sc: Scenario, source: str) -> Path:
    p = Path(sc.data.path or "")
    if not p.is_absolute() and source and not source.startswith("<"):
        cand = Path(source).parent / p
        if cand.exists():
            return cand
    return p


def data_path(sc: Scenario) -> Path:
    """Absolute path of a jsonl data file (relative paths resolve against the scenario file, then the cwd)."""
    return _data_path(sc, sc.source_path or "").resolve()


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises :class:`ScenarioError`."""
    path = Path(path)
    if not path.exists():
        raise ScenarioError([f"{path}:0: <file>: no such file"])
    sc = parse_scenario(path.read_text(), str(path))
    sc.source_path = str(path.resolve())  # workers run elsewhere: relative data paths must still resolve
    return sc


def scenario_from_dict(d: dict, source: str = "<resolved>") -> Scenario:
    """Rebuild a scenario from its resolved dict (as stored in results)."""
    return parse_scenario(yaml.safe_dump(d, sort_keys=False), source)
