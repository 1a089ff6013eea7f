"""The typed result of one run (results schema version 2): what ``runs/<framework>-r<k>.json`` holds.

One model, read by everything above the store (analysis, reporting, compare) as attributes, so a metric has
one name everywhere (``run.metrics.tokens_per_s``) and no consumer renames or re-parses it. Units are in the
names (``_s`` seconds, ``_gib`` GiB, ``_per_s`` rates); a value that does not apply (GPU memory on a CPU, MFU
without a peak) is ``None``, never 0.

Sections of a :class:`RunResult`:

- identity: ``run_id``, ``scenario``, ``scenario_hash``, ``settings_hash``, ``framework`` (the row's label),
  ``adapter``, ``repeat``, ``status`` (:data:`STATUSES`), ``reason`` (why, when not ok), ``valid`` and
  ``invalid_reasons`` (effective settings against the scenario), ``warnings`` (what makes valid figures less
  trustworthy, e.g. a throttled GPU);
- what ran: ``device``, ``overrides``, ``checkpoint``, ``dataset_sha256_16``, ``dataset`` (the dataset file's
  record), ``expected`` and ``effective`` settings (keys of :mod:`harness.measuring.effective`),
  ``framework_version``, ``env`` (the tool environment the worker ran in, see :mod:`harness.running.envs`),
  ``native_config``, ``output_dir``, ``extra`` (adapter notes: how it fed its tool, the rerun command);
- measurement: :class:`Metrics`, per-step records (:class:`Step`), the evaluation (:class:`EvalResult`), the
  reward accuracy on held-out pairs of a preference objective (:class:`RewardEval`);
- the machine: :class:`Environment` (:func:`harness.measuring.environment.capture` in the worker);
- bookkeeping: ``launched_at`` / ``started_at`` / ``first_step_at`` / ``last_step_at`` / ``finished_at`` (epoch
  s), ``load_s``, ``wall_s``, ``exit_code``, ``log``, ``traceback``, ``previous_attempts`` (failed attempts set
  aside by ``run --retry-failed``).

Version 2 is version 1 made explicit: every key is present (``null`` where it does not apply or was not
recorded), the types are checked when a result is written, and ``adapter`` is always named.
:mod:`harness.storing.migrate` reads version 1 files into it.

Every section keeps keys this model does not name (``model_extra``): a field a writer adds before the schema
names it is stored, not rejected, because a run measured for ten minutes on a GPU must never be lost to a
schema check. For the same reason ``status`` is any string; :data:`STATUSES` lists the ones writers use.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from harness.measuring.telemetry import throttle_flags
from harness.measuring.trained import STATUS_DIVERGED

RESULT_SCHEMA_VERSION = 2

STATUS_OK = "ok"
STATUS_ERROR = "error"  # the tool raised; ``reason`` holds its message
STATUS_OOM = "oom"  # out of memory: a measurement of the framework, not retried
STATUS_TIMEOUT = "timeout"
STATUS_CRASHED = "crashed"  # the worker died without a result (signal, exit code)
STATUS_UNAVAILABLE = "unavailable"  # not runnable here (no CUDA, environment not created)
# STATUS_DIVERGED ("diverged": a recorded loss was NaN or infinite) is defined where it is decided, in the lower
# layer harness.measuring.trained
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_OOM, STATUS_TIMEOUT, STATUS_CRASHED, STATUS_UNAVAILABLE, STATUS_DIVERGED)


def run_key(framework: str, repeat: int) -> str:
    """``<framework>-r<repeat>``: a run's name in the sweep plan and its file name in ``runs/``."""
    return f"{framework}-r{repeat}"


class _Open(BaseModel):
    """A section that keeps the keys it does not name (see the module docstring)."""

    model_config = ConfigDict(extra="allow")


class Metrics(_Open):
    """A run's measurements (:func:`harness.measuring.meter.summarise`, ``StepMeter.finish`` and the worker's MFU).

    Throughput counts non-padding input tokens from each batch (never a tool's own figure) over the measured
    optimizer steps (warmup left out). Peak memory three ways: NVML per-process (sampled) and device total,
    torch's allocator peaks; host RSS of the worker.
    """

    tokens_per_s: float | None = None
    tokens_per_s_median_step: float | None = None
    tokens_per_s_p10_step: float | None = None
    tokens_per_s_p90_step: float | None = None
    loss_tokens_per_s: float | None = None
    samples_per_s: float | None = None
    step_s_median: float | None = None
    step_s_mean: float | None = None
    step_s_p10: float | None = None
    step_s_p90: float | None = None
    step_s_min: float | None = None
    step_s_max: float | None = None
    steps_total: int | None = None
    steps_measured: int | None = None
    warmup_steps: int | None = None
    tokens_measured: int | None = None
    tokens_per_step_mean: float | None = None
    padding_fraction: float | None = None
    measured_s: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    peak_vram_nvml_gib: float | None = None  # NVML, the worker process, sampled in the background
    peak_vram_device_gib: float | None = None  # NVML, everything on the device
    vram_device_before_gib: float | None = None
    nvml_samples: int | None = None
    nvml_sampler_busy_pct: float | None = None  # the NVML sampling's busy time over the time it ran, percent
    nvml_sampler: str | None = None  # where it sampled: "process" (a monitor beside the run) or "thread"
    nvml_sampler_note: str | None = None  # why a thread, when the monitor process could not start
    nvml_error: str | None = None
    peak_alloc_gib: float | None = None  # torch.cuda.max_memory_allocated
    peak_reserved_gib: float | None = None  # torch.cuda.max_memory_reserved
    peak_rss_gib: float | None = None
    mfu: float | None = None  # fraction of peak_tflops (harness.measuring.flops convention)
    model_tflops: float | None = None
    peak_tflops: float | None = None
    peak_tflops_source: str | None = None
    matmul_params: int | None = None
    mfu_error: str | None = None
    foreign_gpu_processes: list[dict[str, Any]] | None = None  # others on the GPU while measuring: pid, max_gib
    energy_j: float | None = None  # NVML total-energy counter over the measured steps
    joules_per_token: float | None = None
    avg_power_w: float | None = None
    energy_error: str | None = None
    throttled: bool | None = None  # a slowing reason was seen while measuring (telemetry.SLOWING)
    power_capped: bool | None = None  # the software power cap was seen (normal under a dense load)
    throttle_reasons_seen: list[str] | None = None
    telemetry: dict[str, Any] | None = None  # clocks, power, temperature at start, at peak power, at the end
    # a multi-GPU run (harness.running.ranks): its processes, and each GPU's figure where the fields above hold the
    # largest (memory) or the sum (energy, power) over the GPUs; None for a one-GPU run
    world_size: int | None = None
    peak_vram_nvml_gib_per_gpu: list[float | None] | None = None
    peak_vram_device_gib_per_gpu: list[float | None] | None = None
    peak_alloc_gib_per_gpu: list[float | None] | None = None
    peak_reserved_gib_per_gpu: list[float | None] | None = None
    vram_device_before_gib_per_gpu: list[float | None] | None = None
    peak_rss_gib_per_gpu: list[float | None] | None = None
    energy_j_per_gpu: list[float | None] | None = None
    avg_power_w_per_gpu: list[float | None] | None = None

    @model_validator(mode="after")
    def _flags_from_reasons(self) -> Metrics:
        """``throttled`` and ``power_capped`` follow from the recorded NVML reasons by the current rule, so a run
        stored under an earlier rule reads the same as one measured now (the reasons are the raw record)."""
        if self.throttle_reasons_seen is not None:
            for key, value in throttle_flags(self.throttle_reasons_seen).items():
                setattr(self, key, value)
        return self


class Step(_Open):
    """One optimizer step as the meter recorded it (tokens counted by the harness from the batch)."""

    step: int
    step_s: float | None = None
    measured: bool = False  # False for warmup steps
    loss: float | None = None
    tokens: int | None = None
    loss_tokens: int | None = None
    samples: int | None = None
    padded_tokens: int | None = None
    max_len: int | None = None
    micro_batches: int | None = None
    rows: int | None = None
    ctx_tokens_sq: int | None = None
    max_sample_len: int | None = None
    samples_per_mb: int | None = None


class ForeignProcess(_Open):
    """A process of someone else found on the GPU (measurements may be disturbed)."""

    gpu: int | None = None
    pid: int | None = None
    used_gib: float | None = None


class Environment(_Open):
    """What a run (or a sweep, ``environment.json``) was measured on."""

    python: str | None = None
    executable: str | None = None
    platform: str | None = None
    hostname: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    libraries: dict[str, str | None] = Field(default_factory=dict)
    variables: dict[str, str] | None = None  # knob environment variables; None: not recorded with this result
    git_sha: str | None = None
    git_dirty: bool | None = None
    gpu_name: str | None = None
    gpu_count: int | None = None
    driver: str | None = None
    gpu_memory_gib: float | None = None
    gpu_uuids: list[str] | None = None  # NVML's card UUIDs; None: not recorded (no GPU, or stored before)
    foreign_gpu_processes: list[ForeignProcess] = Field(default_factory=list)
    nvml_error: str | None = None
    cuda_driver_version: int | None = None
    torch_cuda: str | None = None
    torch_cuda_available: bool | None = None
    cudnn: int | None = None
    torch_gpu_name: str | None = None

    def code(self) -> str | None:
        """The commit measured from, short, with ``+dirty`` for uncommitted changes; None where not recorded."""
        return self.git_sha[:7] + ("+dirty" if self.git_dirty else "") if self.git_sha else None


class EvalResult(_Open):
    """The evaluator's result (the contract of :mod:`harness.analysis.evaluate`)."""

    status: str = STATUS_OK
    error: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # "<task>/<metric>": value, the trained output
    baseline_metrics: dict[str, Any] | None = None  # the same, untrained checkpoint
    stderr: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    target: dict[str, float] | None = None  # eval.target of the scenario; None: no time to target sought
    time_to_target_s: float | None = None
    lm_eval_version: str | None = None
    warmup_s: float | None = None
    eval_s: float | None = None
    baseline_cached: bool | None = None
    traceback: str | None = None  # where the evaluator raised (harness.analysis.entry)

    @property
    def ok(self) -> bool:
        """The evaluation succeeded."""
        return self.status == STATUS_OK


class RewardEval(_Open):
    """Reward accuracy on held-out pairs (the contract of :mod:`harness.analysis.reward`)."""

    status: str = STATUS_OK
    error: str | None = None
    pairs: int | None = None
    beta: float | None = None
    reward_accuracy: float | None = None  # r(chosen) > r(rejected), r = beta * log(pi / pi_ref)
    reward_margin: float | None = None  # mean r(chosen) - r(rejected)
    likelihood_accuracy: float | None = None  # log pi(chosen) > log pi(rejected), the trained output
    baseline_likelihood_accuracy: float | None = None  # the same, the untrained checkpoint
    traceback: str | None = None  # where the scoring raised (harness.analysis.entry)

    @property
    def ok(self) -> bool:
        """The scoring succeeded."""
        return self.status == STATUS_OK


class Attempt(_Open):
    """A failed attempt set aside by ``run --retry-failed`` (its JSON kept under ``runs/attempts/``)."""

    file: str | None = None
    status: str | None = None
    reason: str | None = None


class RunResult(_Open):
    """One run: scenario x framework x repeat (sections in the module docstring)."""

    schema_version: int = RESULT_SCHEMA_VERSION
    # identity
    run_id: str | None = None
    scenario: str
    scenario_hash: str | None = None
    settings_hash: str | None = None  # the shared settings and this framework's own row only
    framework: str
    adapter: str | None = None
    repeat: int
    status: str  # one of STATUSES
    reason: str | None = None
    valid: bool = False
    invalid_reasons: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)  # what makes valid figures less trustworthy (throttling)
    # what ran
    device: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    dataset_sha256_16: str | None = None
    dataset: dict[str, Any] | None = None  # the sweep's dataset.meta.json: format, rows, passes, rows left out, ...
    expected: dict[str, Any] = Field(default_factory=dict)
    effective: dict[str, Any] = Field(default_factory=dict)
    seeds: dict[str, int] = Field(default_factory=dict)  # {"train": .., "model": ..} this repeat trained with
    framework_version: str | None = None
    env: str | None = None
    native_config: str | None = None
    output_dir: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    # measurement
    metrics: Metrics = Field(default_factory=Metrics)
    steps: list[Step] = Field(default_factory=list)
    eval: EvalResult | None = None
    reward_eval: RewardEval | None = None  # objective.eval_pairs: reward accuracy of the saved output
    environment: Environment | None = None  # None: the worker never ran (e.g. unavailable)
    # bookkeeping
    launched_at: float | None = None  # epoch s: the runner launched the worker (wall_s runs from here to its exit)
    started_at: float | None = None
    finished_at: float | None = None
    load_s: float | None = None
    # epoch s of the first step's begin and the last step's end: with started_at, finished_at and wall_s, where a
    # run's time outside its steps goes (start-up and loading before, saving after)
    first_step_at: float | None = None
    last_step_at: float | None = None
    wall_s: float | None = None
    exit_code: int | None = None
    log: str | None = None
    traceback: str | None = None
    previous_attempts: list[Attempt] = Field(default_factory=list)

    @field_validator("metrics", "overrides", "expected", "effective", "extra", "steps", "invalid_reasons",
                     "warnings", "previous_attempts", mode="before")
    @classmethod
    def _null_is_empty(cls, v: Any, info: ValidationInfo) -> Any:
        # writers put null where nothing was produced (a timed-out worker's metrics): the same as empty
        if v is not None:
            return v
        return [] if info.field_name in ("steps", "invalid_reasons", "warnings", "previous_attempts") else {}

    @property
    def ok(self) -> bool:
        """Finished with a result (it may still be invalid)."""
        return self.status == STATUS_OK

    @property
    def key(self) -> str:
        """The run's name in the sweep plan and its file name in ``runs/`` (:func:`run_key`)."""
        return run_key(self.framework, self.repeat)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON-ready except for values ``json.dumps(default=str)`` handles)."""
        return self.model_dump()
